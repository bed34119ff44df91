"""The CPU tasks of the DRO benchmark, all on scikit-learn's bundled 8x8 digits (no download):

* ``long_tailed``: the long-tailed digits of ``make demo`` (examples/demo_digits.py builds the data;
  groups = the 10 classes; objective: worst-class validation accuracy);
* ``spurious``: digit >= 5 or not, with a bright corner patch that goes with the label in 90% of the
  training images (groups = label x patch: two majority and two minority groups); the test set has
  every test image once with and once without the patch, so the correlation is gone there;
  objective: worst-group validation accuracy;
* ``noisy_labels``: the 10 classes with 30% of the training labels replaced by another class drawn
  at random; one group per training sample (object-level weighting); the test labels are clean;
  objective: validation accuracy against the (noisy) validation labels.

Every task carves its validation split from its training data; the test split is used only for
the reported numbers.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def demo_module():
    """examples/demo_digits.py, the long-tailed data's single definition."""
    if "demo_digits" in sys.modules:
        return sys.modules["demo_digits"]
    spec = importlib.util.spec_from_file_location("demo_digits", EXAMPLES / "demo_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_digits"] = module
    spec.loader.exec_module(module)
    return module


def mlp(n_in: int, n_hidden: int, n_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.ReLU(), torch.nn.Linear(n_hidden, n_out))


def standardize_with(X_fit: torch.Tensor, *others: torch.Tensor):
    mean, std = X_fit.mean(0), X_fit.std(0).clamp_min(1e-3)
    return [(X - mean) / std for X in (X_fit, *others)]


def stratified_split(y: torch.Tensor, fraction: float, seed: int):
    """(train indices, validation indices): ``fraction`` of every class to validation."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(y)).numpy()
    tr, va = train_test_split(idx, test_size=fraction, stratify=y.numpy(), random_state=seed)
    return torch.from_numpy(tr), torch.from_numpy(va)


# coarse accuracies tie often (2 validation images in the rarest long-tailed classes): ties go to the
# higher validation accuracy, then the lower validation loss
TIE_BREAKS = [("acc", "maximize"), ("loss", "minimize")]


class ClassificationTask:
    """A classifier trained on (X, y) with per-sample group ids; val/test carry their own groups for
    the worst-group accuracy."""

    direction = "maximize"
    worst_value = 0.0
    backend = "auto"
    device = torch.device("cpu")

    def __init__(self, name: str, title: str, X_tr, y_tr, groupings: dict[str, torch.Tensor], n_groups: dict[str, int],
                 val: tuple, test: tuple, n_eval_groups: int, eval_group_names: list[str], n_hidden: int,
                 n_classes: int, batch: int, epochs: int, objective_key: str, objective_text: str,
                 tie_breaks: list[tuple[str, str]], data_info: dict[str, Any], smoke: bool = False) -> None:
        self.name, self.title = name, title
        self.X_tr, self.y_tr = X_tr, y_tr
        self.groupings, self.n_groups = groupings, n_groups
        self.default_grouping = next(iter(groupings))
        self.splits = {"val": val, "test": test}
        self.n_eval_groups, self.eval_group_names = n_eval_groups, eval_group_names
        self.n_hidden, self.n_classes = n_hidden, n_classes
        self.batch, self.epochs, self.eval_every = batch, epochs, None
        self.objective_key, self.objective_text, self.tie_breaks = objective_key, objective_text, tie_breaks
        self.metric_text = ("acc: accuracy over the split (%); worst_group_acc: the lowest accuracy of the split's "
                            f"groups ({', '.join(eval_group_names)}) (%); group_acc: each group's accuracy (%); "
                            "loss: mean cross-entropy against the split's labels")
        self.data_info = data_info
        self.smoke = smoke

    def make_model(self) -> torch.nn.Module:
        return mlp(self.X_tr.shape[1], self.n_hidden, self.n_classes)

    def losses(self, model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(self.X_tr[idx]), self.y_tr[idx], reduction="none")

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, Any]:
        X, y, g = self.splits[split]
        logits = model(X)
        correct = (logits.argmax(1) == y).float()
        per_group = [100.0 * float(correct[g == j].mean()) for j in range(self.n_eval_groups) if bool((g == j).any())]
        return {"acc": 100.0 * float(correct.mean()), "worst_group_acc": min(per_group),
                "loss": float(F.cross_entropy(logits, y)), "group_acc": per_group}

    def describe_weights(self, w: torch.Tensor, grouping: str) -> dict[str, Any]:
        """The method's group weights at the end of training (pi or q), when there are few groups."""
        return {"final_weights": [round(float(v), 6) for v in w]} if len(w) <= 16 else {}

    def describe(self) -> dict[str, Any]:
        return {**self.data_info, "n_train": len(self.y_tr), "n_val": len(self.splits["val"][1]),
                "n_test": len(self.splits["test"][1]), "groupings": dict(self.n_groups),
                "eval_groups": self.eval_group_names,
                "model": f"MLP {self.X_tr.shape[1]}-{self.n_hidden}-{self.n_classes} (ReLU)"}


