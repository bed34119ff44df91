"""The CPU tasks of the DRO benchmark, all on scikit-learn's bundled 8x8 digits (no download):

* ``long_tailed``: the long-tailed digits of ``make demo`` (examples/demo_digits.py builds the data;
  groups = the 10 classes; objective: worst-class validation accuracy on a class-balanced
  validation split, drawn like the (balanced) test split from the training images the long tail
  left out);
* ``spurious``: digit >= 5 or not, with a bright corner patch that goes with the label in 90% of the
  training images (groups = label x patch: two majority and two minority groups); the validation and
  test sets have every one of their images once with and once without the patch, so the correlation is
  gone there; objective: worst-group validation accuracy;
* ``colored``: a Colored-MNIST-style task: digit >= 5 or not, the image drawn in one of two colour
  channels (the other channel blank), the colour equal to the label in ``strength`` of the training
  images (a parameter, 0.95 by default); validation and test images appear once in each colour
  (groups = label x colour, balanced there); objective: worst-group validation accuracy;
* ``noisy_labels``: the 10 classes with 30% of the training labels replaced by another class drawn
  at random; one group per training sample (object-level weighting); the test labels are clean;
  objective: validation accuracy against the (noisy) validation labels.

The validation splits are disjoint from the test splits and, where the field does so, drawn like the
test distribution (balanced classes, the spurious feature independent of the label), not like the
training distribution; the test split is used only for the reported numbers.
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

    @torch.no_grad()
    def train_errors(self, model: torch.nn.Module) -> torch.Tensor:
        """Which training samples the model misclassifies (against the training labels): JTT's error set."""
        return model(self.X_tr).argmax(1) != self.y_tr

    def describe_error_set(self, errors: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"size": int(errors.sum())}
        g = self.groupings[self.default_grouping]
        if self.n_groups[self.default_grouping] <= 16:
            out["per_group"] = torch.bincount(g[errors], minlength=self.n_groups[self.default_grouping]).tolist()
        if hasattr(self, "flipped"):
            out["flipped_share"] = float(self.flipped[errors].float().mean()) if bool(errors.any()) else 0.0
        return out

    def describe_weights(self, w: torch.Tensor, grouping: str) -> dict[str, Any]:
        """The method's group weights at the end of training (pi or q), when there are few groups."""
        return {"final_weights": [round(float(v), 6) for v in w]} if len(w) <= 16 else {}

    def describe(self) -> dict[str, Any]:
        return {**self.data_info, "n_train": len(self.y_tr), "n_val": len(self.splits["val"][1]),
                "n_test": len(self.splits["test"][1]), "groupings": dict(self.n_groups),
                "eval_groups": self.eval_group_names,
                "model": f"MLP {self.X_tr.shape[1]}-{self.n_hidden}-{self.n_classes} (ReLU)"}


