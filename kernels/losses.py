"""Fused re-weighted losses with deterministic reductions.

* weighted_loss(pi, g, l, s) = s * sum_i pi[g_i] * l_i;   dL/dl_i = s * pi[g_i]  (pi is a buffer)
* rgd_loss(l, T) = mean_i(w_i * l_i), w_i = exp(min(l_i, T) / (T + 1)) held constant;
  dL/dl_i = w_i / B

Each forward is one kernel: one program for batches up to ``_SINGLE_MAX``; above that every program
writes a partial sum and the last program to finish (a ticket counter) adds the partials in program
order, so the result does not depend on scheduling.  Each backward is one elementwise kernel. The
weighted loss of float32 losses is instead one kernel for the per-sample weights s * pi[g_i] and
``torch.dot``, so that its backward runs inside torch's autograd engine, without Python.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


from ._interpreter import enable_interpreter_compat
from .launch import cdiv, launch, launch_cached, next_power_of_2

enable_interpreter_compat()

_BLOCK = 1024
_SINGLE_MAX = 1 << 16
_CHUNK = 1 << 14  # elements per program when the batch is split


@triton.jit
def _finish_sum(acc, scale, out_ptr, part_ptr, cnt_ptr, SINGLE: tl.constexpr, PB: tl.constexpr):
    total = tl.sum(acc, axis=0)
    if SINGLE:
        tl.store(out_ptr, total * scale)
    else:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tl.store(part_ptr + pid, total)
        tl.debug_barrier()
        # acq_rel ticket: the last program sees every partial stored before the other tickets.
        ticket = tl.atomic_add(cnt_ptr, 1)
        if ticket == nprog - 1:
            tv = tl.zeros([PB], dtype=tl.float32)
            for k0 in range(0, nprog, PB):
                k = k0 + tl.arange(0, PB)
                tv += tl.load(part_ptr + k, mask=k < nprog, other=0.0, volatile=True)
            tl.store(out_ptr, tl.sum(tv, axis=0) * scale)
            tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _bad_bits(m, ok, x):
    # per sample: ID_OUT_OF_RANGE (1) where its id is outside [0, n), NON_FINITE_LOSS (2) where its loss is NaN or inf
    ids_bad = tl.where(m, tl.where(ok, 0, 1), 0)
    losses_bad = tl.where(m & ((x != x) | (tl.abs(x) == float("inf"))), 2, 0)
    return ids_bad | losses_bad


@triton.jit
def _or_reduce(bad):
    return tl.max(bad & 1, axis=0) | tl.max(bad & 2, axis=0)


@triton.jit
def _weighted_fwd_kernel(pi_ptr, ids_ptr, loss_ptr, out_ptr, part_ptr, cnt_ptr, err_ptr, n, B, chunk,
                         scale, SINGLE: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr,
                         CHECK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, chunk, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        m = i < B
        g = tl.load(ids_ptr + i, mask=m, other=-1)
        ok = m & (g >= 0) & (g < n)
        w = tl.load(pi_ptr + g, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(loss_ptr + i, mask=m, other=0.0).to(tl.float32)
        acc += tl.where(ok, w * x, 0.0)
        if CHECK:
            bad = bad | _bad_bits(m, ok, x)
    if CHECK:
        bits = _or_reduce(bad)
        if bits != 0:
            tl.atomic_or(err_ptr, bits)
    _finish_sum(acc, scale, out_ptr, part_ptr, cnt_ptr, SINGLE, PB)


@triton.jit
def _sample_weights_kernel(pi_ptr, ids_ptr, loss_ptr, w_ptr, err_ptr, n, B, scale, CHECK: tl.constexpr,
                           BLOCK: tl.constexpr):
    # w_i = scale * pi[g_i] (0 for an id outside [0, n)); with CHECK the batch's error bits too
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < B
    g = tl.load(ids_ptr + i, mask=m, other=-1)
    ok = m & (g >= 0) & (g < n)
    w = tl.load(pi_ptr + g, mask=ok, other=0.0).to(tl.float32)
    tl.store(w_ptr + i, scale * w, mask=m)
    if CHECK:
        x = tl.load(loss_ptr + i, mask=m, other=0.0).to(tl.float32)
        bits = _or_reduce(_bad_bits(m, ok, x))
        if bits != 0:
            tl.atomic_or(err_ptr, bits)


@triton.jit
def _check_batch_kernel(ids_ptr, loss_ptr, err_ptr, n, B, HAS_IDS: tl.constexpr, HAS_LOSSES: tl.constexpr,
                        BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < B
    ok = m
    x = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_IDS:
        g = tl.load(ids_ptr + i, mask=m, other=0)
        ok = m & (g >= 0) & (g < n)
    if HAS_LOSSES:
        x = tl.load(loss_ptr + i, mask=m, other=0.0).to(tl.float32)
    bits = _or_reduce(_bad_bits(m, ok, x))
    if bits != 0:
        tl.atomic_or(err_ptr, bits)


@triton.jit
def _weighted_bwd_kernel(pi_ptr, ids_ptr, gup_ptr, grad_ptr, n, B, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < B
    g = tl.load(ids_ptr + i, mask=m, other=-1)
    ok = m & (g >= 0) & (g < n)
    w = tl.load(pi_ptr + g, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gup_ptr).to(tl.float32)
    tl.store(grad_ptr + i, (up * scale * w).to(grad_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rgd_weight(x, T, inv_t1):
    return tl.exp(tl.minimum(x, T) * inv_t1)


@triton.jit
def _rgd_fwd_kernel(loss_ptr, out_ptr, part_ptr, cnt_ptr, B, chunk, T, inv_t1, inv_b,
                    SINGLE: tl.constexpr, BLOCK: tl.constexpr, PB: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        i = start + off + tl.arange(0, BLOCK)
        m = i < B
        x = tl.load(loss_ptr + i, mask=m, other=0.0).to(tl.float32)
        acc += tl.where(m, _rgd_weight(x, T, inv_t1) * x, 0.0)
    _finish_sum(acc, inv_b, out_ptr, part_ptr, cnt_ptr, SINGLE, PB)


@triton.jit
def _rgd_bwd_kernel(loss_ptr, gup_ptr, grad_ptr, B, T, inv_t1, inv_b, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < B
    x = tl.load(loss_ptr + i, mask=m, other=0.0).to(tl.float32)
    up = tl.load(gup_ptr).to(tl.float32)
    g = up * _rgd_weight(x, T, inv_t1) * inv_b
    tl.store(grad_ptr + i, g.to(grad_ptr.dtype.element_ty), mask=m)


def _counter(device: torch.device) -> torch.Tensor:
    # the ticket counter of one multi-program reduction (the batch above _SINGLE_MAX): zero before the launch
    return torch.zeros(1, dtype=torch.int32, device=device)


def _reduce_grid(B: int, chunk: int) -> Tuple[int, int, bool, int]:
    # Returns (programs, elements per program, single program?, partials per load).
    single_max = _SINGLE_MAX if chunk == _CHUNK else chunk
    if B <= single_max:
        return 1, max(B, 1), True, 16
    nprog = cdiv(B, chunk)
    return nprog, chunk, False, min(1024, next_power_of_2(nprog))


def _check_losses(losses: torch.Tensor) -> None:
    if losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError("losses must be a 1-D floating tensor")


class _WeightedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor,
                loss_scale: float, chunk: int, error_word: Optional[torch.Tensor]) -> torch.Tensor:
        B = losses.shape[0]
        out = torch.empty((), dtype=torch.float32, device=losses.device)
        nprog, ch, single, pb = _reduce_grid(B, chunk)
        part = out if single else torch.empty(nprog, dtype=torch.float32, device=losses.device)
        cnt = out if single else _counter(losses.device)
        check = error_word is not None
        launch(_weighted_fwd_kernel, nprog, losses.device, pi, group_ids, losses, out, part, cnt,
               error_word if check else out, pi.shape[0], B, ch, float(loss_scale), SINGLE=single, BLOCK=_BLOCK,
               PB=pb, CHECK=check)
        ctx.save_for_backward(pi, group_ids)
        ctx.loss_scale = float(loss_scale)
        ctx.loss_dtype = losses.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pi, group_ids = ctx.saved_tensors
        B = group_ids.shape[0]
        grad = torch.empty(B, dtype=ctx.loss_dtype, device=group_ids.device)
        if B > 0:
            launch(_weighted_bwd_kernel, cdiv(B, _BLOCK), grad.device,
                   pi, group_ids, grad_out.contiguous().to(torch.float32), grad, pi.shape[0], B,
                   ctx.loss_scale, BLOCK=_BLOCK)
        return None, None, grad, None, None, None


def flag_bad_batch_(error_word: torch.Tensor, n_groups: int, group_ids: Optional[torch.Tensor] = None,
                    losses: Optional[torch.Tensor] = None) -> None:
    """OR into ``error_word`` ID_OUT_OF_RANGE if an id lies outside [0, n_groups) and NON_FINITE_LOSS if a
    loss is NaN or inf (either input may be omitted); no host sync."""
    ref = group_ids if group_ids is not None else losses
    B = ref.shape[0]
    if B == 0:
        return
    launch(_check_batch_kernel, cdiv(B, _BLOCK), ref.device,
           group_ids if group_ids is not None else ref, losses if losses is not None else ref, error_word,
           n_groups, B, HAS_IDS=group_ids is not None, HAS_LOSSES=losses is not None, BLOCK=_BLOCK)


def weighted_loss(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor,
                  loss_scale: float, *, error_word: Optional[torch.Tensor] = None,
                  _chunk: int = _CHUNK) -> torch.Tensor:
    """loss_scale * sum_i pi[g_i] * l_i as a 0-dim float32 tensor; gradient flows into losses only.

    Ids outside [0, len(pi)) contribute 0 and get gradient 0. With ``error_word`` the same pass ORs
    the bits of ``flag_bad_batch_`` into it.
    """
    _check_losses(losses)
    if group_ids.dim() != 1 or group_ids.shape[0] != losses.shape[0]:
        raise ValueError("group_ids must be 1-D with one id per loss")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("group_ids must be int32 or int64")
    if pi.dim() != 1 or not pi.is_floating_point():
        raise ValueError("pi must be a 1-D floating tensor")
    if pi.device != losses.device or group_ids.device != losses.device:
        raise ValueError("pi, group_ids and losses must be on one device")
    return weighted_loss_checked(pi.detach().contiguous(), group_ids, losses, loss_scale, error_word, _chunk)


def weighted_loss_checked(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor, loss_scale: float,
                          error_word: Optional[torch.Tensor], _chunk: int = _CHUNK,
                          cache: Optional[dict] = None) -> torch.Tensor:
    """``weighted_loss`` for callers that have checked its arguments already (pi a contiguous buffer
    without gradient): the optimizers, every step. ``cache``: a dict the caller keeps between calls,
    in which the launch of the per-sample weights is kept for the next call."""
    if losses.dtype == torch.float32 and _chunk == _CHUNK:
        return _weighted_loss_native(pi, group_ids.contiguous(), losses.contiguous(), loss_scale, error_word, cache)
    return _WeightedLoss.apply(pi, group_ids.contiguous(), losses.contiguous(), loss_scale, _chunk, error_word)


_WEIGHTS_VARYING = (1, 2, 3, 4)  # ids, losses, weights, error word (or the weights): new tensors every call


def _weighted_loss_native(pi: torch.Tensor, group_ids: torch.Tensor, losses: torch.Tensor, loss_scale: float,
                          error_word: Optional[torch.Tensor], cache: Optional[dict] = None) -> torch.Tensor:
    # float32 losses: the per-sample weights from one kernel, then torch.dot, whose backward (grad * w)
    # torch's autograd runs without Python: less host time per step than a Python autograd Function
    B = losses.shape[0]
    w = torch.empty(B, dtype=torch.float32, device=losses.device)
    if B:
        check = error_word is not None
        scale = float(loss_scale)
        launch_cached(cache, (pi.data_ptr(), pi.shape[0], B, scale, check), _sample_weights_kernel,
                      cdiv(B, _BLOCK), losses.device,
                      (pi, group_ids, losses, w, error_word if check else w, pi.shape[0], B, scale), _WEIGHTS_VARYING,
                      CHECK=check, BLOCK=_BLOCK)
    return torch.dot(w, losses)


class _RGDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, losses: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        B = losses.shape[0]
        T = float(temperature)
        out = torch.empty((), dtype=torch.float32, device=losses.device)
        nprog, ch, single, pb = _reduce_grid(B, chunk)
        part = out if single else torch.empty(nprog, dtype=torch.float32, device=losses.device)
        cnt = out if single else _counter(losses.device)
        launch(_rgd_fwd_kernel, nprog, losses.device, losses, out, part, cnt, B, ch, T, 1.0 / (T + 1.0), 1.0 / B,
               SINGLE=single, BLOCK=_BLOCK, PB=pb)
        ctx.save_for_backward(losses)
        ctx.temperature = T
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (losses,) = ctx.saved_tensors
        B = losses.shape[0]
        T = ctx.temperature
        grad = torch.empty_like(losses)
        launch(_rgd_bwd_kernel, cdiv(B, _BLOCK), losses.device,
               losses, grad_out.contiguous().to(torch.float32), grad, B, T, 1.0 / (T + 1.0), 1.0 / B, BLOCK=_BLOCK)
        return grad, None, None


def rgd_loss(losses: torch.Tensor, temperature: float, *, _chunk: int = _CHUNK) -> torch.Tensor:
    """mean_i(w_i * l_i), w_i = exp(min(l_i, T) / (T + 1)) detached; a 0-dim float32 tensor.

    dL/dl_i = w_i / B.  Raises ValueError for an empty batch.
    """
    _check_losses(losses)
    if losses.shape[0] == 0:
        raise ValueError("rgd_loss needs a non-empty batch")
    if not float(temperature) > -1.0:
        raise ValueError("temperature must be greater than -1")
    return _RGDLoss.apply(losses.contiguous(), temperature, _chunk)
