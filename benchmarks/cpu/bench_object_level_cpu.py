"""One weight per sample on the CPU: a GroupWeights iteration against the same step in plain torch ops.

Per n_groups and mode: ``weighted_loss(losses, ids).backward()`` + ``step()`` at batch --batch, the two
implementations interleaved block by block (--rounds blocks of --iters iterations each); median us per
iteration and the median of the per-round ratios (plain / GroupWeights). The plain step is the one of
``benchmarks/pi/bench_object_level.py`` (float32 torch ops); GroupWeights computes the step in float64 as
the reference does (docs/algorithm.md sec. 4), through the C++ extension when it is built.

Run: ``python3 benchmarks/cpu/bench_object_level_cpu.py --out benchmarks/results/object_level_cpu.json``"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import also_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(BENCH, "pi"))
sys.path.insert(0, os.path.join(BENCH, "cpu"))
from bench_object_level import PI_DECAY, PI_LR, PlainStep  # noqa: E402
from bench_cpu import write_cpu_record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        ids = torch.randint(0, n, (args.batch,))
        losses = (torch.rand(args.batch) * 3).requires_grad_()
        iters = 20 if n <= 10 ** 6 else 5
        for mode in ("descent-ascent", "optimistic"):
            impls = {"GroupWeights": also_fused.GroupWeights(n, batch_size=args.batch, pi_lr=PI_LR, pi_decay=PI_DECAY,
                                                             mode=mode),
                     "plain torch": PlainStep(n, args.batch, mode, device="cpu")}
            for impl in impls.values():
                for _ in range(2):
                    impl.weighted_loss(losses, ids).backward()
                    impl.step()
            times = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, impl in impls.items():
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        impl.weighted_loss(losses, ids).backward()
                        impl.step()
                    times[name].append((time.perf_counter() - t0) / iters * 1e6)
            row = dict(n_groups=n, mode=mode, batch=args.batch,
                       **{name: dict(us_per_iteration=statistics.median(us), per_round=us) for name, us in times.items()},
                       speed_vs_plain=statistics.median(p / g for p, g in zip(times["plain torch"], times["GroupWeights"])))
            rows.append(row)
            print(n, mode, {k: round(v["us_per_iteration"]) for k, v in row.items() if isinstance(v, dict)},
                  "speed %.2f" % row["speed_vs_plain"], flush=True)
    if args.out:
        write_cpu_record(args.out, rounds=args.rounds, rows=rows)


if __name__ == "__main__":
    main()
