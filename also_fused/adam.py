"""Drop-in Adam and AdamW: torch.optim's formulas, one fused update per device and dtype."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from ._adam_family import AdamFamily
from ._checks import as_scalar, check_hyperparameters, rounding_defaults
from ._plans import grads_by_param, param_itself
from ._step_hooks import optimizer_step
from .update_spec import AdamSpec

_FLAGS = ("amsgrad", "maximize", "decoupled_weight_decay", "stochastic_rounding")
_IN_PLACE = dict(sources=param_itself, destinations=param_itself)
# torch.optim's formula, per (maximize, decoupled_weight_decay, stochastic_rounding) of a bucket
_SPECS = {(maximize, decoupled, stochastic): AdamSpec(eps_mode="torch", maximize=maximize,
                                                      decoupled_weight_decay=decoupled, stochastic_rounding=stochastic)
          for maximize in (False, True) for decoupled in (False, True) for stochastic in (False, True)}


def _spec_of(flags: dict[str, bool]) -> AdamSpec:
    """The spec of a bucket with these per-group flags."""
    return _SPECS[flags["maximize"], flags["decoupled_weight_decay"], flags["stochastic_rounding"]]


class Adam(AdamFamily):
    """torch.optim.Adam with the same signature and results, updated by one Triton launch per step on CUDA.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps),
    with g = grad + weight_decay * p (L2), or with p *= 1 - lr*weight_decay first when
    ``decoupled_weight_decay`` (AdamW). ``foreach``, ``fused`` and ``capturable`` are accepted for
    signature compatibility: the Triton path is always fused and never syncs the host.

    ``state_precision``: how the moments are stored. ``"param"`` (default) keeps them in the param's
    dtype, as torch.optim does (same memory, same state_dict dtypes); ``"float32"`` keeps float32
    moments for bf16/fp16 params; ``"bfloat16"`` halves the state of float32 params; ``"int8"`` stores
    8-bit codes with one float32 scale per 1024 elements (about 2 bytes per param for both moments;
    no amsgrad; the code is stated in ``storage``). The update is computed in
    float32 either way and the moments are rounded or encoded once when stored.

    ``stochastic_rounding``: bfloat16 and float16 params are stored rounded up or down with probability
    proportional to the distance (docs/algorithm.md sec. 14), so that updates below half an ulp are not lost,
    with random bits from a hash of (``rounding_seed``, step, element): the same on every path, and a
    resumed run continues the stream (the seed is a param-group entry of the state_dict; None draws one
    from torch's default generator). float32 params are unaffected.
    """

    _decoupled_default = False

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: Optional[bool] = None,
        backend: str = "auto",
        state_precision: str = "param",
        stochastic_rounding: bool = False,
        rounding_seed: Optional[int] = None,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay, foreach=foreach, capturable=capturable)
        if differentiable:
            raise NotImplementedError("differentiable=True is not supported by also_fused optimizers")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(lr=as_scalar(lr), betas=tuple(map(as_scalar, betas)), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        **rounding_defaults(stochastic_rounding, rounding_seed))
        super().__init__(params, defaults, backend, state_precision)

    @optimizer_step
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One update of every parameter that has a gradient; returns ``closure()`` when given.

        Under ``torch.compile`` the step runs eagerly (a graph break): it is one fused launch already.
        Under ``torch.amp.GradScaler.step`` the gradients are unscaled inside the update and a step whose
        gradients hold inf or NaN changes nothing, decided on the device (no host sync); ``.grad`` keeps
        the scaled gradients (torch's fused optimizers write the unscaled ones back)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaling = self._grad_scaling()
        for plan, grads in self._planner.with_grads("step", _FLAGS, _IN_PLACE):
            self._run_plan(plan, grads, _spec_of(plan.flags), scaling=scaling)
        return loss

    def update_params(self, items: list[tuple[Tensor, int]], grads: Optional[list[Tensor]] = None) -> None:
        """The update ``step()`` makes, of the (param, group index) pairs given, from ``grads`` (one per item;
        default their ``.grad``): the step inside the backward pass, ``also_fused.StepInBackward``, updates
        bucket by bucket through it."""
        grad_of = grads_by_param(items, grads)
        for plan in self._planner.plans_for("in_backward", items, _FLAGS, _IN_PLACE):
            self._run_plan(plan, [grad_of[id(p)] for p in plan.params], _spec_of(plan.flags))


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) on the same fused update as ``Adam``."""

    _decoupled_default = True

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
        state_precision: str = "param",
        stochastic_rounding: bool = False,
        rounding_seed: Optional[int] = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
