"""One weight per sample, by the number of samples: a GroupWeights iteration against the same step in plain torch.

For n_groups in --sizes (10^3 ... 10^9) and both modes, batch --batch: one iteration is
``weights.weighted_loss(losses, ids)`` (forward and backward of the weighted loss) and ``weights.step()``,
as a training loop calls them; the plain-torch iteration is the same maths as torch ops (``pi[ids]``
weighting, a dense ``index_add_`` of the losses, the log-domain softmax mirror step; optimistic: the
extrapolated pi_mid as well). Each timed block is --iters iterations between two CUDA events (host and GPU
together, no sync inside), the two implementations interleaved block by block over --rounds rounds;
median and spread per size. Bytes a step must move (float32 pi): the softmax needs pi's normaliser before
it can write, so one read of pi for it and one read and write for the update (descent-ascent: 12 bytes per
group); optimistic mode then needs pi_mid = PiUpdate(new pi, G), whose normaliser depends on every new entry:
one more read and write (20 bytes per group), as a fraction of the device-to-device copy rate measured in the
same run. A size whose plain step does not fit is timed for GroupWeights alone. Writes JSON and a plot
(time per iteration against n_groups).

Run: ``python3 benchmarks/pi/bench_object_level.py --out benchmarks/results/object_level_<gpu>.json`` (CUDA)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch

import also_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
from results_io import source_digest  # noqa: E402

PI_LR, PI_DECAY, EPS = 1e-3, 1e-2, 1.1920929e-07


class PlainStep:
    """GroupWeights' maths in torch ops (docs/algorithm.md sec. 4, 6), uniform prior, temperature 1."""

    def __init__(self, n: int, batch: int, mode: str, device: str = "cuda") -> None:
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
        self.pi = self._update(self.pi)
        if self.pi_mid is not None:
            self.pi_mid = self._update(self.pi)
        self.sums.zero_()


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


def block_us(impl, batches, iters: int) -> float:
    """us per iteration of ``iters`` iterations between two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        ids, losses = batches[i % len(batches)]
        impl.weighted_loss(losses, ids).backward()
        impl.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def profile_host(n: int, batch: int) -> None:
    """Where the host time of a GroupWeights iteration goes (own time per function)."""
    import cProfile
    import io
    import pstats
    import time
    ids = torch.randint(0, n, (batch,), device="cuda")
    losses = (torch.rand(batch, device="cuda") * 3).requires_grad_()
    for mode in ("descent-ascent", "optimistic"):
        weights = also_fused.GroupWeights(n, batch_size=batch, pi_lr=PI_LR, pi_decay=PI_DECAY, mode=mode, device="cuda")
        host = {}
        for name, impl in (("GroupWeights", weights), ("plain torch", PlainStep(n, batch, mode))):
            block_us(impl, [(ids, losses)], 10)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                impl.weighted_loss(losses, ids).backward()
                impl.step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7,1e8,1e9")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", default=None, metavar="N",
                        help="only profile the host: cProfile of 200 GroupWeights iterations at N groups, both modes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.profile:
        profile_host(int(float(args.profile)), args.batch)
        return
    rate = copy_rate()
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gen = torch.Generator("cuda").manual_seed(n)
        batches = [(torch.randint(0, n, (args.batch,), device="cuda", generator=gen),
                    (torch.rand(args.batch, device="cuda", generator=gen) * 3).requires_grad_())
                   for _ in range(4)]
        for mode in ("descent-ascent", "optimistic"):
            impls = {"GroupWeights": also_fused.GroupWeights(n, batch_size=args.batch, pi_lr=PI_LR,
                                                             pi_decay=PI_DECAY, mode=mode, device="cuda")}
            try:
                impls["plain torch"] = PlainStep(n, args.batch, mode)
                for impl in impls.values():  # warm-up (compiles, allocates); a plain step that does not fit goes
                    block_us(impl, batches, 3)
            except torch.OutOfMemoryError:
                impls.pop("plain torch", None)
                torch.cuda.empty_cache()
            times = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, impl in impls.items():
                    times[name].append(block_us(impl, batches, args.iters))
            must_move = (20 if mode == "optimistic" else 12) * n
            row = dict(n_groups=n, mode=mode, batch=args.batch)
            for name, us in times.items():
                med = statistics.median(us)
                row[name] = dict(us_per_iteration=med, us_min=min(us), us_max=max(us), per_round=us,
                                 bytes_must_move=must_move, of_copy_rate=must_move / (med * 1e-6) / rate)
            if "plain torch" in times:
                row["speedup_vs_plain"] = statistics.median(
                    [p / g for p, g in zip(times["plain torch"], times["GroupWeights"])])
            rows.append(row)
            print(json.dumps({k: (round(v["us_per_iteration"], 1) if isinstance(v, dict) else v)
                              for k, v in row.items()}), flush=True)
            del impls
            torch.cuda.empty_cache()
    record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, also_fused_source=source_digest(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), copy_rate_bytes_per_s=rate,
                  iters=args.iters, rounds=args.rounds, rows=rows)
    out = args.out or "object_level.json"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for mode, style in (("descent-ascent", "-"), ("optimistic", "--")):
            for name, marker in (("GroupWeights", "o"), ("plain torch", "s")):
                pts = [(r["n_groups"], r[name]["us_per_iteration"]) for r in rows if r["mode"] == mode and name in r]
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, label=f"{name}, {mode}")
        ax.set(xscale="log", yscale="log", xlabel="n_groups (one per sample)", ylabel="us per iteration",
               title=f"weighted_loss + step, batch {args.batch}, {record['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.splitext(out)[0] + ".png", dpi=120)
    except ImportError:
        pass
    print("wrote", out)


if __name__ == "__main__":
    main()
