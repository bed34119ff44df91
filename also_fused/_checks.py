"""Host-side checks of what the optimizers are given: Adam's hyper-parameters, choices, pi hyper-parameters,
weights on the simplex, group ids and per-sample losses.

Shapes, dtypes and devices are checked here at once. Values (ids in range, finite losses) are
checked here only when asked (``check_values``): on the reference and CPU paths, where reading them
costs no host sync worth avoiding, with the (min, max) reader the backend gives (``value_range``).
The Triton kernels check values on the device (``_input_errors.py``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .rounding import SEED_BOUND

# (min, max) of ids or losses read on the host; NaN propagates
ValueRange = Callable[[Tensor], tuple]
MODES = ("optimistic", "descent-ascent")
REDUCTIONS = ("sum", "mean")
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def rounding_seed(stochastic_rounding: bool, seed: Optional[int]) -> Optional[int]:
    """The seed of stochastic rounding: ``seed`` checked, or drawn from torch's default generator when None
    (so that ``torch.manual_seed`` makes runs repeatable); None when the rounding is off and no seed is given."""
    if seed is None:
        return int(torch.randint(0, SEED_BOUND, ())) if stochastic_rounding else None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_BOUND:
        raise ValueError(f"rounding_seed must be an int in [0, 2**31), got {seed!r}")
    return seed


def rounding_defaults(stochastic_rounding: bool, seed: Optional[int]) -> dict[str, Any]:
    """The param-group entries of stochastic rounding, when it is on or a seed is given: none otherwise, so that
    the param groups (and state_dicts) of an optimizer without it are torch.optim's."""
    seed = rounding_seed(stochastic_rounding, seed)
    if not stochastic_rounding and seed is None:
        return {}
    return dict(stochastic_rounding=bool(stochastic_rounding), rounding_seed=seed)


def check_hyperparameters(lr: Any, betas: Any, eps: float, weight_decay: float, *,
                          foreach: Optional[bool] = None, capturable: bool = False) -> None:
    """torch.optim.Adam's checks, with its exception types; ``lr`` and ``betas`` may be 1-element tensors."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (two values expected)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def as_scalar(value: Any) -> Any:
    """A 1-element tensor hyper-parameter as a 0-dim tensor (as torch.optim keeps it); floats unchanged."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() != 0 else value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_loss_scale(n_groups: int, loss_scale: Optional[float], batch_size: Optional[int],
                       group_reduction: str) -> float:
    """loss_scale as given, else n_groups / batch_size (not used by the mean reduction)."""
    if loss_scale is None and group_reduction == "mean":
        return 1.0  # not used: the mean reduction normalises by the pi mass present
    if loss_scale is None:
        if batch_size is None:
            raise ValueError("give loss_scale or batch_size (loss_scale defaults to n_groups / batch_size)")
        return n_groups / positive_int("batch_size", batch_size)
    return float(loss_scale)


def check_pi_hyperparameters(pi_lr: float, pi_decay: float, pi_temperature: float) -> None:
    if not pi_lr >= 0.0 or not pi_decay >= 0.0:
        raise ValueError(f"pi_lr and pi_decay must be >= 0, got {pi_lr} and {pi_decay}")
    if not pi_temperature > 0.0:
        raise ValueError(f"pi_temperature must be > 0, got {pi_temperature}")


def as_simplex(weights: Optional[Union[Tensor, Sequence[float]]], n_groups: int, name: str) -> Optional[Tensor]:
    """User weights normalised to sum 1 (float32, CPU); None stays None (uniform)."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64).reshape(-1)
    if w.numel() != n_groups:
        raise ValueError(f"{name} has {w.numel()} entries, expected n_groups={n_groups}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError(f"{name} must have a positive sum")
    return (w / total).float()


def as_ids(group_ids: Union[Tensor, Sequence[int]], n_groups: int, device: torch.device,
           check_values: bool, value_range: Optional[ValueRange] = None) -> Tensor:
    """group_ids as a 1-D int64 tensor on ``device`` (a list of ints is accepted; CPU ids are copied
    without blocking); with ``check_values`` also ids outside [0, n_groups) raise (a host sync), their
    range read by ``value_range`` (default: torch.aminmax)."""
    if not isinstance(group_ids, Tensor):
        values = list(group_ids)
        if not values:
            raise ValueError("group_ids is empty: a step needs at least one sample")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("group_ids must be integers (a list of ints or an integer tensor)")
        group_ids = torch.as_tensor(values, dtype=torch.int64)
    if group_ids.dtype not in ID_DTYPES:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [batch], got shape {tuple(group_ids.shape)}")
    if group_ids.numel() == 0:
        raise ValueError("group_ids is empty: a step needs at least one sample")
    if group_ids.device != device:
        if group_ids.device.type != "cpu":
            raise ValueError(f"group_ids are on {group_ids.device}, pi is on {device}")
        group_ids = group_ids.to(device, non_blocking=True)
    if group_ids.dtype != torch.int64:
        group_ids = group_ids.long()
    if check_values:
        lo, hi = (value_range or aminmax_on_host)(group_ids)
        if lo < 0 or hi >= n_groups:
            raise ValueError(f"group_ids must lie in [0, {n_groups}), got values in [{lo}, {hi}]")
    return group_ids


def check_losses(losses: Any, ids: Tensor, device: torch.device, check_finite: bool,
                 value_range: Optional[ValueRange] = None) -> None:
    """Per-sample losses: a floating tensor shaped like ``ids`` on ``device``; with ``check_finite``
    NaN or inf raise (a host sync); ``value_range`` as for ``as_ids``."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"per-sample losses must be a tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise ValueError(f"per-sample losses must be floating point, got {losses.dtype}")
    if losses.shape != ids.shape:
        raise ValueError(f"per-sample losses must have shape {tuple(ids.shape)} (one per group id), "
                         f"got {tuple(losses.shape)}")
    if losses.device != device:
        raise ValueError(f"per-sample losses are on {losses.device}, pi is on {device}")
    if check_finite:
        check_finite_losses(losses, value_range)


def check_finite_losses(losses: Tensor, value_range: Optional[ValueRange] = None) -> None:
    """NaN or inf among the per-sample losses raise (a host sync). One reduction: the extremes propagate
    NaN, and they are finite exactly when every loss is."""
    lo, hi = (value_range or aminmax_on_host)(losses.detach())
    if not -math.inf < lo <= hi < math.inf:
        raise ValueError("per-sample losses contain NaN or inf; the step was not taken")


def aminmax_on_host(values: Tensor) -> tuple:
    """(min, max) of ids or losses as Python numbers, in one reduction (torch.aminmax propagates NaN)."""
    return tuple(v.item() for v in torch.aminmax(values))
