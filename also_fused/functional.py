"""Pure-torch reference math: the source of truth for every other path, and the fallback where none runs.

Each function states its formula in the notation of docs/algorithm.md. The CPU extension
(``cpu_fused``) and the Triton kernels (``also_fused.kernels``) compute the same functions; the tests
compare every path with float64 models. Imports only torch and the package's own contract modules.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

# the 8-bit moment code lives in ``storage``; these names stay reachable here as before
from .storage import (QUANT_BLOCK, QUANT_DTYPES, dequantize_legacy_moment, dequantize_moment,  # noqa: F401
                      is_legacy_scales, quant_blocks, quantize_moment_)
from .rounding import stochastic_round, stream_key
from .update_spec import AdamSpec, AdamTensors, GradScaling, HyperRow, keyword_form

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
                eps: float, weight_decay: float, eps_mode: str, decoupled: bool, rounding_seed: Optional[int] = None
                ) -> Tensor:
    """x_new = x - lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps)   (eps_mode "also", docs/algorithm.md sec. 3)
    x_new = x - lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)       (eps_mode "torch", torch.optim.Adam)
    with bc_k = 1 - beta_k^t; AdamW first scales x by (1 - lr*wd). Returns x_new in float32. With
    ``rounding_seed`` a bfloat16 or float16 ``dst`` takes x_new rounded stochastically (sec. 14; the bits of step t)."""
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
    if rounding_seed is not None and dst.dtype in (torch.bfloat16, torch.float16):
        dst.copy_(stochastic_round(new, stream_key(rounding_seed, int(t)), dst.dtype))
    else:
        dst.copy_(new)
    return new


# An id outside [0, n_groups) takes no part on every path (validate=False lets such ids through): it weighs
# 0 in the loss, adds nothing to the group sums and is not counted (docs/semantics.md). The ops below
# index with ids clamped into the range and mask those samples out; for ids in range they compute the
# same values as plain indexing.
def in_range(group_ids: Tensor, n_groups: int) -> Tensor:
    """Which samples' ids lie in [0, n_groups)."""
    return (group_ids >= 0) & (group_ids < n_groups)


def gather_weights(pi: Tensor, group_ids: Tensor) -> Tensor:
    """pi[g_i] per sample, 0 for an id outside [0, n_groups)."""
    n = pi.numel()
    return torch.where(in_range(group_ids, n), pi[group_ids.clamp(0, n - 1)], 0.0)


def scatter_group_losses(losses: Tensor, group_ids: Tensor, n_groups: int) -> Tensor:
    """S_j = sum_{i: g_i = j} l_i (fp32, repeated ids add up); G of docs/algorithm.md is -S."""
    sums = torch.zeros(n_groups, dtype=torch.float32, device=losses.device)
    terms = torch.where(in_range(group_ids, n_groups), losses.detach().float(), 0.0)
    sums.index_add_(0, group_ids.clamp(0, n_groups - 1), terms)
    return sums


def group_counts(group_ids: Tensor, n_groups: int) -> Tensor:
    """C_j = number of samples of the batch in group j (float32 [n_groups]); no host sync."""
    counts = torch.zeros(n_groups, dtype=torch.float32, device=group_ids.device)
    return counts.index_add_(0, group_ids.clamp(0, n_groups - 1), in_range(group_ids, n_groups).float())


def group_counts_per_sample(group_ids: Tensor, n_groups: int, counts: Optional[Tensor] = None) -> Tensor:
    """c_i = number of samples of the batch in group g_i (float32 [B]), from ``counts`` (default: this batch's
    ``group_counts``); dense, no host sync. At least 1: a sample in range counts itself, and one outside it is
    masked out by whoever divides by c_i."""
    counts = group_counts(group_ids, n_groups) if counts is None else counts
    return counts[group_ids.clamp(0, n_groups - 1)].clamp_min(1.0)


def group_mean_sample_weights(pi: Tensor, group_ids: Tensor, n_groups: int) -> Tensor:
    """w_i = pi[g_i] / (c_i * M), M = sum of pi over the groups present (= sum_i pi[g_i] / c_i).

    sum_i w_i l_i = sum_{j present} pi_j mean_j / M: group-mean reduction of the weighted loss.
    """
    per_sample = gather_weights(pi.detach(), group_ids).float() / group_counts_per_sample(group_ids, n_groups)
    return per_sample / per_sample.sum()


