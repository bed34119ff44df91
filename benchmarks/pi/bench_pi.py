"""GPU benchmark of the pi step (PiUpdate) and of the fused losses.

PiUpdate against a plain-torch version of the published step (dense scatter_add of -l, log,
softmax), for n_groups 1e4, 1e6, 1e7 and B = 4096, in the two modes:
  descent-ascent: one PiUpdate, in place;  optimistic: PiUpdate plus the second update (second_out).
Then weighted_loss and rgd_loss forward + backward at B = 4096 against plain torch.

Medians of triton.testing.do_bench (CUDA events, warm-up first); inputs rotate among several sets
when they would fit in L2.  Triton rows also give the time per call replayed from a CUDA graph
(launch gaps removed).  Percent of copy bandwidth uses the fewest bytes a step must move (read pi
once, write each result once, read ids and losses) over the device-to-device copy rate measured in
the same run.  Writes JSON records (benchmarks/results/pi_<date>.json unless --out names another path)
and prints a table last. Run: ``python3 benchmarks/pi/bench_pi.py`` (CUDA).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from typing import Callable, Dict, List

import torch
import triton
from triton.testing import do_bench

from also_fused.kernels.group_pi import pi_update
from also_fused.kernels.losses import rgd_loss, weighted_loss

EPS = 1.1920929e-07
HP = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=EPS)
L2_BYTES = 50 * 2**20


def torch_pi_step(pi: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The published step: dense G = scatter_add(-l), then the log-domain softmax."""
    G = torch.zeros_like(pi).scatter_add_(0, ids, -losses)
    c = HP["pi_decay"] * HP["pi_lr"]
    log_reg = math.log(1.0 / pi.numel())
    z = (torch.log(pi + EPS) + c * log_reg - HP["pi_lr"] * G) / (1.0 + c)
    return torch.softmax(z / HP["temperature"], dim=0)


def torch_pi_optimistic(pi: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor):
    G = torch.zeros_like(pi).scatter_add_(0, ids, -losses)
    c = HP["pi_decay"] * HP["pi_lr"]
    outs = []
    src = pi
    for _ in range(2):
        z = (torch.log(src + EPS) - HP["pi_lr"] * G) / (1.0 + c)
        src = torch.softmax(z / HP["temperature"], dim=0)
        outs.append(src)
    return outs


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = 256 * 2**20  # 1 GiB of float32
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=reps, return_mode="median")
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)


def rotating(fn_sets: List[Callable[[], object]]) -> Callable[[], None]:
    state = {"k": 0}

    def run() -> None:
        fn_sets[state["k"]]()
        state["k"] = (state["k"] + 1) % len(fn_sets)

    return run


