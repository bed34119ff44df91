"""ALSO: Adam on the parameters plus KL-regularised mirror ascent on group weights pi (docs/algorithm.md)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import functional as F
from ._step_hooks import optimizer_step
from ._transaction import StepTransaction
from .group_weights import GroupIds, GroupWeights, Simplex
from .theta import BUCKET_FLAGS, ThetaAdam

Closure = Callable[[Tensor, float], Any]


def _takes_arguments(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` cannot be called without arguments (the published closure takes two)."""
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to read (a builtin): taken as one of no arguments
        return False
    return False


class _OfWeights:
    """An attribute of ALSO that lives in its GroupWeights (``name`` there)."""

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj.weights, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.weights, self.name, value)


class ALSO(ThetaAdam):
    """Adaptive Loss Scaling Optimizer: min over theta, max over pi of sum_j pi_j L_j - tau KL(pi || pi_reg).

    The composition of ALSO's theta update (``also_fused.theta.ThetaAdam``: Adam with L2 weight
    decay coupled into the gradient and eps added to sqrt(v) before the bias correction) and a
    ``GroupWeights`` (``opt.weights``), whose mirror-ascent step is
    ``pi <- softmax((log(pi+eps) + c log(pi_reg) + pi_lr * S) / ((1+c) T))``, c = pi_decay*pi_lr,
    S_j the sum of the batch's losses of group j. ``mode="optimistic"`` first extrapolates both with
    the previous gradients (the Adam state then advances twice per step); ``"descent-ascent"`` does not.

    Two ways to call it:

    * closure API (the published one): ``opt.step(closure, group_ids)`` with
      ``closure(pi_selected, loss_scale) -> (per_sample_losses, extra)``;
    * loop API: ``loss = opt.weighted_loss(losses, group_ids); loss.backward(); opt.step()``. In
      optimistic mode the params hold the extrapolated point after ``step()``; ``eval()`` puts the
      iterate x back into them, ``train()`` the extrapolated point.

    ``stochastic_rounding`` / ``rounding_seed`` round 16-bit params as the drop-ins' options do;
    ``state_precision`` stores the Adam moments as the drop-ins' option does ("float32" by default,
    "bfloat16", "param", "int8"); ``group_reduction="mean"``, ``process_group`` (torch.distributed: pi bitwise equal on every
    rank, N ranks follow one process on the concatenated batch), ``shard_pi`` (each rank holds a slice of pi;
    ``opt.pi`` is then that slice) and ``validate`` are those of ``GroupWeights``. A rejected step (group ids outside [0, n_groups), non-finite losses) leaves the
    params, the Adam state, the step counts and pi exactly as they were, and ValueError names it:
    at once on the reference path; on the Triton kernels, without a host sync, from the first
    ``weighted_loss()``, ``step()`` or ``train()`` after the GPU has finished that step, or from
    ``eval()``, ``state_dict()``, ``load_state_dict()`` and ``check_errors()``, which wait for it.
    With FSDP2 the update runs on the local shards; checkpoint through ``also_fused.checkpoint``. The params
    share one device, pi's (params on several devices: GroupWeights beside a drop-in).
    ``step()`` returns the mean per-sample loss of the step as a 0-dim tensor (no host sync for it).
    """

    EXTRA_KEY = "also"
    # the pi side's settings, read and written where they live
    n_groups, loss_scale, pi_lr, pi_decay, pi_temperature = (_OfWeights() for _ in range(5))
    group_reduction, process_group, validate, device = (_OfWeights() for _ in range(4))
    pi_eps = _OfWeights("eps")

    def __init__(
        self,
        params: Iterable,
        n_groups: int,
        loss_scale: Optional[float] = None,
        batch_size: Optional[int] = None,
        mode: str = "optimistic",
        alpha: float = 1.0,
        pi_reg: Simplex = None,
        pi_init: Simplex = None,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        lr: Union[float, Tensor] = 1e-3,
        weight_decay: float = 1e-3,
        pi_lr: float = 1e-3,
        pi_decay: float = 1e-2,
        pi_temperature: float = 1.0,
        eps: float = F.FLOAT32_EPS,
        amsgrad: bool = False,
        backend: str = "auto",
        validate: bool = True,
        group_reduction: str = "sum",
        process_group: Optional[Any] = None,
        state_precision: str = "float32",
        stochastic_rounding: bool = False,
        rounding_seed: Optional[int] = None,
        shard_pi: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         mode=mode, alpha=alpha, backend=backend, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
        self.weights = GroupWeights(
            n_groups, loss_scale=loss_scale, batch_size=batch_size, mode=mode, pi_lr=pi_lr, pi_decay=pi_decay,
            pi_reg=pi_reg, pi_init=pi_init, pi_temperature=pi_temperature, eps=eps,
            group_reduction=group_reduction, process_group=process_group,
            device=self.param_groups[0]["params"][0].device, validate=validate, backend=backend, shard_pi=shard_pi)
        self._pi_steps = self.weights.step_driver()  # the only way in to the group weights
        self._errors = self._pi_steps.errors  # the theta kernels read the same device error word

    # ------------------------------------------------------------------ public
    @property
    def pi(self) -> Tensor:
        """The current group weights, float32 [n_groups] on the params' device (do not modify in place)."""
        return self.weights.pi

    @property
    def pi_reg(self) -> Tensor:
        """The KL anchor, float32 [n_groups] (uniform unless given)."""
        return self.weights.pi_reg

    @torch.compiler.disable
    def weighted_loss(self, losses: Tensor, group_ids: GroupIds) -> Tensor:
        """``loss_scale * sum_i pi[g_i] * l_i`` for the loop API, differentiable in the losses.

        Records the detached losses for the pi step of the next ``step()``; call it once per
        micro-batch when accumulating gradients. In optimistic mode pi is the extrapolated pi_mid.
        """
        return self._pi_steps.weighted_loss(losses, group_ids)

    def check_errors(self, wait: bool = True) -> None:
        """Raise now for bad input that the device found in an earlier step (see ``validate``).

        With ``wait=False`` only what the GPU has already finished is looked at (no host sync)."""
        self.weights.check_errors(wait)

    def select_batch(self, threshold: float, strategy: str = "pi", order: str = "desc",
                     generator: Optional[torch.Generator] = None) -> tuple[int, Tensor]:
        """Draw ``max(1, n_groups - cutoff)`` distinct ids, cutoff where pi's sorted cumulative mass reaches ``threshold``."""
        return self.weights.select_batch(threshold, strategy, order, generator)

    @optimizer_step
    def step(self, closure: Optional[Callable[..., Any]] = None, group_ids: Optional[GroupIds] = None) -> Any:
        """One ALSO step; returns the batch-mean per-sample loss (0-dim tensor), or the closure's loss.

        * ``step(closure, group_ids)`` (published API): ``closure(pi_selected, loss_scale) -> (losses,
          extra)`` must zero the grads, run forward, backward ``loss_scale * sum(pi_selected * losses)``
          and return the detached per-sample losses;
        * ``step()`` (loop API): uses the losses recorded by ``weighted_loss`` since the last step;
        * ``step(closure)`` with a closure of no arguments (torch.optim's convention, as Lightning and
          accelerate call it): the closure runs with gradients on, computing its loss through
          ``weighted_loss`` and calling ``backward``; then the loop API's step; returns the closure's
          loss. If the closure raises, the batches it recorded are dropped.
        """
        if closure is None:
            if group_ids is not None:
                self._pi_steps.drop_batches()  # as for every rejected loop step: the batch is dropped
                raise TypeError("group_ids is given without a closure; the loop API takes them in weighted_loss()")
            return self._step_loop()
        if group_ids is not None:
            return self._step_closure(closure, group_ids)
        if _takes_arguments(closure):
            raise TypeError("a closure of (pi_selected, loss_scale) is the published API, which needs group_ids: "
                            "opt.step(closure, group_ids) (a closure of no arguments follows torch.optim's convention)")
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._pi_steps.drop_batches()
            raise
        self._step_loop()
        return loss

    def _check_devices(self, devices: set[torch.device]) -> None:
        # pi and the device checks' error word live on one device, and a step the device rejects must leave
        # every param as it was (checked before any backend is chosen for the devices)
        if len(devices) > 1:
            raise ValueError(f"ALSO's params must share one device (pi's), got {sorted(map(str, devices))}: use "
                             "GroupWeights beside an optimizer of params on several devices")

    # ---------------------------------------------------------------- steps
    def _step_closure(self, closure: Closure, group_ids: GroupIds) -> Tensor:
        self.check_errors(wait=False)
        pi_steps = self._pi_steps
        ids = pi_steps.parse_ids(group_ids)
        transaction = self._begin_step("closure")
        moved: list[tuple[Tensor, dict]] = []
        try:
            if self.mode == "optimistic":
                moved = self._extrapolate_closure()
            selected, scale = pi_steps.closure_weights(ids)
            with torch.enable_grad():
                result = closure(selected, scale)
            losses = pi_steps.closure_losses(result, ids)
            items = self._planner.grad_items()
        except BaseException:
            self._restore(moved)  # the rejected step leaves the params and the state as they were
            self._transaction = None
            transaction.undo()
            raise
        pi_steps.drop_batches()
        pi_steps.share_error_word()
        self._update_closure(items, moved)
        pi_steps.ascend_closure(ids, losses)
        self._finish_step(transaction)
        return losses.float().mean()

    def _step_loop(self) -> Tensor:
        self.check_errors(wait=False)
        pi_steps = self._pi_steps
        ids, losses, staged_mean = pi_steps.take_batch()  # a rejected step drops its batch: run it again
        self._check_training()
        pi_steps.check_batch(losses)
        reused = self._planner.reused(self._loop_tag(), BUCKET_FLAGS)
        if reused is None:
            self._planner.grad_items()  # refuses bad gradients before anything changes
        scaling = self._grad_scaling()  # under GradScaler.step: unscale in the update, skip on overflow
        transaction = self._begin_step("loop")
        pi_steps.share_error_word()
        # a staged pi step launches nothing at step(): the theta update then reports the step to the host
        reported = self._update(reused, pi_steps.report_slot() if staged_mean is not None else None, scaling)
        mean = pi_steps.ascend(ids, losses, staged_mean, reported, None if scaling is None else scaling.found_inf)
        self._finish_step(transaction)
        return mean

    def _begin_step(self, api: str) -> StepTransaction:
        """The step's transaction over the theta side (the API in use, the state entries it creates or drops)
        and the group weights' host state; then switch to ``api``."""
        transaction = StepTransaction(self._errors, (self, self._pi_steps))
        self._set_api(api)
        self._transaction = transaction if transaction.recording else None
        return transaction

    def _finish_step(self, transaction: StepTransaction) -> None:
        self._transaction = None
        self._pi_steps.commit(transaction)

    # ----------------------------------------------------------- state_dict
    def _check_pending(self, wait: bool) -> None:
        self.weights.check_errors(wait)

    def extra_state(self) -> dict[str, Any]:
        """The ``"also"`` entry: pi, pi_mid, pi_reg, the previous batch and the hyper-parameters of the
        pi step (the group weights' state), and alpha, the API in use and train/eval (the theta side's)."""
        extra = {**self._pi_steps.state(), **super().extra_state()}
        if self._api == "closure":
            extra["pi_mid"] = None  # recomputed at the start of every closure step
        return extra

    def check_extra_state(self, extra: dict[str, Any]) -> None:
        self._pi_steps.check_state(extra)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._pi_steps.load_state(extra)
