"""Host time of a tiny model's optimizer calls on the CPU: ``weighted_loss()`` + ``step()`` (ALSO) or ``step()``.

A Linear(8, 4) with fixed gradients and a batch of 16 losses in 4 groups, so that the time is the optimizers'
fixed cost per step (checks, dispatch, the extension's calls), not their arithmetic. also_fused.AdamW, ALSO
descent-ascent and optimistic (loop API, default ``validate=True``), interleaved in blocks of --steps calls,
--rounds rounds; median, min and max us per step. ``--aminmax`` adds the ALSO rows with the host-side value
checks (ids in range, finite losses) read through torch.aminmax instead of the extension's one-call range.
Run: ``python3 benchmarks/cpu/bench_cpu_host.py [--aminmax]``. Writes benchmarks/results/cpu_host_tiny.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import also_fused
from also_fused import cpu_fused

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "cpu_host_tiny.json")
N_GROUPS, BATCH = 4, 16


def build(name: str) -> torch.optim.Optimizer:
    model = torch.nn.Linear(8, 4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if name == "also_fused AdamW":
        return also_fused.AdamW(model.parameters(), lr=1e-3)
    mode = "descent-ascent" if "descent-ascent" in name else "optimistic"
    return also_fused.ALSO(model.parameters(), N_GROUPS, batch_size=BATCH, mode=mode, lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--aminmax", action="store_true", help="also the value checks through torch.aminmax")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["also_fused AdamW", "ALSO descent-ascent", "ALSO optimistic"]
    if args.aminmax:
        names += ["ALSO descent-ascent, checks by torch.aminmax", "ALSO optimistic, checks by torch.aminmax"]
    optimizers = {name: build(name) for name in names}
    losses = torch.rand(BATCH, requires_grad=True)
    ids = torch.randint(0, N_GROUPS, (BATCH,))
    extension_range = cpu_fused.value_range

    def call(name: str, opt: torch.optim.Optimizer) -> None:
        if isinstance(opt, also_fused.ALSO):
            opt.weighted_loss(losses, ids)
        opt.step()

    us: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            cpu_fused.value_range = (lambda values: None) if "aminmax" in name else extension_range
            for _ in range(args.steps // 10):
                call(name, opt)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                call(name, opt)
            us[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    cpu_fused.value_range = extension_range
    records = [dict(impl=name, host_us_median=statistics.median(v), host_us_min=min(v), host_us_max=max(v),
                    rounds=args.rounds, steps=args.steps, extension=cpu_fused.available()[0],
                    cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
               for name, v in us.items()]
    for r in records:
        print(f"{r['impl']:46s} median {r['host_us_median']:6.1f} us  (min {r['host_us_min']:.1f}, "
              f"max {r['host_us_max']:.1f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
