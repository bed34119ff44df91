"""The DRO benchmark's statistics over seeds: sample std, 95% confidence intervals (Student t), paired
comparisons against the best baseline on the same seeds, and the entries chosen on validation.

Every method runs seeds 0..S-1 with its tuned setting, so two methods' seed-s runs share the seed (their
data order and initialisation): the difference of a metric is compared seed by seed (a paired t
interval). The baseline a method is compared with is the one of the field's baselines on AdamW (ERM, IW,
GroupDRO, RGD, group-balanced upsampling, JTT, GroupDRO with the C/sqrt(n) adjustment, CVaR) whose tuned
setting has the best *validation* objective; a second comparison takes the same baselines on ALSO's Adam
(ThetaAdam, coupled L2; ERM's is the control "ALSO sum, pi fixed"), the like-for-like reference for ALSO,
which runs on that optimizer. The "selected on validation" entries pick, among ALSO's
variants (mode x reduction x prior) and among the GroupWeights ones, the row with the best validation
objective: a user's choice, made without the test split. A difference "wins" or "loses" only where its
interval excludes zero; else it is a tie."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from scipy import stats

BASELINES = ("ERM", "IW", "GroupDRO", "RGD", "Upsampling", "JTT", "GroupDRO adj", "CVaR")
# the same weightings on ALSO's Adam (ERM's counterpart: ALSO's Adam on the plain batch mean, pi fixed)
THETA_BASELINES = ("ALSO sum, pi fixed", "IW, ALSO's Adam", "GroupDRO, ALSO's Adam", "RGD, ALSO's Adam",
                   "Upsampling, ALSO's Adam", "JTT, ALSO's Adam", "GroupDRO adj, ALSO's Adam", "CVaR, ALSO's Adam")
# the variants a user would choose between, not the controls
ALSO_VARIANTS = ("ALSO opt sum", "ALSO opt mean", "ALSO DA sum", "ALSO DA mean", "ALSO opt sum, pi ~ 1/n")
GROUPWEIGHTS_VARIANTS = ("GroupWeights opt sum + AdamW", "GroupWeights opt mean + AdamW",
                         "GroupWeights DA sum + AdamW", "GroupWeights DA mean + AdamW")


def interval(values: list[float]) -> dict[str, float]:
    """mean, sample std (ddof 1) and the half-width of the 95% t interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "std": std, "ci95": half}


def per_seed(row: dict[str, Any], key: str) -> Optional[list[float]]:
    values = [r["test"][key] for r in row["per_seed"] if r.get("test") is not None and key in r["test"]]
    return values if len(values) == len(row["per_seed"]) else None


def best_on_validation(rows: list[dict[str, Any]], names: tuple[str, ...], direction: str) -> Optional[dict]:
    chosen = [r for r in rows if r["method"] in names and r["best_val_objective"] is not None]
    if not chosen:
        return None
    sign = 1 if direction == "maximize" else -1
    return max(chosen, key=lambda r: sign * r["best_val_objective"])


def paired(row: dict[str, Any], base: dict[str, Any], key: str, direction: str) -> Optional[dict[str, Any]]:
    """row - base on ``key``, seed by seed: mean, 95% interval, and the verdict (better/worse/tie for row)."""
    a, b = per_seed(row, key), per_seed(base, key)
    if a is None or b is None or len(a) != len(b):
        return None
    diff = interval([x - y for x, y in zip(a, b)])
    better = diff["mean"] > 0 if direction == "maximize" else diff["mean"] < 0
    excludes_zero = abs(diff["mean"]) > diff["ci95"]
    return {"against": base["method"], "mean": diff["mean"], "ci95": diff["ci95"],
            "verdict": ("better" if better else "worse") if excludes_zero else "tie"}


def annotate(doc: dict[str, Any], keys: list[str], higher_is_better: bool = True) -> dict[str, Any]:
    """Adds to every row ``stats[key]`` (interval over seeds) and ``vs_best_baseline[key]`` (paired), and to
    the document ``best_baseline`` and ``selected_on_validation`` (ALSO's and GroupWeights' variants chosen by
    validation)."""
    direction = doc["protocol"]["direction"]
    rows = doc["results"]
    base = best_on_validation(rows, BASELINES, direction)
    theta_base = best_on_validation(rows, THETA_BASELINES, direction)
    selected = [best_on_validation(rows, variants, direction) for variants in (ALSO_VARIANTS, GROUPWEIGHTS_VARIANTS)]
    metric_direction = "maximize" if higher_is_better else "minimize"
    for row in rows:
        row["stats"] = {k: interval(v) for k in keys if (v := per_seed(row, k)) is not None}
        row["vs_best_baseline"] = ({} if base is None or row is base else
                                   {k: p for k in keys if (p := paired(row, base, k, metric_direction))})
        row["vs_best_baseline_also_adam"] = ({} if theta_base is None or row is theta_base else
                                             {k: p for k in keys if (p := paired(row, theta_base, k, metric_direction))})
    doc["best_baseline"] = None if base is None else base["method"]
    doc["best_baseline_also_adam"] = None if theta_base is None else theta_base["method"]
    doc["selected_on_validation"] = [r["method"] for r in selected if r is not None]
    doc["statistics"] = ("sample std (ddof 1) over the seeds; 95% Student t intervals of the mean; paired t "
                         "intervals of the seed-by-seed difference against the baseline (of "
                         f"{', '.join(BASELINES)}) with the best validation objective, and against the one of "
                         f"{', '.join(THETA_BASELINES)} (the same weightings on ALSO's Adam); ALSO's variant "
                         f"selected on validation among {', '.join(ALSO_VARIANTS)}; GroupWeights' among "
                         f"{', '.join(GROUPWEIGHTS_VARIANTS)}")
    return doc
