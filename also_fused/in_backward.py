"""The optimizer step inside the backward pass, bucket by bucket, so that a step never holds every gradient.

    stepper = also_fused.StepInBackward(optimizer, bucket_mb=25)
    for batch in loader:
        loss_fn(model(batch)).backward()   # updates the params; their .grad is None afterwards
        optimizer.step()                   # closes the step (the update already ran); schedulers as usual
        scheduler.step()

As soon as autograd has accumulated a param's gradient (``Tensor.register_post_accumulate_grad_hook``) the
param joins the current bucket; a bucket of ``bucket_mb`` megabytes of params, in the order backward
produces their gradients, is updated by one fused launch and its gradients are freed. The last bucket is
updated when the backward pass ends. The update is the one ``optimizer.step()`` makes, element for element
(the same bits), with the param groups' hyper-parameters at the time of the backward pass.

What cannot fit is refused: a second backward pass before ``optimizer.step()`` (gradient accumulation over
micro-batches: the first pass already stepped; use the plain step for it), sparse gradients, and the
optimizers other than ``Adam``, ``AdamW``, ``ThetaAdam`` and ``ALSO``. Global-norm clipping cannot run either: the
gradients are gone when backward returns (clip per bucket is not offered). ALSO's loop API works unchanged:
``weighted_loss`` before backward (its device checks are then known to the theta kernels, so a rejected
batch changes no param), the theta update during backward, pi's step in ``step()``.
"""
from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from .adam import Adam
from .storage import dense_like
from .theta import ThetaAdam

__all__ = ["StepInBackward"]

_MB = 1 << 20


class StepInBackward:
    """Runs ``optimizer``'s update inside each backward pass, in buckets of about ``bucket_mb`` MB of params.

    ``remove()`` takes the hooks away (the optimizer then steps as before)."""

    def __init__(self, optimizer: Union[Adam, ThetaAdam], bucket_mb: float = 25.0) -> None:
        if not isinstance(optimizer, (Adam, ThetaAdam)):
            raise TypeError(f"the step inside the backward pass takes also_fused.Adam, AdamW, ThetaAdam or ALSO, "
                            f"got {type(optimizer).__name__}: step that one after backward as usual")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.optimizer = optimizer
        self.bucket_bytes = int(bucket_mb * _MB)
        self._group_of: dict[int, int] = {}
        self._handles: list[Any] = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._group_of[id(p)] = gi
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        self._handles.append(optimizer.register_step_post_hook(self._on_step))
        self._bucket: list[tuple[Tensor, int]] = []
        self._bucket_size = 0
        self._in_backward = False
        self._passes_since_step = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------ the hooks
    def _on_gradient(self, p: Tensor) -> None:
        if not self._in_backward:  # the first gradient of this backward pass
            if self._passes_since_step:
                raise RuntimeError("a second backward pass before optimizer.step(): with the step inside the "
                                   "backward pass every pass is a step, so gradient accumulation over "
                                   "micro-batches is not possible; call optimizer.step() after each backward, "
                                   "or accumulate without StepInBackward (remove() it)")
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._in_backward = True
        grad = p.grad
        if grad.layout is not torch.strided:
            raise RuntimeError("sparse gradients are not supported by the step inside the backward pass")
        if not dense_like(grad, p):
            raise RuntimeError("parameters and their gradients must be dense in one layout (contiguous, or "
                               "channels_last with equal strides)")
        self._bucket.append((p, self._group_of[id(p)]))
        self._bucket_size += p.numel() * p.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._update_bucket()

    def _end_of_backward(self) -> None:
        self._update_bucket()
        self._in_backward = False
        self._passes_since_step += 1

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._passes_since_step = 0

    def _update_bucket(self) -> None:
        items, self._bucket, self._bucket_size = self._bucket, [], 0
        if not items:
            return
        with torch.no_grad():
            self.optimizer.update_params(items)
        for p, _ in items:
            p.grad = None
