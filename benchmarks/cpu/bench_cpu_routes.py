"""The candidate routes for ALSO's Adam update on the CPU, timed interleaved against torch's fused Adam.

Why the fast CPU path (also_fused/cpu_fused.py) runs ALSO's updates in the compiled extension:

* torch's fused CPU kernel computes ALSO's step when given eps' = eps / sqrt(1 - beta2^t) (one call
  per param group and step count); one step then costs what torch fused Adam costs, but the
  optimistic mode needs three passes: the main step on the iterate x, a copy of x into the params,
  the extrapolation step on the params;
* a torch.compile'd single pass (``--inductor``; C++ code generated per set of shapes, compiled on
  the first call);
* the extension's single pass (also_fused/csrc/cpu_adam.cpp).

Also prints how far each route's ALSO step lies from the float64 AdamStep for several step counts.
Workload: 4.7M float32 params in 60 tensors (30 of 390 x 400, 30 of 400).
Run: ``python3 benchmarks/cpu/bench_cpu_routes.py [--inductor]`` (prints a table; writes no file).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch

from also_fused import _cpu_adam

SHAPES = [(390, 400)] * 30 + [(400,)] * 30
LR, BETA1, BETA2, EPS, WD = 1e-3, 0.9, 0.999, 1.1920928955078125e-07, 1e-3


def tensors(scale=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def eps_prime(t: float) -> float:
    return EPS / math.sqrt(1.0 - BETA2**t)


def fused(params, grads, m, v, steps, eps):
    torch._fused_adam_(params, grads, m, v, [], steps, lr=LR, beta1=BETA1, beta2=BETA2, weight_decay=WD, eps=eps,
                       amsgrad=False, maximize=False)


def extension(sources, grads, m, v, steps, destinations, extrapolate_to=()):
    """also_fused's single-pass update (``steps``: the counts before it, advanced by it)."""
    ok = _cpu_adam.adam_update(sources, grads, m, v, [], steps, destinations, [(LR, BETA1, BETA2, EPS, WD)],
                               [0] * len(sources), True, False, False, 1.0, [], [], list(extrapolate_to), 1.0, [],
                               1.0, True, [], [], [],  # no 8-bit moments
                               *([[]] if getattr(_cpu_adam, "stochastic_rounding", False) else []))  # no rounding
    assert ok


def compiled_optimistic():
    """x1 = x + AdamStep(x, g) into x, y = x1 + AdamStep(x1, g) into p, one torch.compile'd pass."""
    def one_pass(xs, gs, ms, vs, ps, coef):
        for i in range(len(xs)):
            c = coef[i]  # wd, 1-beta1, beta2, 1-beta2, eps, step size of x1, step size of y
            x, g, m, v = xs[i], gs[i], ms[i], vs[i]
            d = g + c[0] * x
            m1 = torch.lerp(m, d, c[1])
            v1 = v * c[2] + c[3] * d * d
            x1 = x - c[5] * m1 / (v1.sqrt() + c[4])
            d2 = g + c[0] * x1
            m2 = torch.lerp(m1, d2, c[1])
            v2 = v1 * c[2] + c[3] * d2 * d2
            x.copy_(x1)
            m.copy_(m2)
            v.copy_(v2)
            ps[i].copy_(x1 - c[6] * m2 / (v2.sqrt() + c[4]))
    return torch.compile(one_pass, fullgraph=True, dynamic=False)


def step_size(t: float) -> float:
    return LR * math.sqrt(1 - BETA2**t) / (1 - BETA1**t)