def group_mean_sample_weights_from_counts(pi: Tensor, group_ids: Tensor, counts: Tensor, scale: int) -> Tensor:
    """w_i = scale * pi[g_i] / (C[g_i] M), M = sum of pi over the groups with C_j > 0.

    C counts a larger batch that holds this one (every rank's, with ``scale`` = the number of
    ranks): the average over the ranks of sum_i w_i l_i is then the group-mean loss of that batch.
    """
    pi = pi.detach().float()
    present_mass = (pi * (counts > 0)).sum()
    per_sample_counts = group_counts_per_sample(group_ids, pi.numel(), counts)
    return gather_weights(pi, group_ids) / per_sample_counts * (scale / present_mass)


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
    """PiUpdate (docs/algorithm.md sec. 4): z = (log(pi+eps) + c log(pi_reg) + pi_lr*S)/(1+c), softmax(z/T), c = pi_decay*pi_lr.

    A uniform pi_reg (``log_pi_reg=None``) adds a constant to z, which the softmax cancels.
    """
    sums = scatter_group_losses(losses, group_ids, pi.numel())
    return pi_update_from_sums(pi, sums, pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature, eps=eps,
                               log_pi_reg=log_pi_reg)


def pi_update_from_sums(pi: Tensor, sums: Optional[Tensor], *, pi_lr: float, pi_decay: float, temperature: float,
                        eps: float, log_pi_reg: Optional[Tensor] = None) -> Tensor:
    """PiUpdate from the dense per-group sums S (= -G) of the batch: pi_new = exp(z - max z) / sum_j exp(z_j - max z)
    with z of ``pi_logits``, the sum taken in blocks (``PI_BLOCK``, ``pi_exp_blocks``, ``combine_block_sums``) so
    that ranks that own whole blocks of pi compute the same bits (docs/algorithm.md sec. 4)."""
    z, zmax = ReferencePiPhases.logits(pi, None, None, sums, pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature,
                                       eps=eps, log_pi_reg=log_pi_reg)
    partials = pi_exp_blocks(z, zmax)
    return pi_scale(z, combine_block_sums(partials), torch.empty(z.shape, dtype=torch.float32, device=z.device))


# The normaliser of the pi step is summed in blocks of PI_BLOCK groups, block after block: the partial sum of
# block b covers groups [b PI_BLOCK, (b + 1) PI_BLOCK) and the total adds the partials in block order, so that
# a rank that owns whole blocks (``shard_bounds``) computes its partials exactly as a single process does.
PI_BLOCK = 1 << 14


def _piecewise_(t: Tensor, op: Callable[[Tensor], Any]) -> None:
    """``op`` in place on ``t``, block by block on a CPU: torch's CPU kernels compute a transcendental function
    with vector code in the body of a range and with scalar code in its tail, and split a long range between
    threads, so that an entry's bits would depend on where it lies; in blocks of PI_BLOCK (one thread each,
    the tail only in a last partial block) they depend on its place in its block alone. One op elsewhere."""
    if t.device.type == "cpu" and t.numel() > PI_BLOCK:
        for piece in t.split(PI_BLOCK):
            op(piece)
    else:
        op(t)


def blockwise_log(t: Tensor) -> Tensor:
    """log(t) as a new tensor, each entry's bits independent of its place in ``t`` (``_piecewise_``): the log of
    pi_reg, alike for a shard of it and for the whole."""
    out = t.clone()
    _piecewise_(out, Tensor.log_)
    return out


def pi_logits(pi: Tensor, sums: Optional[Tensor], *, pi_lr: float, pi_decay: float, temperature: float, eps: float,
              log_pi_reg: Optional[Tensor] = None) -> Tensor:
    """z_j = (log(pi_j + eps) + c log(pi_reg_j) + pi_lr S_j) / ((1 + c) T) in float64 (a new tensor), c = pi_decay
    * pi_lr; ``sums=None``: S = 0. Every entry from its own inputs, whatever the length of ``pi``."""
    c = pi_decay * pi_lr
    z = pi.double().add_(eps)
    _piecewise_(z, Tensor.log_)
    # products and sums as separate ops (each rounded once, in the body and the tail of a range alike)
    if log_pi_reg is not None:
        z.add_(log_pi_reg.double().mul_(c))
    if sums is not None:
        z.add_(sums.double().mul_(pi_lr))
    return z.div_((1.0 + c) * temperature)


