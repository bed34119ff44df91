"""The examples run and show what their docstrings say (small settings)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

pytestmark = pytest.mark.slow  # trains the example's model; the fast tier has the library's own tests
pytest.importorskip("sklearn")
import per_sample_digits  # noqa: E402


@pytest.mark.parametrize("weighting", ["per-sample", "sampler"])
def test_per_sample_weights_favour_the_rare_classes(weighting):
    """One weight per sample: after training, the two rarest classes' samples carry more weight each than
    the two most common classes' (uniform pi gives every class 1)."""
    data = per_sample_digits.long_tailed_digits(seed=0)
    _, _, weights = per_sample_digits.train(data, weighting, seed=0, device="cpu", epochs=8, batch=32, pi_lr=0.05)
    assert weights.n_groups == len(data[1])
    per_class = per_sample_digits.weight_per_class(weights, data[1])
    assert min(per_class[8:]) > 1.2 * max(per_class[:2]), per_class
