"""Mirror-ascent step on the group weights pi ("PiUpdate"), with a deterministic group scatter.

    S_j = sum_{i: g_i = j} l_i                (so G_j = -S_j)
    c   = pi_decay * pi_lr
    z_j = (log(pi_j + eps) + c * log(pi_reg_j) + pi_lr * S_j) / (1 + c)
    out = softmax(z / temperature)

Four ways to run it, all free of float atomics (bitwise reproducible), chosen by n_groups and the batch:

* small ``n_groups`` (<= ``SMALL_MAX``) and batches (B * next_pow2(n_groups) <= ``SINGLE_PROGRAM_WORK``): one
  program, one launch.  S is built densely by comparing every group index with every sample id, chunk by
  chunk in a fixed order.
* the same single program fused with the weighted loss's per-sample weights
  (``StagedPiStep``): the optimizers' loop API runs a batch's pi step in the launch of its
  weighted loss, staged in a buffer that becomes pi at the next call after ``step()`` (or on the host's
  request), so that ``step()`` launches nothing for pi.
* more groups or a larger batch, sparse variant (n_groups > 1000 * batch): three launches per PiUpdate (two with
  carried range sums, below), no dense G.  A sample launch finds, for each group present in the batch, its
  first sample (the owner) and the group's loss sum (every id against every id, [BI, BK] tiles summed in
  registers, one reduction at the end).
  The stats launch sums the exponentials of the logits with G = 0 over contiguous ranges of pi (float64, one
  read of pi, against a fixed reference a log(1 + eps) that no such logit exceeds); the last of its programs to
  finish (a ticket) combines the partials into the global normaliser, replacing the G = 0 terms of present
  groups by their true terms.  The write launch writes the dense result and its last program patches the
  present groups.  The replaced terms are recomputed with the same float32 formula as in the dense sum and
  cancelled in float64, so the correction stays exact when the absent groups keep at least 1e-9 of the G = 0
  mass (always true for a uniform pi_reg and float32 eps unless the temperature is small; otherwise the dense
  variant runs).  A second update (``second_out``) takes its range sums in the first write, from the values it
  writes, so it costs one more read and write of pi: 12 bytes per group for one update, 20 for both.  A kept,
  in-place step (the optimizers') carries pi's range sums to the next one the same way: its first write sums the
  G = 0 terms of the values it writes, its last program the patched groups' correction, and while nothing else
  touched pi or the workspace the next step skips the stats launch (the sample launch's last program finishes
  the normaliser): 8 bytes per group for one update, 16 for both.  The carried normaliser is the same float64 sum
  in another order; pi's bits are those of a fresh read unless that sum's last bits move 1 / Z across a float32
  rounding boundary (a tested claim, not a guarantee).  The
  sample programs have a launch of their own: sharing the stats launch, they set its registers (145 a thread),
  which left room for one range program per SM (10^9 groups on an H100: that pass 2353 us, 1888 us split).
* more groups or a larger batch, dense variant (smaller n_groups, a non-uniform pi_reg, or the bound above
  failing): the sample launch stores the owners' loss sums in a persistent all-zero buffer of n_groups
  floats, then the range reduction (its last program combining the normaliser) and the write read it; the
  step's last write zeroes the non-zero sums of each range after reading them.  Three launches per PiUpdate (two
  for the second update of ``second_out``).  The buffer lives in the caller's workspace (``pi_update_checked``).

The first and second give the same S and the same result, bitwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl


from ._interpreter import enable_interpreter_compat
from .launch import cdiv, launch_cached, next_power_of_2
from ..error_bits import REPORTED, report
from .losses import _bad_bits, _or_reduce

enable_interpreter_compat()

# The single-program path: up to SMALL_MAX groups (1000 classes fit: ImageNet's as groups) and up to
# SINGLE_PROGRAM_WORK = B * next_pow2(n) comparisons, which one program does in about 45 us on an H200; above
# that the many-groups path's programs are faster on the GPU (benchmarks/pi/bench_pi_paths.py, n = 1000: B = 256
# took 44 us in one program against 79-133 us on the many-groups path, B = 512 82 against 27-56 us).
SMALL_MAX = 1024
SINGLE_PROGRAM_WORK = 1 << 18
_PI_SMALL_VARYING = (2, 3, 7, 8)  # ids, losses, mean, report: the arguments that change every step
_REPORTED = tl.constexpr(REPORTED)

_BLOCK_GPU = 2048
_BLOCK_CPU = 1024
_PROGRAMS_PER_SM = 4  # the many-groups kernels' programs over pi: this many per SM, each a contiguous range ...
_RANGE_WARPS = 8  # ... in this many warps
# software-pipelining stages of their loops over pi (1: none); the values do not depend on it (a GPU test). 3 was
# the fastest at 10^9 on an H100 and an H200 (docs/performance.md)
_LOOP_STAGES = 3
_SAMPLE_BI = 16  # samples per sample-program on a GPU ...
_SAMPLE_BK = 256  # ... against this many ids per loop step (a [16, 256] tile of sums and of first indices) ...
_SAMPLE_WARPS = 8  # ... in this many warps (the fastest of 8 tiles on an H100: benchmarks/pi/bench_sample_tile.py)
_WIDE_IDS_FROM = 2**31  # from this many groups the sample programs compare ids in 64 bits (32 below)
# chunk when a last program scans the per-sample records (2048 was faster than 1024 or 512 at 10^7 on an H100:
# benchmarks/explore/explore_pi_finish.py)
_SCAN = 2048
_DENSE_PER_SAMPLE = 1000  # dense loss sums while n_groups <= this * batch size


@triton.jit
def _wide_exp(d):
    # exp(d) for d <= 0 as float64, reaching below the float32 range (to about e^-700), for the normaliser's
    # terms against the global maximum (a range's sum, a present group's true term): those far under it still
    # count once the groups that set it drop.  One float32 exp either way: plain above -80, the eighth power of
    # exp(d / 8) below.
    near = d > -80.0
    e = tl.exp(tl.where(near, d, d * 0.125)).to(tl.float64)
    e8 = e * e
    e8 = e8 * e8
    e8 = e8 * e8
    return tl.where(near, e, e8)


@triton.jit
def _range_term(d):
    # a term of a range sum, exp(d) for d <= 0 widened to float64: a float32 exp is enough there. Sparse, d is a
    # logit with G = 0 against the fixed reference, which ``_sparse_is_exact`` keeps above -(ln(1e9) + ln n) > -87
    # (float32's normal range); dense, d is against the range's own maximum, whose term 1 is in the sum, so the
    # terms below e^-87 add less than float64 resolves. The sparse normaliser subtracts a present group's term
    # through this same function, so that the value it takes out is the value its range sum took in.
    return tl.exp(d).to(tl.float64)


@triton.jit
def _log_f64(z):
    # log of a positive float64 through its exponent bits (no float64 transcendental needed).
    bits = z.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    mant = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    return tl.log(mant.to(tl.float32)) + e.to(tl.float32) * 0.6931471805599453


@triton.jit
def _pi_logit_base(p, r, c, eps, HAS_REG: tl.constexpr):
    # log(pi + eps) + c log(pi_reg): the part of z_j (times 1 + c) that does not depend on the losses
    x = tl.log(p + eps)
    if HAS_REG:
        x = x + c * r
    return x


@triton.jit
def _pi_softmax(x, s, jm, a, lr):
    # PiUpdate over one program's NPAD groups: softmax((x + lr S) a), a = 1 / ((1 + c) T); 0 outside n
    y = tl.where(jm, (x + lr * s) * a, float("-inf"))
    e = tl.where(jm, tl.exp(y - tl.max(y, axis=0)), 0.0)
    return e / tl.sum(e, axis=0)


@triton.jit
def _group_sums(g, lk, j):
    # S over one chunk of samples for the groups j: a dense comparison of every id with every group, summed
    # in a fixed order (both single-program kernels use it, so their S agree bitwise)
    return tl.sum(tl.where(g[None, :] == j[:, None], lk[None, :], 0.0), axis=1)


@triton.jit
def _pi_small_kernel(pi_ptr, lpr_ptr, ids_ptr, loss_ptr, out_ptr, out2_ptr, err_ptr, mean_ptr, report_ptr, n, B,
                     a, c, lr, eps,
                     HAS_REG: tl.constexpr, SECOND: tl.constexpr, NPAD: tl.constexpr,
                     BK: tl.constexpr, MEAN: tl.constexpr, REPORT: tl.constexpr):
    j = tl.arange(0, NPAD)
    jm = j < n
    word = tl.load(err_ptr)
    keep = word == 0  # a set error word: the step was rejected, nothing is written
    if REPORT:  # the step's report to the host (pinned memory), read there without a sync
        tl.store(report_ptr, word | _REPORTED)
    s = tl.zeros([NPAD], dtype=tl.float32)
    total = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, B, BK):
        k = k0 + tl.arange(0, BK)
        km = k < B
        g = tl.load(ids_ptr + k, mask=km, other=-1)
        lk = tl.load(loss_ptr + k, mask=km, other=0.0).to(tl.float32)
        s += _group_sums(g, lk, j)
        if MEAN:
            total += lk
    if MEAN:  # the batch's mean loss, step()'s return value (written whether or not the step is taken)
        tl.store(mean_ptr, tl.sum(total, axis=0) / B)
    p = tl.load(pi_ptr + j, mask=jm, other=1.0)
    r = tl.zeros([NPAD], dtype=tl.float32)
    if HAS_REG:
        r = tl.load(lpr_ptr + j, mask=jm, other=0.0)
    o = _pi_softmax(_pi_logit_base(p, r, c, eps, HAS_REG), s, jm, a, lr)
    tl.store(out_ptr + j, o, mask=jm & keep)
    if SECOND:
        o2 = _pi_softmax(_pi_logit_base(o, r, c, eps, HAS_REG), s, jm, a, lr)
        tl.store(out2_ptr + j, o2, mask=jm & keep)


@triton.jit
def _weighted_pi_kernel(pi_ptr, mid_ptr, stage_ptr, lpr_ptr, ids_ptr, loss_ptr, w_ptr, err_ptr, n, B, scale,
                        a, c, lr, eps,
                        HAS_REG: tl.constexpr, OPTIMISTIC: tl.constexpr, NPAD: tl.constexpr, BK: tl.constexpr,
                        COMMIT: tl.constexpr, CHECK: tl.constexpr):
    # The weighted loss's per-sample weights and the pi step of this batch in one program; the step's
    # result is staged (``stage``: pi, then pi_mid) and becomes pi at the next call after the step
    # (COMMIT), or earlier through the host (``GroupWeights._flush``). S, the mean and the update are
    # those of _pi_small_kernel, bitwise.
    j = tl.arange(0, NPAD)
    jm = j < n
    copy_at = (B + 4) // 4 * 4  # _losses_copy_at(B)
    if COMMIT:  # the previous step's staged pi (and pi_mid) become the current ones
        p = tl.load(stage_ptr + j, mask=jm, other=1.0)
        tl.store(pi_ptr + j, p, mask=jm)
        if OPTIMISTIC:
            tl.store(mid_ptr + j, tl.load(stage_ptr + NPAD + j, mask=jm, other=1.0), mask=jm)
        tl.debug_barrier()  # the stores above are read back by the gather of the weights below
    else:
        p = tl.load(pi_ptr + j, mask=jm, other=1.0)
    m = p
    if OPTIMISTIC:
        m = tl.load(mid_ptr + j, mask=jm, other=1.0)
    # the weights w_i = scale * pi[g_i] (pi_mid in optimistic mode; 0 for an id outside [0, n))
    weights_ptr = mid_ptr if OPTIMISTIC else pi_ptr
    s = tl.zeros([NPAD], dtype=tl.float32)
    total = tl.zeros([BK], dtype=tl.float32)
    bad = tl.zeros([BK], dtype=tl.int32)
    for k0 in range(0, B, BK):
        k = k0 + tl.arange(0, BK)
        km = k < B
        g = tl.load(ids_ptr + k, mask=km, other=-1)
        lk = tl.load(loss_ptr + k, mask=km, other=0.0).to(tl.float32)
        ok = km & (g >= 0) & (g < n)
        tl.store(w_ptr + k, scale * tl.load(weights_ptr + g, mask=ok, other=0.0), mask=km)
        tl.store(w_ptr + copy_at + k, lk, mask=km)  # the losses, kept for a pi step launched at step()
        s += _group_sums(g, lk, j)
        total += lk
        if CHECK:
            bad = bad | _bad_bits(km, ok, lk)
    word = tl.load(err_ptr)
    if CHECK:
        bits = _or_reduce(bad)
        if bits != 0:
            tl.atomic_or(err_ptr, bits)
        word = word | bits
    keep = word == 0  # a set error word: the step is rejected, its staged pi is the current one
    tl.store(w_ptr + B, tl.sum(total, axis=0) / B)  # the batch's mean loss: step()'s return value
    r = tl.zeros([NPAD], dtype=tl.float32)
    if HAS_REG:
        r = tl.load(lpr_ptr + j, mask=jm, other=0.0)
    o = _pi_softmax(_pi_logit_base(p, r, c, eps, HAS_REG), s, jm, a, lr)
    tl.store(stage_ptr + j, tl.where(keep, o, p), mask=jm)
    if OPTIMISTIC:
        o2 = _pi_softmax(_pi_logit_base(o, r, c, eps, HAS_REG), s, jm, a, lr)
        tl.store(stage_ptr + NPAD + j, tl.where(keep, o2, m), mask=jm)


@triton.jit
def _logit(p, r, sj, a, c, lr, eps, HAS_REG: tl.constexpr, DENSE_S: tl.constexpr):
    x = tl.log(p + eps)
    if HAS_REG:
        x = x + c * r
    if DENSE_S:
        x = x + lr * sj
    return x * a


@triton.jit
def _range_tile(pi_ptr, lpr_ptr, s_ptr, idx, msk, HAS_REG: tl.constexpr, DENSE_S: tl.constexpr):
    # one tile of a range: pi, log(pi_reg) (0 without it) and the dense loss sums (0 in the sparse variant)
    p = tl.load(pi_ptr + idx, mask=msk, other=1.0)
    r = 0.0
    sj = 0.0
    if HAS_REG:
        r = tl.load(lpr_ptr + idx, mask=msk, other=0.0)
    if DENSE_S:
        sj = tl.load(s_ptr + idx, mask=msk, other=0.0)
    return p, r, sj


@triton.jit
def _finish_normaliser(max_ptr, sum_ptr, P, own_ptr, y0_ptr, y_ptr, B, res_ptr, m_ref, carried_ptr,
                       SPARSE: tl.constexpr, CARRIED: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr):
    # The last program of a launch: the reference maximum M (of the range references and, sparse, of the owners'
    # true logits) and the normaliser Z relative to it, summed in float64 in a fixed order; res <- (M, shift, 1 / Z)
    # as the write kernel scales with them. The partials (range references and sums) were stored by the launch's
    # other programs, hence the volatile loads; the records come from an earlier launch or from this program
    # before a barrier. Sparse: every range is relative to the fixed reference m_ref, which is then not read back.
    # CARRIED (sparse, the sample launch's last program): the range sums are the previous write's, taken from the
    # values it wrote before its last program patched the present groups, and carried_ptr holds that patch's
    # correction; the records were stored by this launch's other programs.
    if SPARSE:
        ov = tl.full([SB], float("-inf"), dtype=tl.float32)
        for k0 in range(0, B, SB):
            i = k0 + tl.arange(0, SB)
            ov = tl.maximum(ov, tl.load(y_ptr + i, mask=i < B, other=float("-inf"), volatile=CARRIED).to(tl.float32))
        M = tl.maximum(tl.max(ov, axis=0), m_ref)
        t_ref = _wide_exp(m_ref - M)
    else:
        mv = tl.full([PB], float("-inf"), dtype=tl.float32)
        for k0 in range(0, P, PB):
            k = k0 + tl.arange(0, PB)
            mv = tl.maximum(mv, tl.load(max_ptr + k, mask=k < P, other=float("-inf"), volatile=True).to(tl.float32))
        M = tl.max(mv, axis=0)
    zv = tl.zeros([PB], dtype=tl.float64)
    for k0 in range(0, P, PB):
        k = k0 + tl.arange(0, PB)
        km = k < P
        ps = tl.load(sum_ptr + k, mask=km, other=0.0, volatile=True)
        if SPARSE:
            zv += tl.where(km, ps * t_ref, 0.0)
        else:
            pm = tl.load(max_ptr + k, mask=km, other=0.0, volatile=True).to(tl.float32)
            zv += tl.where(km, ps * _wide_exp(pm - M), 0.0)
    Z = tl.sum(zv, axis=0)
    if SPARSE:
        if CARRIED:
            Z += tl.load(carried_ptr) * t_ref
        # swap the G = 0 term of each present group (same float32 value as in its range sum) for its true term
        zs = tl.zeros([SB], dtype=tl.float64)
        for k0 in range(0, B, SB):
            i = k0 + tl.arange(0, SB)
            im = i < B
            # every sample's records are written (a non-owner's with values its flag discards): the loads need not
            # wait for the owner flag (4 us less at 10^7 on an H100, where this program's latency is the launch's)
            own = tl.load(own_ptr + i, mask=im, other=-1.0, volatile=CARRIED) >= 0
            y0 = tl.load(y0_ptr + i, mask=im, other=0.0, volatile=CARRIED).to(tl.float32)
            y = tl.load(y_ptr + i, mask=im, other=0.0, volatile=CARRIED).to(tl.float32)
            zs += tl.where(own, _wide_exp(y - M) - _range_term(y0 - m_ref) * t_ref, 0.0)
        Z += tl.sum(zs, axis=0)
    # Z >= 1 unless the entries that set M dropped; then scale through log Z instead
    normal = Z >= 1.0
    tl.store(res_ptr, M.to(tl.float64))
    tl.store(res_ptr + 1, tl.where(normal, 0.0, _log_f64(Z)).to(tl.float64))
    tl.store(res_ptr + 2, tl.where(normal, 1.0 / Z, 1.0).to(tl.float32).to(tl.float64))


@triton.jit
def _scale(y, M, shift, inv_z):
    return tl.exp((y - M) - shift) * inv_z


@triton.jit
def _pi_sample_sums_kernel(pi_ptr, lpr_ptr, s_ptr, ids_ptr, loss_ptr, ws_ptr, ticket_ptr, n, B, P, a, c, lr, eps,
                           m_ref, HAS_REG: tl.constexpr, DENSE_S: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                           WIDE_IDS: tl.constexpr, FINISH: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr):
    # Each program takes BI samples and finds, against the whole batch, the first sample with the same id (the
    # group's owner: one writer per group) and the group's loss sum. The [BI, BK] tiles accumulate over the batch
    # in registers and are reduced once at the end. Records (float64, from 4P of ws): owner id or -1 | group loss
    # sum | (sparse) owner logit with G = 0 | owner logit (-inf for non-owners); DENSE_S: the owners' loss sums
    # go into the dense buffer s_ptr instead of the logits. FINISH (sparse, the range sums carried from the
    # previous write): the last program to finish (a ticket) computes the normaliser, as the stats launch would.
    own_base = ws_ptr + 4 * P
    i = tl.program_id(0) * BI + tl.arange(0, BI)
    im = i < B
    g = tl.load(ids_ptr + i, mask=im, other=-1).to(tl.int64)
    valid = im & (g >= 0) & (g < n)
    # ids outside [0, n) become -1 here and -2 in the batch below (they match nothing); below 2^31 groups the
    # comparisons run on int32
    gi = tl.where(valid, g, -1)
    if not WIDE_IDS:
        gi = gi.to(tl.int32)
    acc = tl.zeros([BI, BK], dtype=tl.float32)
    first = tl.full([BI, BK], 2147483647, dtype=tl.int32)
    for k0 in range(0, B, BK):
        k = k0 + tl.arange(0, BK)
        km = k < B
        gk = tl.load(ids_ptr + k, mask=km, other=-1).to(tl.int64)
        gk = tl.where(km & (gk >= 0) & (gk < n), gk, -2)
        if not WIDE_IDS:
            gk = gk.to(tl.int32)
        lk = tl.load(loss_ptr + k, mask=km, other=0.0).to(tl.float32)
        hit = gi[:, None] == gk[None, :]
        acc += tl.where(hit, lk[None, :], 0.0)
        first = tl.minimum(first, tl.where(hit, k[None, :], 2147483647))
    s = tl.sum(acc, axis=1)
    own = valid & (tl.min(first, axis=1) == i)
    tl.store(own_base + i, tl.where(own, g, -1).to(tl.float64), mask=im)
    tl.store(own_base + B + i, s.to(tl.float64), mask=im)
    if DENSE_S:
        tl.store(s_ptr + g, s, mask=own)
    else:
        gs = tl.where(own, g, 0)
        p = tl.load(pi_ptr + gs, mask=own, other=1.0)
        r = 0.0
        if HAS_REG:
            r = tl.load(lpr_ptr + gs, mask=own, other=0.0)
        y0 = _logit(p, r, 0.0, a, c, lr, eps, HAS_REG, False)
        y = tl.where(own, _logit(p, r, s, a, c, lr, eps, HAS_REG, True), float("-inf"))
        tl.store(own_base + 2 * B + i, y0.to(tl.float64), mask=im)
        tl.store(own_base + 3 * B + i, y.to(tl.float64), mask=im)
    if FINISH:
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1)
        if ticket == tl.num_programs(0) - 1:
            _finish_normaliser(ws_ptr, ws_ptr + P, P, own_base, own_base + 2 * B, own_base + 3 * B, B,
                               own_base + 6 * B, m_ref, own_base + 6 * B + 6, True, True, PB, SB)
            tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _pi_stats_kernel(pi_ptr, lpr_ptr, s_ptr, ws_ptr, ticket_ptr, n, B, P, range_len, a, c, lr, eps, m_ref,
                     HAS_REG: tl.constexpr, DENSE_S: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr,
                     BLOCK: tl.constexpr, STAGES: tl.constexpr):
    # ws (float64): [0,P) range reference (dense variant) | [P,2P) range sum | [2P,4P) the same for a second
    # update | the sample records from 4P (``_pi_sample_sums_kernel``, launched before) | (M, shift, 1/Z) of each
    # update | the correction of carried range sums (``_pi_write_kernel``'s CARRY).
    # Program p reduces range p of pi; the last program to finish (a ticket) computes the normaliser. With
    # DENSE_S the loss sums live in the dense buffer s_ptr; otherwise the ranges use G = 0 against the fixed
    # reference m_ref >= every such logit (a log(1 + eps): pi <= 1, pi_reg <= 1; one read of pi), and the present
    # groups are corrected in the normaliser from the records.
    pid = tl.program_id(0)
    own_base = ws_ptr + 4 * P
    start = pid.to(tl.int64) * range_len
    if DENSE_S:
        mv = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for off in tl.range(0, range_len, BLOCK, num_stages=STAGES):
            idx = start + off + tl.arange(0, BLOCK)
            msk = idx < n
            p, r, sj = _range_tile(pi_ptr, lpr_ptr, s_ptr, idx, msk, HAS_REG, True)
            mv = tl.maximum(mv, tl.where(msk, _logit(p, r, sj, a, c, lr, eps, HAS_REG, True), float("-inf")))
        m = tl.max(mv, axis=0)
    else:
        m = tl.zeros([], dtype=tl.float32) + m_ref
    sv = tl.zeros([BLOCK], dtype=tl.float64)
    for off in tl.range(0, range_len, BLOCK, num_stages=STAGES):
        idx = start + off + tl.arange(0, BLOCK)
        msk = idx < n
        p, r, sj = _range_tile(pi_ptr, lpr_ptr, s_ptr, idx, msk, HAS_REG, DENSE_S)
        t = _range_term(_logit(p, r, sj, a, c, lr, eps, HAS_REG, DENSE_S) - m)
        sv += tl.where(msk, t, 0.0)
    if DENSE_S:  # the sparse ranges' reference is m_ref, which the last program knows
        tl.store(ws_ptr + pid, m.to(tl.float64))
    tl.store(ws_ptr + P + pid, tl.sum(sv, axis=0))
    tl.debug_barrier()
    # acq_rel ticket: the last program sees every partial stored before the other tickets (and the records of the
    # sample launch, which finished before this launch began)
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == tl.num_programs(0) - 1:
        _finish_normaliser(ws_ptr, ws_ptr + P, P, own_base, own_base + 2 * B, own_base + 3 * B, B, own_base + 6 * B,
                           m_ref, own_base + 6 * B + 6, not DENSE_S, False, PB, SB)
        if not DENSE_S:  # these sums are pi's own: nothing to correct if a later step takes them as carried
            tl.store(own_base + 6 * B + 6, 0.0)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _pi_write_kernel(pi_ptr, lpr_ptr, s_ptr, out_ptr, ws_ptr, err_ptr, ticket_ptr, report_ptr, n, B, P, range_len,
                     a, c, lr, eps, m_ref,
                     HAS_REG: tl.constexpr, DENSE_S: tl.constexpr, CLEAR: tl.constexpr, UPDATE: tl.constexpr,
                     SECOND_STATS: tl.constexpr, CARRY: tl.constexpr, REPORT: tl.constexpr, BLOCK: tl.constexpr,
                     PB: tl.constexpr, SB: tl.constexpr, STAGES: tl.constexpr):
    # out = exp((z - M) - shift) / Z over each program's range, with (M, shift, 1/Z) of update UPDATE (0: the
    # first, 1: the second); the last program to finish patches the present groups (sparse); CLEAR (dense, the
    # step's last read of the loss sums): each program zeroes the non-zero sums of its range after reading them.
    # SECOND_STATS (sparse, first update): the range sums of the second update PiUpdate(out, G) with G = 0 are
    # taken from the values written, and the last program finishes that update's normaliser, so that the second
    # update reads pi once less. CARRY (sparse, first update, out is pi): where the step is kept, the same G = 0 range
    # sums of the values written replace this update's in ws, and the last program stores the correction that
    # patching the present groups makes to them, so that the next step over this pi skips the stats launch (its
    # sample launch finishes the normaliser). REPORT: the last program then writes
    # the step's report (the error word it read, with REPORTED set) to the host's slot.
    pid = tl.program_id(0)
    own_base = ws_ptr + 4 * P
    res = own_base + 6 * B + 3 * UPDATE
    word = tl.load(err_ptr)
    keep = word == 0  # a set error word: the step was rejected, pi is not written
    M = tl.load(res).to(tl.float32)
    shift = tl.load(res + 1).to(tl.float32)
    inv_z = tl.load(res + 2).to(tl.float32)
    start = pid.to(tl.int64) * range_len
    sv = tl.zeros([BLOCK], dtype=tl.float64)
    for off in tl.range(0, range_len, BLOCK, num_stages=STAGES):
        idx = start + off + tl.arange(0, BLOCK)
        msk = idx < n
        p, r, sj = _range_tile(pi_ptr, lpr_ptr, s_ptr, idx, msk, HAS_REG, DENSE_S)
        o = _scale(_logit(p, r, sj, a, c, lr, eps, HAS_REG, DENSE_S), M, shift, inv_z)
        tl.store(out_ptr + idx, o, mask=msk & keep)
        if CLEAR:  # the step's last read of the dense loss sums: the entries its batch set go back to zero
            tl.store(s_ptr + idx, tl.zeros([BLOCK], dtype=tl.float32), mask=msk & (sj != 0.0))
        if SECOND_STATS or CARRY:
            sv += tl.where(msk, _range_term(_logit(o, r, 0.0, a, c, lr, eps, HAS_REG, False) - m_ref), 0.0)
    if SECOND_STATS:  # relative to m_ref, as the sparse variant's range sums are
        tl.store(ws_ptr + 3 * P + pid, tl.sum(sv, axis=0))
    if CARRY:  # this update's sums are used up (its normaliser was finished by an earlier launch)
        tl.store(ws_ptr + P + pid, tl.sum(sv, axis=0), mask=keep)
    if (not DENSE_S) or REPORT:  # sparse: the last program patches the present groups; REPORT: it reports
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1)
        if ticket == tl.num_programs(0) - 1:
            if not DENSE_S:
                _patch_present_groups(out_ptr, lpr_ptr, ws_ptr, P, B, res, M, shift, inv_z, keep, a, c, lr, eps, m_ref,
                                      HAS_REG, UPDATE, SECOND_STATS, CARRY, PB, SB)
            tl.atomic_xchg(ticket_ptr, 0)
            if REPORT:
                tl.store(report_ptr, word | _REPORTED)


@triton.jit
def _patch_present_groups(out_ptr, lpr_ptr, ws_ptr, P, B, res, M, shift, inv_z, keep, a, c, lr, eps, m_ref,
                          HAS_REG: tl.constexpr, UPDATE: tl.constexpr, SECOND_STATS: tl.constexpr,
                          CARRY: tl.constexpr, PB: tl.constexpr, SB: tl.constexpr):
    # The sparse write's last program: the present groups' true values (the ranges wrote their G = 0 values);
    # SECOND_STATS: then the second update's normaliser, from the owners' two logits of that update; CARRY (where
    # the step is kept): the sum over the owners of their G = 0 terms of the patched value less those of the
    # unpatched one, which turns the range sums the write took into pi's own
    own_base = ws_ptr + 4 * P
    zc = tl.zeros([SB], dtype=tl.float64)
    for k0 in range(0, B, SB):
        i = k0 + tl.arange(0, SB)
        im = i < B
        gf = tl.load(own_base + i, mask=im, other=-1.0)
        own = gf >= 0
        g = tl.where(own, gf, 0.0).to(tl.int64)
        # as in ``_finish_normaliser``, the records of every sample, not waiting for the owner flag
        y = tl.load(own_base + (3 + 2 * UPDATE) * B + i, mask=im, other=0.0).to(tl.float32)
        o = _scale(y, M, shift, inv_z)
        tl.store(out_ptr + g, o, mask=own & keep)
        if SECOND_STATS or CARRY:
            # the logit with G = 0 of the value the range sum saw (the unpatched one)
            y0 = tl.load(own_base + 2 * B + i, mask=im, other=0.0).to(tl.float32)
            r = 0.0
            if HAS_REG:
                r = tl.load(lpr_ptr + g, mask=own, other=0.0)
            seen = _logit(_scale(y0, M, shift, inv_z), r, 0.0, a, c, lr, eps, HAS_REG, False)
            if CARRY:
                patched = _logit(o, r, 0.0, a, c, lr, eps, HAS_REG, False)
                zc += tl.where(own, _range_term(patched - m_ref) - _range_term(seen - m_ref), 0.0)
            if SECOND_STATS:
                # the second update's two logits of each owner: with G = 0 as seen, the true one from the patched
                # value
                s = tl.load(own_base + B + i, mask=im, other=0.0).to(tl.float32)
                true = tl.where(own, _logit(o, r, s, a, c, lr, eps, HAS_REG, True), float("-inf"))
                tl.store(own_base + 4 * B + i, seen.to(tl.float64), mask=im)
                tl.store(own_base + 5 * B + i, true.to(tl.float64), mask=im)
    if CARRY:
        tl.store(own_base + 6 * B + 6, tl.sum(zc, axis=0), mask=keep)
    if SECOND_STATS:
        tl.debug_barrier()  # the records stored above are read back by other threads
        _finish_normaliser(ws_ptr + 2 * P, ws_ptr + 3 * P, P, own_base, own_base + 4 * B, own_base + 5 * B, B, res + 3,
                           m_ref, ws_ptr, True, False, PB, SB)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _loss_sum_buffer(workspace: Optional[dict], device: torch.device, n: int) -> torch.Tensor:
    # Dense per-group loss sums for the exact path, kept all zero between calls (the last write launch clears
    # the entries it set): in the caller's workspace across calls, else a fresh one. Calls that share a
    # workspace on several streams at once must not overlap.
    buf = None if workspace is None else workspace.get("loss_sums")
    if buf is None or buf.numel() < n or buf.device != device:
        buf = torch.zeros(max(n, 1024), dtype=torch.float32, device=device)
        if workspace is not None:
            workspace["loss_sums"] = buf
    return buf


def _float64_workspace(workspace: Optional[dict], device: torch.device, size: int) -> torch.Tensor:
    # the many-groups path's per-call partials (every entry is written before it is read)
    buf = None if workspace is None else workspace.get("partials")
    if buf is None or buf.numel() != size or buf.device != device:
        buf = torch.empty(size, dtype=torch.float64, device=device)
        if workspace is not None:
            workspace["partials"] = buf
    return buf


def _kept_zeros(workspace: Optional[dict], name: str, shape: tuple, device: torch.device) -> torch.Tensor:
    # int32 zeros kept in the caller's workspace under ``name`` (a fresh tensor without one): the many-groups
    # kernels' "last program" counters ("tickets", (2,): stats, write; zero between launches, the last program of
    # each launch resets its own) and the error word of a call without checks ("zero_word", (): only read by
    # these kernels, no launch sets it), so that a step allocates and fills neither
    buf = None if workspace is None else workspace.get(name)
    if buf is None or buf.device != device:
        buf = torch.zeros(shape, dtype=torch.int32, device=device)
        if workspace is not None:
            workspace[name] = buf
    return buf


def _sparse_is_exact(n: int, B: int, a: float, eps: float) -> bool:
    """Whether the G = 0 sum minus the present groups' terms keeps float32 accuracy in float64.

    With a uniform pi_reg the logits with G = 0 lie in [a log eps, a log(1 + eps)], so the absent
    groups hold at least (n - B) / B * (eps / (1 + eps))^a of the G = 0 mass of the present ones;
    above 1e-9 the float64 cancellation error stays under 1e-7 of the result. The same bound (taken with
    one sample for an empty batch) keeps every G = 0 term above e^-(ln(1e9) + ln n) > e^-87, in float32's normal
    range (``_range_term``).
    """
    B = max(B, 1)
    if eps <= 0.0 or B >= n:
        return False
    return math.log(B / (n - B)) + a * math.log((1.0 + eps) / eps) <= math.log(1e9)


def _check(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor,
           log_pi_reg: Optional[torch.Tensor], out: Optional[torch.Tensor],
           second_out: Optional[torch.Tensor], temperature: float) -> None:
    if pi.dim() != 1 or pi.dtype != torch.float32 or not pi.is_contiguous():
        raise ValueError("pi must be a contiguous 1-D float32 tensor")
    if group_ids.dim() != 1 or group_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("group_ids must be a 1-D int32/int64 tensor")
    if losses.dim() != 1 or losses.shape[0] != group_ids.shape[0]:
        raise ValueError("losses must be 1-D with one entry per group id")
    if losses.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError("losses must be float32, float16 or bfloat16")
    for name, t in (("log_pi_reg", log_pi_reg), ("out", out), ("second_out", second_out)):
        if t is not None and (t.shape != pi.shape or t.dtype != torch.float32
                              or not t.is_contiguous() or t.device != pi.device):
            raise ValueError(f"{name} must be a contiguous float32 tensor shaped like pi")
    if group_ids.device != pi.device or losses.device != pi.device:
        raise ValueError("pi, group_ids and losses must be on one device")
    if not temperature > 0:
        raise ValueError("temperature must be positive")


def pi_update(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor, *,
              pi_lr: float, pi_decay: float, temperature: float, eps: float,
              log_pi_reg: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
              second_out: Optional[torch.Tensor] = None, error_word: Optional[torch.Tensor] = None,
              mean_out: Optional[torch.Tensor] = None, report_out: Optional[torch.Tensor] = None,
              workspace: Optional[dict] = None, _path: Optional[str] = None) -> torch.Tensor:
    """out = softmax(z / T), z_j = (log(pi_j + eps) + c log pi_reg_j + pi_lr S_j) / (1 + c).

    S_j is the sum of the losses of the samples with id j, c = pi_decay * pi_lr.  ``log_pi_reg=None``
    means a uniform pi_reg (its term cancels).  ``out`` may be ``pi`` (in place).  With
    ``second_out``, PiUpdate(out, G) with the same G is written there as well.  Ids outside
    [0, n_groups) are ignored.  While ``error_word`` (0-d int32 on the device) is non-zero nothing is
    written.  ``mean_out`` (0-d float32): receives the mean of the losses.  ``report_out`` (0-d int32,
    pinned host memory on a GPU): receives ``error_word | REPORTED`` once the update has read the word.
    ``workspace``: a dict kept by the caller for the many-groups path's buffers (see ``pi_update_checked``).
    Returns ``out``.  ``_path`` ("single" / "sparse" / "dense") forces the single program (n_groups <=
    SMALL_MAX) or a many-groups variant (tests, benchmarks).
    """
    group_ids = group_ids.contiguous()
    losses = losses.detach().contiguous()
    _check(pi, group_ids, losses, log_pi_reg, out, second_out, temperature)
    if out is None:
        out = torch.empty_like(pi)
    return pi_update_checked(pi, group_ids, losses, pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature,
                             eps=eps, log_pi_reg=log_pi_reg, out=out, second_out=second_out,
                             error_word=error_word, mean_out=mean_out, report_out=report_out, _path=_path,
                             workspace=workspace)


_WEIGHTED_PI_VARYING = (4, 5, 6)  # ids, losses, the row of the weights: new tensors every call


def _npad(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def single_program_max_batch(n: int) -> int:
    """The largest batch whose pi step over n groups runs on the single program (0: none, n > SMALL_MAX)."""
    return SINGLE_PROGRAM_WORK // _npad(n) if 0 < n <= SMALL_MAX else 0


def _single_program(n: int) -> dict:
    """NPAD, BK and num_warps of the single-program kernels over n groups: both use the same ones, so that
    their group sums S agree bitwise (the chunk size sets the order of the additions)."""
    npad = _npad(n)
    return dict(NPAD=npad, BK=max(16, 8192 // npad), num_warps=4 if npad <= 64 else 8)


def _softmax_scalars(pi_lr: float, pi_decay: float, temperature: float, eps: float) -> tuple[float, ...]:
    """(a, c, lr, eps) of the kernels' PiUpdate: c = pi_decay * pi_lr, a = 1 / ((1 + c) T)."""
    c = float(pi_decay) * float(pi_lr)
    return 1.0 / ((1.0 + c) * float(temperature)), c, float(pi_lr), float(eps)


