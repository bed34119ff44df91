"""Grouped bars of benchmarks/training/bench_training.py records: throughput relative to torch AdamW fused per workload.

One bar per implementation (above 1 = faster than torch AdamW fused): the median over rounds of the ratio within a
round, error bars its min-max (records without per-round ratios: the ratio of the medians, error bars from the
slowest and fastest round against torch's median). Writes the PNG beside the JSON (same name).
Usage: python benchmarks/training/plot_training.py benchmarks/results/training_h200.json
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TORCH_FUSED = "torch AdamW fused"
IMPL_COLORS = {TORCH_FUSED: "tab:blue", "also_fused AdamW": "tab:red", "ALSO descent-ascent": "tab:orange",
               "ALSO optimistic": "tab:purple"}

Record = dict[str, Any]


def ordered(values: list[Any]) -> list[Any]:
    return list(OrderedDict.fromkeys(values))


def provenance(records: list[Record]) -> str:
    def distinct(key: str, fmt: str = "{}") -> str:
        return ", ".join(fmt.format(v) for v in ordered([r.get(key) for r in records if r.get(key) is not None]))
    dates = ", ".join(ordered([str(r["date"])[:10] for r in records if r.get("date")]))
    parts = [distinct("device"), distinct("torch", "torch {}"), distinct("triton", "triton {}"), dates]
    return ", ".join(p for p in parts if p)


def ratio_with_spread(record: Record, torch_median_ms: float | None) -> tuple[float, float, float]:
    """(ratio, ratio - lowest, highest - ratio): the median, lowest and highest over the rounds of the ratio within a
    round where the records have it (``paired_ratio_vs_torch_fused``), else the ratio of the medians with the slowest
    and fastest round against torch's median; nan when not measured."""
    paired = record.get("paired_ratio_vs_torch_fused")
    if paired is not None:
        ratio = paired["median"]
        return ratio, max(ratio - paired["min"], 0.0), max(paired["max"] - ratio, 0.0)
    if record.get("ratio_vs_torch_fused") is None or torch_median_ms is None or record.get("ms_min") is None:
        return float("nan"), 0.0, 0.0
    ratio = record["ratio_vs_torch_fused"]
    lowest, highest = torch_median_ms / record["ms_max"], torch_median_ms / record["ms_min"]
    return ratio, max(ratio - lowest, 0.0), max(highest - ratio, 0.0)


def workload_label(workload: str, records: list[Record]) -> str:
    torch_record = next((r for r in records if r["workload"] == workload and r["impl"] == TORCH_FUSED
                         and r.get("ms_per_step") is not None), None)
    first = next(r for r in records if r["workload"] == workload)
    size = f"{first['n_params'] / 1e6:.1f}M params, batch {first['batch']}" if first.get("n_params") else ""
    torch_ms = f"\ntorch fused {torch_record['ms_per_step']:.2f} ms/step" if torch_record else ""
    return f"{workload}\n{size}{torch_ms}\n{first.get('rounds')} rounds x {first.get('steps')} steps"


def plot_training(records: list[Record], out: Path) -> None:
    workloads = ordered([r["workload"] for r in records])
    impls = ordered([r["impl"] for r in records])
    width = 0.8 / len(impls)
    x = np.arange(len(workloads))
    fig, ax = plt.subplots(figsize=(max(7.0, 2.3 * len(workloads) + 2), 5.2))
    highest_bar, highest_whisker = 1.0, 1.0
    for k, impl in enumerate(impls):
        ratios, below, above = [], [], []
        for workload in workloads:
            torch_record = next((r for r in records if r["workload"] == workload and r["impl"] == TORCH_FUSED), None)
            torch_ms = torch_record.get("ms_per_step") if torch_record else None
            record = next((r for r in records if r["workload"] == workload and r["impl"] == impl), None)
            ratio, low, high = ratio_with_spread(record, torch_ms) if record else (float("nan"), 0.0, 0.0)
            ratios.append(ratio)
            below.append(low)
            above.append(high)
        offsets = x + (k - (len(impls) - 1) / 2) * width
        ax.bar(offsets, ratios, width, yerr=[below, above], capsize=3, label=impl,
               color=IMPL_COLORS.get(impl, f"C{k}"), error_kw=dict(elinewidth=0.8))
        for xi, ratio, high, workload in zip(offsets, ratios, above, workloads):
            if np.isfinite(ratio):
                ax.text(xi, ratio * 0.5, f"{ratio:.2f}", ha="center", va="center", fontsize=7, color="white",
                        fontweight="bold", rotation=90)
                highest_bar, highest_whisker = max(highest_bar, ratio), max(highest_whisker, ratio + high)
            elif any(r["workload"] == workload and r["impl"] == impl and r.get("error") for r in records):
                ax.text(xi, 0.02, "failed", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([workload_label(w, records) for w in workloads], fontsize=8)
    ax.set_ylim(0, min(highest_whisker, 2 * highest_bar) * 1.15)
    ax.set_ylabel("throughput / torch AdamW fused throughput\n(torch ms/step / ms/step; above 1 = faster)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(impls), frameon=False)
    paired = all(r.get("paired_ratio_vs_torch_fused") is not None for r in records if r.get("ms_per_step") is not None)
    how = ("median over rounds of the ratio within a round (bars: min-max round)" if paired
           else "ratio of the medians over rounds (bars: slowest-fastest round)")
    tiny = ", tiny configs" if records[0].get("tiny") else ""
    ax.set_title(f"Whole training step, {how}\n{provenance(records)}{tiny}", fontsize=10)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", help="records written by benchmarks/training/bench_training.py")
    args = parser.parse_args()
    path = Path(args.json_path)
    with open(path) as f:
        records = json.load(f)
    if not records:
        raise SystemExit(f"{path} holds no records")
    out = path.with_suffix(".png")
    plot_training(records, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
