"""Comparisons of two paths' results at the precision of their dtype, with the bounds derived.

Two paths that compute one float32 formula with differently rounded operations (an FMA, another order of
a sum) agree within a few float32 ulps of the operations' operands. A value stored in 16 bits (a bf16
param, bf16 moments) is rounded from float32 values that close: the two agree exactly but where one of
them falls on the other side of a 16-bit rounding boundary (one ulp of the 16-bit dtype, at a small share
of the elements), or, for a value that nearly cancels (a moment crossing zero), within the float32 error
of the operands. A wrong formula, flag or hyper-parameter, or a value not written, moves results by far
more: a whole update is hundreds of 16-bit ulps of a param's change, and a 1% change of lr is 10^4
float32 ulps of it.
"""
from __future__ import annotations

import torch

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
FLOAT32_ULP = 2.0 ** -24  # half the gap above 1: the relative size of one float32 rounding


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between representable values of ``dtype`` at |x| (float64; normal values)."""
    _, exponent = torch.frexp(x.double().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - MANTISSA_BITS[dtype])


_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_MAGNITUDE = {torch.float32: 0x7FFFFFFF, torch.bfloat16: 0x7FFF, torch.float16: 0x7FFF}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (common) dtype lie between a and b, elementwise (+0 = -0)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.detach().cpu().contiguous().view(_INT_OF[t.dtype]).long()
        magnitude = bits & _MAGNITUDE[t.dtype]
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def assert_same_rounding(a: torch.Tensor, b: torch.Tensor, what: str = "", max_share: float = 0.01,
                         operand_ulps: float = 16.0) -> None:
    """16-bit values rounded from float32 results a few float32 ulps apart: equal, but for neighbouring
    values (one ulp of the dtype) or, where a value nearly cancels, within ``operand_ulps`` float32 ulps of
    the tensor's largest value; at no more than ``max_share`` of the elements."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.dtype in (torch.bfloat16, torch.float16), what
    a64, b64 = a.double().cpu(), b.double().cpu()
    diff = (a64 - b64).abs()
    scale = float(b64.abs().max()) if b64.numel() else 0.0
    allowed = torch.maximum(ulp(torch.maximum(a64.abs(), b64.abs()), a.dtype),
                            torch.full_like(diff, operand_ulps * FLOAT32_ULP * scale))
    share = float((diff > 0).double().mean()) if diff.numel() else 0.0
    assert bool((diff <= allowed).all()) and share <= max_share, (what, float((diff / allowed).max()), share)


def assert_close_in_float32(a: torch.Tensor, b: torch.Tensor, what: str = "", rel: float = 1e-6) -> None:
    """float32 results of one formula with differently rounded operations: ||a - b|| <= rel ||b||; 1e-6 is
    about 17 float32 roundings (2^-24 each) of the norm: room for the few roundings of a step and their
    cancellation where a result is much smaller than its operands (measured: at most 2.7e-7)."""
    assert a.dtype == b.dtype == torch.float32, (what, a.dtype, b.dtype)
    err = float((a.double() - b.double()).norm())
    assert err <= rel * max(float(b.double().norm()), 1e-30), (what, err / max(float(b.double().norm()), 1e-30))
