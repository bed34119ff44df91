"""Optimizer-state precision on the GPU: step time, bytes moved, % of copy bandwidth and state memory.

GPT-2 124M and 1.3B parameter shapes, fp32 and bf16 params; torch.optim.AdamW(fused=True) against
also_fused.AdamW at each state_precision ("param" = torch's layout, "float32", "bfloat16", "int8"), and
bitsandbytes' / torchao's 8-bit AdamW when they import. opt.step() timed with CUDA events (median of
--iters after warm-up, gradient sets rotated); the copy bandwidth is measured in the same run.
Writes benchmarks/results/state_precision_<gpu>.json (``--sweep``: state_precision_sweep_<gpu>.json).
Run: ``python3 benchmarks/state_precision/bench_state_precision.py --workloads gpt2_1.3b --iters 25`` (CUDA).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import triton

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, BENCH)  # results_io.py
sys.path.insert(0, os.path.join(BENCH, "theta"))  # bench_theta.py

import also_fused  # noqa: E402
from bench_theta import gpt2_shapes  # noqa: E402
from results_io import source_digest, write_records  # noqa: E402

PRECISIONS = ("param", "float32", "bfloat16", "int8")
MOMENT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def bytes_per_param(param_bytes: int, moment_bytes: float) -> float:
    """Read p, g, m, v; write p, m, v (8-bit: plus two float32 scales per 1024 elements, read and written)."""
    scales = 4 * 4 / 1024 if moment_bytes == 1 else 0.0
    return 3 * param_bytes + 4 * moment_bytes + scales


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if torch.is_tensor(t) and k != "step")


def time_step(opt, params, grad_sets, warmup: int, iters: int) -> float:
    def step(k):
        for p, g in zip(params, grad_sets[k % len(grad_sets)]):
            p.grad = g
        opt.step()
    for k in range(warmup):
        step(k)
    times = []
    for k in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for p, g in zip(params, grad_sets[k % len(grad_sets)]):
            p.grad = g
        start.record()
        opt.step()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def third_party(name: str, params):
    if name == "bitsandbytes AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt2_124m,gpt2_1.3b")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--sweep", action="store_true",
                        help="instead: time also_fused's kernel configurations (warps, vector width) per precision")
    parser.add_argument("--sweep-only", default=None,
                        help="with --sweep: only these comma-separated 'param bytes:precision' keys, e.g. 2:param,4:int8")
    args = parser.parse_args()
    bw = copy_bandwidth()
    if args.sweep:
        return sweep(args, bw)
    shapes_of = {"gpt2_124m": gpt2_shapes(768, 12), "gpt2_1.3b": gpt2_shapes(2048, 24)}
    records = []
    for workload in args.workloads.split(","):
        for pdtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device="cuda").manual_seed(0)
            shapes = shapes_of[workload]
            n = sum(torch.Size(s).numel() for s in shapes)
            grad_sets = [[torch.randn(s, device="cuda", dtype=pdtype, generator=gen) * 1e-2 for s in shapes]
                         for _ in range(2)]
            impls = [("torch AdamW fused", None)] + [(f"also_fused AdamW {p}", p) for p in PRECISIONS] + \
                    [("bitsandbytes AdamW8bit", "bnb"), ("torchao AdamW8bit", "ao")]
            for name, precision in impls:
                params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=pdtype, generator=gen))
                          for s in shapes]
                try:
                    if precision is None:
                        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
                    elif precision in ("bnb", "ao"):
                        opt = third_party(name, params)
                    else:
                        opt = also_fused.AdamW(params, lr=1e-4, state_precision=precision)
                    ms = time_step(opt, params, grad_sets, args.warmup, args.iters)
                except Exception as exc:  # a missing or failing third-party optimizer is reported, not fatal
                    print(f"{workload} {pdtype} {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                    del params
                    continue
                mb = pdtype.itemsize if precision in (None, "param") else MOMENT_BYTES.get(precision, 1)
                moved = bytes_per_param(pdtype.itemsize, mb) * n if precision not in ("bnb", "ao") else None
                records.append(dict(
                    workload=workload, param_dtype=str(pdtype).replace("torch.", ""), impl=name, ms=ms,
                    n_params=n, state_bytes_per_param=state_bytes(opt) / n, bytes_moved=moved,
                    pct_copy_bw=None if moved is None else 100 * moved / (ms * 1e-3) / bw,
                    copy_bw_tbs=bw / 1e12, device=torch.cuda.get_device_name(), torch=torch.__version__,
                    date=datetime.date.today().isoformat(), also_fused_source=source_digest()))
                print(f"{workload} {records[-1]['param_dtype']} {name}: {ms:.3f} ms"
                      + ("" if moved is None else f", {records[-1]['pct_copy_bw']:.0f}% of copy"), flush=True)
                del opt, params
                torch.cuda.empty_cache()
            base = next(r["ms"] for r in records if r["workload"] == workload and r["impl"] == "torch AdamW fused"
                        and r["param_dtype"] == str(pdtype).replace("torch.", ""))
            for r in records:
                if r["workload"] == workload and r["param_dtype"] == str(pdtype).replace("torch.", ""):
                    r["speed_vs_torch_fused"] = base / r["ms"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| workload | params | optimizer | ms/step | x torch fused | % copy bw | state bytes/param |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        pct = "-" if r["pct_copy_bw"] is None else f"{r['pct_copy_bw']:.0f}"
        print(f"| {r['workload']} | {r['param_dtype']} | {r['impl']} | {r['ms']:.3f} | {r['speed_vs_torch_fused']:.2f} "
              f"| {pct} | {r['state_bytes_per_param']:.2f} |")
    print("wrote", write_records(records, "state_precision"))

# candidate (BLOCK, iterations, num_warps, PVEC[, pipeline stages]) per (param element size, state precision)
SWEEP_CONFIGS = {
    (4, "param"): [(1024, 1, 4, 0), (1024, 1, 8, 0)],
    (4, "bfloat16"): [(1024, 1, 4, 0), (1024, 1, 8, 0), (1024, 2, 4, 0), (1024, 4, 4, 0), (2048, 1, 4, 0)],
    (4, "int8"): [(1024, 1, 4, 0, 1), (1024, 4, 4, 0, 3), (1024, 8, 4, 0, 2), (1024, 8, 4, 0, 3), (1024, 8, 4, 0, 4),
                  (1024, 16, 4, 0, 3), (1024, 32, 4, 0, 3)],
    (2, "float32"): [(1024, 1, 4, 4), (1024, 1, 4, 8)],
    (2, "param"): [(1024, 1, 4, 4), (1024, 1, 4, 8), (1024, 2, 4, 8), (1024, 1, 8, 8), (1024, 4, 4, 8),
                   (1024, 8, 4, 8), (2048, 1, 4, 8), (2048, 2, 4, 8), (2048, 1, 8, 8)],
    (2, "int8"): [(1024, 1, 4, 8, 1), (1024, 8, 4, 8, 3), (1024, 8, 4, 8, 4), (1024, 16, 4, 8, 3), (1024, 16, 4, 8, 4),
                  (1024, 32, 4, 8, 3), (1024, 32, 4, 8, 4), (1024, 16, 8, 8, 3), (1024, 16, 4, 4, 3)],
}


def sweep(args, bw: float) -> None:
    """Step time and % of copy of every candidate kernel configuration, on the first workload's shapes."""
    from also_fused.kernels import multi_tensor_adam as mta

    shapes = {"gpt2_124m": gpt2_shapes(768, 12), "gpt2_1.3b": gpt2_shapes(2048, 24)}[args.workloads.split(",")[-1]]
    n = sum(torch.Size(s).numel() for s in shapes)
    records = []
    only = None if args.sweep_only is None else set(args.sweep_only.split(","))
    for (psize, precision), configs in SWEEP_CONFIGS.items():
        if only is not None and f"{psize}:{precision}" not in only:
            continue
        pdtype = torch.float32 if psize == 4 else torch.bfloat16
        mb = psize if precision == "param" else MOMENT_BYTES[precision]
        key = (psize, mb)
        saved = mta.STATE_CONFIG.get(key)
        saved_stages = mta.PIPELINE_STAGES.get(key)
        default = mta.kernel_config(*key) + ((mta.pipeline_stages(*key),) if len(configs[0]) == 5 else ())
        gen = torch.Generator(device="cuda").manual_seed(0)
        grad_sets = [[torch.randn(s, device="cuda", dtype=pdtype, generator=gen) * 1e-2 for s in shapes]
                     for _ in range(2)]
        for config in configs:
            mta.STATE_CONFIG[key] = config[:4]
            mta.PIPELINE_STAGES[key] = config[4] if len(config) == 5 else 1
            params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=pdtype, generator=gen)) for s in shapes]
            opt = also_fused.AdamW(params, lr=1e-4, state_precision=precision)
            ms = time_step(opt, params, grad_sets, args.warmup, args.iters)
            moved = bytes_per_param(pdtype.itemsize, mb) * n
            records.append(dict(param_dtype=str(pdtype).replace("torch.", ""), precision=precision,
                                config=list(config), default=config == default, ms=ms,
                                pct_copy_bw=100 * moved / (ms * 1e-3) / bw, copy_bw_tbs=bw / 1e12,
                                device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), also_fused_source=source_digest()))
            print(f"{records[-1]['param_dtype']} {precision} {config}{' (default)' if config == default else ''}: "
                  f"{ms:.3f} ms, {records[-1]['pct_copy_bw']:.0f}% of copy", flush=True)
            del opt, params
            torch.cuda.empty_cache()
        if saved is None:
            mta.STATE_CONFIG.pop(key, None)
        else:
            mta.STATE_CONFIG[key] = saved
        if saved_stages is None:
            mta.PIPELINE_STAGES.pop(key, None)
        else:
            mta.PIPELINE_STAGES[key] = saved_stages
    print("wrote", write_records(records, "state_precision_sweep"))


if __name__ == "__main__":
    main()