# ------------------------------------------------------------------------------------ long-tailed
def long_tailed(smoke: bool = False, epochs: int = 60, batch: int = 32) -> ClassificationTask:
    """The demo's long-tailed digits; validation = a stratified third of the long-tailed training set
    (the first fold of examples/tune_digits.py's split), standardised with the rest."""
    from sklearn.model_selection import StratifiedKFold

    demo = demo_module()
    X_tr, y_tr, X_te, y_te = demo.long_tailed_raw(0)
    tr, va = next(StratifiedKFold(n_splits=3, shuffle=True, random_state=0).split(X_tr.numpy(), y_tr.numpy()))
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    X_fit, X_va, X_te = standardize_with(X_tr[tr], X_tr[va], X_te)
    y_fit, y_va = y_tr[tr], y_tr[va]
    k = demo.N_CLASSES
    names = [f"class {c}" for c in range(k)]
    return ClassificationTask(
        "long_tailed", f"Long-tailed digits (class c keeps n_max * {demo.IMBALANCE:g}^(-c/9) training samples)",
        X_fit, y_fit, {"classes": y_fit}, {"classes": k}, (X_va, y_va, y_va), (X_te, y_te, y_te), k, names,
        n_hidden=64, n_classes=k, batch=batch, epochs=2 if smoke else epochs, objective_key="worst_group_acc",
        objective_text="worst-class validation accuracy (%), maximised", tie_breaks=TIE_BREAKS,
        data_info={"source": "sklearn.datasets.load_digits, made long-tailed by examples/demo_digits.long_tailed_raw",
                   "imbalance": demo.IMBALANCE, "train_per_class": torch.bincount(y_fit, minlength=k).tolist(),
                   "val_per_class": torch.bincount(y_va, minlength=k).tolist(),
                   "test_per_class": torch.bincount(y_te, minlength=k).tolist()},
        smoke=smoke)


# -------------------------------------------------------------------------------------- spurious
PATCH_PIXELS = (0, 1, 8, 9)  # the top-left 2x2 corner of the 8x8 image, blank in almost every digit
PATCH_VALUE = 16.0  # the brightest pixel value of the data set


