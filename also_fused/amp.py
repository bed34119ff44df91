"""torch.amp.GradScaler beside the optimizers here: what a scaler decided, handed on without a host sync.

The drop-ins, ``ThetaAdam`` and ``ALSO`` take ``GradScaler.step``'s fused route themselves (they set
``_step_supports_amp_scaling``). A ``GroupWeights`` beside a scaled optimizer learns of a skipped step
through ``found_inf``::

    scaler.scale(weights.weighted_loss(losses, ids)).backward()
    scaler.step(optimizer)
    weights.step(found_inf=also_fused.amp.found_inf(scaler, optimizer))
    scaler.update()
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["found_inf"]


def found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> Optional[Tensor]:
    """The 0-d float32 tensor, non-zero where ``scaler`` skipped ``optimizer``'s step of this iteration (inf
    or NaN in its gradients); None when the scaler is disabled. Call it after ``scaler.step(optimizer)`` and
    before ``scaler.update()``, which forgets it. Reads the scaler's per-optimizer record (the one
    ``GradScaler.step`` and ``unscale_`` keep); on one device no new tensor is made."""
    if not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    per_device = None if states is None or id(optimizer) not in states else states[id(optimizer)].get(
        "found_inf_per_device")
    if not per_device:
        raise RuntimeError("the scaler has no record of this optimizer's step: call found_inf(scaler, optimizer) "
                           "after scaler.step(optimizer) and before scaler.update()")
    values = list(per_device.values())
    if len(values) == 1:
        return values[0]
    device = values[0].device
    return sum(v.to(device, non_blocking=True) for v in values[1:]) + values[0]
