"""One weight per training sample (ALSO's object-level form): long-tailed digits, AdamW alone against
AdamW + GroupWeights with ``n_groups = len(train set)``, and the published form: the same weighted loss on
batches that a PiBatchSampler draws by pi (docs/algorithm.md sec. 7, ``select_batch``).

scikit-learn's bundled 8x8 digits made long-tailed as in demo_digits.py (no download). Each sample's id
is its own group, so pi is a distribution over the training samples: the mirror-ascent step moves weight
to the samples the model does worst on (docs/algorithm.md sec. 1, 4). Printed: test accuracy, worst-class
test accuracy, and how the learnt weight is spread over the classes (the mean pi of a class's samples
times n, 1 for uniform weights): the rare classes end up with the most weight per sample.

Run: ``python3 examples/per_sample_digits.py`` (a few seconds on a CPU; ``--device cuda`` on a GPU)."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import also_fused
from demo_digits import N_CLASSES, evaluate, long_tailed_digits, mlp


def train(data, weighting: str, seed: int, device: str, epochs: int, batch: int, pi_lr: float):
    """(accuracy %, worst-class accuracy %, weights or None) of one run; ``weighting`` is "none",
    "per-sample" (uniform batches, each loss weighted by its sample's pi) or "sampler" (the weighted loss on batches drawn by pi)."""
    X_tr, y_tr, X_te, y_te = (t.to(device) for t in data)
    n = len(y_tr)
    torch.manual_seed(seed)
    model = mlp().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    weights = None
    if weighting != "none":
        weights = also_fused.GroupWeights(n, batch_size=batch, pi_lr=pi_lr, device=device)
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if weighting == "sampler":
        # threshold 1 - batch/n: at uniform pi a batch of about `batch` ids, fewer as pi concentrates
        sampler = also_fused.PiBatchSampler(weights, threshold=1 - batch / n, num_batches=n // batch,
                                            generator=gen)
    for _ in range(epochs):
        if sampler is None:
            order = torch.randperm(n, generator=gen)
            batches = [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
        else:
            batches = [torch.tensor(ids) for ids in sampler]
        for ids in batches:
            ids = ids.to(device)
            losses = F.cross_entropy(model(X_tr[ids]), y_tr[ids], reduction="none")
            loss = losses.mean() if weights is None else weights.weighted_loss(losses, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if weights is not None:
                weights.step()
    accuracy, worst = evaluate(model, X_te, y_te)
    return accuracy, worst, weights


def weight_per_class(weights: also_fused.GroupWeights, y: torch.Tensor) -> list[float]:
    """n * (the mean pi of each class's samples): 1 everywhere for uniform weights."""
    pi = weights.pi.float().cpu() * len(y)
    return [float(pi[y == c].mean()) for c in range(N_CLASSES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pi-lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    data = long_tailed_digits(seed=0)
    y_train = data[1]
    print(f"{len(y_train)} training samples (one weight each), class sizes {torch.bincount(y_train).tolist()}")
    print("| weighting | test accuracy % | worst-class accuracy % |\n|---|---|---|")
    for weighting, name in (("none", "AdamW alone"), ("per-sample", "per-sample pi, uniform batches"),
                            ("sampler", "per-sample pi, batches drawn by pi")):
        runs = [train(data, weighting, seed, args.device, args.epochs, args.batch, args.pi_lr)
                for seed in range(args.seeds)]
        accuracy = sum(r[0] for r in runs) / len(runs)
        worst = sum(r[1] for r in runs) / len(runs)
        print(f"| {name} | {accuracy:.1f} | {worst:.1f} |")
        if runs[0][2] is not None:
            spread = ", ".join(f"{w:.2f}" for w in weight_per_class(runs[0][2], y_train))
            print(f"|   n x mean pi per class 0..9 (seed 0) | {spread} | |")


if __name__ == "__main__":
    main()
