"""The DRO benchmark's machinery: the methods, one training loop, the Optuna search, the seed runs,
the results JSON and the plot. The tasks (tasks_cpu.py, gpt_sources.py) only supply data, a model,
per-sample losses, group ids and an evaluation.

Methods (every one tuned with the same number of Optuna TPE trials, the same sampler seed and the
same objective; see ``search_space``):

* ERM: the batch-mean loss, AdamW.
* IW (group frequency): the loss of sample i weighted by N / (K n_{g_i}) (n_j: training samples of
  group j, K groups present), AdamW: every group weighs the same in expectation, fixed weights.
* GroupDRO (Sagawa et al., ICLR 2020, Algorithm 1, the online exponentiated-gradient form), AdamW on
  theta. Per batch: the mean loss L_j of every group j present (0 for the absent ones), then
  ``q_j <- q_j exp(eta L_j) / Z`` and the model's loss ``sum_j q_j L_j`` with the updated q. Written
  out in ``GroupDRO`` below, without the generalisation adjustment C / sqrt(n_j) of the paper.
* RGD: ``also_fused.rgd_loss`` (per-sample weights exp(min(l, T)/(T+1)), detached), AdamW.
* ALSO, mode "optimistic" or "descent-ascent", group_reduction "sum" (published) or "mean",
  uniform pi_init = pi_reg, alpha 1, ALSO's own Adam on theta (L2 coupled into the gradient).
* Upsampling (group-balanced sampling): every epoch draws n training samples with replacement, sample
  i with probability 1 / (K n_{g_i}), so every group fills the same share of the batches in expectation;
  the batch mean loss.
* JTT (Liu et al., ICML 2021, "Just Train Twice"): ERM for ``jtt_epochs`` epochs (tuned, 1 to half the
  training), the training samples that model misclassifies form the error set; a fresh model (the
  same initialisation) is trained with the error set's losses weighted by ``upweight`` (tuned, 2-100)
  against 1 for the rest (weights scaled to mean 1). Needs no group labels for training; the groups
  enter only through the validation objective, as in the paper.
* GroupDRO adj: GroupDRO with the paper's generalisation adjustment, C / sqrt(n_j) added to the mean
  loss of every group j present in the batch before the q step (n_j the group's training size; C
  tuned uniformly in [0, 5]).
* CVaR (the minibatch CVaR DRO loss, as in Levy et al. 2020): the mean of the ceil(alpha B) largest
  losses of the batch (alpha tuned in [0.05, 1]); group-free, the natural comparison for ALSO with one
  group per sample.
Every one of these runs on AdamW and, like for like, on ALSO's Adam (``ThetaAdam``, coupled L2).

Three more rows, to read the ALSO rows by. Two controls with pi frozen at uniform (descent-ascent,
pi_lr = pi_decay = 0): "ALSO sum, pi fixed" is ALSO's Adam step on the plain batch mean (it
separates what pi adds from what ALSO's theta update does), "ALSO mean, pi fixed" the same on the
group-balanced loss (with uniform pi the mean reduction's loss is the average of the group means,
IW's objective in expectation). And "ALSO opt sum, pi ~ 1/n": the published group-sum form with
pi_init = pi_reg proportional to the inverse group frequency, the setting that worked in the
long-tailed demo. None of the three is run where every group has one sample (they would repeat
other rows).

GroupDRO and ALSO. ALSO in descent-ascent mode with group_reduction="mean", pi_decay=0, temperature
1 and pi_lr = eta takes the same pi step as GroupDRO's q step: with S_j the batch mean loss of a
present group j (0 for an absent one), ``pi_j <- softmax(log(pi + eps) + eta S)_j`` =
``(pi_j + eps) exp(eta S_j) / Z``, which is GroupDRO's update up to the eps (1.2e-7) inside the log
(tests/test_dro_bench.py checks this). What differs:

1. the order: GroupDRO weighs the batch with q *after* this batch's update; ALSO weighs it with pi
   *before* (pi is updated in ``step()``, after the backward pass);
2. the model's loss: GroupDRO's ``sum_j q_j L_j`` sums over the groups present without normalising;
   ALSO's mean form divides by the pi mass of the groups present, ``sum_{j present} pi_j L_j /
   sum_{j present} pi_j`` (the same gradient direction per step, a different scale when groups are
   missing from a batch);
3. theta: ALSO's Adam (L2 weight decay coupled into the gradient, eps added before the bias
   correction) against AdamW (decoupled weight decay) here;
4. ALSO's pi_decay pulls pi towards pi_reg (a KL term GroupDRO does not have) and the optimistic mode
   extrapolates both players; the group-sum form (the published default) uses the groups' loss
   *sums*, whose expectation B p_j L_j grows with the group's frequency p_j, so at the group level it
   pushes weight towards frequent groups unless pi_reg says otherwise.

With one group per sample (object-level weighting) the mean and sum forms take the same pi step
(every group present has one sample); their model losses differ by the normalisation above.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Optional

import torch

import also_fused

# name -> spec; "grouping" names the task's group ids the method uses (None: the task's default)
METHODS: dict[str, dict[str, Any]] = {
    "ERM": dict(kind="erm"),
    "IW": dict(kind="iw"),
    "GroupDRO": dict(kind="groupdro"),
    "RGD": dict(kind="rgd"),
    "ALSO opt sum": dict(kind="also", mode="optimistic", reduction="sum"),
    "ALSO opt mean": dict(kind="also", mode="optimistic", reduction="mean"),
    "ALSO DA sum": dict(kind="also", mode="descent-ascent", reduction="sum"),
    "ALSO DA mean": dict(kind="also", mode="descent-ascent", reduction="mean"),
    # controls: ALSO with pi frozen at uniform, on the plain batch mean and on the group-balanced loss
    "ALSO sum, pi fixed": dict(kind="also", mode="descent-ascent", reduction="sum", fixed_pi=True),
    "ALSO mean, pi fixed": dict(kind="also", mode="descent-ascent", reduction="mean", fixed_pi=True),
    # the published group-sum form started and anchored at inverse group frequencies (the analogue of IW)
    "ALSO opt sum, pi ~ 1/n": dict(kind="also", mode="optimistic", reduction="sum", prior="inverse_frequency"),
    # like for like: the baselines' weightings on ALSO's Adam (coupled L2; ERM's is "ALSO sum, pi fixed"), and
    # ALSO's weights (GroupWeights) on AdamW (ALSO descent-ascent is GroupWeights on ALSO's Adam, bit for bit)
    "IW, ALSO's Adam": dict(kind="iw", theta="coupled"),
    "GroupDRO, ALSO's Adam": dict(kind="groupdro", theta="coupled"),
    "RGD, ALSO's Adam": dict(kind="rgd", theta="coupled"),
    "GroupWeights opt sum + AdamW": dict(kind="groupweights", mode="optimistic", reduction="sum"),
    "GroupWeights opt mean + AdamW": dict(kind="groupweights", mode="optimistic", reduction="mean"),
    "GroupWeights DA sum + AdamW": dict(kind="groupweights", mode="descent-ascent", reduction="sum"),
    "GroupWeights DA mean + AdamW": dict(kind="groupweights", mode="descent-ascent", reduction="mean"),
    # the field's baselines, each on AdamW and on ALSO's Adam
    "Upsampling": dict(kind="upsample"),
    "JTT": dict(kind="jtt"),
    "GroupDRO adj": dict(kind="groupdro", adjust=True),
    "CVaR": dict(kind="cvar"),
    "Upsampling, ALSO's Adam": dict(kind="upsample", theta="coupled"),
    "JTT, ALSO's Adam": dict(kind="jtt", theta="coupled"),
    "GroupDRO adj, ALSO's Adam": dict(kind="groupdro", adjust=True, theta="coupled"),
    "CVaR, ALSO's Adam": dict(kind="cvar", theta="coupled"),
}
# settings tried to make ALSO's weights win where they lose (benchmarks/dro/attempts.py; not in the main tables)
ATTEMPT_METHODS: dict[str, dict[str, Any]] = {
    "ALSO DA mean, pi ~ 1/n": dict(kind="also", mode="descent-ascent", reduction="mean", prior="inverse_frequency"),
    "ALSO opt mean, pi ~ 1/n": dict(kind="also", mode="optimistic", reduction="mean", prior="inverse_frequency"),
    "ALSO DA mean, tuned temperature": dict(kind="also", mode="descent-ascent", reduction="mean",
                                            tune_temperature=True),
    "ALSO DA mean, pi_lr to 10": dict(kind="also", mode="descent-ascent", reduction="mean", pi_lr_range=(1e-3, 10.0)),
    "ALSO DA sum, tuned temperature": dict(kind="also", mode="descent-ascent", reduction="sum", tune_temperature=True),
    "ALSO DA sum, pi_lr to 10": dict(kind="also", mode="descent-ascent", reduction="sum", pi_lr_range=(1e-3, 10.0)),
    "GroupWeights DA mean + AdamW, pi ~ 1/n": dict(kind="groupweights", mode="descent-ascent", reduction="mean",
                                                   prior="inverse_frequency"),
    # is ALSO's Adam's lead over AdamW the weight-decay range? AdamW's decoupled decay searched up to 10
    "ERM, AdamW decay to 10": dict(kind="erm", wd_range=(1e-6, 10.0)),
    "IW, AdamW decay to 10": dict(kind="iw", wd_range=(1e-6, 10.0)),
    "Upsampling, AdamW decay to 10": dict(kind="upsample", wd_range=(1e-6, 10.0)),
    "GroupDRO adj, AdamW decay to 10": dict(kind="groupdro", adjust=True, wd_range=(1e-6, 10.0)),
    "CVaR, AdamW decay to 10": dict(kind="cvar", wd_range=(1e-6, 10.0)),
    "GroupWeights DA mean + AdamW, decay to 10": dict(kind="groupweights", mode="descent-ascent", reduction="mean",
                                                      wd_range=(1e-6, 10.0)),
    "GroupWeights opt mean + AdamW, decay to 10": dict(kind="groupweights", mode="optimistic", reduction="mean",
                                                       wd_range=(1e-6, 10.0)),
    "GroupWeights DA mean + AdamW, pi ~ 1/n, decay to 10": dict(kind="groupweights", mode="descent-ascent",
                                                                reduction="mean", prior="inverse_frequency",
                                                                wd_range=(1e-6, 10.0)),
    "GroupWeights DA sum + AdamW, decay to 10": dict(kind="groupweights", mode="descent-ascent", reduction="sum",
                                                     wd_range=(1e-6, 10.0)),
    "GroupWeights opt sum + AdamW, decay to 10": dict(kind="groupweights", mode="optimistic", reduction="sum",
                                                      wd_range=(1e-6, 10.0)),
}
METHOD_LONG_NAMES = {
    "ERM": "ERM (AdamW, batch mean)",
    "IW": "importance weighting by group frequency (AdamW)",
    "GroupDRO": "GroupDRO, online exponentiated-gradient q on group mean losses (AdamW)",
    "RGD": "RGD, exp(clipped loss) per-sample weights (AdamW)",
    "ALSO opt sum": "ALSO, optimistic, group_reduction='sum'",
    "ALSO opt mean": "ALSO, optimistic, group_reduction='mean'",
    "ALSO DA sum": "ALSO, descent-ascent, group_reduction='sum'",
    "ALSO DA mean": "ALSO, descent-ascent, group_reduction='mean'",
    "ALSO sum, pi fixed": "control: ALSO descent-ascent, group_reduction='sum', pi_lr = pi_decay = 0, i.e. ALSO's "
                          "Adam (L2 coupled into the gradient) on the plain batch mean",
    "ALSO mean, pi fixed": "control: ALSO descent-ascent, group_reduction='mean', pi_lr = pi_decay = 0, i.e. "
                           "ALSO's Adam on the average of the batch's group mean losses (group-balanced)",
    "ALSO opt sum, pi ~ 1/n": "ALSO, optimistic, group_reduction='sum', pi_init = pi_reg proportional to 1/n_j "
                              "(inverse group frequency)",
    "IW, ALSO's Adam": "importance weighting by group frequency on ALSO's Adam (ThetaAdam, coupled L2)",
    "GroupDRO, ALSO's Adam": "GroupDRO on ALSO's Adam (ThetaAdam, coupled L2)",
    "RGD, ALSO's Adam": "RGD on ALSO's Adam (ThetaAdam, coupled L2)",
    "GroupWeights opt sum + AdamW": "ALSO's group weights (GroupWeights, optimistic, 'sum') beside AdamW",
    "GroupWeights opt mean + AdamW": "ALSO's group weights (GroupWeights, optimistic, 'mean') beside AdamW",
    "GroupWeights DA sum + AdamW": "ALSO's group weights (GroupWeights, descent-ascent, 'sum') beside AdamW",
    "GroupWeights DA mean + AdamW": "ALSO's group weights (GroupWeights, descent-ascent, 'mean') beside AdamW",
    "Upsampling": "group-balanced sampling: batches drawn with replacement, sample i with probability proportional "
                  "to 1 / n_{g_i}, batch mean loss (AdamW)",
    "JTT": "Just Train Twice: ERM for jtt_epochs epochs, then a fresh model trained with the losses of the training "
           "samples the first model misclassified weighted by upweight (AdamW)",
    "GroupDRO adj": "GroupDRO with Sagawa et al.'s generalisation adjustment: C / sqrt(n_g) added to the group mean "
                    "losses of the q step (AdamW)",
    "CVaR": "CVaR DRO: the mean of the largest ceil(alpha B) losses of the batch (AdamW)",
    "Upsampling, ALSO's Adam": "group-balanced sampling on ALSO's Adam (ThetaAdam, coupled L2)",
    "JTT, ALSO's Adam": "JTT with both stages on ALSO's Adam (ThetaAdam, coupled L2)",
    "GroupDRO adj, ALSO's Adam": "GroupDRO with the C / sqrt(n_g) adjustment on ALSO's Adam (ThetaAdam, coupled L2)",
    "CVaR, ALSO's Adam": "CVaR DRO on ALSO's Adam (ThetaAdam, coupled L2)",
    "ALSO DA mean, pi ~ 1/n": "ALSO, descent-ascent, 'mean', pi_init = pi_reg proportional to 1/n_j",
    "ALSO opt mean, pi ~ 1/n": "ALSO, optimistic, 'mean', pi_init = pi_reg proportional to 1/n_j",
    "ALSO DA mean, tuned temperature": "ALSO, descent-ascent, 'mean', pi_temperature tuned in [0.1, 10]",
    "ALSO DA mean, pi_lr to 10": "ALSO, descent-ascent, 'mean', pi_lr searched in [1e-3, 10]",
    "ALSO DA sum, tuned temperature": "ALSO, descent-ascent, 'sum', pi_temperature tuned in [0.1, 10]",
    "ALSO DA sum, pi_lr to 10": "ALSO, descent-ascent, 'sum', pi_lr searched in [1e-3, 10]",
    "GroupWeights DA mean + AdamW, pi ~ 1/n": "ALSO's weights (descent-ascent, 'mean', pi_init = pi_reg ~ 1/n_j) "
                                              "beside AdamW",
    "ERM, AdamW decay to 10": "ERM, AdamW with weight_decay searched in [1e-6, 10]",
    "IW, AdamW decay to 10": "IW, AdamW with weight_decay searched in [1e-6, 10]",
    "Upsampling, AdamW decay to 10": "Upsampling, AdamW with weight_decay searched in [1e-6, 10]",
    "GroupDRO adj, AdamW decay to 10": "GroupDRO adj, AdamW with weight_decay searched in [1e-6, 10]",
    "CVaR, AdamW decay to 10": "CVaR, AdamW with weight_decay searched in [1e-6, 10]",
    "GroupWeights DA mean + AdamW, decay to 10": "GroupWeights DA mean + AdamW, weight_decay searched in [1e-6, 10]",
    "GroupWeights opt mean + AdamW, decay to 10": "GroupWeights opt mean + AdamW, weight_decay searched in [1e-6, 10]",
    "GroupWeights DA mean + AdamW, pi ~ 1/n, decay to 10": "GroupWeights DA mean + AdamW, pi_init = pi_reg ~ 1/n_j, "
                                                           "weight_decay searched in [1e-6, 10]",
    "GroupWeights DA sum + AdamW, decay to 10": "GroupWeights DA sum + AdamW, weight_decay searched in [1e-6, 10]",
    "GroupWeights opt sum + AdamW, decay to 10": "GroupWeights opt sum + AdamW, weight_decay searched in [1e-6, 10]",
}
# a range (lo, hi) is sampled log-uniformly, (lo, hi, "linear") uniformly, (lo, hi, "int") as an integer;
# the same range for every method that has the hyper-parameter
COMMON_SPACE = {"lr": (1e-4, 3e-2), "weight_decay": (1e-6, 1e-1)}
STEP_RANGE = (1e-4, 1.0)  # GroupDRO's eta and ALSO's pi_lr
PI_DECAY_RANGE = (1e-4, 1.0)
RGD_TEMPERATURE_RANGE = (0.1, 10.0)
ADJUSTMENT_RANGE = (0.0, 5.0, "linear")  # GroupDRO's C (Sagawa et al. searched 0, 1, ..., 5)
JTT_UPWEIGHT_RANGE = (2.0, 100.0)  # JTT's lambda_up
CVAR_ALPHA_RANGE = (0.05, 1.0)  # the share of the batch CVaR averages (1: ERM)
TRIAL_SEED = 1000  # the training seed of every tuning trial (not one of the test seeds)


def method_spec(method: str) -> dict[str, Any]:
    """The spec of a method name; "<name> [<grouping>]" runs the method with that grouping of the task."""
    base, grouping = method, None
    if method.endswith("]") and " [" in method:
        base, grouping = method[:-1].split(" [", 1)
    spec = dict(METHODS[base] if base in METHODS else ATTEMPT_METHODS[base])
    spec["grouping"] = grouping
    spec["base"] = base
    return spec


def search_space(method: str, task) -> dict[str, tuple[float, float]]:
    spec = method_spec(method)
    space = dict(COMMON_SPACE)
    space.update(getattr(task, "space_overrides", {}))
    if "wd_range" in spec:
        space["weight_decay"] = spec["wd_range"]
    if spec["kind"] == "groupdro":
        space["eta"] = STEP_RANGE
        if spec.get("adjust"):
            space["adjustment"] = ADJUSTMENT_RANGE
    elif spec["kind"] == "jtt":  # the first model's epochs: 1 to half the training
        space["jtt_epochs"] = (1, max(1, task.epochs // 2), "int")
        space["upweight"] = JTT_UPWEIGHT_RANGE
    elif spec["kind"] == "cvar":
        space["alpha"] = CVAR_ALPHA_RANGE
    elif spec["kind"] == "rgd":
        space["temperature"] = RGD_TEMPERATURE_RANGE
    elif spec["kind"] in ("also", "groupweights") and not spec.get("fixed_pi"):
        space["pi_lr"] = spec.get("pi_lr_range", STEP_RANGE)
        space["pi_decay"] = PI_DECAY_RANGE
        if spec.get("tune_temperature"):
            space["pi_temperature"] = RGD_TEMPERATURE_RANGE
    return space


def suggest(trial, name: str, rng: tuple) -> float:
    lo, hi, *kind = rng
    kind = kind[0] if kind else "log"
    if kind == "int":
        return trial.suggest_int(name, int(lo), int(hi))
    return trial.suggest_float(name, lo, hi, log=kind == "log")


class GroupDRO:
    """Online GroupDRO (Sagawa et al. 2020, Alg. 1): q <- q exp(eta L) / Z on the batch's group mean
    losses L (absent groups: L_j = 0, so only the normalisation moves them), then loss = sum_j q_j L_j
    with the updated q. q starts uniform. ``adjustment`` (per group, C / sqrt(n_j) with n_j the group's
    training size: the paper's generalisation adjustment) is added to the mean loss of every group
    present in the batch before the q step; it is a constant, so it changes q and not the gradient."""

    def __init__(self, n_groups: int, eta: float, device: torch.device,
                 adjustment: Optional[torch.Tensor] = None) -> None:
        self.n_groups = n_groups
        self.eta = eta
        self.q = torch.full((n_groups,), 1.0 / n_groups, device=device)
        self.adjustment = None if adjustment is None else adjustment.to(device=device, dtype=torch.float32)

    def group_means(self, losses: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(self.n_groups, device=losses.device, dtype=losses.dtype).index_add(0, group_ids, losses)
        # index_add, not bincount: no host sync on CUDA
        counts = torch.zeros_like(sums).index_add(0, group_ids, torch.ones_like(losses))
        return sums / counts.clamp_min(1.0)

    @torch.no_grad()
    def update(self, group_means: torch.Tensor, present: Optional[torch.Tensor] = None) -> None:
        scores = group_means.detach().float()
        if self.adjustment is not None:
            scores = scores + self.adjustment * (present.float() if present is not None else 1.0)
        q = self.q * torch.exp(self.eta * scores)
        self.q = q / q.sum()

    def loss(self, losses: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        means = self.group_means(losses, group_ids)
        present = torch.zeros(self.n_groups, dtype=torch.bool, device=losses.device)
        present[group_ids] = True
        self.update(means, present)
        return (self.q.to(means.dtype) * means).sum()


def sagawa_adjustment(group_ids: torch.Tensor, n_groups: int, c: float) -> torch.Tensor:
    """C / sqrt(n_j) for every group j (n_j its number of training samples; an empty group gets 0)."""
    counts = torch.bincount(group_ids, minlength=n_groups).float()
    return torch.where(counts > 0, c / counts.clamp_min(1.0).sqrt(), torch.zeros_like(counts))


def group_balanced_probabilities(group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sampling probability of every training sample so that every group present is drawn equally often:
    1 / (K n_{g_i}), K the number of groups present."""
    counts = torch.bincount(group_ids, minlength=n_groups).float()
    present = int((counts > 0).sum())
    return 1.0 / (present * counts[group_ids])


def cvar_loss(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """The batch's CVaR at level alpha: the mean of its largest ceil(alpha B) losses (the minibatch
    estimator of the worst-case expected loss over reweightings with weights at most 1/alpha)."""
    k = max(1, math.ceil(alpha * losses.numel() - 1e-9))
    return losses.topk(k).values.mean()


def jtt_weights(errors: torch.Tensor, upweight: float) -> torch.Tensor:
    """JTT's second-stage sample weights: ``upweight`` on the error set, 1 elsewhere, scaled to mean 1."""
    w = torch.where(errors, torch.full(errors.shape, float(upweight)), torch.ones(errors.shape))
    return w / w.mean()


def make_theta_optimizer(task, spec: dict[str, Any], params, hp: dict[str, float]) -> torch.optim.Optimizer:
    if spec.get("theta") == "coupled":
        return also_fused.theta.ThetaAdam(params, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                          mode="descent-ascent", backend=task.backend)
    return also_fused.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])


