"""pytest-benchmark suite of one CPU optimizer step: also_fused's reference path beside torch.optim.Adam.

Run with ``make bench-cpu`` (or ``pytest benchmarks/test_bench_cpu.py --benchmark-group-by=param:size``).
Sizes sweep the total parameter count in 30 weight + 30 bias tensors; every implementation sees
the same random non-zero params and gradients. The JSON that pytest-benchmark writes with
``--benchmark-json`` lands next to the other results.
"""
from __future__ import annotations

import pytest
import torch

import also_fused

SIZES = {"1M": 180, "4.7M": 395, "19M": 790}  # square-ish weights: 30 * (w*w + w) params
N_GROUPS, BATCH = 10, 256


def make(width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(30):
        params.append(torch.nn.Parameter(torch.randn(width, width, generator=gen) * 0.02))
        params.append(torch.nn.Parameter(torch.randn(width, generator=gen) * 0.02))
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def step_fn(impl: str, params):
    ids = torch.randint(0, N_GROUPS, (BATCH,), generator=torch.Generator().manual_seed(1))
    losses = torch.rand(BATCH, generator=torch.Generator().manual_seed(2)) + 0.5
    if impl == "torch Adam single-tensor":
        return torch.optim.Adam(params, weight_decay=1e-3, foreach=False).step
    if impl == "torch Adam foreach":
        return torch.optim.Adam(params, weight_decay=1e-3, foreach=True).step
    if impl == "also_fused Adam":
        return also_fused.Adam(params, weight_decay=1e-3, backend="reference").step
    mode, api = impl.split()[-2:]
    opt = also_fused.ALSO(params, N_GROUPS, batch_size=BATCH, mode=mode, backend="reference")
    if api == "closure":
        return lambda: opt.step(lambda pi, scale: (losses, None), ids)

    def loop():
        opt.weighted_loss(losses, ids)
        return opt.step()
    return loop


IMPLS = ["torch Adam single-tensor", "torch Adam foreach", "also_fused Adam",
         "ALSO descent-ascent closure", "ALSO descent-ascent loop", "ALSO optimistic closure", "ALSO optimistic loop"]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, impl, size):
    params = make(SIZES[size])
    step = step_fn(impl, params)
    step()  # warm-up: lazy state allocation
    benchmark.group = f"{size} params"
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in params)
