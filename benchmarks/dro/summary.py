"""The cross-task tables of docs/dro.md, printed from the results JSON (benchmarks/dro/results/):

0. the validation-selected ALSO and GroupWeights entries against both validation-chosen references;
1. every method's headline test metric (worst-class, worst-group or clean accuracy) with its 95% interval,
   and its paired difference from the task's validation-chosen AdamW baseline;
2. like for like: each weighting on AdamW and on ALSO's Adam, and the paired difference between the two;
3. what pi's moves add: each ALSO variant against its control with pi frozen;
4. the attempts (results/attempts/) against the same baselines, and the strength sweep.

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


def selected_table(docs: dict[str, dict]) -> str:
    """Per task: the two validation-chosen references and the validation-selected ALSO and GroupWeights entries
    with their paired differences from both."""
    lines = ["| task | best AdamW baseline (validation) | best baseline on ALSO's Adam (validation) | entry | "
             "test | minus AdamW reference | minus ALSO's Adam reference |", "|---|---|---|---|---|---|---|"]
    for n in TASKS:
        doc = docs.get(n)
        if not doc:
            continue
        key = run_cpu.METRICS[n][0][0]
        rows = {r["method"]: r for r in doc["results"]}
        refs = [doc["best_baseline"], doc["best_baseline_also_adam"]]
        ref_cells = [f"{m} {rows[m]['stats'][key]['mean']:.1f} ± {rows[m]['stats'][key]['ci95']:.1f}" for m in refs]
        for m in doc["selected_on_validation"]:
            r = rows[m]
            p, q = r["vs_best_baseline"][key], r["vs_best_baseline_also_adam"][key]
            lines.append(f"| {SHORT[n]} | {ref_cells[0]} | {ref_cells[1]} | {m} | {r['stats'][key]['mean']:.1f} ± "
                         f"{r['stats'][key]['ci95']:.1f} | {p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} | "
                         f"{q['mean']:+.1f} ± {q['ci95']:.1f} {q['verdict']} |")
    return "\n".join(lines)


PI_PAIRS = [("optimistic, sum", "ALSO opt sum", "ALSO sum, pi fixed"),
            ("descent-ascent, sum", "ALSO DA sum", "ALSO sum, pi fixed"),
            ("optimistic, mean", "ALSO opt mean", "ALSO mean, pi fixed"),
            ("descent-ascent, mean", "ALSO DA mean", "ALSO mean, pi fixed")]


def pi_share(docs: dict[str, dict]) -> str:
    """What pi's moves add: each ALSO variant minus its control with pi frozen at uniform (same theta update,
    same reduction), paired. With one group per sample the mean control is the sum control."""
    names = [n for n in TASKS if docs.get(n)]
    lines = ["| ALSO variant minus its pi-fixed control | " + " | ".join(SHORT[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, a, b in PI_PAIRS:
        cells = []
        for n in names:
            rows = {r["method"]: r for r in docs[n]["results"]}
            control = b if b in rows else "ALSO sum, pi fixed"
            key = run_cpu.METRICS[n][0][0]
            p = dro_stats.paired(rows[a], rows[control], key, "maximize")
            cells.append(f"{p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']}")
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


def group_free_table(att: dict[str, dict]) -> str:
    """One group per training sample on the group tasks: ALSO's per-sample weights against the group-free
    baselines (JTT, CVaR) on the same theta optimizer, paired."""
    lines = ["| task | setting | test | minus JTT | minus CVaR |", "|---|---|---|---|---|"]
    for n in TASKS:
        doc = att.get(n)
        if not doc:
            continue
        key = run_cpu.METRICS[n][0][0]
        rows = {r["method"]: r for r in doc["results"]}
        for m, suffix in (("ALSO DA sum [samples]", ", ALSO's Adam"), ("GroupWeights DA sum + AdamW [samples]", "")):
            if m not in rows:
                continue
            cells = []
            for base in ("JTT" + suffix, "CVaR" + suffix):
                p = dro_stats.paired(rows[m], rows[base], key, "maximize")
                cells.append(f"{p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} ({base} {rows[base]['stats'][key]['mean']:.1f})")
            st = rows[m]["stats"][key]
            lines.append(f"| {SHORT[n]} | {m} | {st['mean']:.1f} ± {st['ci95']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wider_choice(docs: dict[str, dict], att: dict[str, dict]) -> str:
    """If ALSO's variant choice also held the attempts' ALSO rows (one group per class or group; the validation
    objective decides, as in the main table): which variant validation picks, and its test metric."""
    lines = ["| task | validation picks | its validation objective | test | minus ALSO's Adam reference |",
             "|---|---|---|---|---|"]
    for n in TASKS:
        doc, extra = docs.get(n), att.get(n)
        if not doc or not extra:
            continue
        key = run_cpu.METRICS[n][0][0]
        rows = [r for r in doc["results"] if r["method"] in dro_stats.ALSO_VARIANTS]
        rows += [r for r in extra["results"] if r["method"].startswith("ALSO") and not r.get("from_main_run")]
        best = max(rows, key=lambda r: r["best_val_objective"])
        ties = [r["method"] for r in rows if r["best_val_objective"] == best["best_val_objective"]]
        ref = {r["method"]: r for r in doc["results"]}[doc["best_baseline_also_adam"]]
        p = dro_stats.paired(best, ref, key, "maximize")
        tied = f" (tied on validation with {', '.join(t for t in ties if t != best['method'])})" if len(ties) > 1 else ""
        lines.append(f"| {SHORT[n]} | {best['method']}{tied} | {best['best_val_objective']:.2f} | "
                     f"{best['stats'][key]['mean']:.1f} ± {best['stats'][key]['ci95']:.1f} | "
                     f"{p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} ({ref['method']}) |")
    return "\n".join(lines)


ATTEMPT_DEFAULTS = {"ALSO DA mean, tuned temperature": "ALSO DA mean", "ALSO DA mean, pi_lr to 10": "ALSO DA mean",
                    "ALSO DA sum, tuned temperature": "ALSO DA sum", "ALSO DA sum, pi_lr to 10": "ALSO DA sum"}


def attempt_vs_default(docs: dict[str, dict], att: dict[str, dict]) -> str:
    """The tuned-temperature and wider-pi_lr attempts against the same variant with the default search space."""
    lines = ["| task | setting | minus the default search space's row |", "|---|---|---|"]
    for n in TASKS:
        doc, extra = docs.get(n), att.get(n)
        if not doc or not extra:
            continue
        key = run_cpu.METRICS[n][0][0]
        rows = {r["method"]: r for r in doc["results"]}
        for r in extra["results"]:
            if r["method"] in ATTEMPT_DEFAULTS:
                p = dro_stats.paired(r, rows[ATTEMPT_DEFAULTS[r["method"]]], key, "maximize")
                lines.append(f"| {SHORT[n]} | {r['method']} | {p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} "
                             f"({ATTEMPT_DEFAULTS[r['method']]}) |")
    return "\n".join(lines)


DECAY_PAIRS = {"ERM, AdamW decay to 10": ("ERM", "ALSO sum, pi fixed"), "IW, AdamW decay to 10": ("IW", "IW, ALSO's Adam"),
               "Upsampling, AdamW decay to 10": ("Upsampling", "Upsampling, ALSO's Adam"),
               "GroupDRO adj, AdamW decay to 10": ("GroupDRO adj", "GroupDRO adj, ALSO's Adam"),
               "CVaR, AdamW decay to 10": ("CVaR", "CVaR, ALSO's Adam"),
               "GroupWeights DA mean + AdamW, decay to 10": ("GroupWeights DA mean + AdamW", "ALSO DA mean"),
               "GroupWeights opt mean + AdamW, decay to 10": ("GroupWeights opt mean + AdamW", "ALSO opt mean"),
               "GroupWeights DA mean + AdamW, pi ~ 1/n, decay to 10": ("GroupWeights DA mean + AdamW, pi ~ 1/n",
                                                                       "ALSO DA mean, pi ~ 1/n"),
               "GroupWeights DA sum + AdamW, decay to 10": ("GroupWeights DA sum + AdamW", "ALSO DA sum"),
               "GroupWeights opt sum + AdamW, decay to 10": ("GroupWeights opt sum + AdamW", "ALSO opt sum")}


def decay_table(dec: dict[str, dict], docs: dict[str, dict], att: dict[str, dict]) -> str:
    """AdamW with weight_decay up to 10 against AdamW up to 0.1 (the main run or the attempts) and against the same
    weighting on ALSO's Adam; all on seeds 0-9, paired."""
    lines = ["| task | weighting | AdamW, decay <= 0.1 | AdamW, decay <= 10 (tuned decay) | ALSO's Adam | wider minus "
             "narrower | ALSO's Adam minus wider | wider minus the task's ALSO's-Adam reference |",
             "|---|---|---|---|---|---|---|---|"]
    for n in TASKS:
        doc = dec.get(n)
        if not doc:
            continue
        key = run_cpu.METRICS[n][0][0]
        rows = {r["method"]: r for d in (docs.get(n), att.get(n), doc) if d for r in d["results"]}
        for m, (narrow, theta) in DECAY_PAIRS.items():
            if m not in rows or m not in {r["method"] for r in doc["results"]}:
                continue
            w, a, b = rows[m], rows[narrow], rows[theta]
            p, q = dro_stats.paired(w, a, key, "maximize"), dro_stats.paired(b, w, key, "maximize")
            ref = rows[docs[n]["best_baseline_also_adam"]]
            r = dro_stats.paired(w, ref, key, "maximize")
            st = lambda r: f"{r['stats'][key]['mean']:.1f} ± {r['stats'][key]['ci95']:.1f}"
            lines.append(f"| {SHORT[n]} | {narrow} | {st(a)} | {st(w)} ({w['tuned_hparams']['weight_decay']:.2g}) | "
                         f"{st(b)} | {p['mean']:+.1f} ± {p['ci95']:.1f} {p['verdict']} | "
                         f"{q['mean']:+.1f} ± {q['ci95']:.1f} {q['verdict']} | "
                         f"{r['mean']:+.1f} ± {r['ci95']:.1f} {r['verdict']} ({ref['method']}) |")
    return "\n".join(lines)


