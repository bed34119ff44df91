"""Host-side checks of what the optimizers are given: choices, pi hyper-parameters, weights on the
simplex, group ids and per-sample losses.

Shapes, dtypes and devices are checked here at once. Values (ids in range, finite losses) are
checked here only when asked (``check_values``): on the reference path, where reading them costs
no host sync worth avoiding. The Triton kernels check values on the device (``_input_errors.py``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from . import cpu_fused

MODES = ("optimistic", "descent-ascent")
REDUCTIONS = ("sum", "mean")
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


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
           check_values: bool, extension: bool = False) -> Tensor:
    """group_ids as a 1-D int64 tensor on ``device`` (a list of ints is accepted; CPU ids are copied
    without blocking); with ``check_values`` also ids outside [0, n_groups) raise (a host sync).
    ``extension``: their range may come from the fast CPU path's extension (``_value_range``)."""
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
        lo, hi = _value_range(group_ids, extension)
        if lo < 0 or hi >= n_groups:
            raise ValueError(f"group_ids must lie in [0, {n_groups}), got values in [{lo}, {hi}]")
    return group_ids


def check_losses(losses: Any, ids: Tensor, device: torch.device, check_finite: bool, extension: bool = False) -> None:
    """Per-sample losses: a floating tensor shaped like ``ids`` on ``device``; with ``check_finite``
    NaN or inf raise (a host sync); ``extension`` as for ``as_ids``."""
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
        check_finite_losses(losses, extension)


def check_finite_losses(losses: Tensor, extension: bool = False) -> None:
    """NaN or inf among the per-sample losses raise (a host sync). One reduction: torch.aminmax
    propagates NaN, and the extremes are finite exactly when every loss is."""
    lo, hi = _value_range(losses.detach(), extension)
    if not -math.inf < lo <= hi < math.inf:
        raise ValueError("per-sample losses contain NaN or inf; the step was not taken")


def _value_range(values: Tensor, extension: bool) -> tuple:
    """(min, max) of ids or losses read on the host: with ``extension`` (the fast CPU path, not the reference)
    from the CPU extension where it applies, in one call; else torch.aminmax (which propagates NaN)."""
    extremes = cpu_fused.value_range(values) if extension else None
    if extremes is None:
        extremes = tuple(v.item() for v in torch.aminmax(values))
    return extremes