# ------------------------------------------------------------------------------------ long-tailed
def long_tailed_split(val_per_class: int):
    """The demo's long-tailed training set with a class-balanced validation split. examples/demo_digits.py
    keeps n_max * 20^(-c/9) of class c's training images; the images it leaves out are the validation
    pool: ``val_per_class`` of every class drawn from them (class 0, which keeps all its images, gives
    its own). Returns raw (X_fit, y_fit, X_val, y_val, X_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    demo = demo_module()
    X_lt, y_lt, X_te, y_te = demo.long_tailed_raw(0)
    X, y = load_digits(return_X_y=True)
    X_all, _, y_all, _ = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    X_all, y_all = torch.tensor(X_all, dtype=torch.float32), torch.tensor(y_all)
    gen = torch.Generator().manual_seed(0)  # the demo's draw, repeated to know which images it kept
    n_max = int((y_all == 0).sum())
    keep, val = [], []
    for c in range(demo.N_CLASSES):
        idx = torch.nonzero(y_all == c).flatten()
        order = idx[torch.randperm(len(idx), generator=gen)]
        n_c = max(1, int(n_max * demo.IMBALANCE ** (-c / (demo.N_CLASSES - 1))))
        kept, rest = order[:n_c], order[n_c:]
        if len(rest) < val_per_class:  # the head class: its validation images come out of its training images
            kept, rest = order[:n_c - val_per_class], order[n_c - val_per_class:]
        keep.append(kept)
        val.append(rest[:val_per_class])
    keep, val = torch.cat(keep), torch.cat(val)
    # the same images as the demo's long tail (less the head class's validation images)
    lt_rows = {tuple(r) for r in X_lt.tolist()}
    assert all(tuple(r) in lt_rows for r in X_all[keep].tolist())
    return X_all[keep], y_all[keep], X_all[val], y_all[val], X_te, y_te


def long_tailed(smoke: bool = False, epochs: int = 60, batch: int = 32, val_per_class: int = 25) -> ClassificationTask:
    """The demo's long-tailed digits; validation = ``val_per_class`` images of every class the long tail
    left out (balanced like the test split, disjoint from it and from the training images)."""
    demo = demo_module()
    X_fit, y_fit, X_va, y_va, X_te, y_te = long_tailed_split(val_per_class)
    X_fit, X_va, X_te = standardize_with(X_fit, X_va, X_te)
    k = demo.N_CLASSES
    names = [f"class {c}" for c in range(k)]
    return ClassificationTask(
        "long_tailed", f"Long-tailed digits (class c keeps n_max * {demo.IMBALANCE:g}^(-c/9) training samples)",
        X_fit, y_fit, {"classes": y_fit, "samples": torch.arange(len(y_fit))}, {"classes": k, "samples": len(y_fit)}, (X_va, y_va, y_va), (X_te, y_te, y_te), k, names,
        n_hidden=64, n_classes=k, batch=batch, epochs=2 if smoke else epochs, objective_key="worst_group_acc",
        objective_text="worst-class accuracy (%) on the class-balanced validation split, maximised",
        tie_breaks=TIE_BREAKS,
        data_info={"source": "sklearn.datasets.load_digits, made long-tailed by examples/demo_digits.long_tailed_raw; "
                             "validation: images the long tail left out, class-balanced (class 0's from its own)",
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


def spurious_attribute(digit: torch.Tensor, y: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
    """The spurious attribute a of every image: a = y for exactly round(strength * n) of every digit's n
    images (drawn at random), a = 1 - y for the rest."""
    gen = torch.Generator().manual_seed(seed)
    a = y.clone()
    for c in range(10):  # the minority share is exact within every digit (so within both labels)
        idx = (digit == c).nonzero().flatten()
        flip = idx[torch.randperm(len(idx), generator=gen)[:round((1 - strength) * len(idx))]]
        a[flip] = 1 - a[flip]
    return a


def both_ways(X: torch.Tensor, y: torch.Tensor, render):
    """Every image once with a = 0 and once with a = 1 (the label independent of a, groups balanced
    within each label): (X, y, a)."""
    zeros = torch.zeros_like(y)
    return torch.cat([render(X, zeros), render(X, 1 - zeros)]), torch.cat([y, y]), torch.cat([zeros, 1 - zeros])


def digits_70_30():
    """scikit-learn's digits, the stratified 70/30 split every CPU task uses: (X_tr, X_te, digit_tr, digit_te)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, digit = load_digits(return_X_y=True)
    X_tr, X_te, d_tr, d_te = train_test_split(X, digit, test_size=0.3, stratify=digit, random_state=0)
    return (torch.tensor(X_tr, dtype=torch.float32), torch.tensor(X_te, dtype=torch.float32), torch.tensor(d_tr),
            torch.tensor(d_te))


def spurious(smoke: bool = False, majority: float = 0.9, epochs: int = 40, batch: int = 32,
             val_like: str = "test") -> ClassificationTask:
    """Label y = (digit >= 5); attribute a = a bright 2x2 patch in the top-left corner. In the
    training data a = y for ``majority`` of every digit's images (exactly, at random), a != y for the
    rest; groups g = 2 y + a. The test set is every test image twice, with and without the patch, so
    a says nothing about y there; the validation split (a stratified third of the training digits,
    held out before the patch is drawn) is built the same way (``val_like="test"``), or keeps the
    training correlation (``val_like="train"``, the earlier protocol)."""
    X_tr, X_te, d_tr, d_te = digits_70_30()
    y_tr, y_te = (d_tr >= 5).long(), (d_te >= 5).long()
    a_tr = spurious_attribute(d_tr, y_tr, majority)
    g_tr = 2 * y_tr + a_tr
    tr, va = stratified_split(g_tr, 1 / 3, seed=0)
    if val_like == "test":
        X_va, y_va, a_va = both_ways(X_tr[va], y_tr[va], add_patch)
    else:
        X_va, y_va, a_va = add_patch(X_tr[va], a_tr[va]), y_tr[va], a_tr[va]
    X_fit = add_patch(X_tr[tr], a_tr[tr])
    X_both, y_both, a_both = both_ways(X_te, y_te, add_patch)
    X_fit, X_va, X_both = standardize_with(X_fit, X_va, X_both)
    names = ["digit<5, no patch", "digit<5, patch", "digit>=5, no patch", "digit>=5, patch"]
    g_fit, g_va = g_tr[tr], 2 * y_va + a_va
    return ClassificationTask(
        "spurious", f"Spurious patch: digit >= 5 vs < 5, a corner patch goes with the label in "
                    f"{100 * majority:g}% of training images, in none at validation and test",
        X_fit, y_tr[tr], {"label x patch": g_fit, "samples": torch.arange(len(g_fit))},
        {"label x patch": 4, "samples": len(g_fit)}, (X_va, y_va, g_va),
        (X_both, y_both, 2 * y_both + a_both), 4, names, n_hidden=64, n_classes=2, batch=batch,
        epochs=2 if smoke else epochs, objective_key="worst_group_acc",
        objective_text=f"worst-group validation accuracy (%) over the 4 label x patch groups, maximised (validation "
                       f"{'drawn like the test split' if val_like == 'test' else 'with the training correlation'})",
        tie_breaks=TIE_BREAKS,
        data_info={"source": "sklearn.datasets.load_digits; label = digit >= 5; patch = pixels "
                             f"{list(PATCH_PIXELS)} set to {PATCH_VALUE:g}", "majority": majority, "val_like": val_like,
                   "train_per_group": torch.bincount(g_fit, minlength=4).tolist(),
                   "val_per_group": torch.bincount(g_va, minlength=4).tolist(),
                   "test_per_group": torch.bincount(2 * y_both + a_both, minlength=4).tolist()},
        smoke=smoke)


