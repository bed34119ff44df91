"""The CPU extension's pi step with the scratch its caller keeps against scratch allocated on every call.

``cpu_fused.pi_update`` takes a ``scratch`` dict (GroupWeights passes its workspace) in which the step keeps its
float64 logits and float32 group sums (12 bytes per group); without it the step allocates them per call. Per
n_groups and number of updates (one: descent-ascent, two: optimistic), the two interleaved block by block
(--rounds blocks); median, min and max us per call, the system CPU time each spent (page faults of fresh
allocations show there) and the ratio of the medians. The results are the same bits either way
(tests/test_cpu_fused.py).

Run: ``python3 benchmarks/cpu/bench_pi_scratch.py --out benchmarks/results/cpu_pi_scratch.json``"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

from also_fused import cpu_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(BENCH, "cpu"))
from bench_cpu import write_cpu_record  # noqa: E402

HYPER = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07)


def system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not cpu_fused.available()[0]:
        raise SystemExit("the C++ extension is not built: " + cpu_fused.available()[1])
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gen = torch.Generator().manual_seed(n)
        pi = torch.softmax(torch.randn(n, generator=gen), 0)
        ids = torch.randint(0, n, (args.batch,), generator=gen)
        losses = torch.rand(args.batch, generator=gen) * 3
        out, mid = torch.empty_like(pi), torch.empty_like(pi)
        calls = 20 if n <= 10 ** 6 else 4
        for second in (None, mid):
            variants = {"kept scratch": {}, "scratch per call": None}
            for scratch in variants.values():
                for _ in range(2):
                    cpu_fused.pi_update(pi, ids, losses, out=out, second_out=second, scratch=scratch, **HYPER)
            times = {name: [] for name in variants}
            system = dict.fromkeys(variants, 0.0)
            for _ in range(args.rounds):
                for name, scratch in variants.items():
                    s0, t0 = system_seconds(), time.perf_counter()
                    for _ in range(calls):
                        cpu_fused.pi_update(pi, ids, losses, out=out, second_out=second, scratch=scratch, **HYPER)
                    times[name].append((time.perf_counter() - t0) / calls * 1e6)
                    system[name] += system_seconds() - s0
            row = dict(n_groups=n, updates=1 if second is None else 2, calls_per_round=calls,
                       **{name: dict(median_us=statistics.median(us), min_us=min(us), max_us=max(us),
                                     system_s=system[name]) for name, us in times.items()})
            row["per_call_over_kept"] = row["scratch per call"]["median_us"] / row["kept scratch"]["median_us"]
            rows.append(row)
            print(n, row["updates"], {name: round(row[name]["median_us"]) for name in variants},
                  "ratio %.2f" % row["per_call_over_kept"], flush=True)
    if args.out:
        write_cpu_record(args.out, rounds=args.rounds, rows=rows)


if __name__ == "__main__":
    main()
