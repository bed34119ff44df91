"""transformers: ``GroupWeightedTrainer``, a ``transformers.Trainer`` that weighs per-sample losses by group.

Each example carries its group id in a column (``group_column``, ``"group_ids"`` by default). The loss is
``weighted_loss(per_sample_loss(outputs, inputs), group_ids)`` of ALSO when the Trainer's optimizer is an
``also_fused.ALSO`` (``optimizers=(ALSO(...), scheduler)``: its ``state_dict`` holds pi, so the Trainer's
``optimizer.pt`` keeps it), else of ``group_weights``, a ``GroupWeights`` that is stepped after each
optimizer step (a step post-hook, so ``gradient_accumulation_steps`` micro-batches feed one pi step) and
saved beside ``optimizer.pt`` as ``group_weights.pt``; ``train(resume_from_checkpoint=...)`` loads it.

The group column is added to the columns the Trainer keeps (``_set_signature_columns_if_needed``), so
``remove_unused_columns=True`` (the default) leaves it in the batch; the model never sees it. Labels
(``label_names``, ``["labels"]`` when the model's signature names none) reach ``per_sample_loss`` but are
not passed to the model, which therefore computes no loss of its own. ``per_sample_loss(outputs, inputs)``
returns one loss per example; the default, ``per_sample_cross_entropy``, takes classification logits
[B, C] with labels [B], or causal-LM logits [B, T, V] with labels [B, T] (the token cross entropy of the
next-token prediction, averaged per example over the labels that are not -100).

Evaluation (``evaluate``/``predict``) reports the unweighted mean of the per-sample losses and records
nothing for the pi step. With fp16 (a GradScaler) the optimizer beside ``group_weights`` must take the
scaler's fused route (``also_fused.AdamW``/``Adam``, or the Trainer's ``adamw_torch_fused``): the Trainer's
``adamw_torch`` is refused there, since the scaler would skip its step without the group weights learning
of it. ``compute_loss_func`` and label smoothing are not applied: compute them in ``per_sample_loss``.
DeepSpeed, which makes its own optimizer, is not supported with ``group_weights``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..also import ALSO
from ..group_weights import GroupWeights
from ._common import check_scaler, check_weights_beside, cloned_state, require, scaler_of, step_after, unwrap_optimizer

transformers = require("transformers", "transformers", "transformers")

__all__ = ["GroupWeightedTrainer", "per_sample_cross_entropy", "GROUP_WEIGHTS_NAME"]

GROUP_WEIGHTS_NAME = "group_weights.pt"
PerSampleLoss = Callable[[Any, dict[str, Any]], Tensor]


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs[0]


def per_sample_cross_entropy(outputs: Any, inputs: dict[str, Any]) -> Tensor:
    """Cross entropy per example, in float32: logits [B, C] with labels [B], or causal-LM logits [B, T, V]
    with labels [B, T] (position t predicts label t+1; the mean over each row's labels that are not -100,
    0 for a row with none)."""
    logits, labels = _logits(outputs), inputs["labels"]
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                                 ignore_index=-100).view(labels.shape)
        counted = (labels != -100).sum(dim=1).clamp(min=1)
        return tokens.sum(dim=1) / counted
    raise ValueError(f"per_sample_cross_entropy takes logits [B, C] with labels [B] or logits [B, T, V] with "
                     f"labels [B, T], got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: give "
                     "GroupWeightedTrainer(per_sample_loss=...)")


class GroupWeightedTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is the group-weighted sum of per-sample losses (module docstring).

    ``group_weights``: a ``GroupWeights`` (beside any optimizer but ALSO), stepped after each optimizer step
    and checkpointed as ``group_weights.pt``; leave it None with ``optimizers=(also_fused.ALSO(...), ...)``.
    ``group_column``: the batch key of the group ids. ``per_sample_loss(outputs, inputs) -> [B]``: default
    ``per_sample_cross_entropy``. Every other argument is the Trainer's.
    """

    def __init__(self, *args: Any, group_weights: Optional[GroupWeights] = None, group_column: str = "group_ids",
                 per_sample_loss: Optional[PerSampleLoss] = None, **kwargs: Any) -> None:
        if group_weights is not None and not isinstance(group_weights, GroupWeights):
            raise TypeError(f"group_weights must be an also_fused.GroupWeights, got {type(group_weights).__name__}")
        self.group_weights = group_weights
        self.group_column = group_column
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None or self.args.label_smoothing_factor != 0:
            raise ValueError("GroupWeightedTrainer computes the loss from per_sample_loss: compute_loss_func and "
                             "label_smoothing_factor are not applied (put them in per_sample_loss)")
        if group_weights is not None and self.optimizer is not None:
            check_weights_beside(unwrap_optimizer(self.optimizer), group_weights)
        self.label_names = list(self.label_names) or ["labels"]
        # the loss is computed here, not by the model: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._hooked: Optional[tuple[torch.optim.Optimizer, Any]] = None

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        group_ids = inputs.pop(self.group_column, None)
        outputs = model(**{k: v for k, v in inputs.items() if k not in self.label_names})
        losses = self.per_sample_loss(outputs, inputs)
        if not model.training:  # evaluation: nothing is recorded for the pi step
            loss = losses.float().mean()
        elif group_ids is None:
            raise KeyError(f"the batch has no {self.group_column!r} column (the group id of each example): add "
                           "it to the dataset, or name it with GroupWeightedTrainer(group_column=...)")
        else:
            loss = self._weights_owner().weighted_loss(losses, group_ids)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.group_column}
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _weights_owner(self) -> Any:
        optimizer = unwrap_optimizer(self.optimizer)
        if isinstance(optimizer, ALSO):
            return optimizer
        if self.group_weights is None:
            raise ValueError("no group weights: give GroupWeightedTrainer(group_weights=GroupWeights(...)) or "
                             "optimizers=(also_fused.ALSO(...), scheduler)")
        if self._hooked is None:
            raise RuntimeError("the group weights are stepped after the optimizer's steps, and the optimizer was "
                               "not made through create_optimizer (DeepSpeed makes its own): not supported")
        return self.group_weights

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in [self.group_column, *self.label_names]:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ------------------------------------------------------------ the pi step
    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.group_weights is not None:
            self._hook(unwrap_optimizer(self.optimizer))
        return optimizer

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        if self._hooked is not None:
            if self._hooked[0] is optimizer:
                return
            self._hooked[1].remove()
            self._hooked = None
        check_scaler(scaler_of(self.accelerator), optimizer)
        self._hooked = (optimizer, step_after(optimizer, self.group_weights))

    # ------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.group_weights is not None and self.args.should_save:
            torch.save(cloned_state(self.group_weights), os.path.join(output_dir, GROUP_WEIGHTS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.group_weights is None:
            return
        path = os.path.join(checkpoint, GROUP_WEIGHTS_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} has no {GROUP_WEIGHTS_NAME}: the group weights start from their "
                          "current state", stacklevel=2)
            return
        self.group_weights.load_state_dict(torch.load(path, map_location=self.group_weights.device,
                                                      weights_only=True))
