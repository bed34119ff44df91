"""Settings tried to make ALSO's weights (ALSO, GroupWeights) win where the main tables show them losing or
tying, AdamW's weight decay searched over a wider range (is ALSO's Adam's lead the decay range?), and the
colored task at other strengths of the spurious colour: ``make bench-dro`` runs this after run_cpu.py. Same protocol as the main tables (Optuna TPE with the same number of trials, validation
objective, model selection over epochs, seeds 0-9): every row here is paired, seed by seed, with the
main run's baselines (their rows are copied from results/<task>.json, which must exist; the JSON names
the commit of both runs). Writes results/attempts/<task>.{json,md,png}, results/decay/<task>.*, and
results/strength/colored_<100 x strength>.{json,md,png}.

    python benchmarks/dro/attempts.py                     # the attempts, the decay range, the strength sweep
    python benchmarks/dro/attempts.py --part attempts --tasks colored --trials 10 --seeds 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dro_core as core  # noqa: E402
import dro_stats  # noqa: E402
import run_cpu  # noqa: E402
import tasks_cpu  # noqa: E402

GROUP_ATTEMPTS = [
    "ALSO DA mean, pi ~ 1/n",  # the mean form anchored at inverse frequencies (IW's weights as the prior)
    "ALSO opt mean, pi ~ 1/n",
    "ALSO DA mean, tuned temperature",  # pi_temperature searched in [0.1, 10] besides pi_lr and pi_decay
    "ALSO DA mean, pi_lr to 10",  # a pi step range ten times wider at the top
    "GroupWeights DA mean + AdamW, pi ~ 1/n",
    "ALSO DA sum [samples]",  # one group per training sample: the group-free comparison with JTT and CVaR
    "GroupWeights DA sum + AdamW [samples]",
]
ATTEMPTS = {
    "long_tailed": GROUP_ATTEMPTS,
    "spurious": GROUP_ATTEMPTS,
    "colored": GROUP_ATTEMPTS,
    "noisy_labels": ["ALSO DA sum, tuned temperature", "ALSO DA sum, pi_lr to 10"],
}
# AdamW's decoupled weight decay searched up to 10 instead of 0.1: is ALSO's Adam's lead the decay range?
GROUPWEIGHTS_DECAY = ["GroupWeights DA mean + AdamW, decay to 10", "GroupWeights opt mean + AdamW, decay to 10",
                      "GroupWeights DA mean + AdamW, pi ~ 1/n, decay to 10"]
DECAY = {
    "long_tailed": ["ERM, AdamW decay to 10", "IW, AdamW decay to 10", "Upsampling, AdamW decay to 10",
                    *GROUPWEIGHTS_DECAY],
    "spurious": ["ERM, AdamW decay to 10", "IW, AdamW decay to 10", "GroupDRO adj, AdamW decay to 10",
                 *GROUPWEIGHTS_DECAY],
    "colored": ["ERM, AdamW decay to 10", "IW, AdamW decay to 10", "GroupDRO adj, AdamW decay to 10",
                *GROUPWEIGHTS_DECAY],
    "noisy_labels": ["ERM, AdamW decay to 10", "CVaR, AdamW decay to 10", "GroupWeights DA sum + AdamW, decay to 10",
                     "GroupWeights opt sum + AdamW, decay to 10"],
}
# the colored task at other strengths: the field's baselines and the ALSO / GroupWeights variants, both optimizers
STRENGTHS = [0.99]
STRENGTH_METHODS = ["ERM", "IW", "GroupDRO", "Upsampling", "JTT", "GroupDRO adj", "ALSO sum, pi fixed",
                    "IW, ALSO's Adam", "GroupDRO, ALSO's Adam", "Upsampling, ALSO's Adam",
                    *dro_stats.ALSO_VARIANTS, *dro_stats.GROUPWEIGHTS_VARIANTS]
REFERENCE = (*dro_stats.BASELINES, *dro_stats.THETA_BASELINES)


def attempts(tasks: list[str], trials: int, seeds: int, workers: int, main_dir: Path, out_dir: Path,
             smoke: bool = False, table: dict[str, list[str]] = ATTEMPTS, sub: str = "attempts") -> None:
    jobs, owners = [], []
    for name in tasks:
        for method in table[name]:
            jobs.append((tasks_cpu.make_task, {"name": name, "smoke": smoke}, method))
            owners.append(name)
    print(f"{sub}: {len(jobs)} (task, method) jobs, {trials} trials + {seeds} seeds each")
    t0 = time.perf_counter()
    results = core.run_methods(jobs, trials, seeds, workers)
    wall = time.perf_counter() - t0
    for name in tasks:
        stem = name + ("_smoke" if smoke else "")
        main = json.loads((main_dir / f"{stem}.json").read_text())
        if main["protocol"]["seeds"] != list(range(seeds)) or main["protocol"]["trials_per_method"] != trials:
            raise SystemExit(f"{name}: the main run used other seeds or trials; rerun it with the same ones first")
        keep = set(REFERENCE) | set(main.get("selected_on_validation", []))
        copied = []
        for row in main["results"]:
            if row["method"] in keep:
                row = {k: v for k, v in row.items() if k not in ("stats", "vs_best_baseline",
                                                                 "vs_best_baseline_also_adam")}
                row["from_main_run"] = main["commit"]
                copied.append(row)
        rows = [r for r, owner in zip(results, owners) if owner == name]
        task = tasks_cpu.make_task(name, smoke=smoke)
        doc = core.results_document(task, rows + copied, trials, seeds, workers, wall, extra={
            "part": ("attempts to make ALSO's weights win" if sub == "attempts" else
                     "AdamW's decoupled weight decay searched in [1e-6, 10] instead of [1e-6, 0.1]")
                    + f"; the rows marked from_main_run are copied from the main run (commit {main['commit']}) to pair with",
            "main_run_commit": main["commit"]})
        doc["task"] = name
        run_cpu.write(doc, out_dir / sub / stem)


def strength_sweep(strengths: list[float], trials: int, seeds: int, workers: int, out_dir: Path,
                   smoke: bool = False) -> None:
    jobs = [(tasks_cpu.make_task, {"name": "colored", "strength": s, "smoke": smoke}, m)
            for s in strengths for m in STRENGTH_METHODS]
    print(f"strength sweep: {len(jobs)} (strength, method) jobs, {trials} trials + {seeds} seeds each")
    t0 = time.perf_counter()
    results = core.run_methods(jobs, trials, seeds, workers)
    wall = time.perf_counter() - t0
    for i, s in enumerate(strengths):
        rows = results[i * len(STRENGTH_METHODS):(i + 1) * len(STRENGTH_METHODS)]
        doc = core.results_document(tasks_cpu.make_task("colored", strength=s, smoke=smoke), rows, trials, seeds,
                                    workers, wall, extra={"part": f"the colored task with strength {s}"})
        run_cpu.write(doc, out_dir / "strength" / (f"colored_{round(100 * s)}" + ("_smoke" if smoke else "")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["attempts", "decay", "strength", "all"], default="all")
    parser.add_argument("--tasks", nargs="*", default=list(ATTEMPTS), choices=list(ATTEMPTS))
    parser.add_argument("--strengths", type=float, nargs="*", default=STRENGTHS,
                        help="the colored task's train correlations of the sweep (the main run has 0.95)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--main-dir", default=str(run_cpu.RESULTS), help="where the main run's JSON are")
    parser.add_argument("--out-dir", default=str(run_cpu.RESULTS))
    parser.add_argument("--smoke", action="store_true", help="2 epochs per run, against the main run's *_smoke.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.part in ("attempts", "all"):
        attempts(args.tasks, args.trials, args.seeds, args.workers, Path(args.main_dir), Path(args.out_dir), args.smoke)
    if args.part in ("decay", "all"):
        attempts(args.tasks, args.trials, args.seeds, args.workers, Path(args.main_dir), Path(args.out_dir), args.smoke,
                 table=DECAY, sub="decay")
    if args.part in ("strength", "all"):
        strength_sweep(args.strengths, args.trials, args.seeds, args.workers, Path(args.out_dir), args.smoke)
    print(f"attempts.py done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
