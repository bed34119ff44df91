"""CPU benchmark of one optimizer step: also_fused against torch's fused CPU Adam/AdamW, interleaved.

Workloads (float32, 30 weight matrices and 30 biases, random non-zero gradients, n_groups 10,
batch 256): "4.7M" (390 x 400 weights), with every implementation; and the
sweep sizes "1M" and "19M" (square weights of width 180 and 790) with the main ones. Every round
steps every implementation of a workload once, in a shuffled order, so that changes in the
machine's load hit all of them alike. The table reports the median over rounds and the ratio to
torch.optim.Adam(fused=True) (AdamW rows: to torch.optim.AdamW(fused=True)). Writes JSON records
to benchmarks/results/cpu_step.json. Run: ``python3 benchmarks/cpu/bench_cpu.py`` (``make bench-cpu``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: published_loop.py
sys.path.insert(0, BENCH)

import also_fused  # noqa: E402
from published_loop import PublishedStyleALSO  # noqa: E402

N_GROUPS, BATCH = 10, 256
WORKLOADS = {"4.7M": [(390, 400)] * 30 + [(400,)] * 30,
             "1M": [(180, 180)] * 30 + [(180,)] * 30,
             "19M": [(790, 790)] * 30 + [(790,)] * 30}
ADAM_FUSED, ADAMW_FUSED = "torch Adam (fused=True)", "torch AdamW (fused=True)"
# the bounds the CPU path is held to (x torch fused, same run)
TARGETS = {"also_fused Adam": 1.15, "also_fused AdamW": 1.15, "also_fused ALSO descent-ascent, loop": 1.35,
           "also_fused ALSO optimistic, loop": 2.4}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_cpu_record(path: str, **fields) -> None:
    """Writes ``fields`` as JSON with what they were measured on and with: the CPU, its threads, torch, the
    extension's pi loops (their instruction set), the package's source digest, the time."""
    from results_io import source_digest

    extension = also_fused.cpu_fused.available()[0]
    record = dict(cpu=cpu_name(), cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  extension=extension,
                  pi_instruction_set=also_fused.cpu_fused._cpu_adam.pi_instruction_set() if extension else None,
                  also_fused_source=source_digest(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  **fields)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]


def implementations(ids: torch.Tensor, losses: torch.Tensor, full: bool,
                    precisions: bool = False) -> dict[str, Callable]:
    """name -> build(params) -> step function. ``full`` adds the context rows, ``precisions`` the
    state_precision rows (moments in bf16 or as 8-bit codes)."""
    def closure(pi_sel, scale):
        return losses, None

    def also_step(mode, api, backend="auto", state_precision="float32"):
        def build(params):
            opt = also_fused.ALSO(params, N_GROUPS, batch_size=BATCH, mode=mode, backend=backend,
                                  state_precision=state_precision)
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
        ADAM_FUSED: lambda ps: torch.optim.Adam(ps, weight_decay=1e-3, fused=True).step,
        ADAMW_FUSED: lambda ps: torch.optim.AdamW(ps, weight_decay=1e-3, fused=True).step,
        "also_fused Adam": lambda ps: also_fused.Adam(ps, weight_decay=1e-3).step,
        "also_fused AdamW": lambda ps: also_fused.AdamW(ps, weight_decay=1e-3).step,
        "also_fused ALSO descent-ascent, loop": also_step("descent-ascent", "loop"),
        "also_fused ALSO descent-ascent, closure": also_step("descent-ascent", "closure"),
        "also_fused ALSO optimistic, loop": also_step("optimistic", "loop"),
        "also_fused ALSO optimistic, closure": also_step("optimistic", "closure"),
    }
    if full:
        impls.update({
            "also_fused Adam (reference)": lambda ps: also_fused.Adam(ps, weight_decay=1e-3, backend="reference").step,
            "also_fused ALSO descent-ascent, loop (reference)": also_step("descent-ascent", "loop", "reference"),
            "also_fused ALSO optimistic, loop (reference)": also_step("optimistic", "loop", "reference"),
            "published-style ALSO descent-ascent": published("descent-ascent"),
            "published-style ALSO optimistic": published("optimistic"),
        })
    if precisions:
        for precision in ("bfloat16", "int8"):
            impls[f"also_fused AdamW {precision}"] = (
                lambda ps, precision=precision: also_fused.AdamW(ps, weight_decay=1e-3, state_precision=precision).step)
            impls[f"also_fused ALSO optimistic, loop, {precision}"] = also_step("optimistic", "loop",
                                                                              state_precision=precision)
    return impls


def bench_workload(shapes, impls: dict[str, Callable], warmup: int, rounds: int, seed: int) -> dict[str, list]:
    """Step times (ms) per implementation, all stepped once per round in a shuffled order."""
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    params = {name: make_params(shapes) for name in impls}
    steps = {name: build(params[name]) for name, build in impls.items()}
    order = list(impls)
    rng = random.Random(seed)
    times: dict[str, list] = {name: [] for name in impls}
    for k in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            for p, g in zip(params[name], grads[k % 2]):
                p.grad = g
            t0 = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - t0
            if k >= warmup:
                times[name].append(1e3 * elapsed)
    return times


def baseline_of(name: str) -> str:
    return ADAMW_FUSED if "AdamW" in name else ADAM_FUSED


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default="4.7M,1M,19M", help="comma-separated, from " + ", ".join(WORKLOADS))
    parser.add_argument("--precisions", action="store_true",
                        help="add also_fused AdamW and ALSO with bf16 and 8-bit moments (state_precision)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order within a round")
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "cpu_step.json"))
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, N_GROUPS, (BATCH,), generator=gen)
    losses = torch.rand(BATCH, generator=gen) + 0.5
    backend = also_fused.Adam([torch.nn.Parameter(torch.zeros(1))])._backend_for(torch.device("cpu"))
    meta = dict(device=f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
                torch=torch.__version__, date=datetime.date.today().isoformat(), backend_auto=backend)
    records = []
    for w in args.workloads.split(","):
        shapes = WORKLOADS[w]
        n_params = sum(torch.Size(s).numel() for s in shapes)
        full = w == "4.7M"
        rounds = args.rounds if n_params < 10e6 else max(10, args.rounds // 2)
        times = bench_workload(shapes, implementations(ids, losses, full, args.precisions), args.warmup, rounds, args.seed)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            q = statistics.quantiles(t, n=4)
            records.append(dict(meta, workload=f"{w}: {n_params / 1e6:.1f}M fp32 params in {len(shapes)} tensors, "
                                                f"n_groups {N_GROUPS}, batch {BATCH}",
                                size=w, impl=name, median_ms=med[name], p25_ms=q[0], p75_ms=q[2], rounds=len(t),
                                baseline=baseline_of(name), ratio_vs_torch_fused=med[name] / med[baseline_of(name)]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)

    print(f"\n{meta['device']}; torch {meta['torch']}; {meta['date']}; backend='auto' on CPU runs {backend!r}")
    for w in ordered(r["size"] for r in records):
        rows = [r for r in records if r["size"] == w]
        print(f"\n{rows[0]['workload']} ({rows[0]['rounds']} interleaved rounds)")
        print("| implementation | median ms/step (p25-p75) | x torch fused |\n|---|---|---|")
        for r in rows:
            print(f"| {r['impl']} | {r['median_ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f}) | "
                  f"{r['ratio_vs_torch_fused']:.2f} |")
    print("\nbounds (x torch fused):")
    for w in ordered(r["size"] for r in records):
        for r in records:
            if r["size"] == w and r["impl"] in TARGETS:
                bound = TARGETS[r["impl"]]
                verdict = "ok" if r["ratio_vs_torch_fused"] <= bound else "ABOVE"
                print(f"  {w:5s} {r['impl']:40s} {r['ratio_vs_torch_fused']:5.2f} <= {bound:4.2f} {verdict}")


def ordered(values):
    return list(dict.fromkeys(values))


if __name__ == "__main__":
    main()