def accuracy():
    """Relative error of one ALSO step (the change of x) against float64, per route and step count."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=gen) * 1e-3
    g = torch.randn(4096, generator=gen) * 1e-2
    m = torch.randn(4096, generator=gen) * 1e-3
    v = torch.rand(4096, generator=gen) * 1e-5
    print("\nALSO step against float64 (relative error of the change of x):")
    print("| t | torch fused kernel, eps' | extension |\n|---|---|---|")
    for t in (1, 2, 10, 100, 1000, 10**4, 10**5):
        d = g.double() + WD * x.double()
        m1 = BETA1 * m.double() + (1 - BETA1) * d
        v1 = BETA2 * v.double() + (1 - BETA2) * d * d
        want = -step_size(t) * m1 / (v1.sqrt() + EPS)
        errs = []
        for route in ("fused", "extension"):
            xs, ms, vs = [x.clone()], [m.clone()], [v.clone()]
            if route == "fused":  # torch's kernel reads the count of this step
                fused(xs, [g], ms, vs, [torch.tensor(float(t))], eps_prime(t))
            else:  # the extension reads the count before the step and advances it
                extension(xs, [g], ms, vs, [torch.tensor(float(t - 1))], xs)
            got = xs[0].double() - x.double()
            errs.append(float((got - want).norm() / want.norm()))
        print(f"| {t} | {errs[0]:.1e} | {errs[1]:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--inductor", action="store_true", help="add the torch.compile'd pass (compiles first)")
    args = parser.parse_args()
    grads = tensors(1.0, seed=1)
    zeros = lambda: [torch.zeros(s) for s in SHAPES]  # noqa: E731
    st = [torch.tensor(10.0) for _ in SHAPES]
    bufs = {k: dict(p=tensors(), x=tensors(), m=zeros(), v=zeros()) for k in range(6)}
    e = eps_prime(float(st[0]))

    def three_passes(b):
        fused(b["x"], grads, b["m"], b["v"], st, e)
        torch._foreach_copy_(b["p"], b["x"])
        fused(b["p"], grads, b["m"], b["v"], st, e)

    routes = {
        "torch fused Adam step (torch.optim.Adam(fused=True)'s kernel)":
            lambda: fused(bufs[0]["p"], grads, bufs[0]["m"], bufs[0]["v"], st, 1e-8),
        "ALSO step, torch fused kernel with eps'":
            lambda: fused(bufs[1]["p"], grads, bufs[1]["m"], bufs[1]["v"], st, e),
        "ALSO step, extension":
            lambda: extension(bufs[2]["p"], grads, bufs[2]["m"], bufs[2]["v"], st, bufs[2]["p"]),
        "ALSO optimistic update, torch fused kernel twice + copy": lambda: three_passes(bufs[3]),
        "ALSO optimistic update, extension (one pass)":
            lambda: extension(bufs[4]["x"], grads, bufs[4]["m"], bufs[4]["v"], st, bufs[4]["x"], bufs[4]["p"]),
    }
    if args.inductor:
        fn = compiled_optimistic()
        coef = torch.tensor([[WD, 1 - BETA1, BETA2, 1 - BETA2, EPS, step_size(9.0), step_size(10.0)]] * len(SHAPES))
        b = bufs[5]
        t0 = time.perf_counter()
        fn(b["x"], grads, b["m"], b["v"], b["p"], coef)
        print(f"torch.compile: first call (compilation) {time.perf_counter() - t0:.1f} s")
        routes["ALSO optimistic update, torch.compile'd pass"] = lambda: fn(b["x"], grads, b["m"], b["v"], b["p"], coef)
    times = {k: [] for k in routes}
    order = list(routes)
    rng = random.Random(0)
    for k in range(args.warmup + args.rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            routes[name]()
            if k >= args.warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    base = statistics.median(times[next(iter(routes))])
    print(f"\n4.7M fp32 params in 60 tensors, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds")
    print("| route | median ms (p25-p75) | x torch fused Adam step |\n|---|---|---|")
    for name, t in times.items():
        q = statistics.quantiles(t, n=4)
        print(f"| {name} | {statistics.median(t):.2f} ({q[0]:.2f}-{q[2]:.2f}) | {statistics.median(t) / base:.2f} |")
    accuracy()


if __name__ == "__main__":
    main()
