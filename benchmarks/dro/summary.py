"""The cross-task tables of docs/dro.md, printed from the results JSON (benchmarks/dro/results/):

1. every method's headline test metric (worst-class, worst-group or clean accuracy) with its 95% interval,
   and its paired difference from the task's validation-chosen AdamW baseline;
2. like for like: each weighting on AdamW and on ALSO's Adam, and the paired difference between the two;
3. the attempts (results/attempts/) against the same baselines.

    python benchmarks/dro/summary.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dro_stats  # noqa: E402
import run_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["long_tailed", "spurious", "colored", "noisy_labels"]
SHORT = {"long_tailed": "long tail", "spurious": "spurious patch", "colored": "colored digits",
         "noisy_labels": "flipped labels"}
PAIRS = [("none (ERM)", "ERM", "ALSO sum, pi fixed"), ("IW", "IW", "IW, ALSO's Adam"),
         ("Upsampling", "Upsampling", "Upsampling, ALSO's Adam"), ("GroupDRO", "GroupDRO", "GroupDRO, ALSO's Adam"),
         ("GroupDRO adj", "GroupDRO adj", "GroupDRO adj, ALSO's Adam"), ("RGD", "RGD", "RGD, ALSO's Adam"),
         ("JTT", "JTT", "JTT, ALSO's Adam"), ("CVaR", "CVaR", "CVaR, ALSO's Adam"),
         ("ALSO's weights DA sum", "GroupWeights DA sum + AdamW", "ALSO DA sum"),
         ("ALSO's weights DA mean", "GroupWeights DA mean + AdamW", "ALSO DA mean"),
         ("ALSO's weights opt sum", "GroupWeights opt sum + AdamW", "ALSO opt sum"),
         ("ALSO's weights opt mean", "GroupWeights opt mean + AdamW", "ALSO opt mean")]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else None


def cell(doc: dict, method: str, versus: str = "vs_best_baseline") -> str:
    rows = {r["method"]: r for r in doc["results"]}
    if method not in rows:
        return "(not run)"
    r = rows[method]
    key = run_cpu.METRICS[doc["task"]][0][0]
    s = r["stats"][key]
    mark = "✓ " if method in doc.get("selected_on_validation", []) else ""
    base = doc["best_baseline"] if versus == "vs_best_baseline" else doc.get("best_baseline_also_adam")
    p = r.get(versus, {}).get(key)
    tail = " (baseline)" if method == base else (f" ({p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']})" if p else "")
    return f"{mark}{s['mean']:.1f} ± {s['ci95']:.1f}{tail}"


def main_table(docs: dict[str, dict]) -> str:
    names = [n for n in TASKS if docs.get(n)]
    head = "| method | " + " | ".join(f"{SHORT[n]} (vs {docs[n]['best_baseline']})" for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    order = []
    for n in names:
        for r in docs[n]["results"]:
            if r["method"] not in order:
                order.append(r["method"])
    for m in order:
        lines.append(f"| {m} | " + " | ".join(cell(docs[n], m) for n in names) + " |")
    return "\n".join(lines)


def like_for_like(docs: dict[str, dict]) -> str:
    names = [n for n in TASKS if docs.get(n)]
    lines = ["| weighting | " + " | ".join(f"{SHORT[n]}: AdamW / ALSO's Adam (diff)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, a, b in PAIRS:
        cells = []
        for n in names:
            rows = {r["method"]: r for r in docs[n]["results"]}
            if a not in rows or b not in rows:
                cells.append("(not run)")
                continue
            key = run_cpu.METRICS[n][0][0]
            p = dro_stats.paired(rows[b], rows[a], key, "maximize")
            cells.append(f"{rows[a]['stats'][key]['mean']:.1f} / {rows[b]['stats'][key]['mean']:.1f} "
                         f"({p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attempts_table(docs: dict[str, dict]) -> str:
    lines = ["| task | setting | test metric (95% CI) | vs best AdamW baseline | vs best baseline on ALSO's Adam | tuned |",
             "|---|---|---|---|---|---|"]
    for n in TASKS:
        doc = docs.get(n)
        if not doc:
            continue
        key = run_cpu.METRICS[n][0][0]
        for r in doc["results"]:
            if r.get("from_main_run"):
                continue
            s = r["stats"][key]
            p, q = r["vs_best_baseline"].get(key), r["vs_best_baseline_also_adam"].get(key)
            hp = ", ".join(f"{k}={v:.2g}" for k, v in r["tuned_hparams"].items())
            lines.append(f"| {SHORT[n]} | {r['method']} | {s['mean']:.1f} ± {s['ci95']:.1f} | "
                         f"{p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} ({doc['best_baseline']}) | "
                         f"{q['mean']:+.1f} ± {q['ci95']:.1f} {q['verdict']} ({doc['best_baseline_also_adam']}) | {hp} |")
    return "\n".join(lines)


def main() -> None:
    docs = {n: load(RESULTS / f"{n}.json") for n in TASKS}
    for n, d in docs.items():
        if d:
            print(f"{n}: commit {d['commit']}, {d['date']}, wall {d['wall_s']:.0f} s; best baseline (validation) "
                  f"{d['best_baseline']}, on ALSO's Adam {d.get('best_baseline_also_adam')}; selected "
                  f"{d['selected_on_validation']}")
    print("\n" + main_table(docs) + "\n\n" + like_for_like(docs))
    att = {n: load(RESULTS / "attempts" / f"{n}.json") for n in TASKS}
    if any(att.values()):
        print("\n" + attempts_table(att))
    for path in sorted((RESULTS / "strength").glob("colored_*.json")):
        d = load(path)
        print(f"\n{path.name} (commit {d['commit']}):\n" + main_table({"colored": d}))


if __name__ == "__main__":
    main()
