"""GPU benchmark of the one-launch multi-tensor Adam kernel (the theta update) against torch.optim.Adam.

Workloads: GPT-2 124M (148 tensors), GPT-2 1.3B (292 tensors), a ResNet-like set (149 tensors, ~36M params);
fp32 and bf16 params; three passes: a plain Adam step, the fused optimistic extrapolation pass
(two steps in one kernel) and the closure pair (extrapolation saving x, then the main step saving the grad).
Each record: median time of the whole call (host work included), the fewest bytes the pass must move,
that as a percentage of a measured device-to-device copy bandwidth, ratio_vs_torch_fused = torch fused
median / this median (above 1: faster than torch fused), and the host time per call with new gradient
tensors every step. torch keeps its moments in the param dtype: with bf16 params it moves fewer bytes.

    python benchmarks/theta/bench_theta.py [--quick] [--sweep] [--out results.json]

(default --out: benchmarks/results/theta_<date>.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
import triton
from triton.testing import do_bench

from also_fused.kernels import multi_tensor_adam as mta

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- shapes
def gpt2_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> List[tuple]:
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet_like_shapes(mult: float = 1.27) -> List[tuple]:
    """Bottleneck ResNet-50 layout (no downsample convs) with widths scaled to ~36M params: 149 tensors."""
    c = lambda x: int(round(x * mult))  # noqa: E731
    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    cin = c(64)
    for blocks, w in zip([3, 4, 6, 3], [64, 128, 256, 512]):
        for _ in range(blocks):
            for sh in [(c(w), cin, 1, 1), (c(w), c(w), 3, 3), (c(4 * w), c(w), 1, 1)]:
                shapes += [sh, (sh[0],), (sh[0],)]
            cin = c(4 * w)
    return shapes + [(1000, cin), (1000,)]


WORKLOADS = {
    "gpt2_124m": gpt2_shapes(768, 12),
    "resnet_like_36m": resnet_like_shapes(),
    "gpt2_1.3b": gpt2_shapes(2048, 24),
}
# Bytes per parameter that each pass must move (param dtype p bytes, fp32 moments).
BYTES_PER_PARAM = {
    "adam": lambda p: 3 * p + 16,           # read x, g, m, v; write x, m, v
    "extrap": lambda p: 4 * p + 16,         # read x, g, m, v; write x1, y, m, v
    # two passes: (x, g_prev, m, v -> y, x saved; moments not written) and
    # (x saved, g, g_prev, m, v -> x, m, v, g saved): 60 B per fp32 param
    "closure_pair": lambda p: 9 * p + 24,
}


# ----------------------------------------------------------------------------------------------- helpers
def copy_bandwidth(nbytes: int = 2 * 2 ** 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.randn(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), False, 1.0)
    del src, dst
    _empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def host_us(fn: Callable[[], None], calls: int = 20) -> float:
    """Host time per call: back-to-back calls without synchronising (the GPU queue absorbs them)."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / calls * 1e6


def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], None], quick: bool, est_ms: float) -> float:
    """Median of many calls, each bracketed by CUDA events (do_bench flushes L2 between calls)."""
    if DEV != "cuda":
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    rep = (150 if quick else 300) if est_ms < 5 else (300 if quick else 600)
    return do_bench(fn, warmup=max(25, 3 * est_ms), rep=rep, return_mode="median")


class Setup:
    """Params, two gradient sets (rotated) and states for one workload and dtype."""

    def __init__(self, shapes, dtype, n_grad_sets: int = 2):
        gen = torch.Generator(device=DEV).manual_seed(0)
        rnd = lambda s, scale=1.0: (torch.randn(s, device=DEV, generator=gen) * scale + 0.01).to(dtype)  # noqa
        self.dtype = dtype
        self.params = [rnd(s, 0.02) for s in shapes]
        self.grad_sets = [[rnd(s, 1e-3) for s in shapes] for _ in range(n_grad_sets)]
        self.m = [torch.randn(s, device=DEV, generator=gen) * 1e-4 for s in shapes]
        self.v = [torch.rand(s, device=DEV, generator=gen) * 1e-6 + 1e-8 for s in shapes]
        self.steps = [torch.full((), 10.0, device=DEV) for _ in shapes]
        self.hyper = mta.hyper_table([(LR, BETAS[0], BETAS[1], EPS, WD)], DEV)
        self.rows = [0] * len(shapes)
        self.numel = sum(p.numel() for p in self.params)
        self.k = 0

    def next_grads(self):
        self.k += 1
        return self.grad_sets[self.k % len(self.grad_sets)]


