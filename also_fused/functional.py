"""Pure-torch reference math: the source of truth for every other path, and the CPU fallback.

Each function states its formula in ALGORITHM.md's notation. The Triton kernels in
``also_fused.kernels`` compute the same functions; the tests compare both with float64 models.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels.layout import QUANT_BLOCK, QUANT_M_BITS, QUANT_V_BITS, code_constants, quant_blocks

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def _advance_moments(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, vmax: Optional[Tensor], *, scale: float,
                     beta1: float, beta2: float, weight_decay: float, maximize: bool, decoupled: bool,
                     out: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None,
                     ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """d = s*g (+ wd*x unless decoupled); m <- b1 m + (1-b1) d; v <- b2 v + (1-b2) d^2; vmax <- max(vmax, v).

    In place when ``out`` is None, else written to ``out`` with the inputs untouched.
    """
    d = grad.float()
    if maximize or scale != 1.0:
        d = d * (-scale if maximize else scale)
    if weight_decay != 0.0 and not decoupled:
        d = d.add(x, alpha=weight_decay)
    if out is None:
        m.lerp_(d, 1.0 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
        if vmax is not None:
            torch.maximum(vmax, v, out=vmax)
        return m, v, vmax
    m_out, v_out, vmax_out = out
    torch.lerp(m, d, 1.0 - beta1, out=m_out)
    torch.mul(v, beta2, out=v_out).addcmul_(d, d, value=1.0 - beta2)
    if vmax is not None:
        torch.maximum(vmax, v_out, out=vmax_out)
    return m_out, v_out, vmax_out


def _apply_step(x: Tensor, m: Tensor, v: Tensor, t: float, dst: Tensor, *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, eps_mode: str, decoupled: bool) -> Tensor:
    """x_new = x - lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps)   (eps_mode "also", ALGORITHM.md sec. 3)
    x_new = x - lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)       (eps_mode "torch", torch.optim.Adam)
    with bc_k = 1 - beta_k^t; AdamW first scales x by (1 - lr*wd). Returns x_new in float32."""
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    if decoupled and weight_decay != 0.0:
        x = x * (1.0 - lr * weight_decay)
    if eps_mode == "also":
        denom = v.sqrt().add_(eps)
        step_size = lr * math.sqrt(bc2) / bc1
    else:
        denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
        step_size = lr / bc1
    if dst is x:
        return dst.addcdiv_(m, denom, value=-step_size)
    if dst.dtype == torch.float32:
        return torch.addcdiv(x, m, denom, value=-step_size, out=dst)
    new = torch.addcdiv(x, m, denom, value=-step_size)
    dst.copy_(new)
    return new


def scatter_group_losses(losses: Tensor, group_ids: Tensor, n_groups: int) -> Tensor:
    """S_j = sum_{i: g_i = j} l_i (fp32, repeated ids add up); G of ALGORITHM.md is -S."""
    sums = torch.zeros(n_groups, dtype=torch.float32, device=losses.device)
    sums.index_add_(0, group_ids, losses.detach().float())
    return sums


def group_counts(group_ids: Tensor, n_groups: int) -> Tensor:
    """C_j = number of samples of the batch in group j (float32 [n_groups]); no host sync."""
    counts = torch.zeros(n_groups, dtype=torch.float32, device=group_ids.device)
    return counts.index_add_(0, group_ids, torch.ones(group_ids.shape, dtype=torch.float32, device=group_ids.device))


def group_counts_per_sample(group_ids: Tensor, n_groups: int) -> Tensor:
    """c_i = number of samples of the batch in group g_i (float32 [B]); dense count, no host sync."""
    return group_counts(group_ids, n_groups)[group_ids]


def group_mean_sample_weights(pi: Tensor, group_ids: Tensor, n_groups: int) -> Tensor:
    """w_i = pi[g_i] / (c_i * M), M = sum of pi over the groups present (= sum_i pi[g_i] / c_i).

    sum_i w_i l_i = sum_{j present} pi_j mean_j / M: group-mean reduction of the weighted loss.
    """
    per_sample = pi.detach()[group_ids].float() / group_counts_per_sample(group_ids, n_groups)
    return per_sample / per_sample.sum()


def group_mean_sample_weights_from_counts(pi: Tensor, group_ids: Tensor, counts: Tensor, scale: int) -> Tensor:
    """w_i = scale * pi[g_i] / (C[g_i] M), M = sum of pi over the groups with C_j > 0.

    C counts a larger batch that holds this one (every rank's, with ``scale`` = the number of
    ranks): the average over the ranks of sum_i w_i l_i is then the group-mean loss of that batch.
    """
    pi = pi.detach().float()
    present_mass = (pi * (counts > 0)).sum()
    return pi[group_ids] / counts[group_ids] * (scale / present_mass)


def pi_step_terms(losses: Tensor, group_ids: Tensor, n_groups: int, reduction: str) -> Tensor:
    """The per-sample terms whose per-group sums make S: l_i ("sum"), or l_i / c_i ("mean": S_j = mean_j)."""
    losses = losses.float()
    if reduction == "mean":
        losses = losses / group_counts_per_sample(group_ids, n_groups)
    return losses


def pi_update_reference(
    pi: Tensor,
    group_ids: Tensor,
    losses: Tensor,
    *,
    pi_lr: float,
    pi_decay: float,
    temperature: float,
    eps: float,
    log_pi_reg: Optional[Tensor] = None,
) -> Tensor:
    """PiUpdate (ALGORITHM.md sec. 4): z = (log(pi+eps) + c log(pi_reg) + pi_lr*S)/(1+c), softmax(z/T), c = pi_decay*pi_lr.

    A uniform pi_reg (``log_pi_reg=None``) adds a constant to z, which the softmax cancels.
    """
    sums = scatter_group_losses(losses, group_ids, pi.numel())
    return pi_update_from_sums(pi, sums, pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature, eps=eps,
                               log_pi_reg=log_pi_reg)


def pi_update_from_sums(pi: Tensor, sums: Tensor, *, pi_lr: float, pi_decay: float, temperature: float, eps: float,
                        log_pi_reg: Optional[Tensor] = None) -> Tensor:
    """PiUpdate from the dense per-group sums S (= -G) of the batch."""
    c = pi_decay * pi_lr
    # float64 here: a float32 sum of ~1e5 near-equal terms drifts by ~1e-6 per step
    z = torch.log(pi.double() + eps)
    if log_pi_reg is not None:
        z = z.add(log_pi_reg.double(), alpha=c)
    z = z.add_(sums.double(), alpha=pi_lr).div_((1.0 + c) * temperature)
    return torch.softmax(z, dim=0).float()


def weighted_loss_reference(pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float) -> Tensor:
    """loss_scale * sum_i pi[g_i] * l_i, differentiable in the losses only (pi is a buffer)."""
    weights = pi.detach()[group_ids].to(losses.dtype)
    return (weights * losses).sum().float() * loss_scale


def rgd_loss_reference(losses: Tensor, temperature: float) -> Tensor:
    """RGD (ALGORITHM.md sec. 8): mean_i w_i l_i with w_i = exp(min(l_i, T)/(T+1)), w detached."""
    weights = torch.exp(losses.detach().float().clamp(max=temperature) / (temperature + 1.0))
    return (weights * losses.float()).mean()


def select_batch_reference(
    pi: Tensor,
    threshold: float,
    strategy: str = "pi",
    order: str = "desc",
    generator: Optional[torch.Generator] = None,
) -> tuple[int, Tensor]:
    """Sort pi, cutoff = searchsorted(cumsum, threshold) + 1, batch = max(1, n - cutoff) distinct ids.

    ``strategy="pi"`` draws them proportionally to pi without replacement, ``"uniform"`` uniformly.
    """
    if strategy not in ("pi", "uniform"):
        raise ValueError(f"strategy must be 'pi' or 'uniform', got {strategy!r}")
    if order not in ("desc", "asc"):
        raise ValueError(f"order must be 'desc' or 'asc', got {order!r}")
    n = pi.numel()
    sorted_pi, _ = torch.sort(pi.float(), descending=(order == "desc"))
    cumulative = torch.cumsum(sorted_pi, dim=0)
    threshold_t = torch.tensor([threshold], dtype=cumulative.dtype, device=cumulative.device)
    cutoff = int(torch.searchsorted(cumulative, threshold_t, side="left").item()) + 1
    batch_size = max(1, n - cutoff)
    gen_device = generator.device if generator is not None else pi.device
    if strategy == "uniform":
        ids = torch.randperm(n, generator=generator, device=gen_device)[:batch_size]
    else:
        probs = pi.float().to(gen_device)
        ids = torch.multinomial(probs, batch_size, replacement=False, generator=generator)
    return batch_size, ids.to(pi.device)


# 8-bit moments (state_precision="int8"): a tensor's storage in blocks of QUANT_BLOCK consecutive elements,
# each with a power-of-two scale s (the smallest above the block's largest |x|, within [2^(2^E - 126), 2^127]),
# and per element a code c: a float of M mantissa bits counting up from o = s / 2^(2^E), E exponent bits
# wide (m: a sign bit and (E, M) = (3, 4); v: (5, 3); kernels/layout.py):
#     t = |x| + o  (float32),   c = min((bits(t) - bits(o) + 2^(22-M)) >> (23-M), 2^(E+M) - 1)
#     |x| = float(bits(o) + c * 2^(23-M)) - o  (float32)
# i.e. |x| rounded (halves up) to M significant bits relative to o, the bottom binade linear like IEEE
# subnormals; m's sign is code bit 7. c = 0 decodes to exactly 0. Relative to s the smallest non-zero
# values are 2^-12 (m) and 2^-35 (v): v's code stays non-zero wherever m's does (v ~ m^2 relative to
# their scales), so m / sqrt(v) does not divide by a zero v. Per element an integer add and a float add
# each way (benchmarks/bench_quant_codes.py measures the error against other codes).
QUANT_DTYPES = {True: torch.int8, False: torch.uint8}  # signed (m), unsigned (v)
_SIGN_BIT = -(2 ** 31)


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


def adam_update_reference(
    sources: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    destinations: Sequence[Tensor],
    hyper: Sequence[tuple[float, float, float, float, float]],
    hyper_rows: Sequence[int],
    *,
    max_exp_avg_sqs: Optional[Sequence[Tensor]] = None,
    eps_mode: str = "also",
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    save_sources_to: Optional[Sequence[Tensor]] = None,
    save_grads_to: Optional[Sequence[Tensor]] = None,
    extrapolate_to: Optional[Sequence[Tensor]] = None,
    extrapolation_scale: float = 1.0,
    prior_grads: Optional[Sequence[Tensor]] = None,
    prior_scale: float = 1.0,
    commit_state: bool = True,
    exp_avg_scales: Optional[Sequence[Tensor]] = None,
    exp_avg_sq_scales: Optional[Sequence[Tensor]] = None,
) -> None:
    """One Adam-style update of many tensors: the reference twin of ``kernels.multi_tensor_adam_``.

    For tensor i with hyper-parameters ``hyper[hyper_rows[i]] = (lr, beta1, beta2, eps, wd)`` and
    ``steps[i]`` the step count before the call (advanced by one per moment advance below, and
    written back when ``commit_state``):
      1. ``prior_grads``: the moments first advance with ``prior_scale * prior_grads`` from x;
      2. x1 = x + AdamStep(x, grad_scale * grad) is written to ``destinations``;
      3. ``extrapolate_to``: y = x1 + AdamStep(x1, extrapolation_scale * grad) is written there
         (from x1 as stored, i.e. rounded to the param dtype).
    ``commit_state=False`` leaves the moments untouched. ``save_sources_to`` / ``save_grads_to``
    receive copies of x / the raw grad. Moments stored below float32 (bf16, fp16) are read into float32,
    carried in float32 through all the advances of the call and rounded to nearest once when written
    back. With ``exp_avg_scales`` / ``exp_avg_sq_scales`` the moments are 8-bit codes (int8 m, uint8 v,
    see ``quantize_moment_``): decoded at the start of the call and encoded once at its end.
    One tensor at a time: on a CPU that keeps it in cache.
    """
    if not commit_state and (prior_grads is not None or extrapolate_to is not None):
        raise ValueError("commit_state=False only applies to a single update")
    n_advances = 1 + (prior_grads is not None) + (extrapolate_to is not None)
    quantized = exp_avg_scales is not None
    if quantized and max_exp_avg_sqs is not None:
        raise ValueError("8-bit moments do not support amsgrad")
    for i, x in enumerate(sources):
        lr, beta1, beta2, eps, weight_decay = hyper[hyper_rows[i]]
        moment_kw = dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                         decoupled=decoupled_weight_decay)
        apply_kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, eps_mode=eps_mode,
                        decoupled=decoupled_weight_decay)
        t = float(steps[i]) + 1
        grad, stored = grads[i], (exp_avgs[i], exp_avg_sqs[i], None if max_exp_avg_sqs is None else max_exp_avg_sqs[i])
        # the moments are carried in float32 through the call and rounded (or encoded) once when stored;
        # .float() of float32 moments is the tensor itself
        if quantized:
            m = dequantize_moment(stored[0], exp_avg_scales[i], signed=True)
            v = dequantize_moment(stored[1], exp_avg_sq_scales[i], signed=False)
            vmax = None
        else:
            m, v, vmax = (None if t is None else t.float() for t in stored)
        xf = x.float()
        if save_sources_to is not None:
            save_sources_to[i].copy_(x)
        if prior_grads is not None:
            _advance_moments(xf, prior_grads[i], m, v, vmax, scale=prior_scale, **moment_kw)
            t += 1
        out = None
        if not commit_state:
            out = (torch.empty_like(m), torch.empty_like(v), None if vmax is None else torch.empty_like(vmax))
        m1, v1, vmax1 = _advance_moments(xf, grad, m, v, vmax, scale=grad_scale, out=out, **moment_kw)
        x1 = _apply_step(xf, m1, v1 if vmax1 is None else vmax1, t, destinations[i], **apply_kw)
        if extrapolate_to is not None:
            x1 = destinations[i].float()
            _advance_moments(x1, grad, m, v, vmax, scale=extrapolation_scale, **moment_kw)
            _apply_step(x1, m, v if vmax is None else vmax, t + 1, extrapolate_to[i], **apply_kw)
        if save_grads_to is not None:  # last: it may alias prior_grads
            save_grads_to[i].copy_(grad)
        if commit_state and quantized:
            quantize_moment_(m, stored[0], exp_avg_scales[i], signed=True)
            quantize_moment_(v, stored[1], exp_avg_sq_scales[i], signed=False)
        elif commit_state:
            for kept, computed in zip(stored, (m, v, vmax)):
                if kept is not None and kept is not computed:
                    kept.copy_(computed)
    if commit_state:
        torch._foreach_add_(list(steps), float(n_advances))
