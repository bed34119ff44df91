"""The sort-free cutoff kernel's shape (kernels/mass_search.py CONFIG, LARGE_CONFIG) against its time, on a GPU.

For each --sizes n (pi a softmax of random logits) and each config: the whole cutoff search (median of
--repeats calls, each ending in its host read) and one pass of the kernel (``triton.testing.do_bench``,
the 16 bounds of a first pass), beside ``torch.sort`` + float64 cumsum + searchsorted (the sorted path's
cutoff) and a copy of pi (the bandwidth the pass could reach). Every config's cutoff is checked against
the sorted one. Writes JSON lines to --out.

Run: ``python3 benchmarks/explore/explore_mass_search.py --out mass_search.jsonl`` (CUDA)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import triton.testing

from also_fused.kernels import mass_search

VARIANTS = [dict(sub=256, rows=64, k=16, warps=4, stages=1), dict(sub=256, rows=64, k=16, warps=4, stages=3),
            dict(sub=512, rows=32, k=16, warps=8, stages=3), dict(sub=256, rows=64, k=32, warps=8, stages=3),
            dict(sub=128, rows=128, k=32, warps=4, stages=3), dict(sub=512, rows=32, k=8, warps=4, stages=3),
            dict(sub=1024, rows=16, k=16, warps=8, stages=2), dict(sub=256, rows=128, k=16, warps=4, stages=4)]


def wall_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e7,1e8")
    parser.add_argument("--threshold", type=float, default=0.999)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="mass_search.jsonl")
    args = parser.parse_args()
    default, default_large = dict(mass_search.CONFIG), dict(mass_search.LARGE_CONFIG)
    with open(args.out, "w") as out:
        for n in [int(float(s)) for s in args.sizes.split(",")]:
            gen = torch.Generator("cuda").manual_seed(0)
            pi = torch.softmax(torch.randn(n, device="cuda", generator=gen), 0)
            threshold = torch.tensor([args.threshold], dtype=torch.float64, device="cuda")

            def sorted_cutoff() -> int:
                sums = torch.cumsum(torch.sort(pi, descending=True)[0].double(), 0)
                return int(torch.searchsorted(sums, threshold)) + 1

            want = sorted_cutoff()
            base = dict(n=n, device=torch.cuda.get_device_name(), torch=torch.__version__,
                        sorted_cutoff_ms=wall_ms(sorted_cutoff, args.repeats),
                        copy_ms=triton.testing.do_bench(lambda: pi.clone()))
            base["copy_gb_s"] = 2 * pi.numel() * 4 / base["copy_ms"] / 1e6
            out.write(json.dumps(base) + "\n")
            print(base, flush=True)
            for config in VARIANTS:
                mass_search.CONFIG.update(config)
                mass_search.LARGE_CONFIG.update(config)
                try:
                    got = mass_search.mass_cutoff(pi, args.threshold)
                    bounds = torch.linspace(0, mass_search._INF_BITS, config["k"], device="cuda").to(torch.int32)
                    row = dict(n=n, config=config, cutoff_equal=got == want,
                               search_ms=wall_ms(lambda: mass_search.mass_cutoff(pi, args.threshold), args.repeats),
                               pass_ms=triton.testing.do_bench(lambda: mass_search._masses(pi, bounds, True)))
                    row["pass_gb_s"] = pi.numel() * 4 / row["pass_ms"] / 1e6
                except Exception as error:  # a config that does not compile is a result too
                    row = dict(n=n, config=config, error=repr(error)[:300])
                finally:
                    mass_search.CONFIG.update(default)
                    mass_search.LARGE_CONFIG.update(default_large)
                out.write(json.dumps(row) + "\n")
                print(row, flush=True)


if __name__ == "__main__":
    main()