def ours(setup: Setup, mode: str, caches: List[dict], rotate: bool = True) -> Callable[[], None]:
    """The launcher call(s) of one pass, with the caller's step increment; new gradient tensors each call."""
    s = setup
    cache, cache2 = caches
    grads = s.next_grads if rotate else (lambda: s.grad_sets[0])
    if mode == "adam":
        def fn():
            torch._foreach_add_(s.steps, 1.0)
            mta.multi_tensor_adam_(s.params, grads(), s.m, s.v, s.steps, s.params, s.hyper, s.rows,
                                   eps_mode="torch", cache=cache)
        return fn
    if mode == "extrap":
        y = [torch.empty_like(p) for p in s.params]

        def fn():
            torch._foreach_add_(s.steps, 2.0)
            mta.multi_tensor_adam_(s.params, grads(), s.m, s.v, s.steps, s.params, s.hyper, s.rows,
                                   extrapolate_to=y, cache=cache)
        return fn
    if mode == "closure_pair":
        saved = [torch.empty_like(p) for p in s.params]
        gprev = [g.clone() for g in s.grad_sets[0]]

        def fn():
            torch._foreach_add_(s.steps, 1.0)
            # extrapolation: y = x + AdamStep(x, g_prev) into the param, x saved
            mta.multi_tensor_adam_(s.params, gprev, s.m, s.v, s.steps, s.params, s.hyper, s.rows,
                                   save_sources_to=saved, commit_state=False, cache=cache)
            torch._foreach_add_(s.steps, 1.0)
            # main step from the saved x: the moments advance with g_prev, then with the new gradient,
            # which is kept for the next extrapolation
            mta.multi_tensor_adam_(saved, grads(), s.m, s.v, s.steps, s.params, s.hyper, s.rows,
                                   prior_grads=gprev, save_grads_to=gprev, cache=cache2)
        return fn
    raise ValueError(mode)


