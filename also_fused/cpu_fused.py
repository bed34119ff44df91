"""The fast CPU path: Adam-style updates of CPU tensors in one pass over memory, and the group weights'
pi step and per-sample weights in one call each (``pi_update``, ``sample_weights``; csrc/cpu_pi.cpp).

It computes what ``functional.adam_step`` states, with the same arguments (``update_spec``):

* torch's formula (``eps_mode="torch"``, the Adam/AdamW drop-ins) on params updated in place with
  moments in the param dtype (torch.optim's own layout) runs torch's own fused CPU kernel
  (``torch._fused_adam_`` / ``torch._fused_adamw_``), one call per param group:
  ``p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``, bitwise what ``torch.optim.Adam(fused=True)`` computes;
* everything else (ALSO's ``x - lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps)``, the optimistic
  extrapolation fused with the main step, the prior advance, the copies of x and g, bf16/fp16
  params, moments stored in another dtype or as 8-bit codes) runs the compiled extension
  ``also_fused._cpu_adam``: every element is read once and written once, in float32, in the
  reference's order of operations (8-bit codes decoded and encoded per 1024-element block);
* whatever neither handles (e.g. strided views) runs the reference itself.

As in the reference, ``steps`` hold the counts before the call and the update advances them
(one per moment advance) when it commits the state.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import functional as F
from .storage import QUANT_M_BITS, QUANT_V_BITS, dense_like
from .update_spec import AdamSpec, AdamTensors, GradScaling, HyperRow, keyword_form

try:
    from . import _cpu_adam
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built (no C++ compiler at install), or built for another torch
    _cpu_adam = None
    try:
        _built = importlib.util.find_spec(f"{__package__}._cpu_adam") is not None
    except (ImportError, ValueError):
        _built = False
    _IMPORT_ERROR = (f"{type(exc).__name__}: {exc}" if _built else
                     "it was not built; reinstalling the package with a C++ compiler builds it")

# an extension built from older sources has the update but not the group weights' functions: those then
# run as torch ops (reinstalling the package rebuilds it)
# (and one built before the blocked normaliser, without pi_logits, has another pi_step)
_HAS_PI_STEP = _cpu_adam is not None and all(hasattr(_cpu_adam, name) for name in
                                             ("pi_step", "sample_weights", "pi_logits", "pi_exp_blocks", "pi_scale"))
# builds whose update takes each tensor's stochastic-rounding seed
_HAS_ROUNDING = _cpu_adam is not None and getattr(_cpu_adam, "stochastic_rounding", False)
# builds whose pi_step takes the caller's kept scratch
_HAS_PI_SCRATCH = _HAS_PI_STEP and getattr(_cpu_adam, "pi_step_scratch", False)
_HAS_RANGES = _cpu_adam is not None and hasattr(_cpu_adam, "id_range") and hasattr(_cpu_adam, "loss_range")
_torch_fused_ok: Optional[bool] = None
# the 8-bit codes' (exponent, mantissa) bits, m's then v's (see functional.quantize_moment_)
_QUANT_CONSTANTS = [float(b) for b in QUANT_M_BITS + QUANT_V_BITS]


def available() -> tuple[bool, str]:
    """(True, "") when the compiled single-pass update imports, else (False, why)."""
    if _cpu_adam is None:
        return False, f"the extension also_fused._cpu_adam: {_IMPORT_ERROR}"
    return True, ""


def torch_fused_available() -> bool:
    """Whether this torch has the fused Adam kernel for CPU tensors (torch >= 2.4)."""
    global _torch_fused_ok
    if _torch_fused_ok is None:
        try:
            p, g = torch.zeros(1), torch.ones(1)
            torch._fused_adam_([p], [g], [torch.zeros(1)], [torch.zeros(1)], [], [torch.ones(())], lr=1e-3,
                               beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
            _torch_fused_ok = bool(torch.isfinite(p).all()) and float(p) != 0.0
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _torch_fused_ok = False
    return _torch_fused_ok


def _flat_alike(params: Sequence[Tensor], *lists: Sequence[Tensor]) -> bool:
    """Whether every tensor covers its storage densely in its param's element order (contiguous, or
    the param's channels_last strides), as torch's fused kernel, which runs over flat storage, needs."""
    return all(dense_like(t, p) for tensors in lists for t, p in zip(tensors, params))


def _torch_fused_step(params: list[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                      exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]],
                      steps: Sequence[Tensor], hyper: Sequence[tuple[float, float, float, float, float]],
                      hyper_rows: Sequence[int], decoupled: bool, maximize: bool) -> None:
    """torch.optim.Adam/AdamW's fused CPU update in place, one call per hyper-parameter row; like
    torch.optim, the step counts advance first (the kernel reads the count of this step)."""
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    torch._foreach_add_(list(steps), 1.0)
    for row in sorted(set(hyper_rows)):
        idx = [i for i, r in enumerate(hyper_rows) if r == row]

        def pick(seq: Sequence[Tensor]) -> list[Tensor]:
            return list(seq) if len(idx) == len(params) else [seq[i] for i in idx]

        lr, beta1, beta2, eps, weight_decay = hyper[row]
        kernel(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
               [] if max_exp_avg_sqs is None else pick(max_exp_avg_sqs), pick(steps), lr=lr, beta1=beta1,
               beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=max_exp_avg_sqs is not None,
               maximize=maximize)


def adam_step(tensors: AdamTensors, grads: Sequence[Tensor], hyper: Sequence[HyperRow], spec: AdamSpec,
              scaling: Optional[GradScaling] = None) -> None:
    """``functional.adam_step`` on CPU tensors (float hyper-parameters), in one pass over memory where it can."""
    sources = tensors.sources
    if len(sources) == 0:
        return
    tensors.check(spec)
    rounded = spec.stochastic_rounding and sources[0].dtype in (torch.bfloat16, torch.float16)
    if rounded and not _HAS_ROUNDING:
        # an older build rounds to nearest only: the reference then rounds (the same bits as the kernels)
        F.adam_step(tensors, grads, hyper, spec, scaling)
        return
    if scaling is not None and scaling.skip_on_host(tensors):
        return
    plain = (tensors.prior_grads is None and tensors.extrapolate_to is None and tensors.save_sources_to is None
             and tensors.save_grads_to is None and spec.commit_state and spec.grad_scale == 1.0
             and not tensors.quantized and not rounded)
    # torch's fused kernel keeps the moments in the param dtype, as the drop-ins do by default
    if (spec.eps_mode == "torch" and plain and tensors.exp_avgs[0].dtype == sources[0].dtype
            and torch_fused_available() and all(s is d for s, d in zip(sources, tensors.destinations))
            and _flat_alike(sources, sources, grads, tensors.exp_avgs, tensors.exp_avg_sqs,
                            tensors.max_exp_avg_sqs or ())):
        inverse = 1.0 if scaling is None else scaling.inverse_on_host()
        if inverse != 1.0:
            # unscaled as GradScaler.unscale_ does (g * (1/scale)): the same bits as the folded scale for
            # GradScaler's power-of-two scales
            grads = torch._foreach_mul(list(grads), inverse)
        _torch_fused_step(list(sources), grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs,
                          tensors.steps, hyper, tensors.hyper_rows, spec.decoupled_weight_decay, spec.maximize)
        return
    if scaling is not None:
        spec = scaling.folded(spec)
    if _cpu_adam is not None and _cpu_adam.adam_update(
            list(sources), list(grads), list(tensors.exp_avgs), list(tensors.exp_avg_sqs),
            list(tensors.max_exp_avg_sqs or ()), list(tensors.steps), list(tensors.destinations), hyper,
            list(tensors.hyper_rows), spec.eps_mode == "also", spec.decoupled_weight_decay, spec.maximize,
            float(spec.grad_scale), list(tensors.save_sources_to or ()), list(tensors.save_grads_to or ()),
            list(tensors.extrapolate_to or ()), float(spec.extrapolation_scale), list(tensors.prior_grads or ()),
            float(spec.prior_scale), spec.commit_state, list(tensors.exp_avg_scales or ()),
            list(tensors.exp_avg_sq_scales or ()), _QUANT_CONSTANTS,
            *([list(tensors.rounding_seeds) if rounded else []] if _HAS_ROUNDING else [])):
        return
    F.adam_step(tensors, grads, hyper, spec)


# the keyword form of earlier releases (see update_spec.keyword_form)
adam_update = keyword_form(adam_step)


def value_range(values: Tensor) -> Optional[tuple[float, float]]:
    """(min, max) of non-empty int64 ids or float32 losses (both NaN when a loss is NaN, as torch.aminmax gives
    them) in one call of the extension, without torch.aminmax's two tensors and their reads; None where it does
    not apply (the extension missing or older, another dtype, not a contiguous 1-D CPU tensor, empty)."""
    if (not _HAS_RANGES or not values.is_cpu or values.dim() != 1 or not values.is_contiguous()
            or values.numel() == 0):
        return None
    if values.dtype == torch.int64:
        return _cpu_adam.id_range(values)
    if values.dtype == torch.float32:
        return _cpu_adam.loss_range(values)
    return None


def _plain_vectors(*tensors: Optional[Tensor]) -> bool:
    """Every tensor given is a contiguous 1-D CPU tensor (None: not given)."""
    return all(t is None or (t.is_cpu and t.dim() == 1 and t.is_contiguous()) for t in tensors)


def pi_update(pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor, second_out: Optional[Tensor] = None,
              mean_out: Optional[Tensor] = None, pi_lr: float, pi_decay: float, temperature: float, eps: float,
              log_pi_reg: Optional[Tensor] = None, scratch: Optional[dict] = None) -> bool:
    """out = PiUpdate(pi, S), second_out = PiUpdate(out, S), mean_out = the losses' mean, as ``functional``
    computes them (float32 group sums in sample order, float64 logits and softmax, its normaliser summed in
    blocks of ``functional.PI_BLOCK`` added in order; the mean in float64), in one call of the extension; ids
    outside [0, n_groups) add nothing. ``scratch``: a dict the caller keeps between calls, where the step keeps
    its 12 bytes per group of working memory (float64 logits, float32 group sums) instead of allocating them on
    every call. False, doing nothing, where it does not apply (the extension missing or older, or tensors that
    are not contiguous float32 / int64 CPU vectors)."""
    if not pi_phases_apply(pi, group_ids, losses, out, second_out, log_pi_reg):
        return False
    args = (pi, log_pi_reg, group_ids, losses, out, second_out, mean_out, float(pi_lr), float(pi_decay),
            float(temperature), float(eps), F.PI_BLOCK)
    if _HAS_PI_SCRATCH:
        _cpu_adam.pi_step(*args, *(_kept_scratch(scratch, pi.numel()) if scratch is not None else (None, None)))
    else:
        _cpu_adam.pi_step(*args)
    return True


def _kept_scratch(scratch: dict, n: int) -> tuple[Tensor, Tensor]:
    """The pi step's scratch for n groups, from ``scratch`` or new there: float64 logits, and float32 group
    sums that are all zero between calls (the extension zeroes the entries it adds to before it returns)."""
    kept = scratch.get("cpu_pi_step")
    if kept is None or kept[0].numel() != n:
        kept = scratch["cpu_pi_step"] = (torch.empty(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float32))
    return kept


def pi_phases_apply(pi: Tensor, group_ids: Optional[Tensor], losses: Optional[Tensor], *others: Optional[Tensor]
                    ) -> bool:
    """Whether the extension runs the pi step on these tensors (``pi_update`` and the phases alike)."""
    return (_HAS_PI_STEP and pi.dtype == torch.float32 and (group_ids is None or group_ids.dtype == torch.int64)
            and (losses is None or losses.dtype == torch.float32)
            and all(t is None or t.dtype == torch.float32 for t in others)
            and _plain_vectors(pi, group_ids, losses, *others))


def pi_logits(pi: Tensor, group_ids: Optional[Tensor], losses: Optional[Tensor], sums: Optional[Tensor], *,
              pi_lr: float, pi_decay: float, temperature: float, eps: float,
              log_pi_reg: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The first phase of ``pi_update`` over a slice of pi (``pi_phases_apply`` must hold): z (float64, new) as
    ``functional.pi_logits`` defines it, S from (ids, losses) in sample order or the dense ``sums``; and max z
    (0-d float64)."""
    z = torch.empty(pi.shape, dtype=torch.float64)
    zmax = _cpu_adam.pi_logits(pi, log_pi_reg, group_ids, losses, sums, z, float(pi_lr), float(pi_decay),
                               float(temperature), float(eps))
    return z, torch.tensor(zmax, dtype=torch.float64)


