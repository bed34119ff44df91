"""select_batch's cutoff without a sort, on the GPU: a K-ary search over pi's float32 bit patterns.

pi >= 0, so an entry's int32 bit pattern orders like its value. For a bound b, mass(b) is the float64 sum
of the entries at or past b in sort order (bits >= b for "desc", bits <= b for "asc") and count(b) their
number. One launch evaluates K bounds: each program reads its chunk of pi once and writes K partial
masses and counts; torch adds the partials in program order (deterministic). The bracket around v* (the
last bound whose mass reaches the threshold) shrinks (K + 1)-fold per pass, 8 passes for 31 bits, then
one pass at v* gives the ties and pi's total. No host sync until the cutoff is read. ``functional.mass_cutoff`` is the
plain-torch reference (bisection, the same answer)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..functional import cutoff_at
from ._interpreter import enable_interpreter_compat
from .launch import cdiv

enable_interpreter_compat()

_SUB = 256  # entries per row of a program's register tile
_MAX_ROWS = 64  # rows per program: a program reads up to _SUB * _MAX_ROWS entries
_K = 16
_INF_BITS = 0x7F800000


@triton.jit
def _masses_kernel(pi_ptr, n, bounds_ptr, mass_ptr, count_ptr, DESC: tl.constexpr, K: tl.constexpr,
                   SUB: tl.constexpr, ROWS: tl.constexpr):
    """Program p reads entries [p * SUB * ROWS, (p + 1) * SUB * ROWS) a row of SUB at a time and keeps a
    (SUB, K) tile of float64 masses and int32 counts, entry column j against bound k; one reduction over
    the SUB axis at the end gives its K partials (K reductions of a whole block per row would cost more
    than the memory traffic)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, SUB)
    bounds = tl.load(bounds_ptr + tl.arange(0, K))
    mass = tl.zeros((SUB, K), dtype=tl.float64)
    count = tl.zeros((SUB, K), dtype=tl.int32)
    start = pid.to(tl.int64) * (SUB * ROWS)
    for row in range(ROWS):
        offs = start + row * SUB + lanes
        inside = offs < n
        values = tl.load(pi_ptr + offs, mask=inside, other=0.0)
        bits = values.to(tl.int32, bitcast=True)
        if DESC:
            chosen = inside[:, None] & (bits[:, None] >= bounds[None, :])
        else:
            chosen = inside[:, None] & (bits[:, None] <= bounds[None, :])
        mass += tl.where(chosen, values.to(tl.float64)[:, None], 0.0)
        count += chosen.to(tl.int32)
    tl.store(mass_ptr + pid * K + tl.arange(0, K), tl.sum(mass, axis=0))
    tl.store(count_ptr + pid * K + tl.arange(0, K), tl.sum(count, axis=0))


def _masses(pi: torch.Tensor, bounds: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass, count) of the entries at or past each of the K int32 ``bounds``, float64 and int64; the
    programs' partials are added in program order (deterministic)."""
    n = pi.numel()
    rows = min(_MAX_ROWS, triton.next_power_of_2(cdiv(n, _SUB)))
    programs = cdiv(n, _SUB * rows)
    mass = torch.empty(programs, _K, dtype=torch.float64, device=pi.device)
    count = torch.empty(programs, _K, dtype=torch.int32, device=pi.device)
    _masses_kernel[(programs,)](pi, n, bounds, mass, count, DESC=descending, K=_K, SUB=_SUB, ROWS=rows,
                                num_warps=4)
    return mass.sum(0), count.sum(0, dtype=torch.int64)


def _passes() -> int:
    """Passes until the widest bracket (2^31 patterns) is down to 1, each leaving at most w // (K + 1) + 1."""
    width, passes = _INF_BITS + 2, 0
    while width > 1:
        width, passes = width // (_K + 1) + 1 if width > _K + 1 else 1, passes + 1
    return passes


def mass_cutoff(pi: torch.Tensor, threshold: float, order: str = "desc") -> int:
    """``functional.mass_cutoff`` on the GPU (any device under the interpreter): 1 + the first position where
    the cumulative mass of pi, sorted by ``order``, reaches ``threshold``; n + 1 when it never does."""
    n = pi.numel()
    if n == 0:
        raise ValueError("select_batch needs at least one group")
    if threshold <= 0:
        return 1
    values = pi.detach().float().reshape(-1).contiguous()
    descending = order == "desc"
    device = values.device
    steps = torch.arange(1, _K + 1, device=device, dtype=torch.int64)
    # desc: mass(lo) >= threshold > mass(hi); asc: mass(lo) < threshold <= mass(hi)
    lo = torch.tensor(0 if descending else -1, dtype=torch.int64, device=device)
    hi = torch.tensor(_INF_BITS + 1 if descending else _INF_BITS, dtype=torch.int64, device=device)
    for _ in range(_passes()):
        bounds = lo + (hi - lo) * steps // (_K + 1)
        mass, _ = _masses(values, bounds.to(torch.int32), descending)
        reaches = mass >= threshold
        if descending:  # reaches is a prefix of the bounds (mass falls as the bound rises)
            lo = torch.where(reaches, bounds, lo).max()
            hi = torch.where(reaches, hi, bounds).min()
        else:  # a suffix
            lo = torch.where(reaches, lo, bounds).max()
            hi = torch.where(reaches, bounds, hi).min()
    v_bits = lo if descending else hi
    # at v* + 1 (desc; v* - 1 asc): the entries strictly ahead of v*; at v*: with its ties; at 0 (desc; +inf
    # asc): every entry, pi's total; the other bounds of the launch repeat v*
    probe = torch.stack([v_bits + (1 if descending else -1), v_bits,
                         torch.full_like(v_bits, 0 if descending else _INF_BITS)])
    probe = torch.cat([probe, v_bits.expand(_K - probe.numel())])
    mass, count = _masses(values, probe.to(torch.int32), descending)
    return cutoff_at(v_bits.to(torch.int32), mass[0], count[0], count[1] - count[0], mass[2], threshold, n)