def pi_stage(n: int, device: torch.device) -> torch.Tensor:
    """A stage for ``StagedPiStep`` over ``n`` (<= SMALL_MAX) groups: staged pi, then staged pi_mid."""
    return torch.zeros(2 * _npad(n), dtype=torch.float32, device=device)


def commit_pi_stage(stage: torch.Tensor, pi: torch.Tensor, pi_mid: Optional[torch.Tensor]) -> None:
    """pi (and pi_mid) <- the values the last ``StagedPiStep.step`` staged (stream-ordered copies)."""
    n = pi.shape[0]
    pi.copy_(stage[:n])
    if pi_mid is not None:
        npad = _npad(n)
        pi_mid.copy_(stage[npad:npad + n])


def _losses_copy_at(B: int) -> int:
    # where the copy of the losses starts in a StagedPiStep row: after the B weights and the mean, at a
    # multiple of 4 floats, so that it has the 16-byte alignment of a fresh tensor (a launch specialised
    # for another alignment may sum in another order)
    return (B + 4) // 4 * 4


_ROWS_PER_BLOCK = 128  # StagedPiStep rows carved from one allocation, at most ...
_BLOCK_FLOATS = 1 << 18  # ... and as many as fit in 1 MiB (at least one)


class StagedPiStep:
    """The weighted loss and its batch's pi step staged, in one launch (``_weighted_pi_kernel``), bound to one
    group weights' pi, pi_mid (None but in optimistic mode), stage (``pi_stage``), log(pi_reg) (None: uniform)
    and error word (None: no checks); built again when one of those tensors is replaced.

    ``step(ids, losses, commit, loss_scale, hyper)``, hyper = (pi_lr, pi_decay, temperature, eps), returns
    ``(loss_scale * sum_i w[g_i] l_i, mean, losses_copy)``, w = pi_mid (optimistic) or pi, with staged
    pi = PiUpdate(pi, S) and staged pi_mid = PiUpdate(staged pi, S), S the batch's loss sums per group, as
    ``pi_update`` computes them (bitwise); ``mean`` is the batch's mean loss (0-d) and ``losses_copy`` a copy of
    the losses (for a pi step launched at step() instead). ``commit`` first moves the previously staged pi (and
    pi_mid) into pi (and pi_mid). Bad ids or losses set the error word's bits; while it is set, the staged pi
    and pi_mid are the current ones (the step is rejected). n_groups <= SMALL_MAX, B <= single_program_max_batch(n_groups)
    (the pi step of ``pi_update`` on the single program); ids (int64) and losses (float32) contiguous on pi's
    device.

    Each call writes a fresh row [weights (saved for the backward), mean, losses copy] that no later call
    writes again. The rows are carved, up to 128 at a time, from one allocation (so that a call pays no
    allocation or view of its own, a large share of its host time in a training loop); a block's memory
    is freed once no view of any of its rows is left.
    """

    def __init__(self, pi: torch.Tensor, pi_mid: Optional[torch.Tensor], stage: torch.Tensor,
                 log_pi_reg: Optional[torch.Tensor], error_word: Optional[torch.Tensor]) -> None:
        self._device = pi.device
        self._check = error_word is not None
        self._optimistic = pi_mid is not None
        # without checks, a word of its own that no kernel sets
        err = error_word if self._check else torch.zeros((), dtype=torch.int32, device=pi.device)
        mid = pi_mid if self._optimistic else pi
        self._tensors = (pi, mid, stage, log_pi_reg, err)
        self._n = pi.shape[0]
        self._constexprs = dict(OPTIMISTIC=self._optimistic, CHECK=self._check, **_single_program(self._n))
        self._scalars: Optional[tuple] = None  # (loss_scale, hyper) the kept launches were made for
        self._kept: dict = {}  # (B, commit) -> the kept launch's cache (``launch_cached``)
        self._rows: dict = {}  # B -> iterator over the unused (weights, mean, losses copy) rows of a block

    def step(self, group_ids: torch.Tensor, losses: torch.Tensor, commit: bool, loss_scale: float,
             hyper: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = losses.shape[0]
        rows = self._rows.get(B)
        row = None if rows is None else next(rows, None)
        if row is None:
            row = next(self._carve(B, losses))
        weights, mean, copy = row
        scalars = (loss_scale, hyper)
        if scalars != self._scalars:
            self._scalars, self._kept = scalars, {}
        cache = self._kept.get((B, commit))
        prepared = None if cache is None else cache.get(True)
        if prepared is None or not prepared(1, group_ids, losses, weights):
            self._launch(group_ids, losses, weights, B, commit)
        return torch.dot(weights, losses), mean, copy

    def _carve(self, B: int, like: torch.Tensor):
        """A new block of rows for batches of B: each row [B weights, the mean, padding, B losses], 16-byte
        aligned (so that the kept launch's pointer specialisation holds for every row)."""
        copy_at = _losses_copy_at(B)
        width = (copy_at + B + 3) // 4 * 4
        block = like.new_empty((max(1, min(_ROWS_PER_BLOCK, _BLOCK_FLOATS // width)), width))
        if len(self._rows) >= 4:  # batch sizes that vary: keep the blocks of the last few
            self._rows.clear()
        rows = self._rows[B] = zip(block[:, :B].unbind(0), block[:, B].unbind(0),
                                   block[:, copy_at:copy_at + B].unbind(0))
        return rows

    def _launch(self, group_ids: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor, B: int,
                commit: bool) -> None:
        """The launch through ``launch_cached``, which keeps it (under the key True) for the calls that follow.
        The kernel writes the mean and the copy of the losses at their places after ``weights`` in its row."""
        loss_scale, (pi_lr, pi_decay, temperature, eps) = self._scalars
        a, c, lr, eps = _softmax_scalars(pi_lr, pi_decay, temperature, eps)
        # with c = 0 the KL term vanishes; dropping it avoids 0 * log(0) for a pi_reg with zero entries
        pi, mid, stage, lpr, err = self._tensors
        has_reg = lpr is not None and c != 0.0
        args = (pi, mid, stage, lpr if has_reg else pi, group_ids, losses, weights, err, self._n, B,
                float(loss_scale), a, c, lr, eps)
        cache = self._kept.setdefault((B, commit), {})
        launch_cached(cache, True, _weighted_pi_kernel, 1, self._device, args, _WEIGHTED_PI_VARYING,
                      HAS_REG=has_reg, COMMIT=commit, **self._constexprs)


class _ManyGroupsLayout:
    """How the many-groups path splits one call's work (variant, tiles, ranges, sample programs) and the workspace
    buffers it uses; one per (pi, batch size, hyper-parameters), kept by callers that pass a ``cache``."""

    def __init__(self, pi: torch.Tensor, B: int, scalars: tuple[float, float, float, float], has_reg: bool,
                 path: Optional[str], workspace: Optional[dict]) -> None:
        a, c, lr, eps = scalars
        n, device = pi.shape[0], pi.device
        on_cpu = device.type != "cuda"
        if path in (None, "single"):
            # The dense variant pays two extra reads of n floats (pi for the range maxima, the loss sums) and
            # a launch; the sparse one a scan of the batch per sample program. On an H100 at B = 4096 the dense
            # variant was faster at n = 1e4 and 1e6 and the sparse one at n = 1e7.
            self.dense_s = has_reg or n <= _DENSE_PER_SAMPLE * B or not _sparse_is_exact(n, B, a, eps)
        else:
            self.dense_s = path == "dense"
        self.block = _BLOCK_CPU if on_cpu else _BLOCK_GPU
        self.stages = 1 if on_cpu else _LOOP_STAGES
        max_progs = 4 if on_cpu else _PROGRAMS_PER_SM * _sm_count(device)
        n_tiles = cdiv(n, self.block)
        self.range_len = cdiv(n_tiles, min(n_tiles, max_progs)) * self.block
        self.P = cdiv(n, self.range_len)
        self.bi, self.bk, self.sample_warps = (128, 128, 4) if on_cpu else (_SAMPLE_BI, _SAMPLE_BK, _SAMPLE_WARPS)
        self.Q = cdiv(B, self.bi)
        self.wide_ids = n >= _WIDE_IDS_FROM
        self.pb = max(16, min(1024, next_power_of_2(max(self.P, 1))))
        # the sparse variant's fixed reference: no logit with G = 0 exceeds a log(1 + eps) (pi, pi_reg <= 1)
        self.scalars = (a, c, lr, eps, a * math.log1p(eps))
        self.ws = _float64_workspace(workspace, device, 4 * self.P + 6 * B + 7)
        self.tickets = _kept_zeros(workspace, "tickets", (2,), device)
        self.write_ticket = self.tickets[1:]
        self.sbuf = _loss_sum_buffer(workspace, device, n) if self.dense_s else pi


def pi_update_checked(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor, *,
                      pi_lr: float, pi_decay: float, temperature: float, eps: float,
                      log_pi_reg: Optional[torch.Tensor], out: torch.Tensor,
                      second_out: Optional[torch.Tensor] = None, error_word: Optional[torch.Tensor] = None,
                      mean_out: Optional[torch.Tensor] = None, report_out: Optional[torch.Tensor] = None,
                      _path: Optional[str] = None, cache: Optional[dict] = None,
                      workspace: Optional[dict] = None) -> torch.Tensor:
    """``pi_update`` for callers that have checked its arguments already (contiguous, detached, on one
    device, as ``_check`` asks): the optimizers, once per step. ``cache``: a dict the caller keeps
    between calls, in which the launches (and the many-groups path's layout) are kept for the next call (on a GPU
    a kept launch rewrites only the arguments that change; elsewhere ``launch_cached`` launches as usual);
    ``workspace``: a dict the caller keeps for the many-groups path's buffers (its calls then allocate nothing).
    With both, a sparse step in place (``out`` is ``pi``) leaves pi's range sums in the workspace for the next one
    (``_carried_sums``): change pi in place only through torch (whose ops move its version counter), not through
    ``.data``, between such calls."""
    n = pi.shape[0]
    B = group_ids.shape[0]
    single = 0 < n <= SMALL_MAX and (B <= single_program_max_batch(n) if _path is None else _path == "single")
    if mean_out is not None and not single:
        if losses.dtype == torch.float32:
            torch.mean(losses, 0, out=mean_out)  # losses.mean()'s reduction, written in place: one launch, not two
        else:
            mean_out.copy_(losses.float().mean())
    err = _kept_zeros(workspace, "zero_word", (), pi.device) if error_word is None else error_word
    if n == 0:
        if report_out is not None:
            report(err, report_out)
        return out
    a, c, lr, eps = _softmax_scalars(pi_lr, pi_decay, temperature, eps)
    has_reg = log_pi_reg is not None
    lpr = log_pi_reg if has_reg else pi
    second = second_out is not None

    if single:
        if workspace is not None:
            workspace.pop("carried", None)  # pi may be written here: range sums carried in the workspace are void
        args = (pi, lpr, group_ids, losses, out, second_out if second else out, err,
                out if mean_out is None else mean_out, err if report_out is None else report_out, n, B, a, c, lr, eps)
        # everything but the ids, losses, mean and report (new tensors every step) names the kept launch
        key = (pi.data_ptr(), lpr.data_ptr(), out.data_ptr(), args[5].data_ptr(), err.data_ptr(), n, B, a, c, lr, eps,
               has_reg, second, mean_out is None, report_out is None)
        launch_cached(cache, key, _pi_small_kernel, 1, pi.device, args, _PI_SMALL_VARYING,
                      HAS_REG=has_reg, SECOND=second, MEAN=mean_out is not None, REPORT=report_out is not None,
                      **_single_program(n))
        return out

    keep = cache is not None  # kept layout and launches (off CUDA launch_cached launches as usual)
    key = kept = None
    if keep:  # everything a kept launch fixes besides the ids, losses and report slot
        key = (pi.data_ptr(), lpr.data_ptr(), out.data_ptr(), second_out.data_ptr() if second else 0,
               err.data_ptr(), n, B, a, c, lr, eps, has_reg, _path, report_out is None, _BLOCK_GPU, _PROGRAMS_PER_SM,
               _LOOP_STAGES, _RANGE_WARPS, _SAMPLE_BI, _SAMPLE_BK, _SAMPLE_WARPS, _WIDE_IDS_FROM, _SCAN)
        kept = cache.get("many")
    if kept is None or kept[0] != key:
        kept = (key, _ManyGroupsLayout(pi, B, (a, c, lr, eps), has_reg, _path, workspace), {})
        if keep:
            cache["many"] = kept
    _, lay, roles = kept
    device = pi.device

    def run(role: str, kernel, grid: int, args: tuple, varying: tuple, num_warps: int, **constexprs) -> None:
        # without a cache launch_cached launches as launch() does
        launch_cached(roles.setdefault(role, {}) if keep else None, True, kernel, grid, device, args, varying,
                      num_warps=num_warps, **constexprs)

    def samples(finish: bool) -> None:
        if lay.Q > 0:
            run("samples_finish" if finish else "samples", _pi_sample_sums_kernel, lay.Q,
                (pi, lpr, lay.sbuf, group_ids, losses, lay.ws, lay.tickets, n, B, lay.P, *lay.scalars), (3, 4),
                num_warps=lay.sample_warps, HAS_REG=has_reg, DENSE_S=lay.dense_s, BI=lay.bi, BK=lay.bk,
                WIDE_IDS=lay.wide_ids, FINISH=finish, PB=lay.pb, SB=_SCAN)

    def stats(role: str, src: torch.Tensor) -> None:
        run(role, _pi_stats_kernel, lay.P,
            (src, lpr, lay.sbuf, lay.ws, lay.tickets, n, B, lay.P, lay.range_len, *lay.scalars), (),
            num_warps=_RANGE_WARPS, HAS_REG=has_reg, DENSE_S=lay.dense_s, PB=lay.pb, SB=_SCAN, BLOCK=lay.block,
            STAGES=lay.stages)

    def write(role: str, src: torch.Tensor, dst: torch.Tensor, clear: bool, update: int, second_stats: bool,
              last: bool, carry: bool = False) -> None:
        reports = last and report_out is not None
        run(role, _pi_write_kernel, lay.P,
            (src, lpr, lay.sbuf, dst, lay.ws, err, lay.write_ticket, report_out if reports else err, n, B, lay.P,
             lay.range_len, *lay.scalars), (7,) if reports else (), num_warps=_RANGE_WARPS, HAS_REG=has_reg,
            DENSE_S=lay.dense_s, CLEAR=clear, UPDATE=update, SECOND_STATS=second_stats, CARRY=carry, REPORT=reports,
            BLOCK=lay.block, PB=lay.pb, SB=_SCAN, STAGES=lay.stages)

    # the batch's records (owners, loss sums) first; then the normaliser over the ranges of pi and the write.
    # Dense: the loss sums go through the dense buffer, which the last write zeroes again. Sparse: the ranges take
    # G = 0 (one read of pi), the normaliser and the write patch the present groups; the first write takes the
    # second update's range sums from the values it writes, so the second write reads out once
    # Sparse and in place, with a kept layout: the write leaves pi's range sums for the next call, which then skips
    # the stats launch while nothing else has touched pi or the workspace (``_carried_sums``).
    carry = keep and workspace is not None and not lay.dense_s and out.data_ptr() == pi.data_ptr()
    carried = carry and lay.Q > 0 and _carried_sums(workspace, lay, pi)
    samples(carried)
    if not carried:
        stats("stats", pi)
    if lay.dense_s:
        write("write", pi, out, not second, 0, False, not second)
        if second:
            stats("stats2", out)
            write("write2", out, second_out, True, 0, False, True)
    else:
        write("write", pi, out, False, 0, second, not second, carry)
        if second:
            write("write2", out, second_out, False, 1, False, True)
    if carry:
        workspace["carried"] = (lay, pi._version)
    elif workspace is not None:
        workspace.pop("carried", None)
    return out


def _carried_sums(workspace: dict, lay: _ManyGroupsLayout, pi: torch.Tensor) -> bool:
    """Whether the workspace holds pi's range sums as the last call's write left them: that call was made with this
    very layout (the same pi, hyper-parameters, batch size and variant), no call has used the workspace since, and
    pi's version counter has not moved (an in-place change to pi through torch, or a load, moves it; the kernels'
    own writes do not). A step whose error word was set wrote neither pi nor the sums, which then still hold."""
    carried = workspace.get("carried")
    return carried is not None and carried[0] is lay and carried[1] == pi._version