def add_patch(X: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    X = X.clone()
    cols = torch.tensor(PATCH_PIXELS)
    X[a.bool().nonzero().flatten().unsqueeze(1), cols] = PATCH_VALUE
    return X


def spurious(smoke: bool = False, majority: float = 0.9, epochs: int = 40, batch: int = 32) -> ClassificationTask:
    """Label y = (digit >= 5); attribute a = a bright 2x2 patch in the top-left corner. In the
    training and validation data a = y for ``majority`` of every class's images (exactly, at random),
    a != y for the rest; groups g = 2 y + a. The test set is every test image twice, with and without
    the patch, so a says nothing about y there."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, digit = load_digits(return_X_y=True)
    X_tr, X_te, d_tr, d_te = train_test_split(X, digit, test_size=0.3, stratify=digit, random_state=0)
    X_tr, X_te = torch.tensor(X_tr, dtype=torch.float32), torch.tensor(X_te, dtype=torch.float32)
    y_tr, y_te = torch.tensor(d_tr >= 5).long(), torch.tensor(d_te >= 5).long()
    d_tr_t = torch.tensor(d_tr)
    gen = torch.Generator().manual_seed(0)
    a_tr = y_tr.clone()
    for c in range(10):  # the minority share is exact within every digit (so within both labels)
        idx = (d_tr_t == c).nonzero().flatten()
        flip = idx[torch.randperm(len(idx), generator=gen)[:round((1 - majority) * len(idx))]]
        a_tr[flip] = 1 - a_tr[flip]
    X_tr = add_patch(X_tr, a_tr)
    g_tr = 2 * y_tr + a_tr
    tr, va = stratified_split(g_tr, 1 / 3, seed=0)
    X_both = torch.cat([add_patch(X_te, torch.zeros(len(y_te))), add_patch(X_te, torch.ones(len(y_te)))])
    y_both = torch.cat([y_te, y_te])
    a_both = torch.cat([torch.zeros_like(y_te), torch.ones_like(y_te)])
    X_fit, X_va, X_both = standardize_with(X_tr[tr], X_tr[va], X_both)
    names = ["digit<5, no patch", "digit<5, patch", "digit>=5, no patch", "digit>=5, patch"]
    g_fit = g_tr[tr]
    return ClassificationTask(
        "spurious", f"Spurious patch: digit >= 5 vs < 5, a corner patch goes with the label in "
                    f"{100 * majority:g}% of training images, in none at test",
        X_fit, y_tr[tr], {"label x patch": g_fit}, {"label x patch": 4}, (X_va, y_tr[va], g_tr[va]),
        (X_both, y_both, 2 * y_both + a_both), 4, names, n_hidden=64, n_classes=2, batch=batch,
        epochs=2 if smoke else epochs, objective_key="worst_group_acc",
        objective_text="worst-group validation accuracy (%) over the 4 label x patch groups, maximised",
        tie_breaks=TIE_BREAKS,
        data_info={"source": "sklearn.datasets.load_digits; label = digit >= 5; patch = pixels "
                             f"{list(PATCH_PIXELS)} set to {PATCH_VALUE:g}", "majority": majority,
                   "train_per_group": torch.bincount(g_fit, minlength=4).tolist(),
                   "val_per_group": torch.bincount(g_tr[va], minlength=4).tolist(),
                   "test_per_group": torch.bincount(2 * y_both + a_both, minlength=4).tolist()},
        smoke=smoke)


# ---------------------------------------------------------------------------------- noisy labels
def noisy_labels(smoke: bool = False, noise: float = 0.3, epochs: int = 40, batch: int = 32) -> ClassificationTask:
    """10-class digits; ``noise`` of the training labels (exactly, at random) replaced by another class
    drawn uniformly; validation = a stratified quarter of the noisy training set (noisy labels, as a
    practitioner would have them); test = the untouched clean test split. One group per training sample."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    X_tr, X_te = torch.tensor(X_tr, dtype=torch.float32), torch.tensor(X_te, dtype=torch.float32)
    y_clean, y_te = torch.tensor(y_tr), torch.tensor(y_te)
    gen = torch.Generator().manual_seed(0)
    flipped = torch.zeros(len(y_clean), dtype=torch.bool)
    flipped[torch.randperm(len(y_clean), generator=gen)[:round(noise * len(y_clean))]] = True
    shift = torch.randint(1, 10, (len(y_clean),), generator=gen)
    y_noisy = torch.where(flipped, (y_clean + shift) % 10, y_clean)
    tr, va = stratified_split(y_noisy, 1 / 4, seed=0)
    X_fit, X_va, X_te = standardize_with(X_tr[tr], X_tr[va], X_te)
    n_fit = len(tr)
    task = ClassificationTask(
        "noisy_labels", f"Flipped labels: 10-class digits, {100 * noise:g}% of the training labels wrong, "
                        "one group per training sample",
        X_fit, y_noisy[tr], {"samples": torch.arange(n_fit)}, {"samples": n_fit},
        (X_va, y_noisy[va], y_noisy[va]), (X_te, y_te, y_te), 10, [f"class {c}" for c in range(10)],
        n_hidden=64, n_classes=10, batch=batch, epochs=2 if smoke else epochs, objective_key="acc",
        objective_text="validation accuracy against the noisy validation labels (%), maximised (under uniform "
                       "label noise its expectation is an increasing affine function of the clean accuracy)",
        tie_breaks=[("worst_group_acc", "maximize"), ("loss", "minimize")],
        data_info={"source": "sklearn.datasets.load_digits", "noise": noise,
                   "flipped_train": int(flipped[tr].sum()), "flipped_val": int(flipped[va].sum()),
                   "test": "clean labels"},
        smoke=smoke)
    task.flipped = flipped[tr]
    task.metric_text += ("; on the test split the labels are clean and the groups are the classes (worst_group_acc = "
                         "worst-class clean accuracy)")
    task.describe_weights = lambda w, grouping: describe_sample_weights(w, task.flipped)
    return task


def describe_sample_weights(w: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """Where the learned per-sample weights went: the share of the weight on flipped samples (their
    share of the data is flipped.mean()) and the flipped share among the top 10% weights."""
    w = w.double()
    top = w.topk(max(1, len(w) // 10)).indices
    return {"weight_on_flipped": float(w[flipped].sum() / w.sum()),
            "flipped_share_of_data": float(flipped.double().mean()),
            "flipped_share_of_top10pct": float(flipped[top].double().mean())}


TASKS = {"long_tailed": long_tailed, "spurious": spurious, "noisy_labels": noisy_labels}


def make_task(name: str, **kwargs) -> ClassificationTask:
    return TASKS[name](**kwargs)
