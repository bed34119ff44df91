"""How far apart torch's own Adam/AdamW implementations and also_fused's drift in 100 fp32 steps.

Prints the relative parameter difference after 100 steps for every pair, so that a tolerance for
the drop-ins can be read against torch's own spread (single-tensor vs foreach vs fused).
Run: ``python3 benchmarks/theta/parity_check.py`` (CUDA); prints, writes no file.
"""
import torch

import also_fused


def run(make, steps=100, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(7, 5), (13,), (1,), (3, 4, 2), (1000, 33)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


for name in ("Adam", "AdamW"):
    impls = {
        "torch single": lambda ps: getattr(torch.optim, name)(ps, foreach=False),
        "torch foreach": lambda ps: getattr(torch.optim, name)(ps, foreach=True),
        "torch fused": lambda ps: getattr(torch.optim, name)(ps, fused=True),
        "also_fused triton": lambda ps: getattr(also_fused, name)(ps, backend="triton"),
    }
    out = {k: run(v) for k, v in impls.items()}
    ref = out["torch single"]
    for k, v in out.items():
        print(f"{name:6s} {k:18s} rel diff vs torch single: {float((v - ref).norm() / ref.norm()):.2e}")
