"""The group weights pi as a component: KL-regularised mirror ascent on the simplex, beside any optimizer."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, _collectives
from . import functional as F
from ._input_errors import DeviceInputErrors
from ._step_hooks import without_grad
from ._transaction import StepTransaction
from .backends import resolve_backend

GroupIds = Union[Tensor, Sequence[int]]
Simplex = Optional[Union[Tensor, Sequence[float]]]
PiInputs = tuple[Optional[Tensor], Tensor]  # (ids, per-sample terms), or (None, dense per-group sums S)
STATE_KEYS = ("n_groups", "mode", "loss_scale", "pi_lr", "pi_decay", "pi_temperature", "pi_eps", "pi", "pi_mid",
              "pi_reg", "prev_ids", "prev_losses")
# attribute name -> state_dict key of the float hyper-parameters
FLOAT_STATE = (("loss_scale", "loss_scale"), ("pi_lr", "pi_lr"), ("pi_decay", "pi_decay"),
               ("pi_temperature", "pi_temperature"), ("eps", "pi_eps"))


class GroupWeights:
    """Group weights pi for distributionally robust training with any optimizer (docs/algorithm.md sec. 1, 4).

    ``weighted_loss(l, g) = loss_scale * sum_i pi[g_i] l_i`` is the model's loss; ``step()`` then takes
    the mirror-ascent step ``pi <- softmax((log(pi+eps) + c log(pi_reg) + pi_lr S) / ((1+c) T))``,
    c = pi_decay * pi_lr, S_j the sum of the losses of group j recorded since the last step::

        loss = weights.weighted_loss(per_sample_losses, group_ids)
        loss.backward(); optimizer.step(); weights.step()

    ``weighted_loss`` may be called once per micro-batch: every loss recorded since the last
    ``step()`` feeds the next pi step. On the Triton kernels with the sum reduction (up to 1024 groups,
    batch x next_pow2(n_groups) up to 2^18)
    ``weighted_loss`` computes its batch's pi step in the same launch as the weights and ``step()`` only
    makes it current, without a launch of its own (several micro-batches: ``step()`` launches the pi
    step of all of them); the result is the same, bitwise. ``mode="optimistic"`` weighs the losses with
    the extrapolated ``pi_mid = PiUpdate(pi, G_prev)`` instead of pi (docs/algorithm.md sec. 6). ``group_reduction="mean"``
    uses group means: S_j = the mean loss of group j, and the loss is
    ``sum_{j present} pi_j mean_j / sum_{j present} pi_j`` (``loss_scale`` does not apply).

    Under torch.distributed (``process_group``, or the default group when it has several ranks) the
    pi step uses every rank's losses, so pi stays bitwise equal on every rank; with ``batch_size`` =
    the per-rank batch, N ranks follow one process on the concatenated batch (given that the
    gradients are averaged over the same ranks, as DDP and FSDP2 do). Every rank must make every call.

    ``shard_pi=True`` (under such a group) splits pi, pi_mid and pi_reg over the ranks: each holds a run of whole
    blocks of ``functional.PI_BLOCK`` groups, ``shard_range``, and ``pi`` is that slice (``gather_pi()`` the
    whole). The softmax's max and sum over every group come from each rank's max and block partials (one small
    all-reduce and one small all-gather per pi update; the normaliser adds the block partials in block order on
    every path), so the sharded pi is bitwise the unsharded one; ``weighted_loss`` fetches pi at its batch's ids
    from their owners. Values are then checked on the host, and a bad batch on any rank raises on every rank
    before anything changes. ``state_dict()`` is each rank's shard. Sum reduction only (docs/semantics.md).

    Bad input (ids outside [0, n_groups), NaN or inf losses, wrong shapes, dtypes or devices)
    raises ValueError or TypeError and leaves pi, pi_mid and the rest of the state exactly as they
    were. Shapes, dtypes and devices are checked at once. With ``validate=True`` the values are
    checked too: on the reference path (CPU) on the host, ids by ``weighted_loss()`` and finiteness
    by ``step()``; on the Triton kernels on the device, without a host sync: the rejected step is a
    no-op there, and the error is raised by the first ``weighted_loss()`` or ``step()`` after the
    GPU has finished that step, or by ``check_errors()``, ``state_dict()`` or ``load_state_dict()``,
    which wait for it (on a CPU at once). The batches recorded since are dropped: run them again.
    The theta optimizer is the caller's: it is not rolled back. ``validate=False`` skips the value
    checks, on every path alike: an id outside [0, n_groups) then takes no part (it weighs 0 in the
    loss, adds nothing to the group sums and is not counted), and a NaN or inf loss is not caught (it
    makes the loss, and through the step pi, non-finite).
    """

    def __init__(
        self,
        n_groups: int,
        *,
        loss_scale: Optional[float] = None,
        batch_size: Optional[int] = None,
        mode: str = "descent-ascent",
        pi_lr: float = 1e-3,
        pi_decay: float = 1e-2,
        pi_reg: Simplex = None,
        pi_init: Simplex = None,
        pi_temperature: float = 1.0,
        eps: float = F.FLOAT32_EPS,
        group_reduction: str = "sum",
        process_group: Optional[Any] = None,
        device: Optional[Union[str, torch.device]] = None,
        validate: bool = True,
        backend: str = "auto",
        shard_pi: bool = False,
    ) -> None:
        _checks.check_choice("group_reduction", group_reduction, _checks.REDUCTIONS)
        if not isinstance(shard_pi, bool):
            raise TypeError(f"shard_pi must be True or False, got {shard_pi!r}")
        if shard_pi and group_reduction != "sum":
            raise ValueError("shard_pi=True takes group_reduction='sum' (the group means need every group's counts)")
        _checks.positive_int("n_groups", n_groups)
        _checks.check_choice("mode", mode, _checks.MODES)
        loss_scale = _checks.resolve_loss_scale(n_groups, loss_scale, batch_size, group_reduction)
        _checks.check_pi_hyperparameters(pi_lr, pi_decay, pi_temperature)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        pi_reg_host = _checks.as_simplex(pi_reg, n_groups, "pi_reg")
        pi_init_host = _checks.as_simplex(pi_init, n_groups, "pi_init")
        device = _as_device(device)
        self._backend = resolve_backend(backend, device)
        self.n_groups = n_groups
        self.mode = mode
        self.loss_scale = loss_scale
        self.pi_lr = float(pi_lr)
        self.pi_decay = float(pi_decay)
        self.pi_temperature = float(pi_temperature)
        self.eps = float(eps)
        self.group_reduction = group_reduction
        self.process_group = process_group
        self.device = device
        self._device_index = -1 if device.type == "cpu" else device.index  # as Tensor.get_device() gives it
        self.validate = validate
        self.shard_pi = shard_pi
        # sharded: this rank's groups [start, stop) of pi, pi_mid and pi_reg (None: the whole of them)
        self._shard: Optional[tuple[int, int]] = None
        group = _collectives.reduce_group(process_group) if shard_pi else None
        if group is not None:
            self._shard = _collectives.shard_bounds(n_groups, _collectives.world_size(group),
                                                    _collectives.rank_of(group))
        start, stop = self.shard_range
        if pi_init_host is None:
            self._pi = torch.full((stop - start,), 1.0 / n_groups, dtype=torch.float32, device=device)
        else:
            self._pi = pi_init_host[start:stop].to(device)
        self._pi_reg = None if pi_reg_host is None else pi_reg_host[start:stop].to(device)
        self._log_pi_reg = None if self._pi_reg is None else F.blockwise_log(self._pi_reg)
        self._pi_mid = self._pi.clone() if mode == "optimistic" else None
        # ALSO's closure API: the previous batch, whose G extrapolates pi at the start of the next step
        self._prev_ids: Optional[Tensor] = None
        self._prev_losses: Optional[Tensor] = None
        # (ids, losses, None, None) of each weighted_loss() since the last step; staged: (ids, a copy of the
        # losses, the mean the launch wrote, the staged key)
        self._recorded: list[tuple[Tensor, Tensor, Optional[Tensor], Optional[tuple]]] = []
        # validation on the kernels' path runs on the device (no host sync; see _input_errors.py)
        # (sharded: on the host, every rank told of any rank's bad batch before anything changes)
        self._errors = (DeviceInputErrors(device, n_groups)
                        if validate and self._backend.checks_values_on_device and self._shard is None else None)
        self._reported = False  # the step's last launch wrote its error report (see _input_errors.py)
        self._launches: dict[Any, dict] = {}  # kernels' launches kept between steps, by use (not copied)
        self._steps_taken = 0
        # the sum reduction on the kernels, up to 1024 groups and batches of up to _staged_max_batch samples:
        # weighted_loss() runs the pi step of its batch in its own launch and stages the result; step() then
        # only marks it pending (one batch since the last step), and the next weighted_loss() (or _flush, for
        # all else that reads pi) commits it
        self._staged_max_batch = (self._backend.staged_pi_max_batch(n_groups)
                                  if group_reduction == "sum" and self._shard is None else 0)
        self._stage = self._backend.pi_stage(n_groups) if self._staged_max_batch > 0 else None
        self._pending = False  # the stage holds the last step's pi (and pi_mid), not yet in _pi
        self._positions: Optional[Tensor] = None  # sharded: 0, 1, ..., B - 1 (the gathered weights' ids)
        self._step_driver = PiStepDriver(self)

    # ------------------------------------------------------------------ public
    @property
    def pi(self) -> Tensor:
        """The current group weights, float32 [n_groups] (do not modify in place); with a sharded pi this rank's
        slice, the groups ``shard_range`` (``gather_pi()`` gives the whole)."""
        self._flush()
        return self._pi

    @property
    def shard_range(self) -> tuple[int, int]:
        """The groups [start, stop) whose weights this rank holds: (0, n_groups) unless pi is sharded."""
        return self._shard if self._shard is not None else (0, self.n_groups)

    @property
    def sharded(self) -> bool:
        """Whether this rank holds a slice of pi (``shard_pi=True`` under a process group of several ranks)."""
        return self._shard is not None

    @property
    def shard_rank(self) -> tuple[int, int]:
        """(rank, number of ranks) of the process group over which pi is sharded ((0, 1) unsharded)."""
        if self._shard is None:
            return 0, 1
        group = self._group()
        return _collectives.rank_of(group), _collectives.world_size(group)

    def gather_pi(self) -> Tensor:
        """The whole of pi, float32 [n_groups], on every rank (a collective when pi is sharded: every rank calls it;
        n_groups floats on each rank)."""
        if self._shard is None:
            return self.pi
        return _collectives.gather_shards(self.pi, self.n_groups, self._group())

    @property
    def pi_mid(self) -> Tensor:
        """The weights ``weighted_loss`` uses: pi_mid = PiUpdate(pi, G_prev) in optimistic mode, else pi (sharded:
        this rank's slice)."""
        self._flush()
        return self._pi_mid if self.mode == "optimistic" else self._pi

    @property
    def pi_reg(self) -> Tensor:
        """The KL anchor, float32 [n_groups] (uniform unless given; sharded: this rank's slice)."""
        if self._pi_reg is None:
            return torch.full_like(self._pi, 1.0 / self.n_groups)
        return self._pi_reg

    @torch.compiler.disable
    def weighted_loss(self, losses: Tensor, group_ids: GroupIds) -> Tensor:
        """``loss_scale * sum_i w[g_i] l_i`` with w = pi (pi_mid in optimistic mode), differentiable in the losses.

        Records the detached losses for the next ``step()``. With the mean reduction each call
        normalises by its own micro-batch's counts; the pi step uses the counts of the whole step.
        """
        return self._weighted_loss(losses, group_ids)

    def _weighted_loss(self, losses: Tensor, group_ids: GroupIds) -> Tensor:
        self.check_errors(wait=False)
        if self._shard is not None:
            return self._weighted_loss_sharded(losses, group_ids)
        if self._stage is not None and self._plain_batch(losses, group_ids):
            return self._weighted_loss_staged(losses, group_ids)
        ids = self._as_ids(group_ids)
        self._check_losses(losses, ids, finite=False)
        word = None if self._errors is None else self._errors.word
        if (self._stage is not None and losses.dtype == torch.float32 and self._group() is None
                and ids.shape[0] <= self._staged_max_batch):
            return self._weighted_loss_staged(losses.contiguous(), ids.contiguous())
        weights = self.pi_mid
        if self.group_reduction == "mean":
            self._flag_bad("this weighted_loss() call", ids, losses.detach())
            sample_weights = self._group_mean_weights(weights, ids)
            loss = (sample_weights.to(losses.dtype) * losses).sum().float()
        else:
            loss = self._backend.weighted_loss(weights, ids, losses, self.loss_scale, error_word=word,
                                               cache=self._launches.setdefault("weights", {}))
            if word is not None:
                self._errors.check_now("this weighted_loss() call")
        self._recorded.append((ids, losses.detach(), None, None))
        return loss

    def _weighted_loss_sharded(self, losses: Tensor, group_ids: GroupIds) -> Tensor:
        """The weighted loss with pi sharded: the batch checked on every rank (any rank's refusal raises on all),
        the weights pi[g_i] fetched from their owners (``_collectives.values_at``), then the backend's weighted
        loss of those weights at ids 0..B-1, which gives the bits of the unsharded call."""
        ids = self._agreed(lambda: self._checked_batch(losses, group_ids))
        weights = _collectives.values_at(self._pi_mid if self.mode == "optimistic" else self._pi, ids,
                                         *self._shard, self._group())
        loss = self._backend.weighted_loss(weights, self._positions_of(ids.numel()), losses, self.loss_scale)
        self._recorded.append((ids, losses.detach(), None, None))
        return loss

    def _checked_batch(self, losses: Any, group_ids: GroupIds) -> Tensor:
        ids = self._as_ids(group_ids)
        self._check_losses(losses, ids, finite=False)
        return ids

    def _agreed(self, check: Any) -> Any:
        """``check()``'s result; sharded, every rank learns whether any rank's check raised (ValueError or
        TypeError), and then every rank raises, before anything changes."""
        if self._shard is None:
            return check()
        result, error = None, None
        try:
            result = check()
        except (ValueError, TypeError) as exc:
            error = exc
        _collectives.agree_on_error(error, self._group(), self.device)
        return result

    def _positions_of(self, n: int) -> Tensor:
        if self._positions is None or self._positions.numel() < n:
            self._positions = torch.arange(max(n, 1024), dtype=torch.int64, device=self.device)
        return self._positions[:n]

    def _plain_batch(self, losses: Any, ids: Any) -> bool:
        """Whether the batch is what the checks would pass unchanged to the staged path: float32 losses and int64
        ids, 1-D, of one non-zero length up to the staged path's limit, contiguous, on pi's device, and no
        torch.distributed group (values are checked on the device there). Any other batch goes through the
        checks, which convert or refuse it (and a larger one then takes the pi step at step())."""
        index = self._device_index
        return (type(losses) is Tensor and type(ids) is Tensor and losses.dtype is torch.float32
                and ids.dtype is torch.int64 and losses.dim() == 1 and losses.shape == ids.shape
                and 0 < losses.shape[0] <= self._staged_max_batch
                and losses.get_device() == index and ids.get_device() == index
                and losses.is_contiguous() and ids.is_contiguous() and self._group() is None)

    def _weighted_loss_staged(self, losses: Tensor, ids: Tensor) -> Tensor:
        """The weighted loss, and this batch's pi step staged (one launch): step() takes it when it was the only
        batch recorded since the last step (several micro-batches: step() runs the pi step of all of them)."""
        staged = self._launches.get("staged")
        if staged is None:  # bound to pi, pi_mid, the stage, log(pi_reg) and the error word (see _load_state)
            word = None if self._errors is None else self._errors.word
            staged = self._launches["staged"] = self._backend.staged_pi_step(self._pi, self._pi_mid, self._stage,
                                                                             self._log_pi_reg, word)
        key = self._staged_key()
        loss, mean, copy = staged.step(ids, losses, self._pending, self.loss_scale, key)
        self._pending = False
        if self._errors is not None:
            self._errors.check_now("this weighted_loss() call")
        self._recorded.append((ids, copy, mean, key))
        return loss

    def _staged_key(self) -> tuple[float, ...]:
        # what a staged pi step was computed with besides the losses (pi_reg changes only with a load, which
        # drops the recorded batches)
        return self.pi_lr, self.pi_decay, self.pi_temperature, self.eps

    def _flush(self) -> None:
        """Commit the pi step the last step() left staged, for everything that reads pi but the staged path."""
        if self._pending:
            self._pending = False
            self._backend.commit_pi_stage(self._stage, self._pi, self._pi_mid)

    @torch.compiler.disable
    @without_grad
    def step(self, found_inf: Optional[Tensor] = None) -> Tensor:
        """pi <- PiUpdate(pi, G), G from every loss recorded since the last step (optimistic mode: then
        pi_mid <- PiUpdate(pi, G) as well); returns their mean as a 0-dim tensor (no host sync).

        ``found_inf``: beside an optimizer stepped by ``torch.amp.GradScaler``, the tensor the scaler used
        for that step (``also_fused.amp.found_inf(scaler, optimizer)``): where it is non-zero (the scaler
        skipped the model's step) pi and pi_mid stay as they were, decided on the device. Either way the
        recorded batches are used up: a skipped batch does not carry into the next step."""
        skip = self._skip_tensor(found_inf)
        self.check_errors(wait=False)
        ids, losses, staged_mean = self._take_recorded()
        self._check_recorded(losses)
        transaction = StepTransaction(self._errors, (self._step_driver,))
        self._share_error_word()
        mean = self._ascend(ids, losses, staged_mean, skip=skip)
        self._commit(transaction)
        return mean

    def step_driver(self) -> "PiStepDriver":
        """The interface through which an optimizer that owns these weights (ALSO) takes their steps."""
        return self._step_driver

    def check_errors(self, wait: bool = True) -> None:
        """Raise now for bad input that the device found in an earlier step (see ``validate``).

        With ``wait=False`` only what the GPU has already finished is looked at (no host sync)."""
        if self._errors is not None:
            self._errors.poll(wait)

    def select_batch(self, threshold: float, strategy: str = "pi", order: str = "desc",
                     generator: Optional[torch.Generator] = None) -> tuple[int, Tensor]:
        """Draw ``max(1, n_groups - cutoff)`` distinct ids, cutoff where pi's sorted cumulative mass reaches ``threshold``.

        Sharded pi: a collective (every rank calls it), which gives every rank the same ids: up to
        ``functional.SORTED_CUTOFF_MAX_GROUPS`` groups from the gathered pi, the unsharded draw itself; beyond,
        the cutoff from every rank's partial masses and the ids from an exponential race over the shards (the
        unsharded draw's distribution, other random numbers), seeded by the first rank's ``generator``."""
        if self._shard is None:
            return F.select_batch(self.pi, threshold, strategy, order, generator, cutoff=self._backend.mass_cutoff)
        return _collectives.sharded_select_batch(self.pi, self.n_groups, threshold, strategy, order, generator,
                                                 self._group())

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: waits first for the device's check of earlier steps."""
        self.check_errors()
        state = self.__dict__.copy()
        state["_launches"] = {}
        return state

    def state_dict(self) -> dict[str, Any]:
        """pi, pi_mid, pi_reg, the previous batch and the hyper-parameters of the pi step (the tensors
        themselves, as torch.optim's state_dict: copy or save them). Waits for the device's check of the
        steps before it, so that an error is raised before saving."""
        self.check_errors()
        return self._state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` (ALSO's ``"also"`` entry too); a state of another n_groups, mode or
        group_reduction raises ValueError and changes nothing."""
        self.check_errors()
        self._check_state(state_dict)
        self._load_state(state_dict)

    # -------------------------------------------------------------- input checks
    @property
    def _checks_values_on_host(self) -> bool:
        # the reference path reads ids and losses on the host; the kernels check them on the device
        return self.validate and self._errors is None

    def _as_ids(self, group_ids: GroupIds) -> Tensor:
        return _checks.as_ids(group_ids, self.n_groups, self.device, self._checks_values_on_host,
                              self._backend.value_range)

    def _check_losses(self, losses: Any, ids: Tensor, finite: bool) -> None:
        _checks.check_losses(losses, ids, self.device, finite and self._checks_values_on_host,
                             self._backend.value_range)

    def _check_recorded(self, losses: Optional[Tensor]) -> None:
        """The losses recorded by ``weighted_loss`` (checked there but for their values): NaN or inf raise
        now where the host checks values (a host sync). None: a staged step (the kernels checked them). Sharded:
        on every rank if any rank's losses are refused."""
        if losses is not None and self._checks_values_on_host:
            self._agreed(lambda: _checks.check_finite_losses(losses, self._backend.value_range))

    def _flag_bad(self, what: str, ids: Optional[Tensor] = None, losses: Optional[Tensor] = None) -> None:
        """Kernels' path: set the error word for bad ids or losses (on a CPU: raise now, naming ``what``)."""
        if self._errors is not None:
            self._backend.flag_bad_batch(self._errors.word, self.n_groups, ids, losses)
            self._errors.check_now(what)

    # ------------------------------------------------- the steps (ALSO's through PiStepDriver)
    def _take_recorded(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """What the step's pi update needs of the batches recorded since the last step, and the record is
        emptied (a rejected step drops its batches: zero the grads and run them again): (None, None, mean)
        when weighted_loss() staged the update of the one batch recorded, with the current hyper-parameters,
        mean the 0-d mean loss it wrote; else the ids and float32 losses, concatenated, and None."""
        recorded = self._recorded
        if not recorded:
            raise RuntimeError("step() needs the per-sample losses: compute the loss with "
                               "weighted_loss(losses, group_ids) before backward()")
        self._recorded = []
        if len(recorded) == 1:
            ids, losses, mean, key = recorded[0]
            if mean is not None and key == self._staged_key():
                return None, None, mean
            return ids, losses.float(), None
        return torch.cat([r[0] for r in recorded]), torch.cat([r[1].float() for r in recorded]), None

    def _ascend(self, ids: Optional[Tensor], losses: Optional[Tensor], staged_mean: Optional[Tensor] = None,
                reported: bool = False, skip: Optional[Tensor] = None) -> Tensor:
        """pi <- PiUpdate(pi, G); optimistic: pi_mid <- PiUpdate(new pi, G), in the same launch. Returns the
        losses' mean (0-d; computed by the pi step's own launch where it reads the per-sample losses).
        With ``staged_mean`` (from ``_take_recorded``) the update is the one weighted_loss() staged: it only
        becomes pending; ``reported``: a launch of the step wrote ``_report_slot()``. ``skip`` (0-d bool on
        the device): where true, pi and pi_mid keep their values (GradScaler skipped the step)."""
        if staged_mean is not None:
            self._reported = reported
            if skip is None:
                self._pending = True
            else:  # committed now, so that the skip can keep pi
                with self._kept_where(skip):
                    self._backend.commit_pi_stage(self._stage, self._pi, self._pi_mid)
            return staged_mean
        self._flush()
        second = self._pi_mid if self.mode == "optimistic" else None
        inputs = self._pi_inputs(ids, losses)
        if skip is not None and self._skips_in_kernels(inputs):
            return self._pi_apply(inputs, out=self._pi, second_out=second, losses=losses, last=True,
                                  cache="ascend", skip=skip)
        with self._kept_where(skip):
            return self._pi_apply(inputs, out=self._pi, second_out=second, losses=losses, last=True, cache="ascend")

    @contextlib.contextmanager
    def _kept_where(self, skip: Optional[Tensor]) -> Iterator[None]:
        """pi and pi_mid as they were before the block wherever ``skip`` is true (on the device)."""
        if skip is None:
            yield
            return
        kept = [(t, t.clone()) for t in (self._pi, self._pi_mid) if t is not None]
        yield
        for t, before in kept:
            torch.where(skip, before, t, out=t)

    def _skips_in_kernels(self, inputs: PiInputs) -> bool:
        """Whether the pi step's kernels take GradScaler's skip as their error word (``_pi_apply``), which writes
        nothing where it is set: no copy of pi and pi_mid to restore from."""
        return self._shard is None and inputs[0] is not None and self._backend.checks_values_on_device

    def _skip_word(self, skip: Tensor) -> Tensor:
        """A 0-d int32 word, kept between steps, set where the error word is or ``skip`` is true."""
        gate = self._launches.get("skip_word")
        if gate is None:
            gate = self._launches["skip_word"] = torch.zeros((), dtype=torch.int32, device=self.device)
        if self._errors is None:
            gate.copy_(skip)
        else:
            torch.bitwise_or(self._errors.word, skip, out=gate)
        return gate

    def _skip_tensor(self, found_inf: Optional[Tensor]) -> Optional[Tensor]:
        """found_inf != 0 as a 0-d bool on pi's device (None for None)."""
        if found_inf is None:
            return None
        if not isinstance(found_inf, Tensor) or found_inf.numel() != 1:
            raise TypeError("found_inf must be a one-element tensor (GradScaler's, see also_fused.amp.found_inf)")
        return found_inf.reshape(()).to(self.device, non_blocking=True) != 0

    def _closure_weights(self, ids: Tensor) -> tuple[Tensor, float]:
        """ALSO's closure API: (pi_selected, loss_scale) for the closure. In optimistic mode pi_mid =
        PiUpdate(pi, G_prev) is computed first from the previous batch (a copy of pi before it)."""
        self._flush()
        weights = self._pi
        if self.mode == "optimistic":
            if self._prev_losses is None:
                self._pi_mid.copy_(self._pi)
            else:
                self._pi_apply((self._prev_ids, self._prev_losses), out=self._pi_mid)
            weights = self._pi_mid
        self._recorded.clear()
        if self.group_reduction == "mean":
            return self._group_mean_weights(weights, ids), 1.0
        if self._shard is not None:
            return _collectives.values_at(weights, ids, *self._shard, self._group()), self.loss_scale
        return F.gather_weights(weights, ids), self.loss_scale

    def _closure_losses(self, result: Any, ids: Tensor) -> Tensor:
        """ALSO's closure API: the detached per-sample losses of the closure's result, checked."""
        losses = result[0] if isinstance(result, (tuple, list)) else result
        self._agreed(lambda: self._check_losses(losses, ids, finite=True))
        losses = losses.detach()
        self._flag_bad("this step", losses=losses)
        return losses

    def _ascend_closure(self, ids: Tensor, losses: Tensor) -> None:
        """ALSO's closure API: pi <- PiUpdate(pi, G); optimistic mode keeps G for the next pi_mid."""
        inputs = self._pi_inputs(ids, losses)
        if self.mode == "optimistic":
            self._prev_ids, self._prev_losses = inputs
        self._pi_apply(inputs, out=self._pi, last=True, cache="ascend")

    def _report_slot(self) -> Optional[Tensor]:
        """The slot in which a launch of the step being taken may report it (None without device checks)."""
        return None if self._errors is None else self._errors.report_slot()

    def _share_error_word(self) -> None:
        """Distributed: every rank rejects the step if any rank found bad input (pi stays equal on all)."""
        group = self._group()
        if self._errors is not None and group is not None:
            _collectives.share_error_word(self._errors.word, group)

    def _commit(self, transaction: StepTransaction) -> None:
        """Count the step and commit its transaction: on the kernels' path its error word is queued, with the
        transaction's undo for a rejection."""
        self._steps_taken += 1
        reported, self._reported = self._reported, False
        transaction.commit(self._steps_taken, reported)

    # ---------------------------------------------------------------- pi math
    def _group(self) -> Optional[Any]:
        return _collectives.reduce_group(self.process_group)

    def _pi_hyper(self) -> dict[str, Any]:
        # with c = pi_decay * pi_lr = 0 the KL term vanishes; dropping it avoids 0 * log(0) = NaN
        # for a pi_reg with zero entries
        log_pi_reg = self._log_pi_reg if self.pi_decay * self.pi_lr != 0.0 else None
        return dict(pi_lr=self.pi_lr, pi_decay=self.pi_decay, temperature=self.pi_temperature,
                    eps=self.eps, log_pi_reg=log_pi_reg)

    def _pi_inputs(self, ids: Tensor, losses: Tensor) -> PiInputs:
        """What the pi step consumes: (ids, per-sample terms), or (None, dense S) over every rank."""
        group = self._group()
        if self._shard is not None:
            return _collectives.sharded_step_inputs(ids, losses, self.n_groups, self.group_reduction, group,
                                                    *self._shard)
        if group is None and self.group_reduction == "sum":
            return ids, losses.float()
        if group is None:
            return ids, F.pi_step_terms(losses, ids, self.n_groups, self.group_reduction)
        return _collectives.pi_step_inputs(ids, losses, self.n_groups, self.group_reduction, group)

    def _pi_apply(self, inputs: PiInputs, out: Tensor, second_out: Optional[Tensor] = None,
                  losses: Optional[Tensor] = None, last: bool = False, cache: Optional[str] = None,
                  skip: Optional[Tensor] = None) -> Optional[Tensor]:
        """out = PiUpdate(pi, G); second_out = PiUpdate(out, G); nothing changes while the error word is set.
        With ``losses`` (the per-sample losses), returns their mean as a 0-d float32 tensor. ``last``: the
        step's last launch, which reports the error word to the host where it can (``_input_errors``).
        ``cache``: the name under which the kernel's launch is kept for the next call of the same use.
        ``skip`` (where ``_skips_in_kernels``): nothing changes where it is true either; the kernels then read
        ``_skip_word`` and the step's report is left to the transaction (it reports the error word alone)."""
        if self._shard is not None:
            return self._pi_apply_sharded(inputs, out, second_out, losses)
        ids, terms = inputs
        hyper = self._pi_hyper()
        word = None if self._errors is None else self._errors.word
        if ids is not None:
            # the sum reduction: the pi step reads these very losses and writes their mean too
            mean_out = torch.empty((), dtype=torch.float32, device=terms.device) if terms is losses else None
            report = self._errors.report_slot() if last and word is not None and skip is None else None
            if skip is not None:
                word = self._skip_word(skip)
            self._reported = self._backend.pi_update(
                self._pi, ids, terms, out=out, second_out=second_out, error_word=word, mean_out=mean_out,
                report_out=report, cache=None if cache is None else self._launches.setdefault(cache, {}),
                workspace=self._launches.setdefault("workspace", {}), **hyper)
            return mean_out if mean_out is not None or losses is None else losses.mean()
        new = F.pi_update_from_sums(self._pi, terms, **hyper)
        second = None if second_out is None else F.pi_update_from_sums(new, terms, **hyper)
        if word is not None:
            rejected = word != 0
            new = torch.where(rejected, out, new)
            second = None if second is None else torch.where(rejected, second_out, second)
        if second is not None:
            second_out.copy_(second)
        out.copy_(new)
        return None if losses is None else losses.mean()

    def _pi_apply_sharded(self, inputs: PiInputs, out: Tensor, second_out: Optional[Tensor],
                          losses: Optional[Tensor]) -> Optional[Tensor]:
        """``_pi_apply`` on this rank's slice: the phases of the step the unsharded pi takes on these inputs (the
        backend's for (id, term) pairs, the reference's for dense sums), with the max and the block partials of
        every rank between them; hence the unsharded pi's bits."""
        ids, terms = inputs
        hyper = self._pi_hyper()
        phases = (F.ReferencePiPhases if ids is None else
                  self._backend.pi_phases(self._pi, ids, terms, hyper["log_pi_reg"]))
        # written in place, as the unsharded step writes them (out may be pi: it is read before the write)
        self._sharded_update(phases, self._pi, ids, terms, hyper, out)
        if second_out is not None:
            self._sharded_update(phases, out, ids, terms, hyper, second_out)
        return None if losses is None else losses.mean()

    def _sharded_update(self, phases: Any, src: Tensor, ids: Optional[Tensor], terms: Tensor,
                        hyper: dict[str, Any], out: Tensor) -> Tensor:
        """out = PiUpdate(src, S) on this rank's slice: z and its max here, the max over every rank (all-reduce),
        the exponentials' block partials here, every rank's partials (all-gather) added in block order, the
        scaling."""
        group = self._group()
        z, local_max = phases.logits(src, ids, None if ids is None else terms, terms if ids is None else None,
                                     **hyper)
        partials = phases.exp_blocks(z, _collectives.global_max(local_max, group))
        total = F.combine_block_sums(_collectives.every_block_partial(partials, self.n_groups, group))
        return phases.scale(z, total, out)

    def _group_mean_weights(self, pi: Tensor, ids: Tensor) -> Tensor:
        """Per-sample weights of the group-mean loss; distributed, from the counts of every rank, so
        that the gradient average over the ranks is the gradient of the whole batch's group-mean loss."""
        group = self._group()
        if group is None:
            return F.group_mean_sample_weights(pi, ids, self.n_groups)
        counts = _collectives.group_counts(ids, self.n_groups, group)
        return F.group_mean_sample_weights_from_counts(pi, ids, counts, _collectives.world_size(group))

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        self._flush()
        state = dict(n_groups=self.n_groups, mode=self.mode, group_reduction=self.group_reduction,
                     loss_scale=self.loss_scale, pi_lr=self.pi_lr, pi_decay=self.pi_decay,
                     pi_temperature=self.pi_temperature, pi_eps=self.eps, pi=self._pi, pi_mid=self._pi_mid,
                     pi_reg=self._pi_reg, prev_ids=self._prev_ids, prev_losses=self._prev_losses)
        if self._shard is not None:
            # this rank's groups [start, stop): pi, pi_mid and pi_reg are their slices, the previous batch its
            # (id - start, term) pairs or its slice of the dense sums
            state["shard"] = self._shard
        return state

    def _saved_range(self, state: dict[str, Any]) -> tuple[int, int]:
        """The groups whose weights ``state`` holds (refused unless this rank's, or all of them)."""
        saved = state.get("shard")
        saved = (0, self.n_groups) if saved is None else tuple(int(v) for v in saved)
        if saved != self.shard_range and saved != (0, self.n_groups):
            raise ValueError(f"state_dict holds the weights of groups [{saved[0]}, {saved[1]}); this rank holds "
                             f"[{self.shard_range[0]}, {self.shard_range[1]}): load the state this rank saved "
                             "(the same n_groups and number of ranks), or an unsharded one")
        return saved

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse, before anything changes, a state that does not belong to these group weights."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"not a group-weights state_dict: {missing} missing")
        mine = (self.n_groups, self.mode, self.group_reduction)
        theirs = (state["n_groups"], state["mode"], state.get("group_reduction", "sum"))
        if theirs != mine:
            raise ValueError(f"state_dict is for (n_groups, mode, group_reduction) = {theirs}; this one has {mine}")
        start, stop = self._saved_range(state)
        for key in ("pi", "pi_mid", "pi_reg"):
            value = state[key]
            if (value is None and key != "pi") or (isinstance(value, Tensor) and value.shape == (stop - start,)):
                continue
            raise ValueError(f"state_dict entry {key!r} must be a tensor of shape ({stop - start},)")

    def _load_state(self, state: dict[str, Any]) -> None:
        saved = self._saved_range(state)
        start, stop = self.shard_range
        # a whole (unsharded) state loads into a shard: its slice of pi, pi_mid, pi_reg and of the previous batch
        cut = slice(start, stop) if saved != (start, stop) else slice(None)

        def to_device(t: Optional[Tensor], part: slice = cut) -> Optional[Tensor]:
            return None if t is None else t.detach()[part].to(self.device).clone()

        for name, key in FLOAT_STATE:
            setattr(self, name, float(state[key]))
        self._pi = to_device(state["pi"]).float()
        self._pi_mid = to_device(state["pi_mid"])
        if self._pi_mid is None and self.mode == "optimistic":
            self._pi_mid = self._pi.clone()  # ALSO's closure API: recomputed at the start of every step
        self._pi_reg = to_device(state["pi_reg"])
        self._log_pi_reg = None if self._pi_reg is None else F.blockwise_log(self._pi_reg)
        prev_ids, prev_losses = state["prev_ids"], state["prev_losses"]
        if cut != slice(None) and prev_losses is not None:
            if prev_ids is None:  # the dense sums: their slice
                prev_losses = prev_losses[cut]
            else:  # (id, term) pairs: this rank's, with ids from its first group
                mine = (prev_ids >= start) & (prev_ids < stop)
                prev_ids, prev_losses = prev_ids[mine] - start, prev_losses[mine]
        self._prev_ids = to_device(prev_ids, slice(None))
        self._prev_losses = to_device(prev_losses, slice(None))
        self._recorded.clear()
        self._pending = False  # the staged step belonged to the replaced state
        self._launches.clear()  # bound to the replaced tensors


def _as_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """The device of pi: CPU by default; a CUDA device without an index is the current one."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class PiStepDriver:
    """What an optimizer that owns group weights (ALSO) may do with them: its only way in.

    The optimizer's step is a ``StepTransaction`` in which the driver takes part (``snapshot`` /
    ``restore``: the previous batch kept for the closure API's extrapolation, and the recorded batches);
    ``commit`` counts the step and queues it with the device checks. Batches come in through
    ``weighted_loss`` (loop API) or ``parse_ids`` and ``closure_losses`` (closure API)."""

    __slots__ = ("_weights",)

    def __init__(self, weights: GroupWeights) -> None:
        self._weights = weights

    @property
    def errors(self) -> Optional[DeviceInputErrors]:
        """The device checks whose error word the theta kernels read too (None: values checked on the host)."""
        return self._weights._errors

    # ------------------------------------------------------------ batches
    def weighted_loss(self, losses: Tensor, group_ids: GroupIds) -> Tensor:
        return self._weights._weighted_loss(losses, group_ids)

    def take_batch(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """The batches recorded since the last step, taken (see ``GroupWeights._take_recorded``)."""
        return self._weights._take_recorded()

    def check_batch(self, losses: Optional[Tensor]) -> None:
        self._weights._check_recorded(losses)

    def drop_batches(self) -> None:
        """Forget the batches recorded since the last step (a step that is not taken)."""
        self._weights._recorded.clear()

    def parse_ids(self, group_ids: GroupIds) -> Tensor:
        """Closure API: the step's ids checked (on the kernels' path flagged on the device)."""
        weights = self._weights
        ids = weights._agreed(lambda: weights._as_ids(group_ids))
        weights._flag_bad("this step", ids)
        return ids

    # ------------------------------------------------------------ the steps
    def share_error_word(self) -> None:
        self._weights._share_error_word()

    def report_slot(self) -> Optional[Tensor]:
        return self._weights._report_slot()

    def ascend(self, ids: Optional[Tensor], losses: Optional[Tensor], staged_mean: Optional[Tensor],
               reported: bool, found_inf: Optional[Tensor] = None) -> Tensor:
        """Loop API: the pi step of ``take_batch()``'s batch; returns the batch's mean loss. Where
        ``found_inf`` (GradScaler's) is non-zero, pi and pi_mid keep their values."""
        weights = self._weights
        return weights._ascend(ids, losses, staged_mean, reported, skip=weights._skip_tensor(found_inf))

    def closure_weights(self, ids: Tensor) -> tuple[Tensor, float]:
        return self._weights._closure_weights(ids)

    def closure_losses(self, result: Any, ids: Tensor) -> Tensor:
        return self._weights._closure_losses(result, ids)

    def ascend_closure(self, ids: Tensor, losses: Tensor) -> None:
        self._weights._ascend_closure(ids, losses)

    # ------------------------------------------------------------ the transaction
    def snapshot(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return self._weights._prev_ids, self._weights._prev_losses

    def restore(self, snapshot: tuple[Optional[Tensor], Optional[Tensor]]) -> None:
        """Undo the host side of a step the device rejected (its device side was a no-op)."""
        self._weights._prev_ids, self._weights._prev_losses = snapshot
        self._weights._recorded.clear()

    def commit(self, transaction: StepTransaction) -> None:
        self._weights._commit(transaction)

    # ------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return self._weights._state()

    def check_state(self, state: dict[str, Any]) -> None:
        self._weights._check_state(state)

    def load_state(self, state: dict[str, Any]) -> None:
        self._weights._load_state(state)
