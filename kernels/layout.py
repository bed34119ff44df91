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

# The 8-bit codes (functional.quantize_moment_ states them): a tensor's storage in blocks of QUANT_BLOCK
# elements, each with a power-of-two scale, and per element a small float code of (exponent bits, mantissa
# bits) relative to it: m takes a sign bit and (3, 4), v (5, 3). Decoding and encoding are an integer add
# and a float add per element.
QUANT_M_BITS = (3, 4)
QUANT_V_BITS = (5, 3)


def code_constants(bits: tuple) -> tuple:
    """(smallest scale exponent field, offset of the code's zero exponent field in float bits, shift, rounding
    half, largest code) of a code with ``bits`` = (exponent bits, mantissa bits)."""
    exp_bits, mant_bits = bits
    shift = 23 - mant_bits
    return (2 ** exp_bits + 1, (2 ** exp_bits) << 23, shift, 1 << (shift - 1), 2 ** (exp_bits + mant_bits) - 1)
