"""ALSO: Adam on the parameters plus KL-regularised mirror ascent on group weights pi (ALGORITHM.md)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _dispatch
from . import functional as F
from ._base import AdamFamily, as_scalar, check_hyperparameters
from ._input_errors import DeviceInputErrors

MODES = ("optimistic", "descent-ascent")
REDUCTIONS = ("sum", "mean")
Closure = Callable[[Tensor, float], Any]


def _as_simplex(weights: Optional[Union[Tensor, Sequence[float]]], n_groups: int, name: str) -> Optional[Tensor]:
    """Validate and normalise user weights to sum 1 (float32, CPU); None stays None (uniform)."""
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


class ALSO(AdamFamily):
    """Adaptive Loss Scaling Optimizer: min over theta, max over pi of sum_j pi_j L_j - tau KL(pi || pi_reg).

    theta takes ALSO's Adam step (L2 weight decay coupled into the gradient, eps added to sqrt(v)
    before the bias correction); pi takes the mirror-ascent step
    ``pi <- softmax((log(pi+eps) + c log(pi_reg) + pi_lr * S) / ((1+c) T))``, c = pi_decay*pi_lr,
    S_j the sum of the batch's losses of group j. ``mode="optimistic"`` first extrapolates both with
    the previous gradients (the Adam state then advances twice per step); ``"descent-ascent"`` does not.

    Two ways to call it:

    * closure API (the published one): ``opt.step(closure, group_ids)`` with
      ``closure(pi_selected, loss_scale) -> (per_sample_losses, extra)``;
    * loop API: ``loss = opt.weighted_loss(losses, group_ids); loss.backward(); opt.step()``. In
      optimistic mode the params hold the extrapolated point after ``step()``; ``eval()`` puts the
      iterate x back into them, ``train()`` the extrapolated point.

    ``group_reduction="mean"`` (GroupDRO-style) uses group means instead of the published group sums:
    S_j = mean of the batch's losses of group j, and the model's loss is
    ``sum_{j present} pi_j mean_j / sum_{j present} pi_j`` (``loss_scale`` does not apply).

    Under torch.distributed (``process_group``, or the default group when it is initialised with
    more than one rank) the pi step uses the losses of every rank, so that pi stays bitwise equal
    across ranks; with ``batch_size`` = the per-rank batch, N ranks follow the trajectory of one
    process on the concatenated batch, for both reductions, given that the theta gradients are
    averaged over the same group (DDP and FSDP2 do). With FSDP2 the params are DTensors and the
    update runs on the local shards; checkpoint through ``also_fused.checkpoint``.

    ``step()`` returns the mean per-sample loss of the step as a 0-dim tensor (no host sync for it).
    With ``validate=True`` (default) group ids outside [0, n_groups) and non-finite losses reject
    the step: params, Adam state, step counts and pi stay exactly as they were, and ValueError
    names the step. The reference path checks on the host and raises in the call that got the bad
    input. The Triton kernels check on the device, with no host sync: the rejected step (and any
    step queued after it before the host can read the result) is a no-op on the GPU, and the error
    is raised by the first ``weighted_loss()``, ``step()`` or ``train()`` after the GPU has finished
    that step, or by ``eval()``, ``state_dict()``, ``load_state_dict()`` and ``check_errors()``,
    which wait for it (on a CPU the word is read at once, so there the call itself raises).
    ``validate=False`` skips these checks: on CUDA it needs the Triton kernels, which ignore
    out-of-range ids instead of touching memory outside pi; the step is then taken with the
    remaining samples.
    """

    def __init__(
        self,
        params: Iterable,
        n_groups: int,
        loss_scale: Optional[float] = None,
        batch_size: Optional[int] = None,
        mode: str = "optimistic",
        alpha: float = 1.0,
        pi_reg: Optional[Union[Tensor, Sequence[float]]] = None,
        pi_init: Optional[Union[Tensor, Sequence[float]]] = None,
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
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        if group_reduction not in REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {REDUCTIONS}, got {group_reduction!r}")
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
            raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if loss_scale is None and group_reduction == "mean":
            loss_scale = 1.0  # not used: the mean reduction normalises by the pi mass present
        if loss_scale is None:
            if batch_size is None:
                raise ValueError("give loss_scale or batch_size (loss_scale defaults to n_groups / batch_size)")
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            loss_scale = n_groups / batch_size
        if not pi_lr >= 0.0 or not pi_decay >= 0.0:
            raise ValueError(f"pi_lr and pi_decay must be >= 0, got {pi_lr} and {pi_decay}")
        if not pi_temperature > 0.0:
            raise ValueError(f"pi_temperature must be > 0, got {pi_temperature}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        pi_reg_host = _as_simplex(pi_reg, n_groups, "pi_reg")
        pi_init_host = _as_simplex(pi_init, n_groups, "pi_init")
        defaults = dict(lr=as_scalar(lr), betas=tuple(map(as_scalar, betas)), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad)
        super().__init__(params, defaults, backend)

        self.n_groups = n_groups
        self.mode = mode
        self.loss_scale = float(loss_scale)
        self.alpha = float(alpha)
        self.pi_lr = float(pi_lr)
        self.pi_decay = float(pi_decay)
        self.pi_temperature = float(pi_temperature)
        self.pi_eps = float(eps)
        self.validate = validate
        self.group_reduction = group_reduction
        self.process_group = process_group
        self.device = self.param_groups[0]["params"][0].device
        self._pi_backend = self._backend_for(self.device)
        if not validate and self.device.type == "cuda" and (self._pi_backend != "triton" or group_reduction != "sum"):
            raise ValueError("validate=False on CUDA needs backend 'triton' and group_reduction='sum': only those "
                             "kernels mask out-of-range group ids instead of reading outside pi")
        if pi_init_host is None:
            self._pi = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float32, device=self.device)
        else:
            self._pi = pi_init_host.to(self.device)
        self._pi_reg = None if pi_reg_host is None else pi_reg_host.to(self.device)
        self._log_pi_reg = None if self._pi_reg is None else torch.log(self._pi_reg)
        self._pi_mid = self._pi.clone() if mode == "optimistic" else None
        self._prev_ids: Optional[Tensor] = None  # closure API: the previous batch, whose G extrapolates pi
        self._prev_losses: Optional[Tensor] = None
        self._recorded: list[tuple[Tensor, Tensor]] = []  # loop API: (ids, losses) since the last step
        self._saved_x: dict[Tensor, Tensor] = {}  # closure API: x while the params hold the extrapolation
        self._api: Optional[str] = None
        self._training = True
        self._staged_extra: Optional[dict[str, Any]] = None  # set by also_fused.checkpoint before loading
        # validation on the kernels' path runs on the device (no host sync; see _input_errors.py)
        self._errors = DeviceInputErrors(self.device, n_groups) if validate and self._pi_backend == "triton" else None
        self._journal: Optional[list[tuple]] = None  # state entries created or dropped by the step under way
        self._steps_taken = 0

    # ------------------------------------------------------------------ public
    @property
    def pi(self) -> Tensor:
        """The current group weights, float32 [n_groups] on the params' device (do not modify in place)."""
        return self._pi

    @property
    def pi_reg(self) -> Tensor:
        """The KL anchor, float32 [n_groups] (uniform unless given)."""
        if self._pi_reg is None:
            return torch.full_like(self._pi, 1.0 / self.n_groups)
        return self._pi_reg

    @torch.compiler.disable
    def weighted_loss(self, losses: Tensor, group_ids: Union[Tensor, Sequence[int]]) -> Tensor:
        """``loss_scale * sum_i pi[g_i] * l_i`` for the loop API, differentiable in the losses.

        Records the detached losses for the pi step of the next ``step()``; call it once per
        micro-batch when accumulating gradients. In optimistic mode pi is the extrapolated pi_mid.
        """
        self.check_errors(wait=False)
        ids = self._as_ids(group_ids)
        self._check_losses(losses, ids, finite=False)
        weights = self._pi_mid if self.mode == "optimistic" else self._pi
        word = None if self._errors is None else self._errors.word
        if self.group_reduction == "mean":
            if word is not None:
                _dispatch.flag_bad_batch(word, self.n_groups, ids, losses.detach())
                self._errors.check_now("this weighted_loss() call")
            # each call normalises by its own micro-batch's counts; the pi step counts the whole step
            sample_weights = self._group_mean_weights(weights, self._safe_ids(ids))
            loss = (sample_weights.to(losses.dtype) * losses).sum().float()
        else:
            loss = _dispatch.weighted_loss(self._pi_backend, weights, ids, losses, self.loss_scale, error_word=word)
            if word is not None:
                self._errors.check_now("this weighted_loss() call")
        self._recorded.append((ids, losses.detach()))
        return loss

    def check_errors(self, wait: bool = True) -> None:
        """Raise now for bad input that the device found in an earlier step (see ``validate``).

        With ``wait=False`` only what the GPU has already finished is looked at (no host sync)."""
        if self._errors is not None:
            self._errors.poll(wait)

    def select_batch(
        self, threshold: float, strategy: str = "pi", order: str = "desc",
        generator: Optional[torch.Generator] = None,
    ) -> tuple[int, Tensor]:
        """Draw ``max(1, n_groups - cutoff)`` distinct ids, cutoff where pi's sorted cumulative mass reaches ``threshold``."""
        return F.select_batch_reference(self._pi, threshold, strategy, order, generator)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None,
             group_ids: Optional[Union[Tensor, Sequence[int]]] = None) -> Tensor:
        """One ALSO step; returns the batch-mean per-sample loss (0-dim tensor).

        With a closure (published API): ``closure(pi_selected, loss_scale) -> (losses, extra)``
        must zero the grads, run forward, backward ``loss_scale * sum(pi_selected * losses)`` and
        return the detached per-sample losses. Without one (loop API): uses the losses recorded
        by ``weighted_loss`` since the last step.
        """
        if closure is None:
            if group_ids is not None:
                self._recorded.clear()  # as for every rejected loop step: the batch is dropped
                raise TypeError("group_ids is given without a closure; the loop API takes them in weighted_loss()")
            return self._step_loop()
        if group_ids is None:
            raise TypeError("the closure API needs group_ids: opt.step(closure, group_ids)")
        return self._step_closure(closure, group_ids)

    def train(self) -> None:
        """Put the extrapolated point back into the params (optimistic loop API); no-op otherwise."""
        self.check_errors(wait=False)
        if self._training:
            return
        self._swap_points("extrapolated", "iterate")
        self._training = True

    def eval(self) -> None:
        """Put the iterate x into the params for evaluation or saving (optimistic loop API); no-op otherwise.

        The state then holds the extrapolated point y under ``"extrapolated"`` instead of x under
        ``"iterate"`` (one extra buffer per param either way). Waits for the device's check of the
        steps before it, so that an error is raised before the model is evaluated or saved."""
        self.check_errors()
        if not self._training:
            return
        if self._api == "loop":
            self._swap_points("iterate", "extrapolated")
        self._training = False

    @torch.no_grad()
    def _swap_points(self, held: str, into: str) -> None:
        """Params take the point stored under ``held``; the point they held is stored under ``into``."""
        for p, state in self._params_with(held):
            state[into] = p.clone()
            p.copy_(state.pop(held))
        self._plans.clear()  # the cached plans hold the popped buffers

    # --------------------------------------------------------------- checks
    def _as_ids(self, group_ids: Union[Tensor, Sequence[int]]) -> Tensor:
        if not isinstance(group_ids, Tensor):
            values = list(group_ids)
            if not values:
                raise ValueError("group_ids is empty: a step needs at least one sample")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError("group_ids must be integers (a list of ints or an integer tensor)")
            group_ids = torch.as_tensor(values, dtype=torch.int64)
        if group_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D [batch], got shape {tuple(group_ids.shape)}")
        if group_ids.numel() == 0:
            raise ValueError("group_ids is empty: a step needs at least one sample")
        if group_ids.device != self.device:
            if group_ids.device.type != "cpu":
                raise ValueError(f"group_ids are on {group_ids.device}, pi is on {self.device}")
            group_ids = group_ids.to(self.device, non_blocking=True)
        group_ids = group_ids.long()
        if self.validate and self._errors is None:  # the reference path checks here, with a host sync
            bad = ((group_ids < 0) | (group_ids >= self.n_groups)).any()
            if bool(bad):
                lo, hi = int(group_ids.min()), int(group_ids.max())
                raise ValueError(f"group_ids must lie in [0, {self.n_groups}), got values in [{lo}, {hi}]")
        return group_ids

    def _check_losses(self, losses: Any, ids: Tensor, finite: bool) -> None:
        if not isinstance(losses, Tensor):
            raise TypeError(f"per-sample losses must be a tensor, got {type(losses).__name__}")
        if not losses.is_floating_point():
            raise ValueError(f"per-sample losses must be floating point, got {losses.dtype}")
        if losses.shape != ids.shape:
            raise ValueError(f"per-sample losses must have shape {tuple(ids.shape)} (one per group id), "
                             f"got {tuple(losses.shape)}")
        if losses.device != self.device:
            raise ValueError(f"per-sample losses are on {losses.device}, pi is on {self.device}")
        if finite and self.validate and self._errors is None and not bool(torch.isfinite(losses).all()):
            raise ValueError("per-sample losses contain NaN or inf; the step was not taken")

    def _safe_ids(self, ids: Tensor) -> Tensor:
        """Ids for torch indexing ops while out-of-range ids may still be in them (device checks:
        the step will be rejected anyway, but an index outside pi must never be read)."""
        return ids.clamp(0, self.n_groups - 1) if self._errors is not None and self._errors.deferred else ids

    def _begin_step(self, api_before: Optional[str]) -> None:
        """Start recording what this step does to the host-side state, to undo it if the device rejects it."""
        if self._errors is not None:
            self._journal = [("scalars", api_before, self._prev_ids, self._prev_losses)]

    def _finish_step(self) -> None:
        self._steps_taken += 1
        if self._errors is None:
            return
        journal, self._journal = self._journal, None
        self._errors.after_step(self._steps_taken, lambda: self._undo(journal))

    def _undo(self, journal: list[tuple]) -> None:
        """Revert the host-side effects of a step the device rejected (its device-side work was a no-op)."""
        for entry in reversed(journal):
            if entry[0] == "scalars":
                self._api, self._prev_ids, self._prev_losses = entry[1:]
            elif entry[0] == "created":
                _, p, key = entry
                state = self.state.get(p, {})
                state.pop(key, None)
                if not state:
                    self.state.pop(p, None)
            else:  # "dropped"
                _, p, key, value = entry
                self.state[p][key] = value
        self._recorded.clear()
        self._state_version += 1
        self._plans.clear()

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        if self._journal is not None and "step" not in self.state.get(p, {}):
            keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
            self._journal.extend(("created", p, key) for key in keys)
        return super()._init_state(p, amsgrad)

    def _set_api(self, api: str) -> None:
        if self.mode == "optimistic" and self._api not in (None, api):
            raise RuntimeError(f"this optimizer was stepped with the {self._api} API; optimistic mode cannot "
                               f"switch to the {api} API (the params hold a different point)")
        self._api = api

    # ---------------------------------------------------------------- theta
    def _params_with(self, key: str) -> list[tuple[Tensor, dict]]:
        return [(p, self.state[p]) for g in self.param_groups for p in g["params"]
                if key in self.state.get(p, {})]

    def _adam(self, tag: str, items: list[tuple[Tensor, int]],
              grads: Optional[Callable[[Tensor, dict], Tensor]] = None, **flags: Any) -> None:
        """Run ALSO's Adam update on ``items`` (one launch per device/dtype/amsgrad bucket).

        Callable flags give per-tensor lists (sources, destinations, save_*_to, prior_grads,
        extrapolate_to) as functions of (param, state); the others are passed as they are. A
        committing update reads the device error word: a rejected step only restores the params.
        """
        per_tensor = {k: v for k, v in flags.items() if callable(v)}
        scalars = {k: v for k, v in flags.items() if not callable(v)}
        word = self._errors.word if self._errors is not None and scalars.get("commit_state", True) else None
        for plan in self._plans_for(tag, items, ("amsgrad",), per_tensor):
            plan_grads = ([p.grad for p in plan["params"]] if grads is None
                          else [grads(p, s) for p, s in zip(plan["params"], plan["states"])])
            self._run_plan(plan, plan_grads, word, eps_mode="also", **scalars)

    def _buffer(self, state: dict, key: str, like: Tensor) -> Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.empty_like(like)
            self._state_version += 1
            if self._journal is not None:
                self._journal.append(("created", like, key))
        return buf

    def _extrapolate_closure(self) -> list[tuple[Tensor, dict]]:
        """y = x + AdamStep(x, alpha*d_prev) into the params, x saved; the Adam state is not yet written."""
        moved = []
        items = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state.get(p, {})
                if "prev_grad" in state:
                    items.append((p, gi))
                    moved.append((p, state))
        # uncommitted (t + 1 for the bias correction, moments and step count unwritten): the main pass
        # commits this advance; not gated by the error word, since a rejected main pass restores x from it
        self._adam("extrapolate", items, sources=lambda p, s: p, destinations=lambda p, s: p,
                   grads=lambda p, s: s["prev_grad"], grad_scale=self.alpha,
                   save_sources_to=lambda p, s: self._saved_x_buffer(p), commit_state=False)
        return moved

    def _saved_x_buffer(self, p: Tensor) -> Tensor:
        buf = self._saved_x.get(p)
        if buf is None:
            buf = self._saved_x[p] = torch.empty_like(p)
            self._state_version += 1
        return buf

    def _restore(self, moved: list[tuple[Tensor, dict]]) -> None:
        """Closure API: put the saved x back into the params."""
        if moved:
            torch._foreach_copy_([p for p, _ in moved], [self._saved_x[p] for p, _ in moved])

    # ------------------------------------------------------------------- pi
    def _pi_hyper(self) -> dict[str, Any]:
        # with c = pi_decay * pi_lr = 0 the KL term vanishes; dropping it avoids 0 * log(0) = NaN
        # for a pi_reg with zero entries
        log_pi_reg = self._log_pi_reg if self.pi_decay * self.pi_lr != 0.0 else None
        return dict(pi_lr=self.pi_lr, pi_decay=self.pi_decay, temperature=self.pi_temperature,
                    eps=self.pi_eps, log_pi_reg=log_pi_reg)

    def _pi_losses(self, ids: Tensor, losses: Tensor) -> Tensor:
        """The per-sample terms whose per-group sums make S: l_i, or l_i / c_i for group means."""
        losses = losses.float()
        if self.group_reduction == "mean":
            losses = losses / F.group_counts_per_sample(ids, self.n_groups)
        return losses

    def _reduce_group(self) -> Optional[Any]:
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _pi_inputs(self, ids: Tensor, losses: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """What the pi step consumes: (ids, per-sample terms), or (None, dense sums S) after an all-reduce.

        Distributed: the dense per-group sums (and counts, for group means) are all-reduced when that
        moves fewer bytes than all-gathering the (id, loss) pairs of every rank; otherwise the pairs
        are gathered in rank order. Either way every rank reduces the same values in the same order.
        """
        group = self._reduce_group()
        if group is None and self.group_reduction == "sum":
            return ids, losses.float()
        ids = self._safe_ids(ids)  # torch's scatter and gather ops below index with them
        if group is None:
            return ids, self._pi_losses(ids, losses)
        losses = losses.float()
        if self._dense_is_cheaper(ids.numel(), group):
            sums = F.scatter_group_losses(losses, ids, self.n_groups)
            if self.group_reduction == "mean":
                counts = F.group_counts(ids, self.n_groups)
                both = torch.stack([sums, counts])
                dist.all_reduce(both, group=group)
                sums = both[0] / both[1].clamp_min(1.0)
            else:
                dist.all_reduce(sums, group=group)
            return None, sums
        ids, losses = self._gather_ragged([ids, losses], group)
        return ids, self._pi_losses(ids, losses)

    def _dense_is_cheaper(self, n_samples: int, group: Any) -> bool:
        """Whether an all-reduce of n_groups floats moves fewer bytes than all-gathering 12-byte
        (id, loss) pairs of every rank."""
        return 4 * self.n_groups <= 12 * n_samples * dist.get_world_size(group)

    @staticmethod
    def _gather_ragged(tensors: list[Tensor], group: Any) -> list[Tensor]:
        """Each 1-D tensor (one length per rank) concatenated over the ranks in rank order."""
        world = dist.get_world_size(group)
        n = tensors[0].numel()
        size = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes_host = [int(s) for s in sizes]
        longest = max(sizes_host)
        out = []
        for t in tensors:
            padded = torch.cat([t, t.new_zeros(longest - n)])
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=group)
            out.append(torch.cat([part[:k] for part, k in zip(parts, sizes_host)]))
        return out

    def _group_mean_weights(self, pi: Tensor, ids: Tensor) -> Tensor:
        """Per-sample weights of the group-mean loss; distributed, from the counts of every rank.

        With C the counts over all ranks and M the pi mass of the groups present on any rank,
        rank r weighs its samples by world * pi[g_i] / (C[g_i] M): the gradient average over the
        ranks (DDP, FSDP) is then the gradient of the group-mean loss of the whole batch."""
        group = self._reduce_group()
        if group is None:
            return F.group_mean_sample_weights(pi, ids, self.n_groups)
        if self._dense_is_cheaper(ids.numel(), group):
            counts = F.group_counts(ids, self.n_groups)
            dist.all_reduce(counts, group=group)
        else:
            counts = F.group_counts(self._gather_ragged([ids], group)[0], self.n_groups)
        world = dist.get_world_size(group)
        pi = pi.detach().float()
        present_mass = (pi * (counts > 0)).sum()
        return pi[ids] / counts[ids] * (world / present_mass)

    def _pi_apply(self, inputs: tuple[Optional[Tensor], Tensor], out: Tensor,
                  second_out: Optional[Tensor] = None) -> None:
        """out = PiUpdate(pi, G); second_out = PiUpdate(out, G); nothing changes while the error word is set."""
        ids, terms = inputs
        hyper = self._pi_hyper()
        word = None if self._errors is None else self._errors.word
        if ids is not None:
            _dispatch.pi_update(self._pi_backend, self._pi, ids, terms, out=out, second_out=second_out,
                                error_word=word, **hyper)
            return
        new = F.pi_update_from_sums(self._pi, terms, **hyper)
        second = None if second_out is None else F.pi_update_from_sums(new, terms, **hyper)
        if word is not None:
            rejected = word != 0
            new = torch.where(rejected, out, new)
            second = None if second is None else torch.where(rejected, second_out, second)
        if second is not None:
            second_out.copy_(second)
        out.copy_(new)

    def _share_error_word(self) -> None:
        """Distributed: every rank rejects the step if any rank found bad input (pi stays equal on all)."""
        group = self._reduce_group()
        if self._errors is not None and group is not None:
            dist.all_reduce(self._errors.word, op=dist.ReduceOp.MAX, group=group)

    # ---------------------------------------------------------------- steps
    def _step_closure(self, closure: Closure, group_ids: Union[Tensor, Sequence[int]]) -> Tensor:
        self.check_errors(wait=False)
        ids = self._as_ids(group_ids)
        if self._errors is not None:
            _dispatch.flag_bad_batch(self._errors.word, self.n_groups, group_ids=ids)
            self._errors.check_now("this step")
        safe_ids = self._safe_ids(ids)
        previous_api = self._api
        self._set_api("closure")
        self._begin_step(previous_api)
        optimistic = self.mode == "optimistic"
        moved: list[tuple[Tensor, dict]] = []
        try:
            if optimistic:
                moved = self._extrapolate_closure()
                if self._prev_losses is None:
                    self._pi_mid.copy_(self._pi)
                else:
                    self._pi_apply((self._prev_ids, self._prev_losses), out=self._pi_mid)
            weights = self._pi_mid if optimistic else self._pi
            self._recorded.clear()
            if self.group_reduction == "mean":
                selected, scale = self._group_mean_weights(weights, safe_ids), 1.0
            else:
                selected, scale = weights[safe_ids], self.loss_scale
            with torch.enable_grad():
                result = closure(selected, scale)
            losses = result[0] if isinstance(result, (tuple, list)) else result
            self._check_losses(losses, ids, finite=True)
            losses = losses.detach()
            if self._errors is not None:
                _dispatch.flag_bad_batch(self._errors.word, self.n_groups, losses=losses)
                self._errors.check_now("this step")
            items = self._grad_items()
        except BaseException:
            self._restore(moved)  # the rejected step leaves the params and the state as they were
            self._recorded.clear()
            self._api = previous_api
            self._journal = None
            raise
        self._recorded.clear()
        self._share_error_word()

        if not optimistic:
            self._adam("step", items, sources=lambda p, s: p, destinations=lambda p, s: p)
        else:
            with_prev = [(p, gi) for p, gi in items if "prev_grad" in self.state.get(p, {})]
            fresh = [(p, gi) for p, gi in items if "prev_grad" not in self.state.get(p, {})]
            self._adam("main_prior", with_prev, sources=lambda p, s: self._saved_x[p],
                       destinations=lambda p, s: p, prior_grads=lambda p, s: s["prev_grad"],
                       prior_scale=self.alpha, save_grads_to=lambda p, s: s["prev_grad"])
            self._adam("main", fresh, sources=lambda p, s: p, destinations=lambda p, s: p,
                       save_grads_to=lambda p, s: self._buffer(s, "prev_grad", p))
            self._drop_lost_gradients(moved, {p for p, _ in items})
        pi_inputs = self._pi_inputs(ids, losses)
        if optimistic:
            self._prev_ids, self._prev_losses = pi_inputs
        self._pi_apply(pi_inputs, out=self._pi)
        self._finish_step()
        return losses.float().mean()

    def _drop_lost_gradients(self, moved: list[tuple[Tensor, dict]], with_grad: set) -> None:
        """A param extrapolated with d_prev but without a gradient now: the extrapolation's Adam
        advance is committed (as published), d_prev is dropped, and the param goes back to x
        (deliberate fix: the published optimizer leaves it at the extrapolated point)."""
        lost = [(p, gi) for gi, g in enumerate(self.param_groups) for p in g["params"]
                if p not in with_grad and "prev_grad" in self.state.get(p, {})]
        if not lost:
            return
        self._adam("commit", lost, sources=lambda p, s: self._saved_x[p], destinations=lambda p, s: p,
                   grads=lambda p, s: s["prev_grad"], grad_scale=self.alpha)
        for p, _ in lost:
            p.copy_(self._saved_x[p])
            dropped = self.state[p].pop("prev_grad")
            if self._journal is not None:
                self._journal.append(("dropped", p, "prev_grad", dropped))
        self._state_version += 1

    def _step_loop(self) -> Tensor:
        self.check_errors(wait=False)
        if not self._recorded:
            raise RuntimeError("step() without a closure needs the per-sample losses: compute the loss with "
                               "opt.weighted_loss(losses, group_ids) before backward()")
        if self.mode == "optimistic" and not self._training:
            self._recorded.clear()
            raise RuntimeError("the optimizer is in eval() mode (params hold the iterate x): call train() first")
        ids = torch.cat([i for i, _ in self._recorded]) if len(self._recorded) > 1 else self._recorded[0][0]
        losses = torch.cat([l.float() for _, l in self._recorded]) if len(self._recorded) > 1 \
            else self._recorded[0][1].float()
        self._recorded.clear()  # a rejected step drops its batch: zero the grads and run it again
        self._check_losses(losses, ids, finite=True)
        items = self._grad_items()
        previous_api = self._api
        self._set_api("loop")
        self._begin_step(previous_api)
        self._share_error_word()
        if self.mode == "descent-ascent":
            self._adam("step", items, sources=lambda p, s: p, destinations=lambda p, s: p)
            self._pi_apply(self._pi_inputs(ids, losses), out=self._pi)
        else:
            # x_{k+1} = x_k + AdamStep(x_k, d) and y_{k+1} = x_{k+1} + AdamStep(x_{k+1}, alpha d) in one pass
            self._adam("fused", items, sources=lambda p, s: s.get("iterate", p),
                       destinations=lambda p, s: self._buffer(s, "iterate", p),
                       extrapolate_to=lambda p, s: p, extrapolation_scale=self.alpha)
            with_grad = {p for p, _ in items}
            stale = [(p, s) for p, s in self._params_with("iterate") if p not in with_grad]
            if stale:  # no gradient: no extrapolation, the param sits at x (unless the step is rejected)
                if self._errors is None:
                    torch._foreach_copy_([p for p, _ in stale], [s["iterate"] for _, s in stale])
                else:
                    rejected = self._errors.word != 0
                    for p, state in stale:
                        p.copy_(torch.where(rejected, p, state["iterate"]))
            self._pi_apply(self._pi_inputs(ids, losses), out=self._pi, second_out=self._pi_mid)
        self._finish_step()
        return losses.mean()

    # ----------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (per-param Adam state, the iterate x or extrapolated point y, d_prev)
        plus an ``"also"`` entry with pi, pi_mid, pi_reg, the previous batch and the hyper-parameters
        of the pi step. For FSDP2 and torch.distributed.checkpoint use ``also_fused.checkpoint``.
        Waits for the device's check of the steps before it (an error is raised before saving)."""
        self.check_errors()
        sd = super().state_dict()
        sd["also"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_errors()
        state_dict = dict(state_dict)
        extra = state_dict.pop("also", None)
        if extra is None:
            extra, self._staged_extra = self._staged_extra, None
        if extra is None:
            raise ValueError("not an ALSO state_dict: the 'also' entry is missing")
        self._check_extra(extra)
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)

    def _extra_state(self) -> dict[str, Any]:
        return dict(
            n_groups=self.n_groups, mode=self.mode, group_reduction=self.group_reduction,
            loss_scale=self.loss_scale, alpha=self.alpha,
            pi_lr=self.pi_lr, pi_decay=self.pi_decay, pi_temperature=self.pi_temperature, pi_eps=self.pi_eps,
            pi=self._pi, pi_mid=self._pi_mid if self._api != "closure" else None, pi_reg=self._pi_reg,
            prev_ids=self._prev_ids, prev_losses=self._prev_losses, api=self._api, training=self._training,
        )

    def _check_extra(self, extra: dict[str, Any]) -> None:
        mine = (self.n_groups, self.mode, self.group_reduction)
        theirs = (extra["n_groups"], extra["mode"], extra.get("group_reduction", "sum"))
        if theirs != mine:
            raise ValueError(f"state_dict is for (n_groups, mode, group_reduction) = {theirs}; this optimizer "
                             f"has {mine}")

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        def to_device(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to(self.device).clone()

        for name in ("loss_scale", "alpha", "pi_lr", "pi_decay", "pi_temperature", "pi_eps"):
            setattr(self, name, float(extra[name]))
        self._pi = to_device(extra["pi"]).float()
        self._pi_mid = to_device(extra["pi_mid"])
        if self._pi_mid is None and self.mode == "optimistic":
            self._pi_mid = self._pi.clone()  # closure API: recomputed at the start of every step
        self._pi_reg = to_device(extra["pi_reg"])
        self._log_pi_reg = None if self._pi_reg is None else torch.log(self._pi_reg)
        self._prev_ids = to_device(extra["prev_ids"])
        self._prev_losses = to_device(extra["prev_losses"])
        self._api = extra["api"]
        self._training = bool(extra["training"])
        self._recorded.clear()

    def _materialize_state(self) -> None:
        """Create the Adam state of every trainable param that has none yet (zeros, step 0: the same
        as a lazy first creation), so that a checkpoint template lists every param's state."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(p, bool(group["amsgrad"]))
