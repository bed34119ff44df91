"""GPU time of one pi step on the single-program path against the many-groups path, by n_groups and batch.

The single program compares every sample id with every group (B x next_pow2(n) comparisons in one
program); the many-groups path (its dense variant, the one chosen at these sizes) spreads the work over many
programs in three launches. The kernels choose by ``SINGLE_PROGRAM_WORK``; here both are forced at every size.
Medians of ``triton.testing.do_bench`` (CUDA events, warm-up), descent-ascent (one update) and optimistic (two)
updates. Writes --out (JSON) and prints a table. Needs CUDA. Run:
``python3 benchmarks/pi/bench_pi_paths.py --out benchmarks/results/pi_paths_<gpu>.json``.
(``results/pi_paths_h200.json`` was measured
before the batch limit existed, with ``SMALL_MAX`` lowered below n for the many-groups column: the same calls.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import triton
from triton.testing import do_bench

from also_fused.kernels import group_pi

HP = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07)


def time_pi_step(n: int, B: int, optimistic: bool, single_program: bool) -> float:
    gen = torch.Generator(device="cuda").manual_seed(n + B)
    pi = torch.rand(n, device="cuda", generator=gen) + 0.1
    pi /= pi.sum()
    ids = torch.randint(0, n, (B,), device="cuda", generator=gen)
    losses = torch.rand(B, device="cuda", generator=gen) * 3
    out, mid = torch.empty_like(pi), torch.empty_like(pi)
    path = "single" if single_program else "dense"
    step = lambda: group_pi.pi_update(pi, ids, losses, **HP, out=out, second_out=mid if optimistic else None,
                                      _path=path)
    return do_bench(step, warmup=50, rep=200, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="300,1000")
    parser.add_argument("--batches", default="64,256,1024,4096,16384,65536")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pi_paths.py needs CUDA")
    records = []
    print("| n_groups | B | mode | single program us | many-groups path us |")
    print("|---|---|---|---|---|")
    for n in map(int, args.groups.split(",")):
        for B in map(int, args.batches.split(",")):
            for optimistic in (False, True):
                single = time_pi_step(n, B, optimistic, True)
                many = time_pi_step(n, B, optimistic, False)
                mode = "optimistic" if optimistic else "descent-ascent"
                records.append(dict(n_groups=n, batch=B, mode=mode, single_program_us=single, many_groups_us=many,
                                    device=torch.cuda.get_device_name(), torch=torch.__version__,
                                    triton=triton.__version__, date=datetime.date.today().isoformat()))
                print(f"| {n} | {B} | {mode} | {single:.1f} | {many:.1f} |", flush=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
