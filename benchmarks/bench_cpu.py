"""CPU benchmark of one optimizer step: also_fused's reference path vs torch.optim.Adam, in one run.

Workload: 4.7M float32 params in 60 tensors (30 weight matrices and 30 biases), random non-zero
gradients, n_groups = 10, batch 256. Times the whole ``step()`` call: warm-up, then the median of
many runs. Writes JSON records to benchmarks/results/ and prints a table with ratios to
torch.optim.Adam(foreach=False).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import also_fused  # noqa: E402
from published_loop import PublishedStyleALSO  # noqa: E402

N_GROUPS, BATCH = 10, 256


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(390, 400)] * 30 + [(400,)] * 30
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]


def bench(step_fn, params, grads, warmup, iters):
    times = []
    for k in range(warmup + iters):
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[warmup:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_step.json"))
    args = parser.parse_args()
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = lambda x, **k: x  # noqa: E731

    gen = torch.Generator().manual_seed(1)
    template = make_params()
    grads = [[torch.randn(p.shape, generator=gen) for p in template] for _ in range(2)]
    ids = torch.randint(0, N_GROUPS, (BATCH,), generator=gen)
    losses = torch.rand(BATCH, generator=gen) + 0.5
    n_params = sum(p.numel() for p in template)

    def closure(pi_sel, scale):
        return losses, None

    def also_step(mode, api):
        def build(params):
            opt = also_fused.ALSO(params, N_GROUPS, batch_size=BATCH, mode=mode, backend="reference")
            if api == "closure":
                return lambda: opt.step(closure, ids)

            def loop():
                opt.weighted_loss(losses, ids)
                return opt.step()
            return loop
        return build

    def published(mode):
        def build(params):
            opt = PublishedStyleALSO(params, N_GROUPS, N_GROUPS / BATCH, mode=mode)
            return lambda: opt.step(closure, ids)
        return build

    impls = {
        "torch Adam (foreach=False)": lambda ps: torch.optim.Adam(ps, weight_decay=1e-3, foreach=False).step,
        "torch Adam (foreach=True)": lambda ps: torch.optim.Adam(ps, weight_decay=1e-3, foreach=True).step,
        "also_fused Adam (reference)": lambda ps: also_fused.Adam(ps, weight_decay=1e-3, backend="reference").step,
        "published-style ALSO descent-ascent": published("descent-ascent"),
        "published-style ALSO optimistic": published("optimistic"),
        "also_fused ALSO descent-ascent, closure": also_step("descent-ascent", "closure"),
        "also_fused ALSO descent-ascent, loop": also_step("descent-ascent", "loop"),
        "also_fused ALSO optimistic, closure": also_step("optimistic", "closure"),
        "also_fused ALSO optimistic, loop": also_step("optimistic", "loop"),
    }
    results = {}
    for name in tqdm(list(impls), desc="cpu step benchmark"):
        params = make_params()
        results[name] = bench(impls[name](params), params, grads, args.warmup, args.iters)
    base = results["torch Adam (foreach=False)"]
    meta = dict(device=f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                torch=torch.__version__, date=datetime.date.today().isoformat(),
                workload=f"{n_params / 1e6:.1f}M fp32 params in {len(template)} tensors, n_groups {N_GROUPS}, "
                         f"batch {BATCH}")
    records = [dict(meta, impl=name, median_ms=ms, ratio_vs_torch_adam_single=ms / base,
                    bytes_per_step=None) for name, ms in results.items()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"\n{meta['workload']}; {meta['device']}; torch {meta['torch']}; {meta['date']}")
    print("| implementation | median ms/step | x torch Adam (foreach=False) |\n|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