def jtt_error_set(task, spec: dict[str, Any], hp: dict[str, float], seed: int) -> torch.Tensor:
    """JTT's first stage: ERM (on the method's theta optimizer) for hp["jtt_epochs"] epochs from the run's
    seed; returns which training samples the resulting model misclassifies."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = make_theta_optimizer(task, spec, [p for p in model.parameters() if p.requires_grad], hp)
    n, batch = len(task.y_tr), task.batch
    gen = torch.Generator().manual_seed(seed)
    for _ in range(int(hp["jtt_epochs"])):
        order = torch.randperm(n, generator=gen).to(task.device)
        for b in range(n // batch):
            idx = order[b * batch:(b + 1) * batch]
            opt.zero_grad(set_to_none=True)
            task.losses(model, idx).mean().backward()
            opt.step()
    model.eval()
    return task.train_errors(model).cpu()


def selection_key(task, metrics: dict[str, Any]) -> tuple[float, ...]:
    """Larger is better: the validation objective, then the task's tie-breaks (each with its own
    direction); non-finite values rank last. Used to pick the evaluation of a run and the best trial."""
    out = []
    for key, direction in [(task.objective_key, task.direction), *task.tie_breaks]:
        value = metrics[key]
        out.append((1.0 if direction == "maximize" else -1.0) * value if _finite(value) else -math.inf)
    return tuple(out)


class Diverged(Exception):
    pass


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def train_run(task, method: str, hp: dict[str, float], seed: int, evaluate_test: bool) -> dict[str, Any]:
    """Train task's model with ``method`` and ``hp``; evaluate on the validation split every
    ``task.eval_every`` steps (and at the end) and keep the evaluation with the best validation
    objective (model selection over training time). The test split is read only when
    ``evaluate_test`` (the seed runs; never during the search), at every evaluation, and the values of
    the selected one are reported.
    """
    spec = method_spec(method)
    device = task.device
    grouping = spec["grouping"] or task.default_grouping
    group_ids = task.groupings[grouping].to(device)
    n_groups = task.n_groups[grouping]
    n, batch = len(group_ids), task.batch
    torch.manual_seed(seed)
    model = task.make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    dro = None
    prior = None
    if spec.get("prior") == "inverse_frequency":
        counts = torch.bincount(group_ids, minlength=n_groups).double()
        prior = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts)).cpu()
    if spec["kind"] == "also":
        opt = also_fused.ALSO(params, n_groups=n_groups, batch_size=batch, mode=spec["mode"],
                              group_reduction=spec["reduction"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                              pi_lr=hp.get("pi_lr", 0.0), pi_decay=hp.get("pi_decay", 0.0), pi_init=prior,
                              pi_reg=prior, pi_temperature=hp.get("pi_temperature", 1.0), backend=task.backend)
    else:
        opt = make_theta_optimizer(task, spec, params, hp)
    weights = None
    if spec["kind"] == "groupweights":
        weights = also_fused.GroupWeights(n_groups, batch_size=batch, mode=spec["mode"],
                                          group_reduction=spec["reduction"], pi_lr=hp["pi_lr"],
                                          pi_decay=hp["pi_decay"], pi_init=prior, pi_reg=prior,
                                          pi_temperature=hp.get("pi_temperature", 1.0), device=device,
                                          backend=task.backend)
    if spec["kind"] == "groupdro":
        adjustment = sagawa_adjustment(group_ids, n_groups, hp["adjustment"]) if spec.get("adjust") else None
        dro = GroupDRO(n_groups, hp["eta"], device, adjustment)
    sampling = group_balanced_probabilities(group_ids, n_groups).cpu() if spec["kind"] == "upsample" else None
    if spec["kind"] == "jtt":
        errors = jtt_error_set(task, spec, hp, seed)
        sample_w = jtt_weights(errors, hp["upweight"]).to(device)
        torch.manual_seed(seed)  # the second model starts from the first one's initialisation
        model = task.make_model()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_theta_optimizer(task, spec, params, hp)
    if spec["kind"] == "iw":
        counts = torch.bincount(group_ids, minlength=n_groups).float()
        present = int((counts > 0).sum())
        iw = torch.where(counts > 0, n / (present * counts.clamp_min(1.0)), torch.zeros_like(counts))

    def score(metrics: dict[str, Any]) -> tuple[float, ...]:
        return selection_key(task, metrics)

    evaluations: list[dict[str, Any]] = []
    best: Optional[dict[str, Any]] = None
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * task.epochs
    eval_every = task.eval_every or steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    diverged = False
    t0 = time.perf_counter()
    step = 0

    def evaluate() -> None:
        nonlocal best
        if spec["kind"] == "also":
            opt.eval()
        model.eval()
        entry: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch, "val": task.evaluate(model, "val")}
        if evaluate_test:
            entry["test"] = task.evaluate(model, "test")
        model.train()
        if spec["kind"] == "also":
            opt.train()
        evaluations.append(entry)
        if best is None or score(entry["val"]) > score(best["val"]):
            best = entry

    try:
        for _ in range(task.epochs):
            if sampling is None:
                order = torch.randperm(n, generator=gen).to(device)
            else:  # group-balanced sampling with replacement, n draws an epoch
                order = torch.multinomial(sampling, n, replacement=True, generator=gen).to(device)
            for b in range(steps_per_epoch):
                idx = order[b * batch:(b + 1) * batch]
                g = group_ids[idx]
                opt.zero_grad(set_to_none=True)
                losses = task.losses(model, idx)
                if spec["kind"] == "also":
                    loss = opt.weighted_loss(losses, g)
                elif spec["kind"] == "groupweights":
                    loss = weights.weighted_loss(losses, g)
                elif spec["kind"] == "iw":
                    loss = (iw[g] * losses).mean()
                elif spec["kind"] == "groupdro":
                    loss = dro.loss(losses, g)
                elif spec["kind"] == "rgd":
                    loss = also_fused.rgd_loss(losses, temperature=hp["temperature"])
                elif spec["kind"] == "jtt":
                    loss = (sample_w[idx] * losses).mean()
                elif spec["kind"] == "cvar":
                    loss = cvar_loss(losses, hp["alpha"])
                else:
                    loss = losses.mean()
                loss.backward()
                opt.step()
                if weights is not None:
                    weights.step()
                step += 1
                if step % eval_every == 0 or step == total_steps:
                    evaluate()
                    val = evaluations[-1]["val"]
                    if not all(_finite(val[k]) for k in [task.objective_key, *(k for k, _ in task.tie_breaks)]):
                        raise Diverged  # a non-finite validation loss or objective: the run has blown up
    except (Diverged, ValueError) as exc:  # ALSO refuses non-finite losses with ValueError
        if isinstance(exc, ValueError) and "NaN or inf" not in str(exc):
            raise
        diverged = True
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    out: dict[str, Any] = {"seed": seed, "diverged": diverged, "steps": step, "seconds": time.perf_counter() - t0}
    if best is None:
        out.update(selected_step=None, val=None, objective=None)
        return out
    out.update(selected_step=best["step"], selected_epoch=best["epoch"], val=best["val"],
               objective=best["val"][task.objective_key])
    if evaluate_test:
        out["test"] = best["test"]
        out["test_last"] = evaluations[-1]["test"]
    if spec["kind"] in ("also", "groupweights") and hasattr(task, "describe_weights"):
        out["weights"] = task.describe_weights((opt if weights is None else weights).pi.detach().cpu(), grouping)
    if spec["kind"] == "groupdro" and hasattr(task, "describe_weights"):
        out["weights"] = task.describe_weights(dro.q.detach().cpu(), grouping)
    if spec["kind"] == "jtt":
        out["jtt_error_set"] = task.describe_error_set(errors) if hasattr(task, "describe_error_set") else {
            "size": int(errors.sum())}
    return out


def tune_and_test(task_factory: Callable, task_kwargs: dict, method: str, trials: int, seeds: int,
                  sampler_seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """One method on one task: ``trials`` Optuna TPE trials (trial seed TRIAL_SEED, validation
    objective), then ``seeds`` runs (seeds 0..seeds-1) with the best setting, tested at the selected
    evaluation. Runs in a worker process; everything it depends on is its arguments."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)
    task = task_factory(**task_kwargs)
    space = search_space(method, task)
    t0 = time.perf_counter()

    def objective(trial):
        hp = {name: suggest(trial, name, rng) for name, rng in space.items()}
        run = train_run(task, method, hp, TRIAL_SEED, evaluate_test=False)
        trial.set_user_attr("diverged", run["diverged"])
        trial.set_user_attr("selected_epoch", run.get("selected_epoch"))
        trial.set_user_attr("val", None if run["val"] is None else
                            {k: v for k, v in run["val"].items() if isinstance(v, (int, float))})
        if run["val"] is None:
            return task.worst_value
        value = run["objective"]
        return value if _finite(value) else task.worst_value

    study = optuna.create_study(direction=task.direction, sampler=optuna.samplers.TPESampler(seed=sampler_seed))
    study.optimize(objective, n_trials=trials)
    def rank(t):  # ties on the objective (coarse accuracies) go to the task's tie-breaks, then the earlier trial
        val = t.user_attrs.get("val")
        worst = (-math.inf,) * (1 + len(task.tie_breaks))
        return (selection_key(task, val) if val is not None else worst) + (-t.number,)

    done = [t for t in study.trials if t.value is not None]
    best = max(done, key=rank)
    tuned = dict(best.params)
    tune_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    runs = [train_run(task, method, tuned, seed, evaluate_test=True) for seed in range(seeds)]
    spec = method_spec(method)
    return {
        "method": method,
        "description": METHOD_LONG_NAMES[spec["base"]],
        "grouping": spec["grouping"] or task.default_grouping,
        "n_groups": task.n_groups[spec["grouping"] or task.default_grouping],
        "search_space": {k: list(v) for k, v in space.items()},
        "tuned_hparams": tuned,
        "best_trial": best.number,
        "best_val_objective": best.value,
        "trials": [{"number": t.number, "params": t.params, "value": t.value, **t.user_attrs} for t in study.trials],
        "tune_s": tune_s,
        "seeds_s": time.perf_counter() - t1,
        "per_seed": runs,
        **summarise(runs),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean and sample std (ddof 1, over the seeds) of every scalar test metric at the selected evaluation."""
    keys = [k for k, v in runs[0].get("test", {}).items() if isinstance(v, (int, float))] if runs[0].get("test") else []
    mean, std = {}, {}
    for k in keys:
        values = [r["test"][k] for r in runs if r.get("test") is not None]
        if len(values) == len(runs):
            mean[k] = statistics.fmean(values)
            std[k] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "diverged_seeds": sum(bool(r["diverged"]) for r in runs)}


def run_methods(jobs: list[tuple[Callable, dict, str]], trials: int, seeds: int, workers: int,
                sampler_seed: int = 0, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """tune_and_test for every (task factory, task kwargs, method) job, ``workers`` jobs at a time in
    separate processes (a job's result does not depend on the number of workers); results in the
    order of ``jobs``."""
    if workers <= 1:
        results = []
        for factory, kwargs, method in jobs:
            results.append(tune_and_test(factory, kwargs, method, trials, seeds, sampler_seed))
            log(summary_line(results[-1]))
        return results
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(tune_and_test, factory, kwargs, method, trials, seeds, sampler_seed)
                   for factory, kwargs, method in jobs]
        results = []
        for fut in futures:
            results.append(fut.result())
            log(summary_line(results[-1]))
    return results


def summary_line(r: dict[str, Any]) -> str:
    """One log line for a finished method: its tuned setting and test means over the seeds."""
    hp = ", ".join(f"{k}={v:.3g}" for k, v in r["tuned_hparams"].items())
    means = ", ".join(f"{k} {r['mean'][k]:.3f}±{r['std'][k]:.3f}" for k in list(r["mean"])[:3])
    return f"  {r['method']}: val objective {r['best_val_objective']:.4g} with {hp}; test {means} " \
           f"[tune {r['tune_s']:.0f} s, seeds {r['seeds_s']:.0f} s]"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _commit() -> str:
    """The checkout's commit, with "+changes" when the working tree differs from it (the repository's files
    outside benchmarks/dro/results)."""
    import subprocess

    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        # the results this run writes do not count as changes of the code that made them
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/dro/results"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+changes" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    import optuna

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}, {os.cpu_count()} cores, {cpu_model()}"
    return {"machine": name, "platform": platform.platform(), "date": datetime.date.today().isoformat(),
            "commit": _commit(),
            "torch": torch.__version__, "optuna": optuna.__version__, "also_fused": also_fused.__version__,
            "python": platform.python_version()}


def results_document(task, results: list[dict[str, Any]], trials: int, seeds: int, workers: int,
                     wall_s: float, sampler_seed: int = 0, extra: Optional[dict] = None) -> dict[str, Any]:
    return {
        "task": task.name,
        "title": task.title,
        **environment(task.device),
        "smoke": bool(getattr(task, "smoke", False)),
        "protocol": {
            "sampler": "optuna TPESampler", "sampler_seed": sampler_seed, "trials_per_method": trials,
            "trial_seed": TRIAL_SEED, "seeds": list(range(seeds)),
            "objective": task.objective_text, "objective_key": task.objective_key,
            "direction": task.direction, "tie_breaks": [list(t) for t in task.tie_breaks],
            "model_selection": "the evaluation (every eval_every steps and at the end) with the best validation "
                               "objective; test metrics are those of that evaluation",
            "epochs": task.epochs, "batch": task.batch, "eval_every_steps": task.eval_every,
            "std": "sample std over the seeds (ddof 1)", "workers": workers,
        },
        "data": task.describe(),
        "metrics": task.metric_text,
        "wall_s": wall_s,
        **(extra or {}),
        "results": results,
    }


def markdown_table(doc: dict[str, Any], keys: list[tuple[str, str]], scale: float = 1.0, digits: int = 1) -> str:
    head = "| method | groups | " + " | ".join(label for _, label in keys) + " | tuned |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for r in doc["results"]:
        cells = []
        for k, _ in keys:
            if k in r["mean"]:
                cells.append(f"{scale * r['mean'][k]:.{digits}f} ± {scale * r['std'][k]:.{digits}f}")
            else:
                cells.append("n/a")
        hp = ", ".join(f"{k}={v:.2g}" for k, v in r["tuned_hparams"].items())
        lines.append(f"| {r['method']} | {r['grouping']} ({r['n_groups']}) | " + " | ".join(cells) + f" | {hp} |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], keys: list[tuple[str, str]], path, ylabel: str, lower_is_better: bool = False) -> None:
    """Bars: mean ± std over seeds of the test metrics ``keys`` per method; below, the TPE search
    (best validation objective so far per trial)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = doc["results"]
    many = len(rows) > 12  # the trial panel's legend then goes beside the axes, where it hides no curve
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(15 if many else 11, 8.5), gridspec_kw={"height_ratios": [3, 2]})
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    colors = ("tab:red", "tab:blue", "tab:green", "tab:purple")
    finite = [r["mean"].get(k) for r in rows for k, _ in keys if _finite(r["mean"].get(k, math.nan))]
    span = (max(finite) - min(finite) + 1e-9) if finite else 1.0
    if finite and not lower_is_better:
        low, high = max(0.0, min(finite) - 0.3 * span - 5), max(finite) + 0.15 * span + 2
    elif finite:
        low, high = max(0.0, min(finite) - 0.6 * span), max(finite) + 0.3 * span
    for i, (k, label) in enumerate(keys):
        means = [r["mean"].get(k, np.nan) for r in rows]
        stds = [r["std"].get(k, 0.0) for r in rows]
        off = (i - (len(keys) - 1) / 2) * width
        bars = top.bar(x + off, means, width, yerr=stds, capsize=3, label=label, color=colors[i % 4], alpha=0.85)
        if finite:
            for b, m in zip(bars, means):  # the mean, written at the foot of its bar
                if np.isfinite(m):
                    top.text(b.get_x() + b.get_width() / 2, low + 0.02 * (high - low), f"{m:.3g}", ha="center",
                             va="bottom", fontsize=7, color="white", fontweight="bold", rotation=90)
    top.set_xticks(x)
    if len(rows) > 10:
        top.set_xticklabels([r["method"] for r in rows], fontsize=8, rotation=30, ha="right")
    else:
        top.set_xticklabels([r["method"].replace(", ", ",\n") for r in rows], fontsize=8)
    top.set_ylabel(ylabel)
    if finite:
        top.set_ylim(low, high)
    top.grid(axis="y", alpha=0.3)
    top.legend(fontsize=8, loc="best")
    smoke = " (SMOKE RUN: not results)" if doc.get("smoke") else ""
    top.set_title(f"{doc['title']}{smoke}\ntest metrics at the selected evaluation, mean ± std over "
                  f"{len(doc['protocol']['seeds'])} seeds; {doc['machine']}, torch {doc['torch']}, {doc['date']}",
                  fontsize=9)
    sign = 1.0 if doc["protocol"]["direction"] == "maximize" else -1.0
    for i, r in enumerate(rows):
        values = [t["value"] for t in r["trials"] if t["value"] is not None]
        best = [sign * max(sign * v for v in values[:j + 1]) for j in range(len(values))]
        bottom.step(range(1, len(best) + 1), best, where="post", label=r["method"],
                    linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.5, marker=".", markersize=3)
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("trial")
    bottom.set_ylabel("best so far")
    bottom.set_title(textwrap.fill(f"Optuna TPE, {doc['protocol']['trials_per_method']} trials per method: "
                                   f"{doc['protocol']['objective']}", 140), fontsize=9)
    bottom.grid(alpha=0.3)
    if many:
        bottom.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        bottom.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight" if many else None)
    plt.close(fig)
