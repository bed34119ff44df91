"""select_batch's cutoff without a sort, on the GPU: a K-ary search over pi's float32 bit patterns.

pi >= 0, so an entry's int32 bit pattern orders like its value. For a bound b, mass(b) is the float64 sum
of the entries at or past b in sort order (bits >= b for "desc", bits <= b for "asc") and count(b) their
number. One launch evaluates K bounds: each program reads its chunk of pi once and writes K partial
masses and counts; torch adds the partials in program order (deterministic). The bracket around v* (the
last bound whose mass reaches the threshold) starts at pi's range of patterns and shrinks (K + 1)-fold
per pass (at most 8 passes for 31 bits), then one pass at v* gives the ties and pi's total. Two host
reads: pi's range, and the cutoff. ``functional.mass_cutoff`` is the
plain-torch reference (bisection, the same answer)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..functional import cutoff_at
from ._interpreter import enable_interpreter_compat
from .launch import cdiv

enable_interpreter_compat()

# the kernel's shape: a (sub, k) register tile per program over up to sub * rows entries; stages of the
# row loop in flight (software pipelining of the loads). Measured on an H100 (benchmarks/explore/
# explore_mass_search.py, benchmarks/results/mass_search_h100.jsonl): at 1e7 groups the search is
# bound by its passes' host work and 16 bounds a pass (fewer passes) win, 1.8 ms; at 1e8 by the kernel, and
# 8 bounds a pass (a smaller tile, 0.45 ms a pass against 0.77) win, 5.3 ms against 7.1. LARGE_N lies
# between the two sizes measured.
CONFIG = dict(sub=256, rows=64, k=16, warps=4, stages=3)
LARGE_CONFIG = dict(sub=512, rows=32, k=8, warps=4, stages=3)
LARGE_N = 1 << 25


def _config(n: int) -> dict:
    return LARGE_CONFIG if n >= LARGE_N else CONFIG
_INF_BITS = 0x7F800000


@triton.jit
def _masses_kernel(pi_ptr, n, bounds_ptr, mass_ptr, count_ptr, DESC: tl.constexpr, K: tl.constexpr,
                   SUB: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr, WITH_COUNTS: tl.constexpr):
    """Program p reads entries [p * SUB * ROWS, (p + 1) * SUB * ROWS) a row of SUB at a time and keeps a
    (SUB, K) tile of float64 masses (and int32 counts), entry column j against bound k; one reduction over
    the SUB axis at the end gives its K partials (K reductions of a whole block per row would cost more
    than the memory traffic)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, SUB)
    bounds = tl.load(bounds_ptr + tl.arange(0, K))
    mass = tl.zeros((SUB, K), dtype=tl.float64)
    count = tl.zeros((SUB, K), dtype=tl.int32)
    start = pid.to(tl.int64) * (SUB * ROWS)
    for row in tl.range(0, ROWS, num_stages=STAGES):
        offs = start + row * SUB + lanes
        inside = offs < n
        values = tl.load(pi_ptr + offs, mask=inside, other=0.0)
        bits = values.to(tl.int32, bitcast=True)
        if DESC:
            chosen = inside[:, None] & (bits[:, None] >= bounds[None, :])
        else:
            chosen = inside[:, None] & (bits[:, None] <= bounds[None, :])
        mass += tl.where(chosen, values.to(tl.float64)[:, None], 0.0)
        if WITH_COUNTS:
            count += chosen.to(tl.int32)
    tl.store(mass_ptr + pid * K + tl.arange(0, K), tl.sum(mass, axis=0))
    if WITH_COUNTS:
        tl.store(count_ptr + pid * K + tl.arange(0, K), tl.sum(count, axis=0))


def _masses(pi: torch.Tensor, bounds: torch.Tensor, descending: bool,
            with_counts: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mass, count) of the entries at or past each of the K int32 ``bounds``, float64 and int64 (count None
    unless ``with_counts``); the programs' partials are added in program order (deterministic)."""
    n = pi.numel()
    config = _config(n)
    k, sub = config["k"], config["sub"]
    rows = min(config["rows"], triton.next_power_of_2(cdiv(n, sub)))
    programs = cdiv(n, sub * rows)
    mass = torch.empty(programs, k, dtype=torch.float64, device=pi.device)
    count = torch.empty(programs, k, dtype=torch.int32, device=pi.device) if with_counts else mass
    _masses_kernel[(programs,)](pi, n, bounds, mass, count, DESC=descending, K=k, SUB=sub, ROWS=rows,
                                STAGES=config["stages"], WITH_COUNTS=with_counts, num_warps=config["warps"])
    return mass.sum(0), count.sum(0, dtype=torch.int64) if with_counts else None


def _passes(width: int, k: int) -> int:
    """Passes until a bracket of ``width`` patterns is down to 1, each leaving at most w // (k + 1) + 1."""
    passes = 0
    while width > 1:
        width, passes = width // (k + 1) + 1 if width > k + 1 else 1, passes + 1
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
    device, k = values.device, _config(n)["k"]
    # the bracket starts at pi's own range, not at every pattern from 0 to +inf: one host read (the cutoff
    # is read on the host anyway) saves the passes over the exponents pi does not use (a softmax spans a
    # few dozen binades of the 255)
    low, high = torch.stack(torch.aminmax(values.view(torch.int32))).tolist()  # one read of both
    low, high = max(low, 0), max(high, 0)
    # desc: mass(lo) >= threshold > mass(hi); asc: mass(lo) < threshold <= mass(hi)
    lo_bits, hi_bits = (low, high + 1) if descending else (low - 1, high)
    steps = torch.arange(1, k + 1, device=device, dtype=torch.int64)
    lo = torch.tensor(lo_bits, dtype=torch.int64, device=device)
    hi = torch.tensor(hi_bits, dtype=torch.int64, device=device)
    for _ in range(_passes(hi_bits - lo_bits, k)):
        bounds = lo + (hi - lo) * steps // (k + 1)
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
    probe = torch.cat([probe, v_bits.expand(k - probe.numel())])
    mass, count = _masses(values, probe.to(torch.int32), descending, with_counts=True)
    return cutoff_at(v_bits.to(torch.int32), mass[0], count[0], count[1] - count[0], mass[2], threshold, n)
