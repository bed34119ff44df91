"""Long-tailed digits: Adam vs class-balanced Adam vs RGD vs ALSO vs GroupWeights + AdamW, mean and
worst-class test accuracy.

scikit-learn's bundled 8x8 digits (no download). The training split is made long-tailed: class c
keeps n_max * 20^(-c/9) samples; the test split is untouched. An MLP 64-64-10 trains with each
method for the same number of epochs over several seeds. On CUDA the Triton kernels run; on a CPU
the CPU path does. The table is printed and written, with the per-seed numbers as JSON and a
bar plot, to examples/results/demo_<device>.{md,json,png}.

The functions here (data, model, training, table, plot) are reused by tune_digits.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import also_fused

IMBALANCE = 20.0
N_CLASSES = 10
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Each method: how its loss is built and which optimizer runs. Hyper-parameters live apart (below),
# so that the tuning script can replace them.
METHODS = {
    "Adam": dict(kind="adam"),
    "Adam (class-balanced)": dict(kind="adam", class_balanced=True),
    "RGD": dict(kind="rgd"),
    "ALSO (uniform pi)": dict(kind="also"),
    "ALSO (pi_init = pi_reg ~ 1/n)": dict(kind="also", prior="inverse_count"),
    "ALSO (group mean)": dict(kind="also", group_reduction="mean"),
    # pi alone (descent-ascent) beside torch's fused AdamW: ALSO (group mean) without the optimistic theta
    "GroupWeights + AdamW (group mean)": dict(kind="group_weights", group_reduction="mean"),
}


def default_hparams(method: str, lr: float = 3e-3) -> dict:
    """The demo's settings: one lr for every method, the published ALSO defaults for pi, except
    group mean (pi_lr 0.1: pi needs a larger step there, where the group-sum form collapses)."""
    spec = METHODS[method]
    hp = {"lr": lr, "weight_decay": 1e-3}
    if spec["kind"] == "rgd":
        hp["temperature"] = 1.0
    if spec["kind"] in ("also", "group_weights"):
        hp["pi_lr"] = 0.1 if spec.get("group_reduction") == "mean" else 1e-3
        hp["pi_decay"] = 1e-2
    return hp


# ---------------------------------------------------------------------------------------------- data
def long_tailed_raw(seed: int = 0):
    """Unnormalised (X_train, y_train, X_test, y_test): a stratified 70/30 split of the digits, then
    the training part made long-tailed (class c keeps n_max * 20^(-c/9) samples, drawn with `seed`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    gen = torch.Generator().manual_seed(seed)
    X_tr, y_tr = torch.tensor(X_tr, dtype=torch.float32), torch.tensor(y_tr)
    n_max = int((y_tr == 0).sum())
    keep = []
    for c in range(N_CLASSES):
        idx = torch.nonzero(y_tr == c).flatten()
        n_c = max(1, int(n_max * IMBALANCE ** (-c / (N_CLASSES - 1))))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n_c]])
    keep = torch.cat(keep)
    return X_tr[keep], y_tr[keep], torch.tensor(X_te, dtype=torch.float32), torch.tensor(y_te)


def standardize(X_tr, y_tr, X_ev, y_ev):
    """Scale features with the training part's mean and std only."""
    mean, std = X_tr.mean(0), X_tr.std(0).clamp_min(1e-3)
    return (X_tr - mean) / std, y_tr, (X_ev - mean) / std, y_ev


def long_tailed_digits(seed: int = 0):
    """(X_train, y_train, X_test, y_test), standardised with the long-tailed training statistics."""
    return standardize(*long_tailed_raw(seed))


# ------------------------------------------------------------------------------------- model, train
def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, N_CLASSES))


def evaluate(model, X, y):
    """(accuracy %, worst-class accuracy %) over the classes present in y."""
    with torch.no_grad():
        pred = model(X).argmax(1)
    per_class = [float((pred[y == c] == c).float().mean()) for c in range(N_CLASSES) if (y == c).any()]
    return 100 * float((pred == y).float().mean()), 100 * min(per_class)


def train(method: str, data, seed: int, device: str, epochs: int, batch: int, hparams: dict | None = None):
    """Train the MLP with `method` on data[0:2], evaluate on data[2:4].

    Returns (accuracy %, worst-class accuracy %, median ms per optimizer step)."""
    spec = METHODS[method]
    hp = default_hparams(method) if hparams is None else hparams
    X_tr, y_tr, X_te, y_te = (t.to(device) for t in data)
    torch.manual_seed(seed)
    model = mlp().to(device)
    counts = torch.bincount(y_tr, minlength=N_CLASSES).float()
    inv = (1.0 / counts) / (1.0 / counts).sum()
    is_also = spec["kind"] == "also"
    weights = None  # GroupWeights beside torch's AdamW
    if is_also:
        prior = inv if spec.get("prior") == "inverse_count" else None
        opt = also_fused.ALSO(model.parameters(), n_groups=N_CLASSES, batch_size=batch, lr=hp["lr"],
                              weight_decay=hp["weight_decay"], mode="optimistic", pi_lr=hp["pi_lr"],
                              pi_decay=hp["pi_decay"], pi_init=prior, pi_reg=prior,
                              group_reduction=spec.get("group_reduction", "sum"))
    elif spec["kind"] == "group_weights":
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], fused=True)
        weights = also_fused.GroupWeights(N_CLASSES, batch_size=batch, pi_lr=hp["pi_lr"], pi_decay=hp["pi_decay"],
                                          group_reduction=spec.get("group_reduction", "sum"), device=device)
    else:
        opt = also_fused.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    class_weight = (inv * N_CLASSES).to(device) if spec.get("class_balanced") else None
    gen = torch.Generator().manual_seed(seed)
    step_times = []
    for _ in range(epochs):
        order = torch.randperm(len(y_tr), generator=gen).to(device)
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            xb, yb = X_tr[idx], y_tr[idx]
            t0 = time.perf_counter()
            opt.zero_grad()
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            if is_also:
                opt.weighted_loss(losses, yb).backward()
            elif weights is not None:
                weights.weighted_loss(losses, yb).backward()
            elif spec["kind"] == "rgd":
                also_fused.rgd_loss(losses, temperature=hp["temperature"]).backward()
            elif class_weight is not None:
                (class_weight[yb] * losses).mean().backward()
            else:
                losses.mean().backward()
            opt.step()
            if weights is not None:
                weights.step()
            if device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
    if is_also:
        opt.eval()
    acc, worst = evaluate(model, X_te, y_te)
    return acc, worst, 1e3 * statistics.median(step_times)


