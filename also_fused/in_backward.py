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
batch changes no param), the theta update during backward, pi's step in ``step()``. ``GradScaler`` is refused at its first
``scaler.step``: the update has already used the scaled gradients then (bf16 autocast needs no scaler).

DDP: ``StepInBackward(optimizer, ddp_model=ddp)`` registers a communication hook instead: each DDP bucket is
averaged over the ranks as DDP's default hook does (divide, then all-reduce), then updated by one fused launch,
so the params equal, bit for bit, those of DDP with the plain step; the buckets are DDP's (``bucket_cap_mb``),
and the gradients stay in DDP's buckets (``gradient_as_bucket_view=True`` avoids a second copy). With
torch.distributed running and no ``ddp_model`` the hooks would update from local gradients, so that is
refused; FSDP2's sharded params (DTensor) are refused too (its reduce-scatter runs after backward's hooks).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._dtensor import is_dtensor
from ._step_hooks import grad_disabled
from .adam import Adam
from .storage import dense_like
from .theta import ThetaAdam

__all__ = ["StepInBackward"]

_MB = 1 << 20


class StepInBackward:
    """Runs ``optimizer``'s update inside each backward pass, in buckets of about ``bucket_mb`` MB of params
    (or DDP's buckets, after their all-reduce, with ``ddp_model``).

    ``remove()`` takes the hooks away (the optimizer then steps as before; a DDP communication hook cannot be
    removed, so after ``remove()`` it only averages the gradients)."""

    def __init__(self, optimizer: Union[Adam, ThetaAdam], bucket_mb: float = 25.0, *,
                 ddp_model: Optional[torch.nn.parallel.DistributedDataParallel] = None) -> None:
        if not isinstance(optimizer, (Adam, ThetaAdam)):
            raise TypeError(f"the step inside the backward pass takes also_fused.Adam, AdamW, ThetaAdam or ALSO, "
                            f"got {type(optimizer).__name__}: step that one after backward as usual")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if ddp_model is not None and not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_model must be a DistributedDataParallel module, got {type(ddp_model).__name__}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if any(is_dtensor(p) for p in params):
            raise TypeError("FSDP2 (DTensor) params are not supported by the step inside the backward pass: FSDP2 "
                            "reduce-scatters the gradients after the hooks run; step after backward as usual "
                            "(FSDP2 already frees each layer's unsharded gradients)")
        if ddp_model is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("torch.distributed is running: the step inside the backward pass would update "
                               "from each rank's local gradients; wrap the model in DistributedDataParallel and "
                               "pass it as StepInBackward(optimizer, ddp_model=ddp)")
        self.optimizer = optimizer
        self.bucket_bytes = int(bucket_mb * _MB)
        self._handles: list[Any] = []
        self._bucket: list[tuple[Tensor, int]] = []
        self._bucket_size = 0
        self._in_backward = False
        self._passes_since_step = 0
        self._ddp_updated: list[Tensor] = []
        # what a gradient hook needs of its param (group index, bytes), looked up once: the hooks run for every
        # param every step
        self._slot_of: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._slot_of[id(p)] = (gi, p.numel() * p.element_size())
        if ddp_model is None:
            for p in params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        else:
            self._process_group = ddp_model.process_group
            ddp_model.register_comm_hook(None, self._on_ddp_bucket)
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._on_step))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------ the hooks
    def _start_pass(self) -> None:
        if self._passes_since_step:
            raise RuntimeError("a second backward pass before optimizer.step(): with the step inside the "
                               "backward pass every pass is a step, so gradient accumulation over "
                               "micro-batches is not possible; call optimizer.step() after each backward, "
                               "or accumulate without StepInBackward (remove() it)")
        self._in_backward = True

    def _on_gradient(self, p: Tensor) -> None:
        if not self._in_backward:  # the first gradient of this backward pass
            self._start_pass()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        grad = p.grad
        if grad.layout is not torch.strided:
            raise RuntimeError("sparse gradients are not supported by the step inside the backward pass")
        if not dense_like(grad, p):
            raise RuntimeError("parameters and their gradients must be dense in one layout (contiguous, or "
                               "channels_last with equal strides)")
        group, nbytes = self._slot_of[id(p)]
        self._bucket.append((p, group))
        self._bucket_size += nbytes
        if self._bucket_size >= self.bucket_bytes:
            self._update_bucket()

    def _end_of_backward(self) -> None:
        self._update_bucket()
        self._in_backward = False
        self._passes_since_step += 1

    def _on_ddp_bucket(self, state, bucket):  # no annotations: DDP accepts only the real classes there
        """DDP's communication hook: average the bucket over the ranks (DDP's default hook: divide, then
        all-reduce), then update its params from the averaged gradients (views of DDP's bucket)."""
        if not self._handles:  # removed: DDP keeps the hook, which then only averages
            return self._all_reduce_mean(bucket.buffer())
        if not self._in_backward:
            self._start_pass()
        if bucket.is_last():
            self._in_backward = False
            self._passes_since_step += 1

        def update(future: torch.futures.Future) -> Tensor:
            items, grads = [], []
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                slot = self._slot_of.get(id(p))
                if slot is not None:
                    items.append((p, slot[0]))
                    grads.append(g)
            if items:
                with grad_disabled():
                    self.optimizer.update_params(items, grads)
                self._ddp_updated.extend(p for p, _ in items)
            return future.value()

        return self._all_reduce_mean(bucket.buffer()).then(update)

    def _all_reduce_mean(self, buffer: Tensor) -> torch.futures.Future:
        buffer.div_(dist.get_world_size(self._process_group))
        return dist.all_reduce(buffer, group=self._process_group, async_op=True).get_future().then(
            lambda f: f.value()[0])

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
            raise RuntimeError("GradScaler cannot drive the step inside the backward pass: the update has run "
                               "during backward, from the scaled gradients, before the scaler could check them "
                               "for inf; use bf16 autocast (no scaler), or step after backward without "
                               "StepInBackward")
        # DDP's gradients outlive backward in its buckets: the params updated there are not stepped again
        for p in self._ddp_updated:
            p.grad = None
        self._ddp_updated.clear()

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._passes_since_step = 0

    def _update_bucket(self) -> None:
        items, self._bucket, self._bucket_size = self._bucket, [], 0
        if not items:
            return
        with grad_disabled():
            self.optimizer.update_params(items)
        for p, _ in items:
            p.grad = None
