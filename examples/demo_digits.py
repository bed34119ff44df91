"""Long-tailed digits: Adam vs class-balanced Adam vs RGD vs ALSO, mean and worst-class test accuracy.

scikit-learn's bundled 8x8 digits (no download). The training split is made long-tailed: class c
keeps n_max * 20^(-c/9) samples; the test split is untouched. An MLP 64-64-10 trains with each
method for the same number of epochs over several seeds. On CUDA the Triton kernels run; on a CPU
the reference path does.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import also_fused

IMBALANCE = 20.0
N_CLASSES = 10


def long_tailed_digits(seed: int = 0):
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
    X_tr, y_tr = X_tr[keep], y_tr[keep]
    mean, std = X_tr.mean(0), X_tr.std(0).clamp_min(1e-3)
    X_te = (torch.tensor(X_te, dtype=torch.float32) - mean) / std
    return (X_tr - mean) / std, y_tr, X_te, torch.tensor(y_te)


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, N_CLASSES))


def evaluate(model, X, y):
    with torch.no_grad():
        pred = model(X).argmax(1)
    per_class = [float((pred[y == c] == c).float().mean()) for c in range(N_CLASSES)]
    return 100 * float((pred == y).float().mean()), 100 * min(per_class)


def train(method: str, data, seed: int, device: str, epochs: int, batch: int, lr: float):
    X_tr, y_tr, X_te, y_te = (t.to(device) for t in data)
    torch.manual_seed(seed)
    model = mlp().to(device)
    counts = torch.bincount(y_tr, minlength=N_CLASSES).float()
    inv = (1.0 / counts) / (1.0 / counts).sum()
    if method.startswith("ALSO"):
        prior = inv if "1/n" in method else None
        opt = also_fused.ALSO(model.parameters(), n_groups=N_CLASSES, batch_size=batch, lr=lr,
                              mode="optimistic", pi_lr=1e-3, pi_decay=1e-2, pi_init=prior, pi_reg=prior)
    else:
        opt = also_fused.Adam(model.parameters(), lr=lr, weight_decay=1e-3)
    class_weight = (inv * N_CLASSES).to(device) if method == "Adam (class-balanced)" else None
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
            if method.startswith("ALSO"):
                opt.weighted_loss(losses, yb).backward()
            elif method == "RGD":
                also_fused.rgd_loss(losses, temperature=1.0).backward()
            elif class_weight is not None:
                (class_weight[yb] * losses).mean().backward()
            else:
                losses.mean().backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
    if method.startswith("ALSO"):
        opt.eval()
    acc, worst = evaluate(model, X_te, y_te)
    return acc, worst, 1e3 * statistics.median(step_times)


METHODS = ["Adam", "Adam (class-balanced)", "RGD", "ALSO (uniform pi)", "ALSO (pi_init = pi_reg ~ 1/n)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = long_tailed_digits()
    counts = torch.bincount(data[1], minlength=N_CLASSES).tolist()
    print(f"long-tailed digits: train per class {counts}, test {len(data[3])}; device {args.device}, "
          f"{args.epochs} epochs, {args.seeds} seeds, also_fused {also_fused.__version__}, torch {torch.__version__}")
    rows = []
    for method in METHODS:
        results = [train(method, data, seed, args.device, args.epochs, args.batch, args.lr)
                   for seed in range(args.seeds)]
        acc, worst, ms = zip(*results)
        rows.append((method, statistics.mean(acc), statistics.pstdev(acc), statistics.mean(worst),
                     statistics.pstdev(worst), statistics.median(ms)))
        print(f"  done: {method}", flush=True)
    print(f"\n| method | test acc (%) | worst-class acc (%) | ms/step |\n|---|---|---|---|")
    for method, acc, acc_sd, worst, worst_sd, ms in rows:
        print(f"| {method} | {acc:.1f} ± {acc_sd:.1f} | {worst:.1f} ± {worst_sd:.1f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
