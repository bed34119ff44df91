"""Stochastic rounding of float32 to bfloat16 and float16, with random bits from a counter-based hash
(docs/algorithm.md sec. 14).

A float32 value x lies between two neighbouring bfloat16 values lo <= x < hi; it is stored as hi with
probability (x - lo) / (hi - lo), else lo: on average the stored value is x, so updates far below half a
bfloat16 ulp still move a parameter over many steps (round-to-nearest drops them every time). On the bits:
add 16 random bits to the float32 pattern and keep its upper half.

The 16 bits of element i of a tensor at step t are the low half of

    r = mix(mix(k ^ lo32(i)) ^ hi32(i)),   k = mix(seed ^ mix(t)),

with ``mix`` the 32-bit integer mixer below and ``seed`` the tensor's own seed (``tensor_seed`` of the
optimizer's seed and the param's position). Every path computes the same r: the reference here (int64
torch ops, every product below 2^63), the Triton kernel and the C++ extension (uint32 arithmetic; an older
build leaves it to this reference); a resumed run continues the same stream, since the seed and t are in
the state_dict.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
MIX_A = 0x7FEB352D  # odd multipliers below 2^31: a 32-bit value times one fits an int64
MIX_B = 0x1B873593
SEED_BOUND = 2 ** 31  # seeds are drawn in [0, SEED_BOUND)
CANONICAL_NAN = 0x7FC0  # the bfloat16 pattern a NaN is stored as
CANONICAL_NAN_F16 = 0x7E00  # the float16 one


def mix32(h):
    """A bijective 32-bit integer mixer (xorshift-multiply), on a Python int or an int64 tensor of values < 2^32."""
    h = h ^ (h >> 16)
    h = (h * MIX_A) & MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_B) & MASK32
    return h ^ (h >> 16)


def tensor_seed(seed: int, position: int) -> int:
    """The seed of the param at ``position`` (its index over the optimizer's param groups, in order)."""
    return mix32((seed & MASK32) ^ mix32(position + 1))


def stream_key(seed: int, step: int) -> int:
    """k of a tensor's store at step count ``step`` (the count after the moment advance the store follows)."""
    return mix32((seed & MASK32) ^ mix32(step & MASK32))


def random_bits(key: int, numel: int, device: torch.device, start: int = 0) -> Tensor:
    """r for elements start .. start+numel-1 (int64 tensor of values < 2^32)."""
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return mix32(mix32(index & MASK32 ^ key) ^ (index >> 32))


def _in_storage_order(x: Tensor, round_flat: Callable[[Tensor], Tensor]) -> Tensor:
    """``round_flat`` (a function of x's elements in memory order, as the kernels run over a param's storage:
    a channels_last tensor in its own order) applied to x; the result laid out like x."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -d))
    in_memory_order = x.permute(order)  # contiguous for a dense tensor
    out = round_flat(in_memory_order.reshape(-1))
    inverse = sorted(range(x.dim()), key=lambda d: order[d])
    return out.view(in_memory_order.shape).permute(inverse)


def stochastic_round_bf16(x: Tensor, key: int) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 with ``key``'s bits, element i being the i-th in memory;
    NaN stays NaN, and a value that rounds past the largest finite bfloat16 becomes infinite. Returns a tensor
    laid out like ``x``."""

    def round_flat(flat: Tensor) -> Tensor:
        bits = flat.view(torch.int32).to(torch.int64) & MASK32
        noise = random_bits(key, flat.numel(), flat.device) & 0xFFFF
        # the upper half of the sum is the bfloat16 pattern (built on the bits: no conversion that could flush a
        # subnormal); NaN becomes 0x7FC0
        upper = torch.where(torch.isnan(flat), CANONICAL_NAN, ((bits + noise) >> 16) & 0xFFFF)
        return torch.where(upper >= 2 ** 15, upper - 2 ** 16, upper).to(torch.int16).view(torch.bfloat16)

    return _in_storage_order(x, round_flat)


def _as_float32(words: Tensor) -> Tensor:
    """int64 tensor of 32-bit patterns (values < 2^32) -> the float32 values they encode."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).view(torch.float32)


def stochastic_round_fp16(x: Tensor, key: int) -> Tensor:
    """float32 ``x`` rounded stochastically to float16 with ``key``'s bits (element i the i-th in memory).

    |x| lies between two float16 neighbours lo <= |x| < lo + ulp (ulp = 2^(e - 10), e = max(exponent of x,
    -14)); with f the first 16 bits of (|x| - lo) / ulp and u the element's 16 random bits, the result is
    lo + ulp when u + f >= 2^16, else lo, with x's sign: away from zero with probability f / 2^16, the
    bfloat16 rule on a float16 grid. Every float32 step below is exact (products by powers of two, floors,
    a difference of neighbours), so every path gets the same bits. Past the largest float16 the result is
    infinite; NaN is stored as 0x7E00."""

    def round_flat(flat: Tensor) -> Tensor:
        bits = flat.view(torch.int32).to(torch.int64) & MASK32
        sign = bits & 0x80000000
        magnitude = bits & 0x7FFFFFFF
        exponent = magnitude >> 23
        special = exponent == 255  # inf and NaN
        k = exponent.clamp(min=113)  # 113: float32's exponent field of 2^-14, float16's smallest normal
        inverse_ulp, ulp = _as_float32((264 - k) << 23), _as_float32((k - 10) << 23)
        q = torch.where(special, 0.0, _as_float32(magnitude) * inverse_ulp)
        q_low = torch.floor(q)
        fraction = torch.floor((q - q_low) * 65536.0).to(torch.int64)
        noise = random_bits(key, flat.numel(), flat.device) & 0xFFFF
        rounded = (q_low + ((noise + fraction) >= 65536).float()) * ulp
        signed = _as_float32((rounded.view(torch.int32).to(torch.int64) & MASK32) | sign)
        out = torch.where(special, flat, signed).to(torch.float16).view(torch.int16)
        return torch.where(torch.isnan(flat), CANONICAL_NAN_F16, out).to(torch.int16).view(torch.float16)

    return _in_storage_order(x, round_flat)


def stochastic_round(x: Tensor, key: int, dtype: torch.dtype) -> Tensor:
    """``x`` rounded stochastically to ``dtype`` (bfloat16 or float16)."""
    return stochastic_round_bf16(x, key) if dtype == torch.bfloat16 else stochastic_round_fp16(x, key)