def torch_impl(setup: Setup, mode: str, kind: str) -> Callable[[], None]:
    s = setup
    params = [torch.nn.Parameter(p) for p in s.params]  # shares storage with setup.params
    opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                           **({"fused": True} if kind == "fused" else {"foreach": True}))

    def set_grads(gs):
        for p, g in zip(params, gs):
            p.grad = g

    set_grads(s.grad_sets[0])
    opt.step()  # creates the state
    if mode == "adam":
        def fn():
            set_grads(s.next_grads())
            opt.step()
        return fn
    if mode == "extrap":
        x1 = [torch.empty_like(p) for p in s.params]

        def fn():
            set_grads(s.next_grads())
            opt.step()
            torch._foreach_copy_(x1, s.params)
            opt.step()
        return fn
    if mode == "closure_pair":
        saved = [torch.empty_like(p) for p in s.params]
        gprev = [g.clone() for g in s.grad_sets[0]]

        def fn():
            torch._foreach_copy_(saved, s.params)
            set_grads(gprev)
            opt.step()
            torch._foreach_copy_(s.params, saved)
            gs = s.next_grads()
            set_grads(gs)
            opt.step()
            torch._foreach_copy_(gprev, gs)
        return fn
    raise ValueError(mode)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short run: fewer repetitions, GPT-2 124M and ResNet only")
    ap.add_argument("--sweep", action="store_true", help="also time kernel configurations and keep the fastest")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                                                  "theta_" + datetime.date.today().isoformat() + ".json"))
    ap.add_argument("--no-main", action="store_true", help="stop after the sweep")
    ap.add_argument("--config", help="JSON {param element size: [BLOCK, ITERS, num_warps, PVEC]} to use")
    ap.add_argument("--config-out", help="write the configuration kept by the sweep here")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU interpreter, tiny shapes
    args = ap.parse_args()
    if args.config:
        with open(args.config) as f:
            mta.KERNEL_CONFIG.update({int(k): tuple(v) for k, v in json.load(f).items()})
    global DEV
    if args.smoke:
        DEV = "cpu"
        for k in WORKLOADS:
            WORKLOADS[k] = [tuple(max(1, d // 64) for d in sh) for sh in WORKLOADS[k][:6]]
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version())
    records: List[Dict] = []

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)

    bw = copy_bandwidth(2 * 2 ** 30 if DEV == "cuda" else 2 ** 24)
    print(f"device {device}; copy bandwidth {bw / 1e12:.3f} TB/s (read + write)", flush=True)
    workloads = {k: v for k, v in WORKLOADS.items() if not (args.quick and k == "gpt2_1.3b")}

    if args.sweep:
        candidates = {4: [(1024, 8, 4, 0), (1024, 1, 4, 0), (1024, 32, 4, 0), (2048, 4, 8, 0), (4096, 2, 8, 0),
                          (512, 16, 4, 0)],
                      2: [(1024, 8, 4, 0), (1024, 8, 4, 4), (2048, 4, 8, 0), (2048, 4, 8, 4), (1024, 32, 4, 4),
                          (1024, 1, 4, 4)]}
        for dtype in (torch.float32, torch.bfloat16):
            best, best_score = None, -1.0
            scores = {}
            for cfg in candidates[dtype.itemsize]:
                mta.KERNEL_CONFIG[dtype.itemsize] = cfg
                logs = []
                for wname, shapes in workloads.items():
                    s = Setup(shapes, dtype, n_grad_sets=1)
                    fn = ours(s, "adam", [{}, {}])
                    ms = time_ms(fn, True, 1.0)
                    nbytes = BYTES_PER_PARAM["adam"](dtype.itemsize) * s.numel
                    pct = 100 * nbytes / (ms * 1e-3) / bw
                    logs.append(pct)
                    records.append(dict(workload=wname, **{"pass": "adam"}, dtype=str(dtype).replace("torch.", ""),
                                        impl=f"sweep[B={cfg[0]},I={cfg[1]},W={cfg[2]},V={cfg[3]}]",
                                        median_ms=ms, bytes_per_step=nbytes, pct_copy_bw=pct, copy_bw_tbs=bw / 1e12,
                                        ratio_vs_torch_fused=None, cpu_us_per_step=None, **meta))
                    del s, fn
                    _empty_cache()
                score = math.exp(statistics.fmean(math.log(p) for p in logs))
                scores[cfg] = score
                print(f"sweep {dtype} {cfg}: " + " ".join(f"{p:.1f}%" for p in logs) + f"  geomean {score:.1f}%",
                      flush=True)
                if score > best_score:
                    best, best_score = cfg, score
            mta.KERNEL_CONFIG[dtype.itemsize] = best
            print(f"sweep {dtype}: keeping {best}", flush=True)
        save()
        if args.config_out:
            with open(args.config_out, "w") as f:
                json.dump({str(k): list(v) for k, v in mta.KERNEL_CONFIG.items()}, f)
    if args.no_main:
        return

    for wname, shapes in workloads.items():
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).replace("torch.", "")
            for mode in ("adam", "extrap", "closure_pair"):
                nbytes = BYTES_PER_PARAM[mode](dtype.itemsize) * sum(math.prod(sh) for sh in shapes)
                est = nbytes / bw * 1e3
                results = {}
                for impl in ("also_fused", "torch_fused", "torch_foreach"):
                    s = Setup(shapes, dtype)
                    try:
                        hit_us = miss_us = None
                        if impl == "also_fused":
                            caches: List[dict] = [{}, {}]
                            fn = ours(s, mode, caches)
                            fn()
                            _sync()
                            t0 = time.perf_counter()
                            for _ in range(5):  # cache misses: table builds included
                                for c in caches:
                                    c.clear()
                                fn()
                            miss_us = (time.perf_counter() - t0) / 5 * 1e6
                            same = ours(s, mode, caches, rotate=False)
                            same()
                            hit_us = host_us(same)
                            del same
                        else:
                            fn = torch_impl(s, mode, impl.split("_")[1])
                            fn()
                        ms = time_ms(fn, args.quick, est)
                        cpu = host_us(fn, 20 if est < 5 else 10)
                    except torch.OutOfMemoryError:
                        print(f"{wname} {dname} {mode} {impl}: out of memory", flush=True)
                        continue
                    finally:
                        del s
                        fn = None
                        _empty_cache()
                    results[impl] = ms
                    rec = dict(workload=wname, **{"pass": mode}, dtype=dname, impl=impl, n_tensors=len(shapes),
                               n_params=sum(math.prod(sh) for sh in shapes), median_ms=ms, bytes_per_step=nbytes,
                               pct_copy_bw=100 * nbytes / (ms * 1e-3) / bw, copy_bw_tbs=bw / 1e12,
                               ratio_vs_torch_fused=None, cpu_us_per_step=cpu, cpu_us_same_grads=hit_us,
                               cpu_us_cache_miss=miss_us,
                               kernel_config=list(mta.KERNEL_CONFIG[dtype.itemsize]) if impl == "also_fused" else None,
                               **meta)
                    records.append(rec)
                if not results:
                    continue
                for rec in records[-len(results):]:
                    if "torch_fused" in results:
                        rec["ratio_vs_torch_fused"] = results["torch_fused"] / rec["median_ms"]
                save()
                line = " | ".join(f"{r['impl']} {r['median_ms']:.3f} ms {r['pct_copy_bw']:.1f}% "
                                  f"x{(r['ratio_vs_torch_fused'] or 0):.2f} cpu {r['cpu_us_per_step']:.0f}us"
                                  for r in records[-len(results):])
                print(f"{wname:16s} {dname:8s} {mode:12s} {line}", flush=True)

    print("\nworkload         dtype    pass         impl           median_ms  %copy_bw  torch_fused/ms  cpu_us")
    for r in records:
        if r["impl"].startswith("sweep"):
            continue
        print(f"{r['workload']:16s} {r['dtype']:8s} {r['pass']:12s} {r['impl']:14s} {r['median_ms']:9.3f} "
              f"{r['pct_copy_bw']:8.1f} {(r['ratio_vs_torch_fused'] or float('nan')):14.2f} {r['cpu_us_per_step']:7.0f}")
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
