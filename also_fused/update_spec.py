"""The typed contract of one Adam-family update, taken by every path (reference, CPU, Triton kernels).

An update of a list of tensors is described by

* ``AdamTensors``: the tensor lists it reads and writes, one entry per tensor, and each tensor's row
  of hyper-parameters; built once per bucket of params and kept while the state does not move;
* the gradients of the step, a list beside it (new tensors every step);
* the hyper-parameter rows ``(lr, beta1, beta2, eps, weight_decay)`` (floats, or 0-d tensors where the
  user set tensors), as the param groups hold them;
* ``AdamSpec``: the flags and scalars that select the formula (docs/algorithm.md sec. 3 and 6).

``GradScaling`` carries ``torch.amp.GradScaler``'s tensors into a step (the fused route: gradients
unscaled inside the update, the step skipped on the device when the scaler found inf or NaN).

Every path has ``adam_step(tensors, grads, hyper, spec, ...)``: ``functional.adam_step`` (the
reference, which states what each field means), ``cpu_fused.adam_step`` and
``kernels.multi_tensor_adam.adam_step``. Adding a flag means a field here, its use in the reference,
and its use in each backend; nothing else spells the contract out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

HyperRow = tuple[Any, Any, Any, Any, Any]  # (lr, beta1, beta2, eps, weight_decay)
EPS_MODES = ("also", "torch")
TensorList = Optional[Sequence[Tensor]]


@dataclass(frozen=True)
class AdamSpec:
    """The flags and scalars of an update; frozen, so that a kept launch can be keyed on it.

    ``eps_mode``: "also" adds eps to sqrt(v) before the bias correction (ALSO), "torch" after it
    (torch.optim.Adam). ``grad_scale`` multiplies the gradient; ``extrapolation_scale`` the gradient
    of the extrapolation and ``prior_scale`` the prior gradient (see ``AdamTensors``);
    ``commit_state=False`` leaves the moments and step counts unwritten (a single update only);
    ``stochastic_rounding``: 16-bit params are stored rounded stochastically (``rounding``, with each
    tensor's seed from ``AdamTensors.rounding_seeds``) instead of to nearest."""

    eps_mode: str = "also"
    decoupled_weight_decay: bool = False
    maximize: bool = False
    grad_scale: float = 1.0
    extrapolation_scale: float = 1.0
    prior_scale: float = 1.0
    commit_state: bool = True
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if self.eps_mode not in EPS_MODES:
            raise ValueError(f"eps_mode must be 'also' or 'torch', got {self.eps_mode!r}")


@dataclass(eq=False)
class AdamTensors:
    """The tensor lists of an update, one entry per tensor (all of one device and param dtype).

    ``sources`` x are read and ``destinations`` written (the same list objects for an update in place);
    ``steps`` hold each tensor's step count before the call (0-d float32). Optional lists:
    ``max_exp_avg_sqs`` (amsgrad); ``save_sources_to`` / ``save_grads_to`` receive copies of x / the raw
    gradient; ``extrapolate_to`` receives a second step from the stored result; ``prior_grads`` advance
    the moments first; ``exp_avg_scales`` / ``exp_avg_sq_scales`` make the moments 8-bit codes
    (``storage.quantize_moment_``); ``rounding_seeds`` (ints in [0, 2^32)): each tensor's seed for
    stochastic rounding (``rounding.tensor_seed``)."""

    sources: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: Sequence[Tensor]
    destinations: Sequence[Tensor]
    hyper_rows: Sequence[int]
    max_exp_avg_sqs: TensorList = None
    save_sources_to: TensorList = None
    save_grads_to: TensorList = None
    extrapolate_to: TensorList = None
    prior_grads: TensorList = None
    exp_avg_scales: TensorList = None
    exp_avg_sq_scales: TensorList = None
    rounding_seeds: Optional[Sequence[int]] = None

    @property
    def quantized(self) -> bool:
        return self.exp_avg_scales is not None

    @property
    def advances(self) -> int:
        """Moment advances per tensor in one call (the step count moves by as many)."""
        return 1 + (self.prior_grads is not None) + (self.extrapolate_to is not None)

    def check(self, spec: AdamSpec) -> None:
        """Refuse combinations no path runs (each path checks its own tensors' dtypes and layouts)."""
        if not spec.commit_state and (self.prior_grads is not None or self.extrapolate_to is not None):
            raise ValueError("commit_state=False only applies to a single update")
        if (self.exp_avg_scales is None) != (self.exp_avg_sq_scales is None):
            raise ValueError("8-bit moments need both exp_avg_scales and exp_avg_sq_scales")
        if self.quantized and self.max_exp_avg_sqs is not None:
            raise ValueError("8-bit moments do not support amsgrad")
        if spec.stochastic_rounding and (self.rounding_seeds is None
                                         or len(self.rounding_seeds) != len(self.sources)):
            raise ValueError("stochastic_rounding needs one seed per tensor (rounding_seeds)")


@dataclass(frozen=True, eq=False)
class GradScaling:
    """The gradients of a step as ``torch.amp.GradScaler`` hands them to a fused optimizer.

    ``scale`` (0-d float32 on the params' device, or None when the gradients were unscaled already): every
    gradient is multiplied by ``1/scale`` (rounded to float32) inside the update; the multiplication is
    folded into the spec's gradient scales, so each path computes ``g * (grad_scale * (1/scale))``.
    ``found_inf`` (0-d float32): where non-zero the whole update is a no-op (moments, step counts and
    params untouched; an update into another destination copies its source there, as a rejected step
    does). The kernels read both on the device; the host paths read them on the host."""

    scale: Optional[Tensor]
    found_inf: Tensor

    @staticmethod
    def from_optimizer(optimizer: Any) -> Optional["GradScaling"]:
        """The ``grad_scale`` / ``found_inf`` attributes ``GradScaler.step`` sets on an optimizer whose
        ``_step_supports_amp_scaling`` is True (None outside such a step)."""
        found_inf = getattr(optimizer, "found_inf", None)
        scale = getattr(optimizer, "grad_scale", None)
        if found_inf is None and scale is None:
            return None
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        return GradScaling(_as_float32(scale, "grad_scale"), _as_float32(found_inf, "found_inf"))

    def check(self, tensors: "AdamTensors") -> None:
        """Refuse updates that store or replay gradients (the closure API's): those are kept unscaled."""
        if tensors.prior_grads is not None or tensors.save_grads_to is not None:
            raise ValueError("gradient scaling (GradScaler's fused route) applies to updates from this step's "
                             "gradients only, not to ones that save or replay gradients")

    def skip_on_host(self, tensors: "AdamTensors") -> bool:
        """For the host paths: check, and when the step is skipped put each source into a destination that
        is not itself (as the kernels do) and return True."""
        self.check(tensors)
        if not self.skipped_on_host():
            return False
        for src, dst in zip(tensors.sources, tensors.destinations):
            if src is not dst:
                dst.copy_(src)
        return True

    def skipped_on_host(self) -> bool:
        """Whether the step is skipped, read on the host (the reference and CPU paths)."""
        return bool(self.found_inf != 0)

    def inverse_on_host(self) -> float:
        """1/scale rounded to float32, as a Python float (1.0 without a scale)."""
        if self.scale is None:
            return 1.0
        return float(torch.reciprocal(self.scale.detach().to("cpu", torch.float32)))

    def folded(self, spec: "AdamSpec") -> "AdamSpec":
        """``spec`` with 1/scale folded into the gradient's and the extrapolation's scales, each product
        rounded to float32 as the kernel computes it (prior gradients are stored unscaled)."""
        inverse = self.inverse_on_host()
        if inverse == 1.0:
            return spec
        return replace(spec, grad_scale=_float32_product(spec.grad_scale, inverse),
                       extrapolation_scale=_float32_product(spec.extrapolation_scale, inverse))


def _as_float32(t: Optional[Tensor], name: str) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise TypeError(f"{name} must be a one-element tensor, as torch.amp.GradScaler sets it")
    return t.reshape(()) if t.dtype == torch.float32 else t.reshape(()).float()


def _float32_product(a: float, b: float) -> float:
    return float(torch.tensor(a, dtype=torch.float32) * torch.tensor(b, dtype=torch.float32))


_OPTIONAL_LISTS = tuple(f.name for f in fields(AdamTensors) if f.default is None)
_SPEC_FIELDS = tuple(f.name for f in fields(AdamSpec))


def keyword_form(adam_step: Callable[..., Any]) -> Callable[..., Any]:
    """The calling convention of earlier releases for a path's typed ``adam_step``:
    ``(sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, hyper, hyper_rows, **kwargs)`` with the
    optional lists and the spec's fields as keywords (any other keyword goes to ``adam_step`` itself)."""

    @functools.wraps(adam_step)
    def call(sources: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
             exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], destinations: Sequence[Tensor], hyper: Any,
             hyper_rows: Sequence[int], **kwargs: Any) -> Any:
        lists = {name: kwargs.pop(name) for name in _OPTIONAL_LISTS if name in kwargs}
        spec = AdamSpec(**{name: kwargs.pop(name) for name in _SPEC_FIELDS if name in kwargs})
        tensors = AdamTensors(sources, exp_avgs, exp_avg_sqs, steps, destinations, hyper_rows, **lists)
        return adam_step(tensors, grads, hyper, spec, **kwargs)

    return call
