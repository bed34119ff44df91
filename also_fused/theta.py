"""ALSO's update of the parameters theta: Adam with ALSO's eps and coupled decay, and the optimistic extrapolation."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

from . import _checks
from . import functional as F
from ._adam_family import AdamFamily
from ._checks import as_scalar, check_hyperparameters, rounding_defaults
from ._input_errors import DeviceInputErrors
from ._plans import Plan, grads_by_param, param_itself
from ._step_hooks import optimizer_step
from ._transaction import StepTransaction
from .update_spec import AdamSpec, GradScaling

Moved = list[tuple[Tensor, dict]]  # closure API: params holding the extrapolated point, with their state
# the spec field each pass sets to alpha (the others take AdamSpec's defaults, eps_mode "also")
# the per-group flags that split params into buckets (one launch each)
BUCKET_FLAGS = ("amsgrad", "stochastic_rounding")
_ALPHA_FIELD = {"optimistic": "extrapolation_scale", "extrapolate": "grad_scale", "main_prior": "prior_scale",
                "commit": "grad_scale"}


def _iterate_or_param(p: Tensor, state: dict) -> Tensor:
    return state.get("iterate", p)


class ThetaAdam(AdamFamily):
    """ALSO's theta step: ``x <- x - lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps)``, m and v from d + wd*x (docs/algorithm.md sec. 3).

    eps is added to sqrt(v) before the bias correction (unlike torch.optim.Adam) and the weight
    decay is coupled into the gradient. ``mode="optimistic"`` (sec. 6, loop form) follows each step
    with the extrapolation ``y = x + AdamStep(x, alpha*d)`` in the same pass: the params then hold
    y, where the next gradient is taken, and the Adam state advances twice per step; ``eval()``
    puts the iterate x into the params, ``train()`` y again. ``ALSO`` is this update plus a
    ``GroupWeights``; alone, with a ``GroupWeights`` beside it, it gives ALSO's loop API results.
    A param without a gradient is skipped (optimistic mode: it goes back to x).
    ``stochastic_rounding`` / ``rounding_seed``: as the drop-ins' (16-bit params; sec. 14).
    """

    EXTRA_KEY = "theta"  # the state_dict entry that holds what torch.optim's state does not
    _CACHES = AdamFamily._CACHES + ("_stale", "_specs", "_updated_in_backward")

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = F.FLOAT32_EPS,
        weight_decay: float = 1e-3,
        amsgrad: bool = False,
        mode: str = "descent-ascent",
        alpha: float = 1.0,
        backend: str = "auto",
        state_precision: str = "float32",
        stochastic_rounding: bool = False,
        rounding_seed: Optional[int] = None,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        _checks.check_choice("mode", mode, _checks.MODES)
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        defaults = dict(lr=as_scalar(lr), betas=tuple(map(as_scalar, betas)), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, **rounding_defaults(stochastic_rounding, rounding_seed))
        super().__init__(params, defaults, backend, state_precision)
        self.mode = mode
        self.alpha = float(alpha)
        self._saved_x: dict[Tensor, Tensor] = {}  # closure API: x while the params hold the extrapolation
        self._api: Optional[str] = None
        self._training = True
        self._staged_extra: Optional[dict[str, Any]] = None  # see extra_state_for_load
        self._errors: Optional[DeviceInputErrors] = None  # the device error word of the batch (ALSO's)
        # the step being taken, while the device may still reject it: records the state entries it changes
        self._transaction: Optional[StepTransaction] = None

    # ------------------------------------------------------------------ public
    @optimizer_step
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step from the params' gradients (torch.optim's closure re-evaluates the loss first); under
        ``torch.amp.GradScaler.step`` the gradients are unscaled in the update and an overflow step is skipped
        on the device, as for the drop-ins."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_training()
        reused = self._planner.reused(self._loop_tag(), BUCKET_FLAGS)
        if reused is None:
            self._planner.grad_items()  # refuses bad gradients before anything changes
        self._set_api("loop")
        self._update(reused, scaling=self._grad_scaling())
        return loss

    def train(self) -> None:
        """Put the extrapolated point back into the params (optimistic loop API); no-op otherwise."""
        self._check_pending(wait=False)
        if self._training:
            return
        self._swap_points("extrapolated", "iterate")
        self._training = True

    def eval(self) -> None:
        """Put the iterate x into the params for evaluation or saving (optimistic loop API); no-op otherwise.

        The state then holds the extrapolated point y under ``"extrapolated"`` instead of x under
        ``"iterate"`` (one extra buffer per param either way). Waits for the device's check of the
        steps before it, so that an error is raised before the model is evaluated or saved."""
        self._check_pending(wait=True)
        if not self._training:
            return
        if self._api == "loop":
            self._swap_points("iterate", "extrapolated")
        self._training = False

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (per-param Adam state, the iterate x or extrapolated point y, d_prev)
        plus one entry with the rest. Waits for the device's check of the steps before it."""
        self._check_pending(wait=True)
        sd = super().state_dict()
        sd[self.EXTRA_KEY] = self.extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_pending(wait=True)
        state_dict = dict(state_dict)
        extra = state_dict.pop(self.EXTRA_KEY, None)
        if extra is None:
            extra, self._staged_extra = self._staged_extra, None
        if extra is None:
            raise ValueError(f"the {self.EXTRA_KEY!r} entry is missing: not a state_dict of {type(self).__name__}")
        self.check_extra_state(extra)
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)

    # ---------------------------------------------- checkpointing (also_fused.checkpoint)
    def extra_state(self) -> dict[str, Any]:
        """The ``EXTRA_KEY`` entry of the state_dict: what torch.optim's per-param state does not hold."""
        return dict(mode=self.mode, alpha=self.alpha, api=self._api, training=self._training)

    def check_extra_state(self, extra: dict[str, Any]) -> None:
        """Refuse, before anything changes, an entry that does not belong to this optimizer."""
        if extra.get("mode") != self.mode:
            raise ValueError(f"state_dict is for mode {extra.get('mode')!r}; this optimizer has {self.mode!r}")

    @contextlib.contextmanager
    def extra_state_for_load(self, extra: dict[str, Any]) -> Iterator[None]:
        """Within the block, a ``load_state_dict`` whose dict lacks the ``EXTRA_KEY`` entry takes ``extra``
        (torch.distributed.checkpoint's loader hands over only torch.optim's keys)."""
        self._staged_extra = extra
        try:
            yield
        finally:
            self._staged_extra = None

    def materialize_state(self) -> None:
        """Create the Adam state of every trainable param that has none yet (zeros, step 0: the same
        as a lazy first creation), so that a checkpoint template lists every param's state."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self.init_state(p, bool(group["amsgrad"]))

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.alpha = float(extra["alpha"])
        self._api = extra["api"]
        self._training = bool(extra["training"])

    # ------------------------------------------------------------ the updates
    def _loop_tag(self) -> str:
        return "step" if self.mode == "descent-ascent" else "fused"

    def _spec(self, kind: str, stochastic: bool = False) -> AdamSpec:
        """The update's flags for a pass: "descent-ascent" / "optimistic" (loop API), "step", "extrapolate",
        "main_prior", "main", "commit" (closure API); alpha is read now (the user may change it).
        ``stochastic``: the bucket's params are rounded stochastically."""
        key = (kind, self.alpha, stochastic)
        spec = self._specs.get(key)
        if spec is None:
            scalars = {_ALPHA_FIELD[kind]: self.alpha} if kind in _ALPHA_FIELD else {}
            spec = self._specs[key] = AdamSpec(eps_mode="also", commit_state=kind != "extrapolate",
                                               stochastic_rounding=stochastic, **scalars)
        return spec

    def _update(self, reused: Optional[list[tuple[Plan, list[Tensor]]]] = None,
                report: Optional[Tensor] = None, scaling: Optional[GradScaling] = None) -> bool:
        """Loop API: x <- x + AdamStep(x, d); optimistic: x is kept in the state, the params get
        y = x + AdamStep(x, alpha d) (one pass), and params without a gradient go back to x.

        ``reused``: the plans ``StepPlanner.reused`` found unchanged since the last step (else they are built).
        ``report``: a report slot of the device checks (``_input_errors``) for the first launch to write;
        returns whether one did. ``scaling``: GradScaler's tensors (``update_spec.GradScaling``)."""
        if self._updated_in_backward:  # StepInBackward ran the update: only the params it did not reach remain
            done, self._updated_in_backward = self._updated_in_backward, set()
            if self.mode == "optimistic":
                self._return_to_x([(p, s) for p, s in self._params_with("iterate") if id(p) not in done], scaling)
            return False
        if reused is None:
            reused = self._planner.with_grads(self._loop_tag(), BUCKET_FLAGS, self._loop_lists())
        word = self._errors.word if self._errors is not None else None
        reported = False
        for plan, grads in reused:
            spec = self._spec(self.mode, plan.flags["stochastic_rounding"])
            if report is not None and not reported and plan.backend.reports_steps:
                self._run_plan(plan, grads, spec, word, report_out=report, scaling=scaling)
                reported = True
            else:
                self._run_plan(plan, grads, spec, word, scaling=scaling)
        if self.mode == "descent-ascent":
            return reported
        key = (self._state_version, tuple([id(plan) for plan, _ in reused]))
        if self._stale[0] != key:
            with_grad = {id(p) for plan, _ in reused for p in plan.params}
            self._stale = (key, [(p, s) for p, s in self._params_with("iterate") if id(p) not in with_grad])
        self._return_to_x(self._stale[1], scaling)
        return reported

    def _loop_lists(self) -> dict[str, Callable[[Tensor, dict], Tensor]]:
        """The loop API's tensor lists: in place (descent-ascent); from the iterate x into its buffer, with the
        extrapolated point into the param (optimistic)."""
        if self.mode == "descent-ascent":
            return dict(sources=param_itself, destinations=param_itself)
        return dict(sources=_iterate_or_param, destinations=self._iterate_buffer, extrapolate_to=param_itself)

    def update_params(self, items: list[tuple[Tensor, int]], grads: Optional[list[Tensor]] = None) -> None:
        """The loop API's update of the (param, group index) pairs given, from ``grads`` (one per item; default
        their ``.grad``): the step inside
        the backward pass (``also_fused.StepInBackward``) runs it bucket by bucket; the ``step()`` after
        backward then only returns the params it did not reach to x (optimistic) and, for ALSO, takes pi's step.
        Reads the device error word as ``step()`` does, so a batch rejected on the device changes nothing."""
        self._check_training()
        self._set_api("loop")
        word = self._errors.word if self._errors is not None else None
        grad_of = grads_by_param(items, grads)
        for plan in self._planner.plans_for(self._loop_tag() + " in backward", items, BUCKET_FLAGS,
                                            self._loop_lists()):
            self._run_plan(plan, [grad_of[id(p)] for p in plan.params],
                           self._spec(self.mode, plan.flags["stochastic_rounding"]), word)
        self._updated_in_backward.update(id(p) for p, _ in items)

    def _return_to_x(self, stale: Moved, scaling: Optional[GradScaling]) -> None:
        """Optimistic: params without a gradient this step sit at x, not at an extrapolated point (unless the
        step is rejected or skipped)."""
        if stale:
            rejected = None if self._errors is None else self._errors.word != 0
            if scaling is not None:
                skipped = scaling.found_inf != 0
                rejected = skipped if rejected is None else rejected | skipped
            if rejected is None:
                torch._foreach_copy_([p for p, _ in stale], [s["iterate"] for _, s in stale])
            else:
                for p, state in stale:
                    p.copy_(torch.where(rejected, p, state["iterate"]))

    def _extrapolate_closure(self) -> Moved:
        """Closure API: y = x + AdamStep(x, alpha*d_prev) into the params, x saved; the Adam state is not yet written."""
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
        self._adam("extrapolate", items, grads=lambda p, s: s["prev_grad"], sources=param_itself,
                   destinations=param_itself, save_sources_to=lambda p, s: self._saved_x_buffer(p))
        return moved

    def _update_closure(self, items: list[tuple[Tensor, int]], moved: Moved) -> None:
        """Closure API: x <- x + AdamStep(x, d) (optimistic: the extrapolation's advance committed first, d kept as d_prev)."""
        if self.mode == "descent-ascent":
            self._adam("step", items, sources=param_itself, destinations=param_itself)
            return
        with_prev = [(p, gi) for p, gi in items if "prev_grad" in self.state.get(p, {})]
        fresh = [(p, gi) for p, gi in items if "prev_grad" not in self.state.get(p, {})]
        self._adam("main_prior", with_prev, sources=lambda p, s: self._saved_x[p], destinations=param_itself,
                   prior_grads=lambda p, s: s["prev_grad"], save_grads_to=lambda p, s: s["prev_grad"])
        self._adam("main", fresh, sources=param_itself, destinations=param_itself,
                   save_grads_to=lambda p, s: self._buffer(s, "prev_grad", p))
        self._drop_lost_gradients(moved, {p for p, _ in items})

    def _drop_lost_gradients(self, moved: Moved, with_grad: set) -> None:
        """A param extrapolated with d_prev but without a gradient now: the extrapolation's Adam
        advance is committed (as published), d_prev is dropped, and the param goes back to x
        (deliberate fix: the published optimizer leaves it at the extrapolated point)."""
        lost = [(p, gi) for gi, g in enumerate(self.param_groups) for p in g["params"]
                if p not in with_grad and "prev_grad" in self.state.get(p, {})]
        if not lost:
            return
        self._adam("commit", lost, grads=lambda p, s: s["prev_grad"], sources=lambda p, s: self._saved_x[p],
                   destinations=param_itself)
        for p, _ in lost:
            p.copy_(self._saved_x[p])
            dropped = self.state[p].pop("prev_grad")
            self._record(lambda p=p, dropped=dropped: self._put_back(p, "prev_grad", dropped))
        self._state_version += 1

    def _restore(self, moved: Moved) -> None:
        """Closure API: put the saved x back into the params."""
        if moved:
            torch._foreach_copy_([p for p, _ in moved], [self._saved_x[p] for p, _ in moved])

    def _adam(self, tag: str, items: list[tuple[Tensor, int]],
              grads: Optional[Callable[[Tensor, dict], Tensor]] = None, **per_tensor: Callable[[Tensor, dict], Tensor]
              ) -> None:
        """Run ALSO's Adam update of the closure API's pass ``tag`` on ``items`` (one launch per
        device/dtype/amsgrad bucket), with the tensor lists (sources, destinations, save_*_to,
        prior_grads) given as functions of (param, state). A committing update reads the device error
        word: a rejected step only restores the params."""
        for plan in self._planner.plans_for(tag, items, BUCKET_FLAGS, per_tensor):
            spec = self._spec(tag, plan.flags["stochastic_rounding"])
            word = self._errors.word if self._errors is not None and spec.commit_state else None
            plan_grads = ([p.grad for p in plan.params] if grads is None
                          else [grads(p, s) for p, s in zip(plan.params, plan.states)])
            self._run_plan(plan, plan_grads, spec, word)

    # ------------------------------------------------------------ bookkeeping
    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._stale: tuple[Any, list] = (None, [])  # optimistic loop API: params at x without a gradient
        self._specs: dict[tuple, AdamSpec] = {}  # (pass, alpha) -> the spec of the pass
        self._updated_in_backward: set[int] = set()  # ids of the params StepInBackward updated this step

    def _check_training(self) -> None:
        if self.mode == "optimistic" and not self._training:
            raise RuntimeError("the optimizer is in eval() mode (params hold the iterate x): call train() first")

    def _set_api(self, api: str) -> None:
        if self.mode == "optimistic" and self._api not in (None, api):
            raise RuntimeError(f"this optimizer was stepped with the {self._api} API; optimistic mode cannot "
                               f"switch to the {api} API (the params hold a different point)")
        self._api = api

    def _params_with(self, key: str) -> list[tuple[Tensor, dict]]:
        return [(p, self.state[p]) for g in self.param_groups for p in g["params"]
                if key in self.state.get(p, {})]

    @torch.no_grad()
    def _swap_points(self, held: str, into: str) -> None:
        """Params take the point stored under ``held``; the point they held is stored under ``into``."""
        for p, state in self._params_with(held):
            state[into] = p.clone()
            p.copy_(state.pop(held))
        self._planner.clear()  # the cached plans hold the popped buffers
        self._state_version += 1  # and so do the last step's, kept for reuse

    def _iterate_buffer(self, p: Tensor, state: dict) -> Tensor:
        return self._buffer(state, "iterate", p)

    def _buffer(self, state: dict, key: str, like: Tensor) -> Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.empty_like(like)
            self._state_version += 1
            self._record(lambda: self._forget(like, key))
        return buf

    def _saved_x_buffer(self, p: Tensor) -> Tensor:
        buf = self._saved_x.get(p)
        if buf is None:
            buf = self._saved_x[p] = torch.empty_like(p)
            self._state_version += 1
        return buf

    def init_state(self, p: Tensor, amsgrad: bool) -> dict:
        recording = self._transaction is not None
        before = set(self.state.get(p, {})) if recording else None
        state = super().init_state(p, amsgrad)
        if recording:
            for key in state:
                if key not in before:
                    self._record(lambda key=key: self._forget(p, key))
        return state

    # -------------------------------------------- the step transaction (ALSO's)
    def snapshot(self) -> Optional[str]:
        """The API in use before a step (a participant of the step's ``StepTransaction``)."""
        return self._api

    def restore(self, api: Optional[str]) -> None:
        """After a rejected step's recorded state changes were reverted: the API back, plans rebuilt."""
        self._api = api
        self._state_version += 1
        self._planner.clear()

    def _record(self, undo: Callable[[], None]) -> None:
        if self._transaction is not None:
            self._transaction.record(undo)

    def _forget(self, p: Tensor, key: str) -> None:
        state = self.state.get(p, {})
        state.pop(key, None)
        if not state:
            self.state.pop(p, None)

    def _put_back(self, p: Tensor, key: str, value: Tensor) -> None:
        self.state[p][key] = value
