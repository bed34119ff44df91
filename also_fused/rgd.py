"""RGD (Re-weighted Gradient Descent): a loss re-weighting usable with any optimizer."""
from __future__ import annotations

from torch import Tensor

from .backends import resolve_backend


def rgd_loss(per_sample_losses: Tensor, temperature: float, backend: str = "auto") -> Tensor:
    """mean_i exp(min(l_i, T)/(T+1)) * l_i with the weights treated as constants (docs/algorithm.md sec. 8).

    ``temperature`` T is the clipping threshold. On CUDA (``backend="auto"``) forward and backward
    are each one fused kernel; elsewhere (the CPU path too) the reference runs.
    """
    if not isinstance(per_sample_losses, Tensor) or not per_sample_losses.is_floating_point():
        raise TypeError("per_sample_losses must be a floating-point tensor")
    if per_sample_losses.dim() != 1:
        raise ValueError(f"per_sample_losses must be 1-D [batch], got shape {tuple(per_sample_losses.shape)}")
    if per_sample_losses.numel() == 0:
        raise ValueError("per_sample_losses is empty")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # the CPU path has no loss kernel of its own: it runs the reference
    return resolve_backend(backend, per_sample_losses.device).rgd_loss(per_sample_losses, temperature)
