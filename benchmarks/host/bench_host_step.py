"""Host time of ``opt.step()`` alone: torch AdamW fused against also_fused, on GPT-2 124M's 148 tensors.

Gradients are written into two alternating sets of buffers (their addresses change every step, as
with ``zero_grad(set_to_none=True)``), a cosine lr schedule runs, and the GPU is idle when each
step starts (a synchronize before it), so the time is the host's alone. Implementations interleaved
step by step; median and 10th/90th percentiles over --steps. Writes benchmarks/results/host_step_<gpu>.json.
Run: ``python3 benchmarks/host/bench_host_step.py`` (CUDA).
"""
from __future__ import annotations

import argparse
import datetime
import os
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


def build(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
    if name == "torch AdamW fused":
        return torch.optim.AdamW(groups, lr=3e-4, fused=True)
    if name == "also_fused AdamW":
        return also_fused.AdamW(groups, lr=3e-4)
    mode = "descent-ascent" if "descent" in name else "optimistic"
    return also_fused.ALSO(groups, 4, batch_size=8, mode=mode, lr=3e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--impls", default="torch AdamW fused,also_fused AdamW,ALSO descent-ascent,ALSO optimistic")
    args = parser.parse_args()
    names = args.impls.split(",")
    runs = []
    for name in names:
        params = gpt2_params("cuda")
        opt = build(name, params)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
        runs.append((name, params, opt, sched, grads))
    times = {name: [] for name in names}
    losses = torch.rand(8, device="cuda")
    ids = torch.randint(0, 4, (8,), device="cuda")
    for k in range(args.steps + 10):
        for name, params, opt, sched, grads in runs:
            if isinstance(opt, also_fused.ALSO):
                opt.weighted_loss(losses, ids)
            for p, g in zip(params, grads[k % 2]):
                p.grad = g
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - t0
            if k >= 10:
                times[name].append(elapsed * 1e6)
            sched.step()
    torch.cuda.synchronize()
    torch_median = statistics.median(times[names[0]])
    records = []
    for name in names:
        v = sorted(times[name])
        med = statistics.median(v)
        records.append(dict(impl=name, n_tensors=len(runs[0][1]), host_us_step=med, p10=v[len(v) // 10],
                             p90=v[9 * len(v) // 10], ratio_vs_torch_fused=med / torch_median,
                             device=torch.cuda.get_device_name(), torch=torch.__version__,
                             date=datetime.date.today().isoformat(), also_fused_source=source_digest()))
        print(f"{name:22s} host us/step median {med:7.1f} (p10 {v[len(v) // 10]:7.1f}, p90 {v[9 * len(v) // 10]:7.1f})"
              f"  x torch fused: {med / torch_median:.2f}")
    print("wrote", write_records(records, "host_step"))

if __name__ == "__main__":
    main()
