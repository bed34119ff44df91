"""One weight per sample, by the number of samples: a GroupWeights iteration against the same step in plain torch.

For n_groups in --sizes (10^3 ... 10^9) and both modes, batch --batch: one iteration is
``weights.weighted_loss(losses, ids)`` (forward and backward of the weighted loss) and ``weights.step()``,
as a training loop calls them; the plain-torch iteration is the same maths as torch ops (``pi[ids]``
weighting, a dense ``index_add_`` of the losses, the log-domain softmax mirror step; optimistic: the
extrapolated pi_mid as well). Each timed block is --iters iterations between two CUDA events (host and GPU
together, no sync inside), the two implementations interleaved block by block over --rounds rounds;
median and spread per size. Bytes a step must move (float32 pi): one read and one write of pi (descent-ascent:
8 bytes per group; the softmax's normaliser needs a pass over pi, which the previous step's write makes while it
writes pi); optimistic mode then needs pi_mid = PiUpdate(new pi, G), whose normaliser depends on every new
entry: one more read and write (16 bytes per group); as a fraction of the device-to-device copy rate measured in
the same run. A size whose plain step does not fit is timed for GroupWeights alone. With ``--graph`` each
implementation is also timed as a captured iteration (``torch.cuda.graph``: the batch copied into static
buffers, then one replay; GroupWeights with ``validate=False``, which capture needs; the plain step writing pi
in place), interleaved with the eager ones. A replay per iteration costs the host three launches, so a captured
iteration shorter than that measures the host; ``--graph-block K`` adds K iterations captured in one graph (each
copying its batch into the static buffers), one replay per K iterations: the GPU's time per iteration with the host
ahead of it. Each row also gives the host's time per iteration (the time the loop took to enqueue a block).
``--kernel-times`` adds each eager implementation's GPU time per kernel per iteration (torch.profiler, in a pass
after every row is timed: rows timed after a profile ran slower, CUPTI staying attached). Writes JSON
and a plot (time per iteration against n_groups).

Run: ``python3 benchmarks/pi/bench_object_level.py --out benchmarks/results/object_level_<gpu>.json`` (CUDA)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

import also_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
from results_io import source_digest  # noqa: E402

PI_LR, PI_DECAY, EPS = 1e-3, 1e-2, 1.1920929e-07


class PlainStep:
    """GroupWeights' maths in torch ops (docs/algorithm.md sec. 4, 6), uniform prior, temperature 1."""

    def __init__(self, n: int, batch: int, mode: str, device: str = "cuda", in_place: bool = False) -> None:
        self.in_place = in_place  # pi and pi_mid written into their own memory, as a captured step needs
        self.pi = torch.full((n,), 1.0 / n, device=device)
        self.pi_mid = self.pi.clone() if mode == "optimistic" else None
        self.scale = n / batch
        self.c = PI_DECAY * PI_LR
        self.log_reg = math.log(1.0 / n)
        self.sums = torch.zeros(n, device=device)

    def _update(self, src: torch.Tensor) -> torch.Tensor:
        z = (torch.log(src + EPS) + self.c * self.log_reg + PI_LR * self.sums) / (1.0 + self.c)
        return torch.softmax(z, dim=0)

    def weighted_loss(self, losses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        weights = (self.pi if self.pi_mid is None else self.pi_mid)[ids]
        self.sums.index_add_(0, ids, losses.detach())
        return self.scale * (weights * losses).sum()

    def step(self) -> None:
        if self.in_place:
            self.pi.copy_(self._update(self.pi))
            if self.pi_mid is not None:
                self.pi_mid.copy_(self._update(self.pi))
        else:
            self.pi = self._update(self.pi)
            if self.pi_mid is not None:
                self.pi_mid = self._update(self.pi)
        self.sums.zero_()


class PerIteration:
    """Runs ``iters`` iterations one ``iterate`` call each, the batches in turn; returns how many it ran."""

    def run(self, batches, iters: int) -> int:
        for i in range(iters):
            self.iterate(*batches[i % len(batches)])
        return iters


class Eager(PerIteration):
    """One iteration as a training loop writes it."""

    def __init__(self, impl) -> None:
        self.impl = impl

    def iterate(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self.impl.weighted_loss(losses, ids).backward()
        self.impl.step()


class Graphed(PerIteration):
    """The same iteration captured once in a CUDA graph; each iteration copies its batch into the static
    buffers the graph reads and replays it (torch.cuda.graph's recipe: warm-up on a side stream first)."""

    def __init__(self, impl, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self.ids = ids.clone()
        self.losses = losses.detach().clone().requires_grad_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._iteration(impl)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._captured(impl)

    def _captured(self, impl) -> None:
        self._iteration(impl)

    def _iteration(self, impl) -> None:
        self.losses.grad = None  # the captured backward then writes the gradient instead of adding to one
        impl.weighted_loss(self.losses, self.ids).backward()
        impl.step()

    def _load(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self.ids.copy_(ids)
        with torch.no_grad():
            self.losses.copy_(losses)

    def iterate(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self._load(ids, losses)
        self.graph.replay()


class GraphedBlock(Graphed):
    """``per_replay`` iterations captured in one CUDA graph, each copying its batch (one of the staged batches, in
    turn) into the static buffers first: one replay runs them all, so the timing is the GPU's time per iteration
    with the host running ahead, as in a training loop whose host enqueues faster than the GPU computes."""

    def __init__(self, impl, batches, per_replay: int) -> None:
        self.per_replay = per_replay
        self.staged = [(ids.clone(), losses.detach().clone()) for ids, losses in batches]
        super().__init__(impl, *batches[0])

    def _captured(self, impl) -> None:
        for i in range(self.per_replay):
            self._load(*self.staged[i % len(self.staged)])
            self._iteration(impl)

    def run(self, batches, iters: int) -> int:
        replays = max(1, iters // self.per_replay)
        for _ in range(replays):
            self.graph.replay()
        return replays * self.per_replay


def group_weights(n: int, batch: int, mode: str, validate: bool = True) -> also_fused.GroupWeights:
    return also_fused.GroupWeights(n, batch_size=batch, pi_lr=PI_LR, pi_decay=PI_DECAY, mode=mode, device="cuda",
                                   validate=validate)


def copy_rate() -> float:
    """Device-to-device copy rate, bytes read plus written per second (1 GiB, median of 20)."""
    src = torch.rand(256 * 2 ** 20, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times[2:]) * 1e-3)


def block_us(impl, batches, iters: int) -> tuple[float, float]:
    """(GPU, host) us per iteration of about ``iters`` iterations between two events: the GPU time is the events'
    interval, the host time the time the loop took to enqueue them (the events' end not waited for)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    done = impl.run(batches, iters)
    host = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / done, host * 1e6 / done


def profile_host(n: int, batch: int) -> None:
    """Where the host time of a GroupWeights iteration goes (own time per function)."""
    import cProfile
    import io
    import pstats
    import time
    ids = torch.randint(0, n, (batch,), device="cuda")
    losses = (torch.rand(batch, device="cuda") * 3).requires_grad_()
    for mode in ("descent-ascent", "optimistic"):
        weights = group_weights(n, batch, mode)
        host = {}
        for name, impl in (("GroupWeights", Eager(weights)), ("plain torch", Eager(PlainStep(n, batch, mode)))):
            block_us(impl, [(ids, losses)], 10)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                impl.iterate(ids, losses)
            host[name] = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            weights.weighted_loss(losses, ids).backward()
            weights.step()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(f"{mode}: host us per iteration (no profiler): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
        print(text.getvalue())


def make_batches(n: int, batch: int) -> list:
    """The four batches each size's iterations cycle through (the same for every implementation and pass)."""
    gen = torch.Generator("cuda").manual_seed(n)
    return [(torch.randint(0, n, (batch,), device="cuda", generator=gen),
             (torch.rand(batch, device="cuda", generator=gen) * 3).requires_grad_())
            for _ in range(4)]


def build(n: int, mode: str, batches: list, args, eager_only: bool = False) -> dict:
    """The implementations of one row, warmed up (compiled, allocated): GroupWeights and the plain step, eager and
    (--graph, --graph-block, unless ``eager_only``) captured; without the plain ones where they do not fit."""
    graph = args.graph and not eager_only
    graph_block = args.graph_block and not eager_only
    impls = {"GroupWeights": Eager(group_weights(n, args.batch, mode))}
    if graph:
        impls["GroupWeights (graph)"] = Graphed(group_weights(n, args.batch, mode, validate=False), *batches[0])
    if graph_block:
        impls["GroupWeights (graph block)"] = GraphedBlock(group_weights(n, args.batch, mode, validate=False),
                                                           batches, args.graph_block)
    try:
        impls["plain torch"] = Eager(PlainStep(n, args.batch, mode))
        if graph:
            impls["plain torch (graph)"] = Graphed(PlainStep(n, args.batch, mode, in_place=True), *batches[0])
        if graph_block:
            impls["plain torch (graph block)"] = GraphedBlock(PlainStep(n, args.batch, mode, in_place=True), batches,
                                                              args.graph_block)
        for impl in impls.values():  # warm-up (compiles, allocates); a plain step that does not fit goes
            block_us(impl, batches, 3)
    except torch.OutOfMemoryError:
        for name in ("plain torch", "plain torch (graph)", "plain torch (graph block)"):
            impls.pop(name, None)
        torch.cuda.empty_cache()
    return impls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7,1e8,1e9")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", default=None, metavar="N",
                        help="only profile the host: cProfile of 200 GroupWeights iterations at N groups, both modes")
    parser.add_argument("--graph", action="store_true",
                        help="also time each implementation as a captured CUDA graph, replayed per iteration")
    parser.add_argument("--graph-block", type=int, default=0, metavar="K",
                        help="also time each implementation as K iterations captured in one graph, one replay per K "
                             "iterations (the GPU's time per iteration with the host ahead of it; --iters a multiple "
                             "of K)")
    parser.add_argument("--kernel-times", action="store_true",
                        help="also the GPU time of each kernel of an eager iteration (torch.profiler, --iters iterations)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.profile:
        profile_host(int(float(args.profile)), args.batch)
        return
    if args.graph_block and args.iters % args.graph_block:
        parser.error("--iters must be a multiple of --graph-block")
    rate = copy_rate()
    rows = []
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    for n in sizes:
        batches = make_batches(n, args.batch)
        for mode in ("descent-ascent", "optimistic"):
            impls = build(n, mode, batches, args)
            times = {name: [] for name in impls}
            host = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, impl in impls.items():
                    gpu_us, host_us = block_us(impl, batches, args.iters)
                    times[name].append(gpu_us)
                    host[name].append(host_us)
            must_move = (16 if mode == "optimistic" else 8) * n
            row = dict(n_groups=n, mode=mode, batch=args.batch)
            for name, us in times.items():
                med = statistics.median(us)
                row[name] = dict(us_per_iteration=med, us_min=min(us), us_max=max(us), per_round=us,
                                 host_us_per_iteration=statistics.median(host[name]),
                                 bytes_must_move=must_move, of_copy_rate=must_move / (med * 1e-6) / rate)
            for ours, plain, key in (("GroupWeights", "plain torch", ""),
                                     ("GroupWeights (graph)", "plain torch (graph)", "_graphs"),
                                     ("GroupWeights (graph)", "plain torch", "_graph_vs_eager"),
                                     ("GroupWeights (graph block)", "plain torch (graph block)", "_graph_blocks")):
                if ours in times and plain in times:
                    ratios = [p / g for p, g in zip(times[plain], times[ours])]
                    row["speedup_vs_plain" + key] = statistics.median(ratios)
            rows.append(row)
            print(json.dumps({k: (round(v["us_per_iteration"], 1) if isinstance(v, dict) else v)
                              for k, v in row.items()}), flush=True)
            del impls
            torch.cuda.empty_cache()
    if args.kernel_times:
        # after every timing: rows timed after a profile in the same process ran slower than the first row (host
        # time per iteration and the graphs' GPU time), as torch.profiler leaves CUPTI attached to the process
        from bench_pi_stream import kernel_times  # imports this module: only here, not at the top
        for row in rows:
            batches = make_batches(row["n_groups"], args.batch)
            impls = build(row["n_groups"], row["mode"], batches, args, eager_only=True)
            row["kernel_us_per_iteration"] = {
                name: kernel_times(lambda impl=impl: impl.iterate(*batches[0]), args.iters)
                for name, impl in impls.items()}
            del impls
            torch.cuda.empty_cache()
    record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, also_fused_source=source_digest(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), copy_rate_bytes_per_s=rate,
                  iters=args.iters, rounds=args.rounds, graph_block=args.graph_block, rows=rows)
    out = args.out or "object_level.json"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    plot_rows(rows, f"weighted_loss + step, batch {args.batch}, {record['device']}", os.path.splitext(out)[0] + ".png")
    print("wrote", out)


def plot_rows(rows: list, title: str, path: str) -> None:
    """us per iteration against n_groups (log-log), each implementation and mode a line; nothing without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, style in (("descent-ascent", "-"), ("optimistic", "--")):
        for name, marker in (("GroupWeights", "o"), ("plain torch", "s"), ("GroupWeights (graph)", "^"),
                             ("plain torch (graph)", "v"), ("GroupWeights (graph block)", "D"),
                             ("plain torch (graph block)", "x")):
            pts = sorted((r["n_groups"], r[name]["us_per_iteration"]) for r in rows if r["mode"] == mode and name in r)
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{name}, {mode}")
    ax.set(xscale="log", yscale="log", xlabel="n_groups (one per sample)", ylabel="us per iteration", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
