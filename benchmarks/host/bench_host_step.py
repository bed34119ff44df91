"""Host time of ``opt.step()`` alone: torch AdamW fused against also_fused, on GPT-2 124M's 148 tensors.

Gradients are written into two alternating sets of buffers (their addresses change every step, as
with ``zero_grad(set_to_none=True)``), a cosine lr schedule runs, and the GPU is idle when each
step starts (a synchronize before it), so the time is the host's alone. Implementations interleaved
step by step, in a new random order every step; median and 10th/90th percentiles over --steps. Then
the GPU time per step: --rounds rounds, in each every implementation runs 20 steps back to back
between two CUDA events (no sync inside), in a random order; median and range over the rounds.
Writes benchmarks/results/host_step_<gpu>.json.

``--baseline PACKAGE``: every also_fused optimizer also runs from PACKAGE, an earlier version of the
code importable under another name (its imports are relative: copy its also_fused/ as PACKAGE/ and its
kernels/ as PACKAGE/kernels/), interleaved with the current one; the records give new/old.
Run: ``python3 benchmarks/host/bench_host_step.py`` (CUDA).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: results_io.py

import also_fused  # noqa: E402
from results_io import source_digest, write_records  # noqa: E402


def gpt2_params(device: str) -> list[torch.nn.Parameter]:
    import transformers

    torch.manual_seed(0)
    return list(transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(device).parameters())


def build(name: str, params: list[torch.nn.Parameter], package) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
    if name == "torch AdamW fused":
        return torch.optim.AdamW(groups, lr=3e-4, fused=True)
    if name == "also_fused AdamW":
        return package.AdamW(groups, lr=3e-4)
    mode = "descent-ascent" if "descent" in name else "optimistic"
    return package.ALSO(groups, 4, batch_size=8, mode=mode, lr=3e-4)


def one_step(opt, params, grads, losses, ids) -> None:
    if hasattr(opt, "weighted_loss"):
        opt.weighted_loss(losses, ids)
    for p, g in zip(params, grads):
        p.grad = g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the GPU-time phase")
    parser.add_argument("--impls", default="torch AdamW fused,also_fused AdamW,ALSO descent-ascent,ALSO optimistic")
    parser.add_argument("--baseline", default=None, help="an earlier version of the package, run beside this one")
    parser.add_argument("--out", default=None, help="the JSON file to write (default results/host_step_<gpu>.json)")
    args = parser.parse_args()
    variants = [(name, also_fused, name) for name in args.impls.split(",")]
    if args.baseline:
        old = importlib.import_module(args.baseline)
        variants += [(name, old, f"{name} [{args.baseline}]") for name, _, _ in variants if name != "torch AdamW fused"]
    runs = []
    for name, package, label in variants:
        params = gpt2_params("cuda")
        opt = build(name, params, package)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
        runs.append((label, params, opt, sched, grads))
    labels = [run[0] for run in runs]
    times = {label: [] for label in labels}
    losses = torch.rand(8, device="cuda")
    ids = torch.randint(0, 4, (8,), device="cuda")
    order = random.Random(0)
    for k in range(args.steps + 10):
        # a new order every step: what ran just before a step (torch's step leaves the host's caches cold)
        # is then the same for every implementation on average
        for label, params, opt, sched, grads in order.sample(runs, len(runs)):
            one_step(opt, params, grads[k % 2], losses, ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - t0
            if k >= 10:
                times[label].append(elapsed * 1e6)
            sched.step()
    gpu_ms = {label: [] for label in labels}
    for _ in range(args.rounds):
        marks = []
        for label, params, opt, sched, grads in order.sample(runs, len(runs)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for k in range(20):
                one_step(opt, params, grads[k % 2], losses, ids)
                opt.step()
            end.record()
            marks.append((label, start, end))
        torch.cuda.synchronize()
        for label, start, end in marks:
            gpu_ms[label].append(start.elapsed_time(end) / 20)
    torch_median = statistics.median(times[labels[0]])
    medians = {label: statistics.median(times[label]) for label in labels}
    records = []
    for (name, package, label) in variants:
        v = sorted(times[label])
        med = medians[label]
        g = gpu_ms[label]
        record = dict(impl=label, n_tensors=len(runs[0][1]), host_us_step=med, p10=v[len(v) // 10],
                      p90=v[9 * len(v) // 10], ratio_vs_torch_fused=med / torch_median,
                      gpu_ms_step=statistics.median(g), gpu_ms_min=min(g), gpu_ms_max=max(g), rounds=args.rounds,
                      device=torch.cuda.get_device_name(), torch=torch.__version__,
                      date=datetime.date.today().isoformat(),
                      package=None if name == "torch AdamW fused" else package.__name__,
                      also_fused_source=source_digest() if package is also_fused else None)
        text = ""
        if args.baseline and package is also_fused and name != "torch AdamW fused":
            old_label = f"{name} [{args.baseline}]"
            record.update(host_new_over_old=med / medians[old_label],
                          gpu_new_over_old=statistics.median(g) / statistics.median(gpu_ms[old_label]))
            text = f"  new/old host {record['host_new_over_old']:.3f} gpu {record['gpu_new_over_old']:.3f}"
        records.append(record)
        print(f"{label:34s} host us/step median {med:7.1f} (p10 {v[len(v) // 10]:7.1f}, p90 {v[9 * len(v) // 10]:7.1f})"
              f"  x torch fused: {med / torch_median:.2f}  gpu ms/step {statistics.median(g):.3f}"
              f" [{min(g):.3f}, {max(g):.3f}]{text}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        print("wrote", args.out)
    else:
        print("wrote", write_records(records, "host_step"))

if __name__ == "__main__":
    main()