def pi_exp_blocks(z: Tensor, zmax: Tensor) -> Tensor:
    """z <- exp(z - zmax) in place; returns the float64 sum of each block of PI_BLOCK entries (the last one
    partial; z starts at a block boundary): what ``combine_block_sums`` adds up."""
    z.sub_(zmax)
    if z.device.type != "cpu":
        z.exp_()
        full = z.numel() // PI_BLOCK * PI_BLOCK
        parts = [z[:full].view(-1, PI_BLOCK).sum(1)]
        if full < z.numel():
            parts.append(z[full:].sum().reshape(1))
        return torch.cat(parts)
    pieces = z.split(PI_BLOCK)
    partials = torch.empty(len(pieces), dtype=torch.float64)
    for b, piece in enumerate(pieces):
        piece.exp_()
        partials[b] = piece.sum()
    return partials


def combine_block_sums(partials: Tensor) -> Tensor:
    """The normaliser: the block partials added one after another in block order (0-d float64; on a CPU the
    serial scan of ``torch.cumsum``)."""
    if partials.numel() == 0:
        return partials.new_zeros(())
    return torch.cumsum(partials, 0)[-1]


def pi_scale(e: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """out = float32(e * (1 / total)): the pi step's result from the exponentials and the normaliser (``e`` is
    overwritten)."""
    return out.copy_(e.mul_(torch.reciprocal(total)))


class ReferencePiPhases:
    """The pi step in the phases a rank with a shard of pi takes, as torch ops (``pi_update_from_sums``): logits
    and their max, then exponentials and block partials against the max over every rank, then the scaling by
    1 / the sum of every rank's partials in block order."""

    @staticmethod
    def logits(pi: Tensor, group_ids: Optional[Tensor], losses: Optional[Tensor], sums: Optional[Tensor], *,
               pi_lr: float, pi_decay: float, temperature: float, eps: float,
               log_pi_reg: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(z, max z) of ``pi_logits``; S from (ids, losses) as ``scatter_group_losses`` adds them, or ``sums``."""
        if group_ids is not None:
            sums = scatter_group_losses(losses, group_ids, pi.numel())
        z = pi_logits(pi, sums, pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature, eps=eps,
                      log_pi_reg=log_pi_reg)
        return z, (z.max() if z.numel() else z.new_full((), float("-inf")))

    exp_blocks = staticmethod(pi_exp_blocks)
    scale = staticmethod(pi_scale)


def weighted_loss_reference(pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float) -> Tensor:
    """loss_scale * sum_i pi[g_i] * l_i, differentiable in the losses only (pi is a buffer)."""
    weights = gather_weights(pi.detach(), group_ids).to(losses.dtype)
    return (weights * losses).sum().float() * loss_scale


def rgd_loss_reference(losses: Tensor, temperature: float) -> Tensor:
    """RGD (docs/algorithm.md sec. 8): mean_i w_i l_i with w_i = exp(min(l_i, T)/(T+1)), w detached."""
    weights = torch.exp(losses.detach().float().clamp(max=temperature) / (temperature + 1.0))
    return (weights * losses.float()).mean()


def select_batch_reference(
    pi: Tensor,
    threshold: float,
    strategy: str = "pi",
    order: str = "desc",
    generator: Optional[torch.Generator] = None,
) -> tuple[int, Tensor]:
    """Sort pi, cutoff = searchsorted(cumsum, threshold) + 1 (the cumulative mass in float64), batch =
    max(1, n - cutoff) distinct ids.

    ``strategy="pi"`` draws them proportionally to pi without replacement, ``"uniform"`` uniformly.
    """
    _check_selection(strategy, order)
    sorted_pi, _ = torch.sort(pi.float(), descending=(order == "desc"))
    cumulative = torch.cumsum(sorted_pi.double(), dim=0)
    threshold_t = torch.tensor([threshold], dtype=cumulative.dtype, device=cumulative.device)
    cutoff = int(torch.searchsorted(cumulative, threshold_t, side="left").item()) + 1
    return _draw_batch(pi, max(1, pi.numel() - cutoff), strategy, generator)


# up to this many groups the sort is cheaper than the search's passes: on a CPU, and on a GPU up to ~1e8
# (H100, benchmarks/results/select_h100.json: select_batch with the sort 1.4 ms at 1e7 groups against 3.5
# with the search, 9.2 against 8.5 at 1e8; 2^26 lies between)
SORTED_CUTOFF_MAX_GROUPS = 1 << 16
SORTED_CUTOFF_MAX_GROUPS_GPU = 1 << 26


def select_batch(pi: Tensor, threshold: float, strategy: str = "pi", order: str = "desc",
                 generator: Optional[torch.Generator] = None,
                 cutoff: Optional[Callable[[Tensor, float, str], int]] = None) -> tuple[int, Tensor]:
    """``select_batch_reference``; past ``SORTED_CUTOFF_MAX_GROUPS`` groups (``SORTED_CUTOFF_MAX_GROUPS_GPU`` on a
    GPU) without the sort: the cutoff from ``cutoff`` (a backend's search over pi's values; default
    ``mass_cutoff``)."""
    if pi.numel() <= (SORTED_CUTOFF_MAX_GROUPS if pi.device.type == "cpu" else SORTED_CUTOFF_MAX_GROUPS_GPU):
        return select_batch_reference(pi, threshold, strategy, order, generator)
    _check_selection(strategy, order)
    position = (cutoff or mass_cutoff)(pi, threshold, order)
    return _draw_batch(pi, max(1, pi.numel() - position), strategy, generator)


def _check_selection(strategy: str, order: str) -> None:
    if strategy not in ("pi", "uniform"):
        raise ValueError(f"strategy must be 'pi' or 'uniform', got {strategy!r}")
    if order not in ("desc", "asc"):
        raise ValueError(f"order must be 'desc' or 'asc', got {order!r}")


def _draw_batch(pi: Tensor, batch_size: int, strategy: str, generator: Optional[torch.Generator]) -> tuple[int, Tensor]:
    gen_device = generator.device if generator is not None else pi.device
    if strategy == "uniform":
        ids = torch.randperm(pi.numel(), generator=generator, device=gen_device)[:batch_size]
    else:
        ids = draw_without_replacement(pi.float().to(gen_device), batch_size, generator)
    return batch_size, ids.to(pi.device)


# the float32 bit patterns of 0 and +inf: for x >= 0 the int32 pattern grows with x
_ZERO_BITS, _INF_BITS = 0, 0x7F800000


def mass_cutoff(pi: Tensor, threshold: float, order: str = "desc", *, n_total: Optional[int] = None,
                reduce: Optional[Callable[..., Sequence[Tensor]]] = None) -> int:
    """The cutoff of ``select_batch_reference`` (1 + the first position where the cumulative mass of pi,
    sorted by ``order``, reaches ``threshold``; n + 1 when it never does) without sorting.

    For ``desc``: a bisection over float32 bit patterns finds v*, the largest value whose mass of entries
    >= v* reaches the threshold (31 masked float64 sums over pi, no host sync); the entries above v* come
    first in the sorted order and the ties at v* follow, so the position is count(> v*) + j - 1 with j the
    fewest ties at v* that reach the threshold. ``asc`` mirrors it (entries <= v, the smallest v). The sums
    are float64 in another order than a cumulative sum, so the two agree except where the threshold lies
    within float64 rounding of a partial sum.

    A pi sharded over ranks: ``pi`` is this rank's slice, ``n_total`` the whole length, and ``reduce(*parts)``
    sums each 0-d partial (masses and counts) over the ranks, in float64."""
    n = pi.numel() if n_total is None else n_total
    if n == 0:
        raise ValueError("select_batch needs at least one group")
    if threshold <= 0:
        return 1
    values = pi.detach().float().reshape(-1)
    bits = values.view(torch.int32)
    descending = order == "desc"

    def summed(*parts: Tensor) -> Sequence[Tensor]:
        return parts if reduce is None else reduce(*parts)

    def mass_beyond(bound: Tensor) -> Tensor:  # float64 mass of the entries at or past ``bound`` in sort order
        chosen = bits >= bound if descending else bits <= bound
        return summed(torch.where(chosen, values, 0.0).sum(dtype=torch.float64))[0]

    total = summed(values.sum(dtype=torch.float64))[0]
    # desc: lo satisfies (mass >= threshold), hi does not; asc: hi satisfies, lo does not
    lo = torch.tensor(_ZERO_BITS if descending else _ZERO_BITS - 1, dtype=torch.int64, device=pi.device)
    hi = torch.tensor(_INF_BITS + 1 if descending else _INF_BITS, dtype=torch.int64, device=pi.device)
    for _ in range(32):
        mid = (lo + hi) // 2
        reaches = mass_beyond(mid.to(torch.int32)) >= threshold
        if descending:
            lo, hi = torch.where(reaches, mid, lo), torch.where(reaches, hi, mid)
        else:
            lo, hi = torch.where(reaches, lo, mid), torch.where(reaches, mid, hi)
    v_bits = (lo if descending else hi).to(torch.int32)
    before = bits > v_bits if descending else bits < v_bits  # strictly ahead of v* in the sorted order
    mass_before, count_before, ties = summed(torch.where(before, values, 0.0).sum(dtype=torch.float64),
                                             before.sum(), (bits == v_bits).sum())
    return cutoff_at(v_bits, mass_before, count_before.to(torch.int64), ties.to(torch.int64), total, threshold, n)


def cutoff_at(v_bits: Tensor, mass_before: Tensor, count_before: Tensor, ties: Tensor, total: Tensor,
              threshold: float, n: int) -> int:
    """The cutoff from the split at v* (0-d device tensors: v*'s int32 bit pattern, the float64 mass and the
    count of the entries ahead of it in sort order, the number of entries equal to it, pi's float64 total):
    the entries ahead, then the fewest ties that reach the threshold; n + 1 where the total does not."""
    v = v_bits.view(torch.float32).double()
    needed = torch.where(v > 0, torch.ceil((threshold - mass_before) / v), 1.0).clamp(min=1)
    # the division may round j one off either way, so look at j - 1 and j + 1
    j = torch.minimum(needed.to(torch.int64), ties)
    j = torch.where((j > 1) & (mass_before + (j - 1).double() * v >= threshold), j - 1, j)
    j = torch.where((j < ties) & (mass_before + j.double() * v < threshold), j + 1, j)
    position = torch.where(total >= threshold, count_before + j - 1, torch.full_like(count_before, n))
    return int(position.item()) + 1


# torch.multinomial refuses more categories than this
MULTINOMIAL_MAX_CATEGORIES = 2 ** 24


def draw_without_replacement(probs: Tensor, k: int, generator: Optional[torch.Generator] = None,
                             max_categories: int = MULTINOMIAL_MAX_CATEGORIES) -> Tensor:
    """k distinct ids drawn one after another with probability proportional to ``probs`` among those not yet
    drawn: ``torch.multinomial`` up to ``max_categories`` entries; beyond, the same distribution as the k
    smallest of E_i / p_i with E_i ~ Exp(1) independent (an exponential race: E_i / p_i is the arrival time
    of an exponential clock of rate p_i, and the first clock among those left rings with probability
    proportional to its rate). Entries with p_i = 0 come last."""
    if probs.numel() <= max_categories:
        return torch.multinomial(probs, k, replacement=False, generator=generator)
    arrivals = torch.empty_like(probs).exponential_(generator=generator).div_(probs)
    return torch.topk(arrivals, k, largest=False, sorted=True).indices


def adam_step(tensors: AdamTensors, grads: Sequence[Tensor], hyper: Sequence[HyperRow], spec: AdamSpec,
              scaling: Optional[GradScaling] = None) -> None:
    """One Adam-style update of many tensors: what every path's ``adam_step`` computes (``update_spec``).

    For tensor i with hyper-parameters ``hyper[hyper_rows[i]] = (lr, beta1, beta2, eps, wd)`` (floats) and
    ``steps[i]`` the step count before the call (advanced by one per moment advance below, and
    written back when ``spec.commit_state``):
      1. ``prior_grads``: the moments first advance with ``prior_scale * prior_grads`` from x;
      2. x1 = x + AdamStep(x, grad_scale * grad) is written to ``destinations``;
      3. ``extrapolate_to``: y = x1 + AdamStep(x1, extrapolation_scale * grad) is written there
         (from x1 as stored, i.e. rounded to the param dtype).
    x1 and y are rounded to the param dtype to nearest, or with ``spec.stochastic_rounding`` (16-bit
    params) stochastically with the bits of their own step count (``rounding``: x1 at t, y at t + 1).
    ``commit_state=False`` leaves the moments untouched. ``save_sources_to`` / ``save_grads_to``
    receive copies of x / the raw grad. Moments stored below float32 (bf16, fp16) are read into float32,
    carried in float32 through all the advances of the call and rounded to nearest once when written
    back. With ``exp_avg_scales`` / ``exp_avg_sq_scales`` the moments are 8-bit codes (int8 m, uint8 v,
    see ``storage.quantize_moment_``): decoded at the start of the call and encoded once at its end.
    One tensor at a time: on a CPU that keeps it in cache. ``scaling`` (GradScaler's fused route,
    ``update_spec.GradScaling``): gradients are multiplied by 1/scale inside the update (folded into
    ``grad_scale`` and ``extrapolation_scale``); a step with ``found_inf`` set changes nothing but copying
    each source to a destination that differs from it.
    """
    tensors.check(spec)
    if scaling is not None:
        if scaling.skip_on_host(tensors):
            return
        spec = scaling.folded(spec)
    commit, quantized = spec.commit_state, tensors.quantized
    moment_flags = dict(maximize=spec.maximize, decoupled=spec.decoupled_weight_decay)
    for i, x in enumerate(tensors.sources):
        lr, beta1, beta2, eps, weight_decay = hyper[tensors.hyper_rows[i]]
        moment_kw = dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, **moment_flags)
        apply_kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, eps_mode=spec.eps_mode,
                        decoupled=spec.decoupled_weight_decay,
                        rounding_seed=tensors.rounding_seeds[i] if spec.stochastic_rounding else None)
        t = float(tensors.steps[i]) + 1
        grad = grads[i]
        stored = (tensors.exp_avgs[i], tensors.exp_avg_sqs[i],
                  None if tensors.max_exp_avg_sqs is None else tensors.max_exp_avg_sqs[i])
        # the moments are carried in float32 through the call and rounded (or encoded) once when stored;
        # .float() of float32 moments is the tensor itself
        if quantized:
            m = dequantize_moment(stored[0], tensors.exp_avg_scales[i], signed=True)
            v = dequantize_moment(stored[1], tensors.exp_avg_sq_scales[i], signed=False)
            vmax = None
        else:
            m, v, vmax = (None if s is None else s.float() for s in stored)
        xf = x.float()
        if tensors.save_sources_to is not None:
            tensors.save_sources_to[i].copy_(x)
        if tensors.prior_grads is not None:
            _advance_moments(xf, tensors.prior_grads[i], m, v, vmax, scale=spec.prior_scale, **moment_kw)
            t += 1
        out = None
        if not commit:
            out = (torch.empty_like(m), torch.empty_like(v), None if vmax is None else torch.empty_like(vmax))
        m1, v1, vmax1 = _advance_moments(xf, grad, m, v, vmax, scale=spec.grad_scale, out=out, **moment_kw)
        x1 = _apply_step(xf, m1, v1 if vmax1 is None else vmax1, t, tensors.destinations[i], **apply_kw)
        if tensors.extrapolate_to is not None:
            x1 = tensors.destinations[i].float()
            _advance_moments(x1, grad, m, v, vmax, scale=spec.extrapolation_scale, **moment_kw)
            _apply_step(x1, m, v if vmax is None else vmax, t + 1, tensors.extrapolate_to[i], **apply_kw)
        if tensors.save_grads_to is not None:  # last: it may alias prior_grads
            tensors.save_grads_to[i].copy_(grad)
        if commit and quantized:
            quantize_moment_(m, stored[0], tensors.exp_avg_scales[i], signed=True)
            quantize_moment_(v, stored[1], tensors.exp_avg_sq_scales[i], signed=False)
        elif commit:
            for kept, computed in zip(stored, (m, v, vmax)):
                if kept is not None and kept is not computed:
                    kept.copy_(computed)
    if commit:
        torch._foreach_add_(list(tensors.steps), float(tensors.advances))


# the keyword form of earlier releases: (sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, hyper,
# hyper_rows, **optional lists and flags)
adam_update_reference = keyword_form(adam_step)
