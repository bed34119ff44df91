"""The typed contract of one Adam-family update, taken by every path (reference, CPU, Triton kernels).

An update of a list of tensors is described by

* ``AdamTensors``: the tensor lists it reads and writes, one entry per tensor, and each tensor's row
  of hyper-parameters; built once per bucket of params and kept while the state does not move;
* the gradients of the step, a list beside it (new tensors every step);
* the hyper-parameter rows ``(lr, beta1, beta2, eps, weight_decay)`` (floats, or 0-d tensors where the
  user set tensors), as the param groups hold them;
* ``AdamSpec``: the flags and scalars that select the formula (docs/algorithm.md sec. 3 and 6).

Every path has ``adam_step(tensors, grads, hyper, spec, ...)``: ``functional.adam_step`` (the
reference, which states what each field means), ``cpu_fused.adam_step`` and
``kernels.multi_tensor_adam.adam_step``. Adding a flag means a field here, its use in the reference,
and its use in each backend; nothing else spells the contract out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

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
    ``commit_state=False`` leaves the moments and step counts unwritten (a single update only)."""

    eps_mode: str = "also"
    decoupled_weight_decay: bool = False
    maximize: bool = False
    grad_scale: float = 1.0
    extrapolation_scale: float = 1.0
    prior_scale: float = 1.0
    commit_state: bool = True

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
    (``storage.quantize_moment_``)."""

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