def pi_exp_blocks(z: Tensor, zmax: Tensor) -> Tensor:
    """The second phase: z <- exp(z - zmax), and the float64 sums of its blocks of ``functional.PI_BLOCK``."""
    return _cpu_adam.pi_exp_blocks(z, float(zmax), F.PI_BLOCK)


def pi_scale(e: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """The last phase: out = float32(e * (1 / total))."""
    _cpu_adam.pi_scale(e, 1.0 / float(total), out)
    return out


class CpuPiPhases:
    """The extension's pi step in phases (``functional.ReferencePiPhases``' protocol): one slice of pi computes
    in them what ``pi_update`` computes for the whole of it, bitwise."""

    logits = staticmethod(pi_logits)
    exp_blocks = staticmethod(pi_exp_blocks)
    scale = staticmethod(pi_scale)


def sample_weights(pi: Tensor, group_ids: Tensor, scale: float) -> Optional[Tensor]:
    """w_i = scale * pi[g_i] (0 for an id outside [0, n_groups)) as a new float32 tensor, from the extension;
    None where it does not apply."""
    if (not _HAS_PI_STEP or group_ids.dtype != torch.int64 or pi.dtype != torch.float32
            or not _plain_vectors(pi, group_ids)):
        return None
    return _cpu_adam.sample_weights(pi, group_ids, float(scale))
