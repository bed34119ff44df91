"""GPU benchmark of whole optimizer steps through the public classes, side by side in one run.

GPT-2 124M parameter shapes (148 fp32 tensors), random non-zero gradients rotated between steps.
Times ``opt.step()`` (host work included) with CUDA events, median of many runs after warm-up:
torch.optim.Adam (fused / foreach), also_fused.Adam, ALSO in both modes and APIs with n_groups 10
and 10^6 (the loop API step includes the weighted loss forward and backward), and the
published-style per-tensor loop. Writes JSON records to benchmarks/results/gpu_step.json (or --out).
Run: ``python3 benchmarks/step/bench_step.py`` (CUDA; ``gpu_run.sh bench`` writes results/step.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import triton

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, BENCH)  # published_loop.py
sys.path.insert(0, os.path.join(BENCH, "theta"))  # bench_theta.py

import also_fused  # noqa: E402
from bench_theta import gpt2_shapes  # noqa: E402
from published_loop import PublishedStyleALSO  # noqa: E402

BATCH = 4096


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def time_steps(step, params, grad_sets, warmup=10, iters=60):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for k in range(warmup + iters):
        for p, g in zip(params, grad_sets[k % len(grad_sets)]):
            p.grad = g
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        end.synchronize()
        if k >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "gpu_step.json"))
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args()
    shapes = gpt2_shapes(768, 12)
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, device="cuda", generator=gen) * 0.02 for s in shapes]
    grad_sets = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(3)]
    n_params = sum(p.numel() for p in base)
    bw = copy_bandwidth()

    def fresh():
        return [torch.nn.Parameter(p.clone()) for p in base]

    def also_impl(mode, api, n_groups, backend="triton", validate=True):
        def build(params):
            opt = also_fused.ALSO(params, n_groups, batch_size=BATCH, mode=mode, backend=backend, validate=validate)
            ids = torch.randint(0, n_groups, (BATCH,), device="cuda", generator=gen)
            losses = torch.rand(BATCH, device="cuda", generator=gen) + 0.5
            if api == "closure":
                return lambda: opt.step(lambda pi, s: (losses, None), ids)
            leaf = losses.clone().requires_grad_()

            def loop():
                opt.weighted_loss(leaf, ids).backward()
                return opt.step()
            return loop
        return build

    def published(mode, n_groups):
        def build(params):
            opt = PublishedStyleALSO(params, n_groups, n_groups / BATCH, mode=mode)
            ids = torch.randint(0, n_groups, (BATCH,), device="cuda", generator=gen)
            losses = torch.rand(BATCH, device="cuda", generator=gen) + 0.5
            return lambda: opt.step(lambda pi, s: (losses, None), ids)
        return build

    impls = {
        "torch Adam fused": (lambda ps: torch.optim.Adam(ps, weight_decay=1e-3, fused=True).step, 28),
        "torch Adam foreach": (lambda ps: torch.optim.Adam(ps, weight_decay=1e-3, foreach=True).step, 28),
        "also_fused Adam": (lambda ps: also_fused.Adam(ps, weight_decay=1e-3).step, 28),
    }
    for n_groups in (10, 10**6):
        for mode, api, nbytes in [("descent-ascent", "closure", 28), ("descent-ascent", "loop", 28),
                                  ("optimistic", "loop", 32), ("optimistic", "closure", 60)]:
            impls[f"ALSO {mode} {api}, n_groups {n_groups}"] = (also_impl(mode, api, n_groups), nbytes)
    for mode, api, nbytes in [("descent-ascent", "loop", 28), ("optimistic", "loop", 32)]:
        impls[f"ALSO {mode} {api}, n_groups 10, validate=False"] = (also_impl(mode, api, 10, validate=False), nbytes)
    for mode in ("descent-ascent", "optimistic"):
        impls[f"published-style ALSO {mode}, n_groups 10"] = (published(mode, 10), None)

    results = []
    for name, (build, bytes_per_param) in impls.items():
        params = fresh()
        ms = time_steps(build(params), params, grad_sets, iters=args.iters)
        rec = dict(workload="GPT-2 124M shapes, 148 fp32 tensors, B=4096", impl=name, median_ms=ms,
                   bytes_per_step=None if bytes_per_param is None else bytes_per_param * n_params,
                   copy_bw_tbs=bw / 1e12, device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, date=datetime.date.today().isoformat())
        if bytes_per_param is not None:
            rec["pct_copy_bw_theta_bytes"] = 100 * rec["bytes_per_step"] / (ms * 1e-3) / bw
        results.append(rec)
        print(f"{name:55s} {ms:8.3f} ms", flush=True)
        del params
    fused = next(r["median_ms"] for r in results if r["impl"] == "torch Adam fused")
    for r in results:
        r["ratio_vs_torch_fused"] = r["median_ms"] / fused
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; {n_params / 1e6:.1f}M params")
    print("| step | median ms | x torch fused | % of copy bw (theta bytes) |\n|---|---|---|---|")
    for r in results:
        pct = r.get("pct_copy_bw_theta_bytes")
        print(f"| {r['impl']} | {r['median_ms']:.3f} | {r['ratio_vs_torch_fused']:.2f} | "
              f"{'' if pct is None else f'{pct:.0f}%'} |")


if __name__ == "__main__":
    main()