def run_seeds(methods, hparams: dict, data, seeds: int, device: str, epochs: int, batch: int, desc: str = "seeds"):
    """Train every method over seeds 0..seeds-1; one row per method with the per-seed numbers."""
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(methods) * seeds, desc=desc, unit="run", leave=False) as bar:
        for method in methods:
            results = []
            for seed in range(seeds):
                results.append(train(method, data, seed, device, epochs, batch, hparams[method]))
                bar.update()
            acc, worst, ms = (list(v) for v in zip(*results))
            rows.append({
                "method": method, "hparams": hparams[method], "seeds": list(range(seeds)),
                "acc": acc, "worst": worst, "ms_per_step": ms,
                "acc_mean": statistics.mean(acc), "acc_std": statistics.pstdev(acc),
                "worst_mean": statistics.mean(worst), "worst_std": statistics.pstdev(worst),
                "ms_median": statistics.median(ms),
            })
    return rows


# ------------------------------------------------------------------------------------------- output
def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        n = torch.get_num_threads()
        name = f"CPU {platform.machine()}, {n} thread{'s' if n > 1 else ''}"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "also_fused": also_fused.__version__, "python": platform.python_version()}


def table(rows) -> str:
    lines = ["| method | test acc (%) | worst-class acc (%) | ms/step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['acc_mean']:.1f} ± {r['acc_std']:.1f} | "
                     f"{r['worst_mean']:.1f} ± {r['worst_std']:.1f} | {r['ms_median']:.2f} |")
    return "\n".join(lines)


def plot_accuracy(rows, path: Path, title: str, ax=None) -> None:
    """Grouped bars: mean test accuracy and worst-class accuracy per method, std over seeds as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(10, 5))
    x = np.arange(len(rows))
    w = 0.38
    for off, key, label, color in ((-w / 2, "acc", "test accuracy", "tab:blue"),
                                   (w / 2, "worst", "worst-class test accuracy", "tab:red")):
        means = [r[f"{key}_mean"] for r in rows]
        bars = ax.bar(x + off, means, w, yerr=[r[f"{key}_std"] for r in rows], capsize=4,
                      label=label, color=color, alpha=0.85)
        for b, m in zip(bars, means):
            ax.text(b.get_x() + b.get_width() / 2, 2, f"{m:.1f}", ha="center", va="bottom",
                    fontsize=8, color="white", fontweight="bold")
    ax.set_xticks(x)
    ax.set_xticklabels([r["method"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2, fontsize=8, framealpha=0.9)
    ax.set_title(title, fontsize=9)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output stem (default examples/results/demo_<device>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = long_tailed_digits()
    counts = torch.bincount(data[1], minlength=N_CLASSES).tolist()
    env = environment(args.device)
    header = (f"long-tailed digits: train per class {counts}, test {len(data[3])}; {env['device']}, "
              f"{args.epochs} epochs, {args.seeds} seeds, batch {args.batch}, also_fused {env['also_fused']}, "
              f"torch {env['torch']}, {env['date']}")
    print(header)
    hparams = {m: default_hparams(m, args.lr) for m in METHODS}
    t0 = time.perf_counter()
    rows = run_seeds(list(METHODS), hparams, data, args.seeds, args.device, args.epochs, args.batch, desc="demo")
    elapsed = time.perf_counter() - t0
    text = table(rows)
    print("\n" + text)

    stem = Path(args.out) if args.out else RESULTS_DIR / f"demo_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = "; ".join(f"{m}: " + ", ".join(f"{k}={v:g}" for k, v in hp.items()) for m, hp in hparams.items())
    stem.with_suffix(".md").write_text(
        f"# Long-tailed digits demo ({env['device']}, {env['date']})\n\n{header}\n\n"
        f"MLP 64-64-10, test accuracy and worst-class test accuracy, mean ± std over seeds 0-{args.seeds - 1}; "
        f"ms/step is the median optimizer step (zero_grad, forward, backward, step). ALSO runs in optimistic mode; "
        f"GroupWeights (descent-ascent) beside torch.optim.AdamW(fused=True).\n\n"
        f"Settings: {settings}.\n\n{text}\n\nWall time {elapsed:.0f} s. Plot: `{stem.name}.png`.\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {**env, "experiment": "long-tailed digits demo", "train_per_class": counts, "n_test": len(data[3]),
         "imbalance": IMBALANCE, "epochs": args.epochs, "batch": args.batch, "wall_s": elapsed, "rows": rows},
        indent=1) + "\n")
    plot_accuracy(rows, stem.with_suffix(".png"),
                  f"Long-tailed digits (ratio {IMBALANCE:g}), default settings, {args.seeds} seeds, "
                  f"{args.epochs} epochs\n{env['device']}, {env['date']}, torch {env['torch']}, "
                  f"also_fused {env['also_fused']}")
    print(f"\nwrote {stem.name}.md, {stem.name}.json, {stem.name}.png in {stem.parent.name}/ ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
