"""How optimizer state is stored: which tensors an update may treat as flat storage together, and the
8-bit moment code (``state_precision="int8"``). Imports only torch; the kernels import it.

8-bit moments: a tensor's storage in blocks of QUANT_BLOCK consecutive elements, each with a power-of-two
scale s (the smallest above the block's largest |x|, within [2^(2^E - 126), 2^127]), and per element a
code c: a float of M mantissa bits counting up from o = s / 2^(2^E), E exponent bits wide (m: a sign bit
and (E, M) = (3, 4); v: (5, 3)):

    t = |x| + o  (float32),   c = min((bits(t) - bits(o) + 2^(22-M)) >> (23-M), 2^(E+M) - 1)
    |x| = float(bits(o) + c * 2^(23-M)) - o  (float32)

i.e. |x| rounded (halves up) to M significant bits relative to o, the bottom binade linear like IEEE
subnormals; m's sign is code bit 7. c = 0 decodes to exactly 0. Relative to s the smallest non-zero
values are 2^-12 (m) and 2^-35 (v): v's code stays non-zero wherever m's does (v ~ m^2 relative to
their scales), so m / sqrt(v) does not divide by a zero v. Per element an integer add and a float add
each way (benchmarks/state_precision/bench_quant_codes.py measures the error against other codes).
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_like(t: Tensor, like: Tensor) -> bool:
    """Whether ``t`` covers its storage densely in the same element order as ``like``: both contiguous,
    or equal strides in a dense layout (channels_last). An elementwise update may then run over the
    flat storage of both."""
    if t.is_contiguous() and like.is_contiguous():
        return True
    return t.stride() == like.stride() and (t.is_contiguous(memory_format=torch.channels_last)
                                            or t.is_contiguous(memory_format=torch.channels_last_3d))


# 8-bit moments keep one scale per block of this many consecutive elements of a tensor's storage
QUANT_BLOCK = 1024
# (exponent bits, mantissa bits) of the codes: m's (beside its sign bit), v's
QUANT_M_BITS = (3, 4)
QUANT_V_BITS = (5, 3)
QUANT_DTYPES = {True: torch.int8, False: torch.uint8}  # signed (m), unsigned (v)
_SIGN_BIT = -(2 ** 31)


def quant_blocks(numel: int) -> int:
    """The number of block scales of a tensor of ``numel`` elements."""
    return -(-numel // QUANT_BLOCK)


def code_constants(bits: tuple) -> tuple:
    """(smallest scale exponent field, offset of the code's zero exponent field in float bits, shift, rounding
    half, largest code) of a code with ``bits`` = (exponent bits, mantissa bits)."""
    exp_bits, mant_bits = bits
    shift = 23 - mant_bits
    return (2 ** exp_bits + 1, (2 ** exp_bits) << 23, shift, 1 << (shift - 1), 2 ** (exp_bits + mant_bits) - 1)


def _flat(t: Tensor) -> Tensor:
    # the storage of a dense tensor (contiguous or channels_last) in memory order
    return t.as_strided((t.numel(),), (1,))


def _zero_offsets(scales: Tensor, signed: bool, n: int) -> Tensor:
    # bits(o) per element: o = s / 2^(2^E) (an exponent-field subtraction: s is a power of two)
    offset = code_constants(QUANT_M_BITS if signed else QUANT_V_BITS)[1]
    return (scales.float().contiguous().view(torch.int32) - offset).repeat_interleave(QUANT_BLOCK)[:n]


def dequantize_moment(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """float32 values of 8-bit codes (same shape and layout as ``codes``), computed as the kernel does."""
    q = _flat(codes).to(torch.int32)  # int8 m codes sign-extend: bit 31 is the sign
    shift = code_constants(QUANT_M_BITS if signed else QUANT_V_BITS)[2]
    o_bits = _zero_offsets(scales, signed, q.numel())
    c = q & 0x7F if signed else q
    values = ((c << shift) + o_bits).view(torch.float32) - o_bits.view(torch.float32)
    if signed:
        values = (values.view(torch.int32) | (q & _SIGN_BIT)).view(torch.float32)
    out = torch.empty_like(codes, dtype=torch.float32)
    _flat(out).copy_(values)
    return out


def quantize_moment_(values: Tensor, codes: Tensor, scales: Tensor, signed: bool) -> None:
    """Write the 8-bit codes and block scales of float32 ``values`` into ``codes`` and ``scales``."""
    flat = _flat(values.float())
    n = flat.numel()
    min_field, _, shift, half, top = code_constants(QUANT_M_BITS if signed else QUANT_V_BITS)
    padded = torch.zeros(quant_blocks(n) * QUANT_BLOCK, dtype=torch.float32, device=flat.device)
    padded[:n] = flat.abs()
    a = padded.view(-1, QUANT_BLOCK).amax(dim=1)
    # the exponent field of s: one above a's, clamped to the code's range
    field = ((a.view(torch.int32) >> 23) + 1).clamp_(min_field, 254)
    scales.copy_((field << 23).view(torch.float32))
    o_bits = _zero_offsets(scales, signed, n)
    t = flat.abs() + o_bits.view(torch.float32)
    c = ((t.view(torch.int32) - o_bits + half) >> shift).clamp_(max=top)
    if signed:
        c = c | ((flat.contiguous().view(torch.int32) >> 24) & 0x80)
    _flat(codes).copy_(c.to(torch.uint8).view(codes.dtype))


def is_legacy_scales(scales: Tensor) -> bool:
    """Whether block scales were written by the earlier 8-bit code (the block's largest |x|, 0 for a zero
    block) rather than this one (non-zero powers of two)."""
    bits = scales.float().contiguous().view(torch.int32)
    return bool(((bits & 0x7FFFFF) != 0).any() or (bits == 0).any())


def dequantize_legacy_moment(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """float32 values of the earlier 8-bit code, kept to load its state_dicts: m = a sign(q) (q/127)^2,
    v = a (q/255)^4 with a the block's largest |x|."""
    q = _flat(codes).float()
    step = torch.tensor(1.0 / 127**2 if signed else 1.0 / 255**4, dtype=torch.float32, device=scales.device)
    steps = (scales.float() * step).repeat_interleave(QUANT_BLOCK)[:q.numel()]
    values = (q * q.abs()) * steps if signed else (q * q) * (q * q) * steps
    out = torch.empty_like(codes, dtype=torch.float32)
    _flat(out).copy_(values)
    return out
