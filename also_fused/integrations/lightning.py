"""Lightning: group weights stepped with the Trainer's optimizer steps and kept in its checkpoints.

**ALSO needs no callback.** ``configure_optimizers`` returns an ``also_fused.ALSO``; ``training_step``
returns ``opt.weighted_loss(losses, group_ids)``, with ``opt = self.optimizers().optimizer`` (in automatic
optimization ``self.optimizers()`` is Lightning's wrapper, whose ``.optimizer`` is the ALSO). Lightning
calls ``opt.step(closure)`` with a closure of no arguments, which ALSO runs as torch.optim does; with
``accumulate_grad_batches`` each micro-batch's ``weighted_loss`` is recorded and the one step uses them
all. pi is in ALSO's ``state_dict()`` (the ``"also"`` entry), so Lightning's checkpoints keep it and
``trainer.fit(..., ckpt_path=...)`` restores it. Lightning does not call the optimizer's
``train()``/``eval()``: in optimistic mode the params hold ALSO's extrapolated point throughout, which
the checkpoint saves and restores as it is; call ``opt.eval()`` yourself to evaluate at the iterate x.

**GroupWeights beside any optimizer**: ``GroupWeightsCallback(weights)``. ``training_step`` returns
``weights.weighted_loss(losses, group_ids)``; the callback steps ``weights`` after every step of the
Trainer's optimizer (a step post-hook, so accumulated micro-batches feed one pi step), keeps their state
in the checkpoint, and refuses at fit start an fp16 GradScaler beside an optimizer that does not take
its fused route (use ``also_fused.AdamW`` or ``also_fused.Adam`` there, or torch's with ``fused=True``;
a step the scaler skips then leaves pi as it was). Lightning's own rule: under a scaler it refuses
``gradient_clip_val`` for an optimizer that unscales inside its step, as every also_fused optimizer does.

Lightning is imported from ``lightning.pytorch``, else from ``pytorch_lightning``.
"""
from __future__ import annotations

from typing import Any, Optional

from ..group_weights import GroupWeights
from ._common import check_scaler, cloned_state, scaler_of, step_after

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("also_fused.integrations.lightning needs the 'lightning' package "
                          "(pip install lightning)") from None

__all__ = ["GroupWeightsCallback"]


class GroupWeightsCallback(pl.Callback):
    """Steps a ``GroupWeights`` after each optimizer step of the Trainer and keeps it in the checkpoint.

    ``optimizer_index``: which of the Trainer's optimizers drives the pi step; None (the default) needs
    exactly one. A step that GradScaler skips on the fused route (``found_inf``) leaves pi unchanged; an
    fp16 scaler beside an optimizer without that route is refused at fit start. The state
    (``weights.state_dict()``) is saved in the checkpoint under this callback's ``state_key`` and loaded by
    ``trainer.fit(..., ckpt_path=...)``.
    """

    def __init__(self, weights: GroupWeights, optimizer_index: Optional[int] = None) -> None:
        if not isinstance(weights, GroupWeights):
            raise TypeError(f"weights must be an also_fused.GroupWeights, got {type(weights).__name__}")
        self.weights = weights
        self.optimizer_index = optimizer_index
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        optimizer = self._optimizer(trainer)
        check_scaler(scaler_of(trainer.precision_plugin), optimizer)
        self._handles.append(step_after(optimizer, self.weights))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return cloned_state(self.weights)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights.load_state_dict(state_dict)

    def _optimizer(self, trainer: Any) -> Any:
        optimizers = list(trainer.optimizers)
        if self.optimizer_index is None:
            if len(optimizers) != 1:
                raise ValueError(f"the Trainer has {len(optimizers)} optimizers: give GroupWeightsCallback("
                                 "weights, optimizer_index=i), the one whose steps drive the pi step")
            return optimizers[0]
        return optimizers[self.optimizer_index]

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()
