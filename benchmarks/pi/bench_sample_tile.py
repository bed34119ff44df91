"""The many-groups pi step's sample programs by tile: samples per program x ids per loop step x warps.

The sample programs (``_pi_sample_sums_kernel`` in kernels/group_pi.py) compare each of a program's samples with
every id of the batch to find a group's first sample and its loss sum; their tile sets the registers, the
programs per batch and the order in which a group's losses are added (so the bits where a group has 3 or more
samples in one batch). For each --sizes (10^5 takes the dense variant, 10^7 the sparse one at batch 4096) and
both updates (pi; pi and pi_mid), every tile's pi step is captured in a CUDA graph with kept launches, as the
optimizers call it, and the graphs are replayed interleaved, --iters replays per block between CUDA events,
--rounds blocks each; then, after every size is timed, torch.profiler gives each tile's GPU time per kernel.
Writes JSON: per tile the median, min and max per step, the sample kernel's time, and each tile's score (sum over
cases of its median over the case's best).

Run: ``python3 benchmarks/pi/bench_sample_tile.py --out benchmarks/results/pi_sample_tile_<gpu>.json`` (CUDA)."""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys

import torch

from also_fused.kernels import group_pi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_pi_stream import kernel_times  # noqa: E402
from results_io import source_digest  # noqa: E402

HP = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07, log_pi_reg=None)
DEFAULT_TILE = (group_pi._SAMPLE_BI, group_pi._SAMPLE_BK, group_pi._SAMPLE_WARPS)


def set_tile(tile: tuple[int, int, int]) -> None:
    group_pi._SAMPLE_BI, group_pi._SAMPLE_BK, group_pi._SAMPLE_WARPS = tile


def captured_step(pi0: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor, second: bool, module=group_pi):
    """A graph of one pi step (``module.pi_update_checked``: group_pi or a variant of it) with its own pi, pi_mid,
    cache and workspace; returns the graph and the eager call (the call's closure holds every tensor the graph
    reads or writes)."""
    pi, mid, cache, workspace = pi0.clone(), torch.empty_like(pi0), {}, {}

    def call() -> None:
        module.pi_update_checked(pi, ids, losses, out=pi, second_out=mid if second else None, cache=cache,
                                 workspace=workspace, **HP)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph, call


def replay_interleaved(graphs: dict, iters: int, rounds: int) -> dict:
    """us per replay of each graph: blocks of ``iters`` replays between CUDA events, the graphs in turn, ``rounds``
    times; {key: [us of each round]}."""
    times: dict = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                graph.replay()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end) * 1e3 / iters)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e7")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--bi", default="16,32")
    parser.add_argument("--bk", default="128,256")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    tiles = list(itertools.product(ints(args.bi), ints(args.bk), ints(args.warps)))
    rows, profiled, score = [], [], {tile: 0.0 for tile in tiles}
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gen = torch.Generator("cuda").manual_seed(n)
        pi0 = torch.full((n,), 1.0 / n, device="cuda")
        ids = torch.randint(0, n, (args.batch,), device="cuda", generator=gen)
        losses = torch.rand(args.batch, device="cuda", generator=gen) * 3
        for second in (False, True):
            steps = {}
            for tile in tiles:
                set_tile(tile)
                steps[tile] = captured_step(pi0, ids, losses, second)
            times = replay_interleaved({tile: graph for tile, (graph, _) in steps.items()}, args.iters, args.rounds)
            best = min(statistics.median(t) for t in times.values())
            for tile, t in times.items():
                row = dict(n_groups=n, second=second, bi=tile[0], bk=tile[1], warps=tile[2],
                           graph_us=statistics.median(t), graph_us_min=min(t), graph_us_max=max(t))
                rows.append(row)
                profiled.append((row, tile, steps[tile][1]))
                score[tile] += row["graph_us"] / best
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            del steps
    # the profiles after every replay: torch.profiler leaves CUPTI attached to the process, and what runs after a
    # profile runs slower (docs/performance.md); each tile's eager call, with its tensors, is kept until then
    for row, tile, call in profiled:
        set_tile(tile)
        kernels = kernel_times(call, args.iters)
        row.update(sample_kernel_us=kernels.get("_pi_sample_sums_kernel"), kernel_us_per_call=kernels)
    set_tile(DEFAULT_TILE)
    ranked = sorted(tiles, key=lambda tile: score[tile])
    print("score (lower is better):", {str(tile): round(score[tile], 3) for tile in ranked})
    record = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, source=source_digest(), batch=args.batch, default_tile=DEFAULT_TILE,
                  rows=rows, score={str(tile): score[tile] for tile in ranked}, best=ranked[0])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
