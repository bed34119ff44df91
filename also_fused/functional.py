"""Pure-torch reference math: the source of truth for every other path, and the CPU fallback.

Each function states its formula in ALGORITHM.md's notation. The Triton kernels in
``also_fused.kernels`` compute the same functions; the tests compare both with float64 models.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def _fp32(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, 1.0 - beta2**step


def adam_moments_reference(
    sources: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Optional[Sequence[Tensor]],
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
    grad_scale: float = 1.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    out: Optional[tuple[list[Tensor], list[Tensor], Optional[list[Tensor]]]] = None,
) -> tuple[list[Tensor], list[Tensor], Optional[list[Tensor]]]:
    """Advance the Adam moments: d = s*g (+ wd*x unless decoupled); m <- b1 m + (1-b1) d; v <- b2 v + (1-b2) d^2.

    Writes into ``out`` (new fp32 tensors when ``out`` is None, so that the state is untouched) and
    returns (m, v, vmax); vmax = max(vmax, v) when amsgrad state is given.
    """
    xs = _fp32(sources)
    ds = _fp32(grads)
    if maximize:
        ds = torch._foreach_neg(ds)
    if grad_scale != 1.0:
        ds = torch._foreach_mul(ds, grad_scale)
    if weight_decay != 0.0 and not decoupled_weight_decay:
        ds = torch._foreach_add(ds, xs, alpha=weight_decay)
    if out is None:
        ms = [m.clone() for m in exp_avgs]
        vs = [v.clone() for v in exp_avg_sqs]
        vmaxs = None if max_exp_avg_sqs is None else [v.clone() for v in max_exp_avg_sqs]
    else:
        ms, vs, vmaxs = out
        if ms is not exp_avgs:
            torch._foreach_copy_(ms, exp_avgs)
            torch._foreach_copy_(vs, exp_avg_sqs)
            if vmaxs is not None:
                torch._foreach_copy_(vmaxs, max_exp_avg_sqs)
    torch._foreach_lerp_(ms, ds, 1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, ds, ds, value=1.0 - beta2)
    if vmaxs is not None:
        torch._foreach_maximum_(vmaxs, vs)
    return ms, vs, vmaxs


def adam_apply_reference(
    sources: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    steps: Sequence[float],
    destinations: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    eps_mode: str = "also",
    decoupled_weight_decay: bool = False,
) -> None:
    """x_new = x - lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps)   (eps_mode "also", ALGORITHM.md sec. 3)
    x_new = x - lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)       (eps_mode "torch", torch.optim.Adam)
    with bc_k = 1 - beta_k^t; AdamW first scales x by (1 - lr*wd)."""
    for x, m, v, t, dst in zip(sources, exp_avgs, second_moments, steps, destinations):
        bc1, bc2 = _bias_corrections(t, beta1, beta2)
        xf = x.float()
        if decoupled_weight_decay and weight_decay != 0.0:
            xf = xf * (1.0 - lr * weight_decay)
        if eps_mode == "also":
            denom = v.sqrt().add_(eps)
            new = xf.addcdiv(m, denom, value=-lr * math.sqrt(bc2) / bc1)
        else:
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            new = xf.addcdiv(m, denom, value=-lr / bc1)
        dst.copy_(new)


def scatter_group_losses(losses: Tensor, group_ids: Tensor, n_groups: int) -> Tensor:
    """S_j = sum_{i: g_i = j} l_i (fp32, repeated ids add up); G of ALGORITHM.md is -S."""
    sums = torch.zeros(n_groups, dtype=torch.float32, device=losses.device)
    sums.index_add_(0, group_ids, losses.detach().float())
    return sums


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
    c = pi_decay * pi_lr
    # float64 here: a float32 sum of ~1e5 near-equal terms drifts by ~1e-6 per step
    z = torch.log(pi.double() + eps)
    if log_pi_reg is not None:
        z = z.add(log_pi_reg.double(), alpha=c)
    sums = scatter_group_losses(losses, group_ids, pi.numel())
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
) -> None:
    """One Adam-style update of many tensors: the reference twin of ``kernels.multi_tensor_adam_``.

    For tensor i with hyper-parameters ``hyper[hyper_rows[i]] = (lr, beta1, beta2, eps, wd)`` and
    ``t = steps[i]`` (the step count of the LAST moment advance of this call):
      1. ``prior_grads``: the moments first advance with ``prior_scale * prior_grads`` from x;
      2. x1 = x + AdamStep(x, grad_scale * grad) is written to ``destinations``;
      3. ``extrapolate_to``: y = x1 + AdamStep(x1, extrapolation_scale * grad) is written there.
    ``commit_state=False`` computes with copies of the moments and leaves the state untouched.
    ``save_sources_to`` / ``save_grads_to`` receive copies of x / the raw grad.
    """
    if not commit_state and (prior_grads is not None or extrapolate_to is not None):
        raise ValueError("commit_state=False only applies to a single update")
    rows: dict[int, list[int]] = {}
    for i, row in enumerate(hyper_rows):
        rows.setdefault(row, []).append(i)
    for row, idx in rows.items():
        lr, beta1, beta2, eps, weight_decay = hyper[row]
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        xs, gs, ms, vs, vmaxs = pick(sources), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs)
        dsts = pick(destinations)
        last_steps = [float(steps[i]) for i in idx]
        n_advances = 1 + (prior_grads is not None) + (extrapolate_to is not None)
        first_step = [t - n_advances + 1 for t in last_steps]
        if save_sources_to is not None:
            torch._foreach_copy_(pick(save_sources_to), xs)
            xs = pick(save_sources_to)  # the destination may alias the source
        moment_kw = dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay)
        apply_kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        eps_mode=eps_mode, decoupled_weight_decay=decoupled_weight_decay)
        state = (ms, vs, vmaxs) if commit_state else None
        if prior_grads is not None:
            adam_moments_reference(xs, pick(prior_grads), ms, vs, vmaxs, grad_scale=prior_scale,
                                   out=state, **moment_kw)
        m1, v1, vmax1 = adam_moments_reference(xs, gs, ms, vs, vmaxs, grad_scale=grad_scale, out=state,
                                               **moment_kw)
        main_step = [t + (prior_grads is not None) for t in first_step]
        # the second moment used in the denominator: the running max under amsgrad
        adam_apply_reference(xs, m1, v1 if vmax1 is None else vmax1, main_step, dsts, **apply_kw)
        if extrapolate_to is not None:
            adam_moments_reference(dsts, gs, ms, vs, vmaxs, grad_scale=extrapolation_scale, out=state,
                                   **moment_kw)
            adam_apply_reference(dsts, ms, vs if vmaxs is None else vmaxs, last_steps, pick(extrapolate_to),
                                 **apply_kw)
        if save_grads_to is not None:  # last: it may alias prior_grads
            torch._foreach_copy_(pick(save_grads_to), gs)
