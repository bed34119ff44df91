"""The device error word: bad input found by a kernel, kept on the device until the host can read it.

Kernels that read a batch OR these bits into a 0-d int32 word; the update kernels read the word and
write nothing (beyond restoring params) while it is non-zero. The last kernel of a step may also copy
the word, with ``REPORTED`` set, into a slot of pinned host memory that the host reads without a sync
(``_input_errors``). Imports only torch; the kernels import it.
"""
from __future__ import annotations

import torch

ID_OUT_OF_RANGE = 1
NON_FINITE_LOSS = 2
# set beside the bits in a step's report (the word as the step's last kernel saw it), so that a
# report reads non-zero once written
REPORTED = 1 << 30


def report(word: torch.Tensor, slot: torch.Tensor) -> None:
    """Copy ``word | REPORTED`` into a report slot (asynchronously from a GPU into pinned memory): the
    report of a step whose last launch does not write it itself."""
    slot.copy_(torch.bitwise_or(word, REPORTED), non_blocking=True)
