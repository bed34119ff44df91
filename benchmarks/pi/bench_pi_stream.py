"""The many-groups pi step alone at large n_groups: GPU time of ``pi_update`` (descent-ascent: pi -> pi; optimistic:
pi -> pi and pi_mid) by tile size, programs per SM and software-pipelining stages of the loops over pi, as a fraction of the copy rate measured in the same run.

Bytes the step must move (float32): 12 per group for one update (a read for the normaliser, a read and a write),
20 with the second (one more read and write). CUDA events around --iters calls, median of --rounds blocks.

Run: ``python3 benchmarks/pi/bench_pi_stream.py --sizes 1e7,1e9 --out pi_stream.json`` (CUDA)."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

from also_fused.kernels import group_pi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_object_level import copy_rate  # noqa: E402


def kernel_times(call, iters: int) -> dict[str, float]:
    """GPU microseconds per call of each kernel the step launches (torch.profiler's CUDA activity), by kernel name:
    where the step's time goes between the pass for the normaliser, the write and the torch ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / iters
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e7,1e9")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--blocks", default="2048,4096,8192")
    parser.add_argument("--per-sm", default="2,4,8")
    parser.add_argument("--stages", default="1", help="software-pipelining stages of the loops over pi")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernel-times", action="store_true",
                        help="also the GPU time of each kernel of the step (torch.profiler, --iters calls)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rate = copy_rate()
    hp = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07, log_pi_reg=None)
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        pi = torch.full((n,), 1.0 / n, device="cuda")
        mid = torch.empty_like(pi)
        ids = torch.randint(0, n, (args.batch,), device="cuda")
        losses = torch.rand(args.batch, device="cuda") * 3
        workspace: dict = {}
        for block, per_sm, stages in itertools.product([int(b) for b in args.blocks.split(",")],
                                                       [int(p) for p in args.per_sm.split(",")],
                                                       [int(k) for k in args.stages.split(",")]):
            group_pi._BLOCK_GPU, group_pi._PROGRAMS_PER_SM, group_pi._LOOP_STAGES = block, per_sm, stages
            for second in (False, True):
                def call(pi=pi, mid=mid, second=second) -> None:
                    group_pi.pi_update_checked(pi, ids, losses, out=pi, second_out=mid if second else None,
                                               workspace=workspace, **hp)
                for _ in range(2):
                    call()
                times = []
                for _ in range(args.rounds):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.iters):
                        call()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3 / args.iters)
                kernels = kernel_times(call, args.iters) if args.kernel_times else None
                us = statistics.median(times)
                must = (20 if second else 12) * n
                row = dict(n_groups=n, second=second, block=block, programs_per_sm=per_sm, stages=stages, us=us,
                           us_min=min(times), us_max=max(times), of_copy_rate=must / (us * 1e-6) / rate)
                if kernels is not None:
                    row["kernel_us_per_call"] = kernels
                rows.append(row)
                print(json.dumps(row), flush=True)
        del pi, mid
        torch.cuda.empty_cache()
    record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_rate_bytes_per_s=rate, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
