"""Where the host time of ``opt.step()`` goes: cProfile around the optimizer calls of a small training loop.

MLP 512-1024-1024-10 at batch 256 with a cosine lr schedule (the host-bound case of bench_training.py);
the forward and backward run outside the profiler. Prints the mean host us per call and the top entries.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import also_fused


def build(name: str, model: torch.nn.Module):
    if name == "torch AdamW fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if name == "also_fused AdamW":
        return also_fused.AdamW(model.parameters(), lr=1e-4)
    mode = "descent-ascent" if "descent" in name else "optimistic"
    return also_fused.ALSO(model.parameters(), 10, batch_size=256, mode=mode, lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    device = "cuda"
    x = torch.randn(256, 512, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    for name in ("torch AdamW fused", "also_fused AdamW", "ALSO descent-ascent", "ALSO optimistic"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 10)).to(device)
        opt = build(name, model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        prof = cProfile.Profile()
        host = 0.0
        for k in range(args.steps + 20):
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            timed = k >= 20
            if timed:
                prof.enable()
            t0 = time.perf_counter()
            loss = opt.weighted_loss(losses, y) if isinstance(opt, also_fused.ALSO) else None
            t1 = time.perf_counter()
            if timed:
                prof.disable()
            (losses.mean() if loss is None else loss).backward()
            if timed:
                prof.enable()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if timed:
                prof.disable()
                host += (t1 - t0) + (t3 - t2)
            sched.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"=== {name}: {1e6 * host / args.steps:.1f} us host per step (weighted_loss + step, under cProfile)")
        print("\n".join(out.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()
