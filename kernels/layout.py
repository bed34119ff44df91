"""Which tensors an elementwise kernel may treat as flat storage together (imports only torch)."""
from __future__ import annotations

import torch


def dense_like(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage densely in the same element order as ``like``: both contiguous,
    or equal strides in a dense layout (channels_last). An elementwise update may then run over the
    flat storage of both."""
    if t.is_contiguous() and like.is_contiguous():
        return True
    return t.stride() == like.stride() and (t.is_contiguous(memory_format=torch.channels_last)
                                            or t.is_contiguous(memory_format=torch.channels_last_3d))


# 8-bit moments keep one scale per block of this many consecutive elements of a tensor's storage
QUANT_BLOCK = 1024


def quant_blocks(numel: int) -> int:
    """The number of block scales of a tensor of ``numel`` elements."""
    return -(-numel // QUANT_BLOCK)

# decoding steps of the 8-bit codes, float32 values: m = q|q| * (scale * QUANT_M_STEP), v = q^2 q^2 * (scale *
# QUANT_V_STEP); blocks whose largest |value| lies below QUANT_MIN_NORMAL (float32's smallest normal) are zeros
QUANT_M_STEP = float(torch.tensor(1.0 / 127**2, dtype=torch.float32))
QUANT_V_STEP = float(torch.tensor(1.0 / 255**4, dtype=torch.float32))
QUANT_MIN_NORMAL = float(torch.finfo(torch.float32).tiny)