def graph_ms(fns: List[Callable[[], object]], reps: int) -> float:
    """Time per call when len(fns) calls are replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ms = do_bench(g.replay, warmup=25, rep=reps, return_mode="median")
    return ms / len(fns)


def bench_pi(n: int, B: int, reps: int, gen: torch.Generator) -> List[Dict]:
    sets = max(1, min(16, math.ceil(3 * L2_BYTES / (12 * n))))
    data = []
    for _ in range(sets):
        p = torch.rand(n, generator=gen) + 0.01
        p = (p / p.sum()).cuda()
        ids = torch.randint(0, n, (B,), generator=gen).cuda()
        ls = (torch.rand(B, generator=gen) * 3 + 0.1).cuda()
        data.append((p, ids, ls, torch.empty_like(p)))
    # correctness spot check against the torch step before timing
    p, ids, ls, mid = data[0]
    ref = torch_pi_step(p, ids, ls)
    got = pi_update(p.clone(), ids, ls, **HP)
    err = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert err < 1e-5, err
    out = []
    for mode in ("descent-ascent", "optimistic"):
        second = mode == "optimistic"

        def tri(d, path=None):
            return lambda: pi_update(d[0], d[1], d[2], **HP, out=d[0],
                                     second_out=d[3] if second else None, _path=path)

        def ref_fn(d):
            return (lambda: torch_pi_optimistic(d[0], d[1], d[2])) if second else (
                lambda: torch_pi_step(d[0], d[1], d[2]))

        bytes_min = (12 if second else 8) * n + 12 * B
        variants = [("triton", [tri(d) for d in data]),
                    ("triton-dense-sums", [tri(d, "dense") for d in data]),
                    ("torch", [ref_fn(d) for d in data])]
        if n <= 256:
            variants.pop(1)
        for impl, fns in variants:
            ms = do_bench(rotating(fns), warmup=25, rep=reps, return_mode="median")
            rec = dict(workload=f"pi_{mode}_n{n:.0e}_B{B}", impl=impl, n_groups=n, batch=B,
                       mode=mode, median_ms=ms, bytes_per_step=bytes_min)
            if impl.startswith("triton"):
                rec["graph_ms"] = graph_ms((fns * math.ceil(20 / len(fns)))[:20], reps)
            out.append(rec)
    return out


def bench_losses(B: int, reps: int, gen: torch.Generator) -> List[Dict]:
    n = 1000
    pi = (torch.rand(n, generator=gen) + 0.1).cuda()
    ids = torch.randint(0, n, (B,), generator=gen).cuda()
    base = (torch.rand(B, generator=gen) * 3).cuda()
    x = base.clone().requires_grad_(True)
    s = n / B
    T = 2.0

    def wl_tri():
        weighted_loss(pi, ids, x, s).backward()

    def wl_torch():
        (s * (pi[ids] * x).sum()).backward()

    def rgd_tri():
        rgd_loss(x, T).backward()

    def rgd_torch():
        w = torch.exp(torch.clamp(x.detach(), max=T) / (T + 1.0))
        (w * x).mean().backward()

    out = []
    for name, fns, nbytes in (("weighted_loss_fwd_bwd", (wl_tri, wl_torch), B * (8 + 4 + 4 + 4 + 4)),
                              ("rgd_fwd_bwd", (rgd_tri, rgd_torch), B * (4 + 4 + 4))):
        for impl, fn in zip(("triton", "torch"), fns):
            ms = do_bench(fn, warmup=25, rep=reps, return_mode="median", grad_to_none=[x])
            out.append(dict(workload=f"{name}_B{B}", impl=impl, batch=B, median_ms=ms,
                            bytes_per_step=nbytes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    reps = 40 if args.quick else 200
    gen = torch.Generator().manual_seed(0)
    B = 4096
    copy_bw = copy_bandwidth(reps)
    recs: List[Dict] = []
    for n in ((10_000, 1_000_000) if args.quick else (10_000, 1_000_000, 10_000_000)):
        recs += bench_pi(n, B, reps, gen)
    recs += bench_losses(B, reps, gen)
    torch_ms = {r["workload"]: r["median_ms"] for r in recs if r["impl"] == "torch"}
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=_dt.datetime.now().isoformat(timespec="seconds"),
                copy_bw_tbs=copy_bw / 1e12)
    for r in recs:
        r.update(meta)
        r["pct_copy_bw"] = 100.0 * r["bytes_per_step"] / (r["median_ms"] * 1e-3) / copy_bw
        r["ratio_vs_torch"] = torch_ms[r["workload"]] / r["median_ms"]
        if "graph_ms" in r:
            r["pct_copy_bw_graph"] = (100.0 * r["bytes_per_step"] / (r["graph_ms"] * 1e-3)
                                      / copy_bw)
    path = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                                    f"pi_{_dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(recs, f, indent=1)
    print(f"device {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"copy {copy_bw / 1e12:.2f} TB/s  -> {path}")
    print(f"{'workload':40s} {'impl':18s} {'median_ms':>10s} {'graph_ms':>9s} {'MB':>8s} "
          f"{'%copy':>6s} {'%copy_g':>7s} {'x torch':>8s}")
    for r in recs:
        g = r.get("graph_ms")
        print(f"{r['workload']:40s} {r['impl']:18s} {r['median_ms']:10.4f} "
              f"{'' if g is None else f'{g:9.4f}':>9s} {r['bytes_per_step'] / 1e6:8.3f} "
              f"{r['pct_copy_bw']:6.1f} {r.get('pct_copy_bw_graph', float('nan')):7.1f} "
              f"{r['ratio_vs_torch']:8.2f}")


if __name__ == "__main__":
    main()
