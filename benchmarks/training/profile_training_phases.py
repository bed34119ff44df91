"""Where a training loop's time goes, per optimizer: phase timing and a cProfile of step().

* ``--phases``: the host time of each phase of a step (forward with the objective, backward, opt.step(),
  scheduler step + zero_grad), the GPU time of opt.step() and of the whole step (CUDA events), blocks of
  --steps steps with one synchronize per block, the optimizers interleaved (order reversed every other
  round); medians over --rounds. A loop whose GPU time per step equals its wall time and whose phases'
  host times add up to it is host-bound.
* ``--profile``: cProfile of --profile-steps calls of opt.step() inside the loop (synchronize before
  each), the top functions by own and by cumulative time, and the medians of unprofiled step() calls.

The workloads, optimizers and loop are those of ``bench_training.py``. Writes --out (JSON; the profile as
text beside it). Needs CUDA. Run: ``python3 benchmarks/training/profile_training_phases.py --workload gpt2 --phases
--out benchmarks/results/training_phases_h200.json`` (``--workload resnet50 --profile --out
benchmarks/results/step_profile_resnet50_h200.json``: the profile).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_training as bt  # noqa: E402

PHASES = ("forward", "backward", "step", "finish")


def sync() -> None:
    torch.cuda.synchronize()


def warm_up(impls: list, workload: bt.Workload, device: torch.device, steps: int) -> None:
    for impl in impls:
        for _ in range(steps):
            bt.train_step(impl, workload, device)
    sync()


def timed_phases(impl: bt.Implementation, workload: bt.Workload, device: torch.device, steps: int) -> dict:
    """One block of ``steps`` steps: per-step host ms of each phase, GPU ms of step() and of the whole step."""
    host = dict.fromkeys(PHASES, 0.0)
    events = []
    sync()
    t_block = time.perf_counter()
    for _ in range(steps):
        start, before_step, after_step = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        t0 = time.perf_counter()
        start.record()
        per_sample, group_ids = bt.forward_per_sample(impl, workload, device)
        loss = bt.training_objective(impl, per_sample, group_ids)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        before_step.record()
        impl.opt.step()
        after_step.record()
        t3 = time.perf_counter()
        bt.finish_step(impl)
        t4 = time.perf_counter()
        for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            host[name] += dt
        events.append((start, before_step, after_step))
    sync()
    out = {f"host_ms_{name}": total * 1e3 / steps for name, total in host.items()}
    out["wall_ms"] = (time.perf_counter() - t_block) * 1e3 / steps
    out["gpu_ms_step"] = statistics.median(b.elapsed_time(c) for _, b, c in events)
    out["gpu_ms_total"] = statistics.median(a.elapsed_time(c) for a, _, c in events)
    return out


def run_phases(impls: list, workload: bt.Workload, device: torch.device, rounds: int, steps: int) -> dict:
    per_round = {impl.name: [] for impl in impls}
    for r in range(rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            per_round[impl.name].append(timed_phases(impl, workload, device, steps))
        print(f"  round {r}: " + ", ".join(f"{n} {v[-1]['wall_ms']:.2f} ms" for n, v in per_round.items()), flush=True)
    summary = {name: {key: statistics.median(block[key] for block in blocks) for key in blocks[0]}
               for name, blocks in per_round.items()}
    for name, values in summary.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return dict(median=summary, rounds=per_round)


def profile_step(impl: bt.Implementation, workload: bt.Workload, device: torch.device, n: int) -> tuple[float, str]:
    profiler = cProfile.Profile()
    for _ in range(n):
        per_sample, group_ids = bt.forward_per_sample(impl, workload, device)
        bt.training_objective(impl, per_sample, group_ids).backward()
        sync()
        profiler.enable()
        impl.opt.step()
        profiler.disable()
        bt.finish_step(impl)
    sync()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(25)
    unprofiled = []
    for _ in range(n):
        per_sample, group_ids = bt.forward_per_sample(impl, workload, device)
        bt.training_objective(impl, per_sample, group_ids).backward()
        sync()
        t0 = time.perf_counter()
        impl.opt.step()
        unprofiled.append((time.perf_counter() - t0) * 1e6)
        bt.finish_step(impl)
    return statistics.median(unprofiled), text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="gpt2", choices=bt.WORKLOAD_NAMES)
    parser.add_argument("--impls", default=",".join(bt.IMPL_NAMES))
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--out", required=True, help="JSON path; the profile goes to the same name with .txt")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_training_phases.py needs CUDA")
    device = torch.device("cuda")
    workload = bt.build_workload(args.workload, device, tiny=False)
    if workload is None:
        sys.exit(f"{args.workload}: its library is not installed")
    impls = bt.build_implementations(workload, bt.parse_names(args.impls, bt.IMPL_NAMES, "impl"))
    warm_up(impls, workload, device, 15)
    record = dict(workload=args.workload, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    if args.phases:
        record["phases"] = run_phases(impls, workload, device, args.rounds, args.steps)
    if args.profile:
        record["step_host_us_unprofiled"] = {}
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            for impl in impls:
                median_us, text = profile_step(impl, workload, device, args.profile_steps)
                record["step_host_us_unprofiled"][impl.name] = median_us
                print(f"  {impl.name}: step() host {median_us:.0f} us (median of {args.profile_steps}, unprofiled)")
                f.write(f"===== {impl.name}: unprofiled median {median_us:.0f} us\n{text}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
