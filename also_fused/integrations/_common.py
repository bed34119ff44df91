"""What the integrations share: the optimizer under a framework's wrapper, a GroupWeights stepped after
each step of it, and the check that a GradScaler cannot make it miss a skipped step."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

import torch
from torch.utils.hooks import RemovableHandle

from ..also import ALSO
from ..group_weights import GroupWeights


def require(module: str, package: str, integration: str) -> ModuleType:
    """``import module``, or an ImportError that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"also_fused.integrations.{integration} needs the {package!r} package "
                          f"(pip install {package})") from error


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under framework wrappers (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer), which keep it as ``.optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_scaler(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a GradScaler beside an optimizer that does not take its fused route.

    GradScaler skips such an optimizer's ``step()`` on an overflow: no step hook runs, and the losses
    recorded by ``weighted_loss`` for the skipped step would feed the next pi step."""
    if scaler is None or not scaler.is_enabled() or getattr(optimizer, "_step_supports_amp_scaling", False):
        return
    raise ValueError(
        f"a GradScaler (fp16 mixed precision) with {type(optimizer).__qualname__}, which does not declare "
        "_step_supports_amp_scaling: on an overflow the scaler skips its step() entirely, and the group weights "
        "would not learn of it (the skipped step's losses would feed the next pi step). Use an optimizer that "
        "takes the scaler's fused route: also_fused.AdamW or also_fused.Adam (or also_fused.ALSO, which holds pi "
        "itself; or torch's with fused=True), or bf16 mixed precision, which has no scaler")


def check_weights_beside(optimizer: torch.optim.Optimizer, weights: GroupWeights) -> None:
    if isinstance(optimizer, ALSO):
        raise ValueError("the optimizer is an also_fused.ALSO, which holds its own group weights (opt.weights): "
                         "use its weighted_loss, without a separate GroupWeights")


def step_after(optimizer: torch.optim.Optimizer, weights: GroupWeights) -> RemovableHandle:
    """Step ``weights`` after every step of ``optimizer`` (a torch.optim step post-hook).

    On GradScaler's fused route the scaler sets ``optimizer.found_inf`` while the step runs: a step it
    skipped then leaves pi as it was."""
    check_weights_beside(optimizer, weights)

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        weights.step(found_inf=getattr(opt, "found_inf", None))

    return optimizer.register_step_post_hook(hook)


def cloned_state(weights: GroupWeights) -> dict[str, Any]:
    """``weights.state_dict()`` with its tensors copied (the live ones change in place at the next step)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in weights.state_dict().items()}


def scaler_of(obj: Any) -> Optional[Any]:
    scaler = getattr(obj, "scaler", None)
    return scaler if scaler is not None and hasattr(scaler, "is_enabled") else None
