"""Every public path gives the bits it gave before the last restructuring (``support/same_bits.py`` says how
they are recorded): params, optimizer state, pi and returned losses over the grid of ``same_bits.cases()``."""
from __future__ import annotations

import json
import os

import pytest

from support import same_bits

pytestmark = pytest.mark.slow  # a regression pin of every path's bits (the refactor guard), not a correctness check

RECORD = os.path.join(os.path.dirname(__file__), "data", "same_bits.json")
with open(RECORD) as _f:
    RECORDED = json.load(_f)

PATHS = same_bits.available_paths()
CASES = same_bits.cases()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_bits_as_recorded(case, path):
    signature = same_bits.signature(path)
    recorded = RECORDED.get(signature, {}).get(path)
    if recorded is None:
        pytest.skip(f"no digests recorded on this machine ({signature}); see tests/support/same_bits.py")
    assert case.name in recorded, f"{case.name} has no recorded digest for {path}"
    assert same_bits.run_case(case, path) == recorded[case.name]