# --------------------------------------------------------------------------------------- colored
def colorize(X: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Colored-MNIST style: the 64 pixels go to the first colour channel (a = 0) or to the second (a = 1);
    the other channel is blank. (n, 64) -> (n, 128)."""
    out = torch.zeros(len(X), 2 * X.shape[1])
    first = a == 0
    out[first, :X.shape[1]] = X[first]
    out[~first, X.shape[1]:] = X[~first]
    return out


def colored(smoke: bool = False, strength: float = 0.95, epochs: int = 40, batch: int = 32,
            label_noise: float = 0.0) -> ClassificationTask:
    """Colored digits: y = (digit >= 5), ``label_noise`` of the training labels flipped (exactly, at
    random; 0 by default), the colour a = y for ``strength`` of every digit's training images and a = 1 - y
    for the rest; groups g = 2 y + a. A third of the training digits (stratified by digit, held out before
    colouring) is the validation split and the 30% test split the test set; both show every image in both
    colours, so the colour is independent of the label and the four groups are the same size within each
    label. The shape of a minority-colour digit must be learnt from the few training images of that colour:
    the feature the model reads it with is a different set of input weights."""
    X_tr, X_te, d_tr, d_te = digits_70_30()
    tr, va = stratified_split(d_tr, 1 / 3, seed=0)
    d_fit = d_tr[tr]
    y_fit = (d_fit >= 5).long()
    if label_noise > 0:
        gen = torch.Generator().manual_seed(1)
        flip = torch.randperm(len(y_fit), generator=gen)[:round(label_noise * len(y_fit))]
        y_fit[flip] = 1 - y_fit[flip]
    a_fit = spurious_attribute(d_fit, y_fit, strength)  # the colour follows the (possibly flipped) label
    X_fit, X_va_raw = X_tr[tr] / 16.0, X_tr[va] / 16.0  # pixel values in [0, 1]; no standardising: blank channels stay 0
    X_va, y_va, a_va = both_ways(X_va_raw, (d_tr[va] >= 5).long(), colorize)
    X_te, y_te, a_te = both_ways(X_te / 16.0, (d_te >= 5).long(), colorize)
    X_fit = colorize(X_fit, a_fit)
    g_fit, g_va, g_te = 2 * y_fit + a_fit, 2 * y_va + a_va, 2 * y_te + a_te
    names = ["digit<5, colour 0", "digit<5, colour 1", "digit>=5, colour 0", "digit>=5, colour 1"]
    task = ClassificationTask(
        "colored", f"Colored digits: digit >= 5 vs < 5, the colour goes with the label in {100 * strength:g}% of "
                   f"training images{f' ({100 * label_noise:g}% labels flipped)' if label_noise else ''}, "
                   "independent of it at validation and test",
        X_fit, y_fit, {"label x colour": g_fit, "samples": torch.arange(len(y_fit))},
        {"label x colour": 4, "samples": len(y_fit)}, (X_va, y_va, g_va), (X_te, y_te, g_te), 4, names,
        n_hidden=64, n_classes=2, batch=batch, epochs=2 if smoke else epochs, objective_key="worst_group_acc",
        objective_text="worst-group accuracy (%) over the 4 label x colour groups of the validation split (every "
                       "validation image in both colours, drawn like the test split), maximised",
        tie_breaks=TIE_BREAKS,
        data_info={"source": "sklearn.datasets.load_digits; label = digit >= 5; colour = which of two 64-pixel "
                             "channels holds the image (pixels / 16)", "strength": strength,
                   "label_noise": label_noise,
                   "train_per_group": torch.bincount(g_fit, minlength=4).tolist(),
                   "val_per_group": torch.bincount(g_va, minlength=4).tolist(),
                   "test_per_group": torch.bincount(g_te, minlength=4).tolist()},
        smoke=smoke)
    task.attribute = a_fit
    return task


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


TASKS = {"long_tailed": long_tailed, "spurious": spurious, "colored": colored, "noisy_labels": noisy_labels}


def make_task(name: str, **kwargs) -> ClassificationTask:
    return TASKS[name](**kwargs)
