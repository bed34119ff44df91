"""accelerate: ALSO and GroupWeights with ``Accelerator.prepare``, ``accumulate`` and ``save_state``.

**ALSO needs no helper.** Keep the ALSO you made (``accelerator.prepare`` returns accelerate's wrapper of
it) and weigh each micro-batch with it::

    also = also_fused.ALSO(model.parameters(), n_groups, ...)
    model, optimizer, loader = accelerator.prepare(model, also, loader)
    for x, y, group_ids in loader:
        with accelerator.accumulate(model):
            losses = loss_fn(model(x), y)  # per sample
            accelerator.backward(also.weighted_loss(losses, group_ids))
            optimizer.step()
            optimizer.zero_grad()

``weighted_loss`` records every micro-batch's losses; the wrapper skips ``step()`` and ``zero_grad()``
while gradients accumulate, and the step that comes uses every recorded batch, as a plain loop that calls
``weighted_loss`` and ``backward`` on each micro-batch and then ``step()`` once. pi is in ALSO's
``state_dict()``, so ``accelerator.save_state``/``load_state`` keep it with the optimizer.

**GroupWeights**: ``prepare_group_weights(accelerator, weights, optimizer)`` registers them for
``save_state``/``load_state`` and, given the optimizer, steps them after each step it really takes (a
step post-hook: not while accumulating, and on fp16's fused route a step the scaler skips leaves pi as
it was). The scaler's ``update()`` runs inside the wrapper's ``step()``, so this hook is how the group
weights learn of a skip; an fp16 scaler beside an optimizer without the fused route is refused.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..group_weights import GroupWeights
from ._common import check_scaler, require, scaler_of, step_after, unwrap_optimizer

require("accelerate", "accelerate", "accelerate")

__all__ = ["prepare_group_weights"]


def prepare_group_weights(accelerator: Any, weights: GroupWeights, optimizer: Optional[Any] = None) -> GroupWeights:
    """Register ``weights`` for ``accelerator.save_state``/``load_state`` and return them.

    With ``optimizer`` (the prepared one, or the optimizer under it), ``weights.step()`` runs after each
    step that optimizer takes (``found_inf`` passed on from a GradScaler's fused route), so the loop only
    calls ``weights.weighted_loss`` per micro-batch. ``weights`` must live on ``accelerator.device``
    (``GroupWeights(..., device=accelerator.device)``). Call it once per Accelerator and GroupWeights."""
    if not isinstance(weights, GroupWeights):
        raise TypeError(f"weights must be an also_fused.GroupWeights, got {type(weights).__name__}")
    device = torch.device(accelerator.device)
    if weights.device.type != device.type or (device.index is not None and weights.device.index != device.index):
        raise ValueError(f"the group weights live on {weights.device}, the accelerator on {device}: make them with "
                         "GroupWeights(..., device=accelerator.device)")
    if optimizer is not None:
        optimizer = unwrap_optimizer(optimizer)
        check_scaler(scaler_of(accelerator), optimizer)
        step_after(optimizer, weights)
    accelerator.register_for_checkpointing(weights)
    return weights
