"""What the test files share (no test file imports another): the test device, the short-run switch
and small helpers here, the rest in this package's modules:

* ``golden``: float64 models of ALSO and GroupWeights written from docs/algorithm.md;
* ``harness``: ALSO and the golden model driven on the same small regression problem;
* ``golden_checks``: a run of ALSO checked against the golden model, the configurations checked;
* ``bad_inputs``: the bad-input matrix's cases, the small model they are tried on, the check of a case;
* ``dropin``: the Adam / AdamW drop-ins run beside torch.optim, and how close they must stay;
* ``distributed``: the 2-process runs (start the ranks, join a group, compare across ranks);
* ``same_bits``: digests of every public path's results, and the script that records them.

``conftest.py`` sets the environment up (Triton's interpreter without a GPU) before any of this is
imported and keeps the pytest fixtures.
"""
from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ALSO_FUSED_SHORT_TESTS=1: fewer steps and examples with every code path still taken, for runs
# under compute-sanitizer (tens of times slower)
SHORT = os.environ.get("ALSO_FUSED_SHORT_TESTS", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def code_rank(codes: torch.Tensor) -> torch.Tensor:
    """An 8-bit moment code's position on its number line (neighbouring codes differ by 1): m's int8 codes
    are sign and magnitude (+0 and -0 both 0), v's uint8 codes their own value."""
    q = codes.int()
    if codes.dtype == torch.int8:
        return torch.where(q < 0, -(q & 0x7F), q)
    return q
