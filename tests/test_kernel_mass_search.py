"""The sort-free cutoff kernel (kernels/mass_search.py) against a float64 model of select_batch's cutoff:
1 + the first position where the cumulative sum of sorted pi reaches the threshold (n + 1: never). On a
CPU through Triton's interpreter at small sizes; on a GPU also past a million groups, where
GroupWeights.select_batch uses it."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from also_fused import functional as F  # noqa: E402
from also_fused.kernels import mass_search  # noqa: E402
from also_fused.kernels.mass_search import mass_cutoff  # noqa: E402
from support import DEVICE  # noqa: E402

SIZES = [1, 7, 2049] + ([3_000_000] if DEVICE == "cuda" else [])


def _pi(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    pi = {"random": torch.rand(n, generator=gen), "three-values": torch.randint(1, 4, (n,), generator=gen).float(),
          "half-zero": torch.rand(n, generator=gen) * (torch.arange(n) % 2)}[kind]
    return pi / pi.sum() if pi.sum() > 0 else pi


def _model(sorted_sums: torch.Tensor, threshold: float) -> int:
    reached = (sorted_sums >= threshold).nonzero()
    return (int(reached[0]) if reached.numel() else sorted_sums.numel()) + 1


@pytest.mark.parametrize("order", ["desc", "asc"])
@pytest.mark.parametrize("kind", ["random", "three-values", "half-zero"])
@pytest.mark.parametrize("n", SIZES)
def test_matches_the_sorted_cumulative_sum(n, kind, order):
    pi = _pi(kind, n)
    sums = torch.cumsum(torch.sort(pi, descending=(order == "desc"))[0].double(), 0)
    gen = torch.Generator().manual_seed(1)
    # between partial sums, on two of them (where rounding decides), and the ends
    thresholds = [0.0, 0.5, 0.999, 1.5] + sums[torch.randint(0, n, (2,), generator=gen)].tolist()
    for threshold in thresholds:
        want = _model(sums, threshold)
        assert mass_cutoff(pi.to(DEVICE), threshold, order) == want, threshold
        if n <= 2049:  # the torch search it mirrors
            assert F.mass_cutoff(pi.to(DEVICE), threshold, order) == want, threshold


@pytest.mark.parametrize("shape", ["default", "large"])
@pytest.mark.parametrize("order", ["desc", "asc"])
def test_partials_of_several_programs(order, shape, monkeypatch):
    """16_387 entries: several programs of the kernel (the last holds 3 entries), their partials added; in the
    kernel's shape for most sizes and in the one for the largest (8 bounds a pass, forced here)."""
    if shape == "large":
        monkeypatch.setattr(mass_search, "LARGE_N", 1)
    pi = _pi("random", 16_387)
    sums = torch.cumsum(torch.sort(pi, descending=(order == "desc"))[0].double(), 0)
    for threshold in (0.999, float(sums[9_000])):
        assert mass_cutoff(pi.to(DEVICE), threshold, order) == _model(sums, threshold), threshold
