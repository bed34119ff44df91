"""DRO benchmark, CPU tasks (``make bench-dro``): long-tailed classes, a spurious patch, colored digits,
flipped labels.

Every method is tuned with the same number of Optuna TPE trials on the task's validation objective
(a split disjoint from the test split, drawn like it where the field does so), with model selection over
epochs by that objective, then trained
with the tuned setting over seeds 0-9 and scored on the test split at its selected epoch. See
dro_core.py for the methods (GroupDRO written out, and how it maps to ALSO's pi step) and
tasks_cpu.py for the data. Writes benchmarks/dro/results/<task>.{json,png,md}.

    python benchmarks/dro/run_cpu.py                      # the four tasks, 30 trials, 10 seeds
    python benchmarks/dro/run_cpu.py --tasks spurious --trials 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dro_core as core  # noqa: E402
import dro_stats  # noqa: E402
import tasks_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_METHODS = list(core.METHODS)
# one group per sample: the group frequencies are all 1, so IW, the 1/n prior and the group-balanced
# control would repeat other rows
PER_SAMPLE_OMITTED = {
    "IW": "one group per training sample: every group-frequency weight is 1, the same runs as ERM",
    "ALSO opt sum, pi ~ 1/n": "one group per training sample: the prior is uniform, the same runs as ALSO opt sum",
    "ALSO mean, pi fixed": "one group per training sample: the group-balanced loss is the batch mean, the same "
                           "runs as ALSO sum, pi fixed",
    "IW, ALSO's Adam": "one group per training sample: the same runs as ALSO sum, pi fixed (ERM on ALSO's Adam)",
    "GroupWeights opt mean + AdamW": "one group per training sample: the same pi step as the sum form",
    "GroupWeights DA mean + AdamW": "one group per training sample: the same pi step as the sum form",
    "Upsampling": "one group per training sample: group-balanced sampling is uniform sampling (ERM's batches "
                  "drawn with replacement)",
    "Upsampling, ALSO's Adam": "one group per training sample: uniform sampling, as ALSO sum, pi fixed",
    "GroupDRO adj": "one group per training sample: n_g = 1, the adjustment is the same constant C for every "
                    "group in the batch",
    "GroupDRO adj, ALSO's Adam": "one group per training sample: the adjustment is one constant"}
TASK_METHODS = {"long_tailed": ALL_METHODS, "spurious": ALL_METHODS, "colored": ALL_METHODS,
                "noisy_labels": [m for m in ALL_METHODS if m not in PER_SAMPLE_OMITTED]}
OMITTED = {"noisy_labels": PER_SAMPLE_OMITTED}
METRICS = {
    "long_tailed": [("worst_group_acc", "worst-class test acc (%)"), ("acc", "average test acc (%)")],
    "spurious": [("worst_group_acc", "worst-group test acc (%)"), ("acc", "average test acc (%)")],
    "colored": [("worst_group_acc", "worst-group test acc (%)"), ("acc", "average test acc (%)")],
    "noisy_labels": [("acc", "clean test acc (%)"), ("worst_group_acc", "worst-class clean test acc (%)")],
}


def run(tasks: list[str], trials: int, seeds: int, workers: int, out_dir: Path, smoke: bool = False,
        methods: list[str] | None = None, log=print) -> dict[str, dict[str, Any]]:
    """Tune and test every method (of ``methods``, default all) of every task; write and return one
    results document per task."""
    jobs, owners = [], []
    for name in tasks:
        for method in TASK_METHODS[name]:
            if methods and method not in methods:
                continue
            jobs.append((tasks_cpu.make_task, {"name": name, "smoke": smoke}, method))
            owners.append(name)
    log(f"{len(jobs)} (task, method) jobs, {trials} trials + {seeds} seeds each, {workers} worker(s)"
        f"{' [SMOKE]' if smoke else ''}")
    t0 = time.perf_counter()
    results = core.run_methods(jobs, trials, seeds, workers, log=log)
    wall = time.perf_counter() - t0
    docs = {}
    for name in tasks:
        task = tasks_cpu.make_task(name, smoke=smoke)
        rows = [r for r, owner in zip(results, owners) if owner == name]
        if not rows:
            continue
        doc = core.results_document(task, rows, trials, seeds, workers, wall, extra={
            "wall_s_note": "wall time of all the tasks run together (they share the worker processes); "
                           "tune_s and seeds_s of every method are its own",
            "omitted": OMITTED.get(name, {})})
        write(doc, out_dir / (name + ("_smoke" if smoke else "")))
        docs[name] = doc
    return docs


def write(doc: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = METRICS[doc["task"]]
    dro_stats.annotate(doc, [k for k, _ in keys])
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    table = stats_table(doc, keys)
    label = "SMOKE RUN (a tiny configuration for CI; not results)\n\n" if doc["smoke"] else ""
    p = doc["protocol"]
    stem.with_suffix(".md").write_text(
        f"# {doc['title']}\n\n{label}{doc['machine']}, torch {doc['torch']}, optuna {doc['optuna']}, {doc['date']}. "
        f"Optuna TPE, {p['trials_per_method']} trials per method; objective: {p['objective']}; "
        f"{p['epochs']} epochs, batch {p['batch']}, model selection over epochs by the objective; "
        f"test metrics at the selected epoch over seeds {p['seeds']} (commit {doc.get('commit', 'not recorded')}).\n\n"
        f"{table}\n")
    core.plot(doc, keys, stem.with_suffix(".png"), "% (mean ± std over seeds)")


def stats_table(doc: dict[str, Any], keys: list[tuple[str, str]]) -> str:
    """Per method: mean with its 95% interval of each metric, and the first metric's paired difference from
    the best baseline (chosen on validation) with its interval and verdict."""
    first = keys[0][0]
    base, theta_base = doc.get("best_baseline"), doc.get("best_baseline_also_adam")
    head = ("| method | groups | " + " | ".join(f"{label}: mean ± 95% CI" for _, label in keys)
            + f" | {keys[0][1]} minus {base} (paired, 95% CI) | minus {theta_base} (paired, 95% CI) | tuned |")
    lines = [head, "|" + "---|" * (len(keys) + 5)]
    for r in doc["results"]:
        cells = [f"{r['stats'][k]['mean']:.1f} ± {r['stats'][k]['ci95']:.1f}" if k in r["stats"] else "n/a"
                 for k, _ in keys]
        p = r["vs_best_baseline"].get(first)
        versus = "(the baseline)" if r["method"] == base else (
            f"{p['mean']:+.1f} ± {p['ci95']:.1f} ({p['verdict']})" if p else "n/a")
        q = r.get("vs_best_baseline_also_adam", {}).get(first)
        versus += " | " + ("(the baseline)" if r["method"] == theta_base else (
            f"{q['mean']:+.1f} ± {q['ci95']:.1f} ({q['verdict']})" if q else "n/a"))
        name = r["method"] + (" (selected on validation)" if r["method"] in doc.get("selected_on_validation", []) else "")
        hp = ", ".join(f"{k}={v:.2g}" for k, v in r["tuned_hparams"].items())
        lines.append(f"| {name} | {r['grouping']} ({r['n_groups']}) | " + " | ".join(cells) + f" | {versus} | {hp} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(tasks_cpu.TASKS), choices=list(tasks_cpu.TASKS))
    parser.add_argument("--trials", type=int, default=30, help="Optuna trials per method (the same for every method)")
    parser.add_argument("--methods", nargs="*", default=None, choices=ALL_METHODS, help="a subset of the methods")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=min(2, torch.get_num_threads()),
                        help="(task, method) jobs run in parallel processes, one thread each")
    parser.add_argument("--smoke", action="store_true", help="2 epochs per run (with --trials/--seeds: seconds)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--replot", action="store_true", help="rewrite the tables and plots from the JSON in --out-dir")
    args = parser.parse_args()
    if args.replot:
        for name in args.tasks:
            stem = Path(args.out_dir) / (name + ("_smoke" if args.smoke else ""))
            if stem.with_suffix(".json").exists():
                write(json.loads(stem.with_suffix(".json").read_text()), stem)
        return
    t0 = time.perf_counter()
    docs = run(args.tasks, args.trials, args.seeds, args.workers, Path(args.out_dir), args.smoke, args.methods)
    for name, doc in docs.items():
        print(f"\n{doc['title']}\n" + stats_table(doc, METRICS[name]))
    print(f"\nwrote {', '.join(docs)} to {args.out_dir} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
