"""Plots of the benchmark JSON records in benchmarks/results/, written next to them as PNG.

- theta_<dev>.json -> theta_<dev>_bw.png: percent of the measured copy bandwidth per workload x pass x
  implementation (grouped bars, one panel per workload and dtype).
- pi_<dev>.json    -> pi_<dev>_time.png: pi-step time against n_groups per implementation (log-log).
- step_<dev>.json  -> step_<dev>_time.png: whole optimizer step time per implementation (bars).
- cpu_step.json    -> cpu_step_ratio.png: CPU step time relative to torch's fused Adam (AdamW rows: fused
  AdamW), first workload of the file.

Ratios are recomputed from median_ms (time of the implementation / time of the baseline, so lower is
faster) rather than read from the records. Titles carry the device, date and versions of the records.
Usage: python benchmarks/plot_results.py [--results DIR]
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"also_fused": "tab:red", "torch_fused": "tab:blue", "torch_foreach": "tab:gray",
          "triton": "tab:red", "triton-dense-sums": "tab:orange", "torch": "tab:blue"}


def load(path: Path):
    with open(path) as f:
        return json.load(f)


def provenance(records) -> str:
    """'device, date, torch X, triton Y' from the records (every distinct value, in order)."""
    def distinct(key, fmt="{}"):
        vals = list(OrderedDict.fromkeys(str(r[key]) for r in records if r.get(key) is not None))
        return ", ".join(fmt.format(v) for v in vals)
    dates = list(OrderedDict.fromkeys(str(r["date"])[:10] for r in records if r.get("date")))
    parts = [distinct("device"), ", ".join(dates), distinct("torch", "torch {}"), distinct("triton", "triton {}")]
    return ", ".join(p for p in parts if p)


def ordered(values):
    return list(OrderedDict.fromkeys(values))


def impl_colors(records) -> list[str]:
    """Bar colours: torch blue, the published optimizer grey, this package red."""
    return ["tab:blue" if r["impl"].startswith("torch") else "tab:gray" if r["impl"].startswith("published")
            else "tab:red" for r in records]


def plot_theta(records, out: Path) -> None:
    workloads = ordered(r["workload"] for r in records)
    dtypes = ordered(r["dtype"] for r in records)
    passes = ordered(r["pass"] for r in records)
    impls = ordered(r["impl"] for r in records)
    fig, axes = plt.subplots(len(dtypes), len(workloads), figsize=(4.6 * len(workloads), 3.8 * len(dtypes)),
                             sharey=True, squeeze=False)
    width = 0.8 / len(impls)
    x = np.arange(len(passes))
    for i, dtype in enumerate(dtypes):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                vals = []
                for p in passes:
                    hit = [r for r in records if (r["workload"], r["dtype"], r["pass"], r["impl"]) == (wl, dtype, p, impl)]
                    vals.append(hit[0]["pct_copy_bw"] if hit else np.nan)
                bars = ax.bar(x + (k - (len(impls) - 1) / 2) * width, vals, width, label=impl,
                              color=COLORS.get(impl))
                for b, v in zip(bars, vals):
                    if np.isfinite(v):
                        ax.text(b.get_x() + b.get_width() / 2, v + 1.5, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
            ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
            ax.set_xticks(x)
            ax.set_xticklabels(passes)
            n_params = next(r.get("n_params") for r in records if r["workload"] == wl)
            ax.set_title(f"{wl} ({n_params / 1e6:.0f}M params), {dtype}" if n_params else f"{wl}, {dtype}", fontsize=9)
            ax.set_ylim(0, 130)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("% of measured copy bandwidth")
    axes[0][0].legend(fontsize=8, loc="upper left", ncol=len(impls))
    fig.suptitle("Theta pass (Adam update / optimistic extrapolation / closure pair): bytes per step / time "
                 "/ measured copy bandwidth\n" + provenance(records) + "\nbytes counted with fp32 moments for "
                 "every implementation (above 100%: it moved fewer bytes, e.g. torch fused keeps bf16 moments)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_pi(records, out: Path) -> None:
    recs = [r for r in records if r.get("n_groups") and r.get("mode")]
    modes = ordered(r["mode"] for r in recs)
    impls = ordered(r["impl"] for r in recs)
    batches = ordered(r.get("batch") for r in recs)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.6), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in impls:
            pts = sorted((r["n_groups"], r["median_ms"], r.get("graph_ms")) for r in recs
                         if r["mode"] == mode and r["impl"] == impl)
            if not pts:
                continue
            n, ms, graph = zip(*pts)
            color = COLORS.get(impl)
            ax.loglog(n, ms, marker="o", color=color, label=f"{impl} (eager launch)")
            if any(g is not None for g in graph):
                gn = [a for a, g in zip(n, graph) if g is not None]
                ax.loglog(gn, [g for g in graph if g is not None], marker="s", linestyle="--", color=color,
                          label=f"{impl} (CUDA graph replay)")
        ax.set_title(f"mode {mode}", fontsize=10)
        ax.set_xlabel("n_groups")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pi step, median ms")
    fig.suptitle(f"pi mirror-ascent step (scatter of losses + dense update), batch {', '.join(map(str, batches))}\n"
                 + provenance(recs), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_step(records, out: Path) -> None:
    base = next(r["median_ms"] for r in records if r["impl"] == "torch Adam fused")
    recs = records[::-1]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(recs) + 1.6))
    colors = impl_colors(recs)
    y = np.arange(len(recs))
    ax.barh(y, [r["median_ms"] for r in recs], color=colors)
    for yi, r in zip(y, recs):
        ax.text(r["median_ms"] * 1.04, yi, f"{r['median_ms']:.2f} ms  ({r['median_ms'] / base:.2f}x)",
                va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["impl"] for r in recs], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(r["median_ms"] for r in recs) * 4)
    ax.axvline(base, color="tab:blue", linestyle="--", linewidth=0.8)
    ax.set_xlabel("median ms per optimizer step (log scale); in brackets: time / torch Adam fused time (lower is faster)")
    ax.grid(axis="x", which="both", alpha=0.3)
    workloads = ", ".join(ordered(r["workload"] for r in records))
    ax.set_title(f"Whole optimizer step: {workloads}\n{provenance(records)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_cpu(records, out: Path) -> None:
    first = records[0].get("size")
    records = [r for r in records if r.get("size") == first]
    medians = {r["impl"]: r["median_ms"] for r in records}
    recs = records[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(recs) + 1.6))
    colors = impl_colors(recs)
    y = np.arange(len(recs))
    ratios = [r["median_ms"] / medians[r.get("baseline", "torch Adam (foreach=False)")] for r in recs]
    ax.barh(y, ratios, color=colors)
    for yi, ratio, r in zip(y, ratios, recs):
        ax.text(ratio + 0.03, yi, f"{ratio:.2f}x  ({r['median_ms']:.2f} ms)", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["impl"] for r in recs], fontsize=8)
    ax.set_xlim(0, max(ratios) * 1.3)
    baselines = " or ".join(ordered(r.get("baseline", "torch Adam (foreach=False)") for r in records))
    ax.set_xlabel(f"step time / {baselines} step time (lower is faster)")
    ax.grid(axis="x", alpha=0.3)
    workloads = ", ".join(ordered(r["workload"] for r in records))
    ax.set_title(f"CPU optimizer step: {workloads}\n{provenance(records)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON records")
    args = parser.parse_args()
    folder = Path(args.results)
    jobs = [("theta_*.json", plot_theta, "_bw"), ("pi_*.json", plot_pi, "_time"),
            ("step_*.json", plot_step, "_time"), ("cpu_step.json", plot_cpu, "_ratio")]
    written = []
    for pattern, fn, suffix in jobs:
        for path in sorted(folder.glob(pattern)):
            if pattern == "theta_*.json" and "sweep" in path.stem:
                continue  # kernel-configuration sweep: not an implementation comparison
            records = load(path)
            if not records:
                continue
            out = path.with_name(path.stem + suffix + ".png")
            fn(records, out)
            written.append(out.name)
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