def main() -> None:
    docs = {n: load(RESULTS / f"{n}.json") for n in TASKS}
    for n, d in docs.items():
        if d:
            print(f"{n}: commit {d['commit']}, {d['date']}, wall {d['wall_s']:.0f} s; best baseline (validation) "
                  f"{d['best_baseline']}, on ALSO's Adam {d.get('best_baseline_also_adam')}; selected "
                  f"{d['selected_on_validation']}")
    print("\n" + selected_table(docs) + "\n\n" + main_table(docs) + "\n\n" + like_for_like(docs) + "\n\n" + pi_share(docs))
    att = {n: load(RESULTS / "attempts" / f"{n}.json") for n in TASKS}
    if any(att.values()):
        print("\n" + attempts_table(att) + "\n\n" + group_free_table(att) + "\n\n" + wider_choice(docs, att)
              + "\n\n" + attempt_vs_default(docs, att))
    dec = {n: load(RESULTS / "decay" / f"{n}.json") for n in TASKS}
    if any(dec.values()):
        print("\n" + decay_table(dec, docs, att))
    for path in sorted((RESULTS / "strength").glob("colored_*.json")):
        d = load(path)
        print(f"\n{path.name} (commit {d['commit']}):\n" + main_table({"colored": d}) + "\n\n"
              + like_for_like({"colored": d}))


if __name__ == "__main__":
    main()
