"""What Adam, AdamW and ALSO share: state layout, backend choice, bucketing, state_dict handling."""
from __future__ import annotations

import functools
from itertools import chain
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from . import _dispatch
from . import functional as F
from .storage import dense_like

# the moments, stored at the optimizer's state precision; the other state entries follow the param
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PARAM_DTYPE_STATE_KEYS = ("iterate", "prev_grad", "extrapolated")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# state_precision -> the moments' dtype (None: the param's, as torch.optim keeps them; int8: 8-bit codes
# with block scales, see functional.quantize_moment_)
STATE_PRECISIONS = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")
_is_contiguous = Tensor.is_contiguous
_stride = Tensor.stride

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds of a DTensor (FSDP2 params, grads and state), else ``t`` itself.

    The shard shares storage with the DTensor, so updating it in place updates the DTensor."""
    return t._local_tensor if is_dtensor(t) else t


def check_hyperparameters(lr: Any, betas: Any, eps: float, weight_decay: float, *,
                          foreach: Optional[bool] = None, capturable: bool = False) -> None:
    """torch.optim.Adam's checks, with its exception types; ``lr`` and ``betas`` may be 1-element tensors."""
    if isinstance(lr, Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (two values expected)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


_profiler_enabled = torch._C._autograd._profiler_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {})
StepFn = TypeVar("StepFn", bound=Callable[..., Any])


def optimizer_step(step: StepFn) -> StepFn:
    """Wraps the optimizers' ``step``: gradients off, eager under ``torch.compile`` (a graph break), and
    torch.optim's step hooks and ``Optimizer.step#<class>.step`` profiler label, as torch.optim's own
    wrapper gives them (marked ``hooked``, so torch.optim does not wrap it again). The label is opened
    only while a profiler records: torch.optim opens it on every call, several microseconds of host time."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _step_with_hooks(step, args, kwargs)
        return _step_with_hooks(step, args, kwargs)

    wrapped = torch.compiler.disable(wrapper)
    wrapped.hooked = True
    return wrapped  # type: ignore[return-value]


def _step_with_hooks(step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if _GLOBAL_PRE_HOOKS or self._optimizer_step_pre_hooks:
        for pre_hook in chain(_GLOBAL_PRE_HOOKS.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    grad_enabled = torch.is_grad_enabled()
    _set_grad_enabled(False)
    try:
        out = step(*args, **kwargs)
    finally:
        _set_grad_enabled(grad_enabled)
    self._optimizer_step_code()
    if self._optimizer_step_post_hooks or _GLOBAL_POST_HOOKS:
        for post_hook in chain(self._optimizer_step_post_hooks.values(), _GLOBAL_POST_HOOKS.values()):
            post_hook(self, args, kwargs)
    return out


def param_itself(p: Tensor, state: dict) -> Tensor:
    """The param (the sources and destinations of an in-place update)."""
    return p


def as_scalar(value: Any) -> Any:
    """A 1-element tensor hyper-parameter as a 0-dim tensor (as torch.optim keeps it); floats unchanged."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() != 0 else value


class AdamFamily(torch.optim.Optimizer):
    """Base of the Adam-style optimizers here: one fused update per (device, dtype, flags) bucket."""

    _CACHES = ("_resolved", "_hyper_table", "_plans", "_last_step")  # set by _reset_caches, left out of a copy

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str,
                 state_precision: str = "float32") -> None:
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        if state_precision not in STATE_PRECISIONS:
            raise ValueError(f"state_precision must be one of {tuple(STATE_PRECISIONS)}, got {state_precision!r}")
        self.state_precision = state_precision
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("complex parameters are not supported")
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")
        self.backend = backend
        self._state_version = 0
        self._reset_caches()
        for device in {p.device for group in self.param_groups for p in group["params"]}:
            self._backend_for(device)  # refuse a device the chosen backend cannot run on, before any step

    def _reset_caches(self) -> None:
        """What is derived from the params and the state and rebuilt on demand: at construction, and in a
        copy (``__setstate__``), whose cached launches would otherwise hold the original's tensors."""
        self._resolved: dict[torch.device, str] = {}
        self._hyper_table = _dispatch.HyperTable()
        # prepared tensor lists per (pass, set of params with a gradient); any change to the set or
        # layout of state tensors bumps _state_version and so rebuilds them
        self._plans: dict[tuple, tuple[int, list[dict]]] = {}
        # per pass: the signature of the last step (params, which had gradients, flags, state version)
        # and its plans with the positions of their gradients, for _plans_with_grads
        self._last_step: dict[str, tuple] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; with ``set_to_none`` and no profiler recording, without the profiler
        label that torch.optim opens on every call."""
        if not set_to_none or _profiler_enabled():
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    def __getstate__(self) -> dict[str, Any]:
        """The whole optimizer but its caches and hooks, for ``copy.deepcopy`` and pickle (torch.optim keeps
        only defaults, state and param_groups, all that its own optimizers hold; hooks are dropped as
        there). Waits first for the device's check of earlier steps, as ``state_dict()`` does."""
        self._check_pending(wait=True)
        return {key: value for key, value in self.__dict__.items()
                if key not in self._CACHES and not (key.startswith("_optimizer_") and key.endswith("_hooks"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()

    def _check_pending(self, wait: bool) -> None:
        """Raise for bad input the device found in an earlier step (ALSO: its group weights' check)."""

    # ----------------------------------------------------------------- helpers
    def _backend_for(self, device: torch.device) -> str:
        name = self._resolved.get(device)
        if name is None:
            name = _dispatch.resolve_backend(self.backend, device)
            self._resolved[device] = name
        return name

    def _step_device(self, p: Tensor) -> torch.device:
        # the reference path reads t on the host; the kernels read it on the device (no sync)
        return p.device if self._backend_for(p.device) == "triton" else torch.device("cpu")

    def _hyper_rows(self) -> list[tuple[Any, Any, Any, Any, Any]]:
        """(lr, beta1, beta2, eps, weight_decay) of every param group, floats or tensors as the user set them."""
        return [(g["lr"], *g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups]

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if "step" not in state:
            self._state_version += 1
            state["step"] = torch.zeros((), dtype=torch.float32, device=self._step_device(p))
            # laid out like the param (channels_last stays channels_last): the kernels run elementwise
            # over the flat storage of param, gradient and state together
            dtype = self._moment_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.uint8 if dtype == torch.int8 else dtype)
            if dtype == torch.int8:
                # one scale per block of this rank's shard (plain tensors; also_fused.checkpoint shards them)
                local = local_tensor(p)
                for key in SCALE_KEYS:
                    state[key] = torch.zeros(F.quant_blocks(local.numel()), dtype=torch.float32, device=local.device)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "state_precision", None) == "int8":
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            if param_group.get("amsgrad", self.defaults.get("amsgrad", False)):
                raise ValueError("state_precision='int8' does not support amsgrad")
        super().add_param_group(param_group)

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype the moments of ``p`` are stored in (the update itself runs in float32)."""
        return STATE_PRECISIONS[self.state_precision] or p.dtype

    def _grad_items(self) -> list[tuple[Tensor, int]]:
        """(param, group index) of every param with a gradient; sparse gradients are refused, and so are
        params and gradients that are not dense in one shared layout (contiguous or channels_last).

        Runs every step over every param, so it reads as little as it can: torch itself keeps a
        .grad's shape, dtype and device equal to its param's."""
        items = []
        append = items.append
        dtensor = DTensor
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                local = p
                if dtensor is not None and isinstance(g, dtensor):
                    # a plain tensor's properties cost less to read than a DTensor's
                    g, local = g._local_tensor, p._local_tensor
                if g.layout is not torch.strided:
                    raise RuntimeError("sparse gradients are not supported")
                if not dense_like(g, local):
                    raise RuntimeError("parameters and their gradients must be dense in one layout "
                                       "(contiguous, or channels_last with equal strides)")
                append((p, gi))
        return items

    def _plans_with_grads(self, tag: str, flag_names: tuple[str, ...],
                          per_tensor: dict[str, Callable[[Tensor, dict], Tensor]]) -> list[tuple[dict, list[Tensor]]]:
        """The plans of ``_plans_for(tag, _grad_items(), ...)``, each with its gradients: those of the last
        step when ``_reused_plans`` finds nothing changed, else built (and remembered for the next step)."""
        reused = self._reused_plans(tag, flag_names)
        if reused is not None:
            return reused
        signature, flat, grads = self._step_signature(flag_names)
        plans = self._plans_for(tag, self._grad_items(), flag_names, per_tensor)
        position = {id(p): i for i, p in enumerate(flat)}
        # per plan: None when all its params are contiguous, else their strides (a gradient with its
        # param's strides is dense in its layout: the check of a channels_last model's step)
        entries = [(plan, [position[id(p)] for p in plan["params"]],
                    None if all(map(_is_contiguous, plan["params"])) else tuple(map(_stride, plan["params"])))
                   for plan in plans]
        if not any(plan["has_dtensors"] for plan in plans):
            self._last_step[tag] = (signature, entries)
        return [(plan, [grads[i] for i in positions]) for plan, positions, _ in entries]

    def _reused_plans(self, tag: str, flag_names: tuple[str, ...]) -> Optional[list[tuple[dict, list[Tensor]]]]:
        """The last step's plans of ``tag`` with this step's gradients, if the params, which of them have a
        gradient, the flags and the state layout are unchanged and the gradients are plain dense tensors in
        their param's layout (as autograd makes them); else None. A few whole-list checks, no Python loop
        over the params, and nothing is built or changed."""
        last = self._last_step.get(tag)
        if last is None:
            return None
        signature, _, grads = self._step_signature(flag_names)
        if last[0] != signature:
            return None
        out = []
        for plan, positions, strides in last[1]:
            plan_grads = [grads[i] for i in positions]
            if strides is None:
                if not all(map(_is_contiguous, plan_grads)):
                    return None
            elif tuple(map(_stride, plan_grads)) != strides and not all(map(dense_like, plan_grads, plan["params"])):
                return None
            out.append((plan, plan_grads))
        return out

    def _step_signature(self, flag_names: tuple[str, ...]) -> tuple[tuple, list[Tensor], list[Optional[Tensor]]]:
        groups = self.param_groups
        flat = list(chain.from_iterable([g["params"] for g in groups]))
        grads = [p.grad for p in flat]
        signature = (tuple(map(id, flat)), tuple(map(type, grads)),
                     tuple([tuple([g.get(f, False) for f in flag_names]) for g in groups]), self._state_version)
        return signature, flat, grads

    def _plans_for(self, tag: str, items: list[tuple[Tensor, int]], flag_names: tuple[str, ...],
                   per_tensor: dict[str, Callable[[Tensor, dict], Tensor]]) -> list[dict]:
        """One plan per (device, dtype, flags) bucket of ``items``: the tensor lists of its update.

        The lists hold local shards (``local_tensor``): the update of a DTensor param is the
        update of its shard, elementwise, with state sharded like the param. ``per_tensor`` maps a list name ("sources", "destinations", "prior_grads", ...) to a function
        of (param, state). Plans are reused while the params and the state layout are unchanged.
        """
        # keyed by the local tensors: FSDP2 may give a DTensor param a new shard object (e.g. when
        # loading a model state_dict), and a plan must never keep updating a stale one
        flags = tuple([tuple([bool(g.get(f, False)) for f in flag_names]) for g in self.param_groups])
        if DTensor is None:
            key = (tag, flags, tuple([id(p) for p, _ in items]))
        else:
            key = (tag, flags, tuple([id(p._local_tensor if isinstance(p, DTensor) else p) for p, _ in items]))
        cached = self._plans.get(key)
        if cached is not None and cached[0] == self._state_version:
            return cached[1]
        # a build that creates state tensors bumps the version: it is rebuilt once more next time,
        # when lists chosen by the presence of a state entry (e.g. the iterate) see it
        version = self._state_version
        plans = []
        for bkey, bucket in self._buckets(items, *flag_names).items():
            params = [p for p, _ in bucket]
            states = [self._init_state(p, bkey[2]) for p in params]
            plan = dict(key=bkey, params=params, states=states, rows=[gi for _, gi in bucket],
                        steps=[s["step"] for s in states],
                        exp_avgs=[local_tensor(s["exp_avg"]) for s in states],
                        exp_avg_sqs=[local_tensor(s["exp_avg_sq"]) for s in states],
                        max_exp_avg_sqs=[local_tensor(s["max_exp_avg_sq"]) for s in states] if bkey[2] else None,
                        lists=self._tensor_lists(per_tensor, params, states),
                        backend=self._backend_for(params[0].device), cache={},
                        has_dtensors=any(is_dtensor(p) for p in params),
                        scales=dict(exp_avg_scales=[s["exp_avg_scale"] for s in states],
                                    exp_avg_sq_scales=[s["exp_avg_sq_scale"] for s in states])
                        if "exp_avg_scale" in states[0] else {})
            plans.append(plan)
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = (version, plans)
        return plans

    @staticmethod
    def _tensor_lists(per_tensor: dict[str, Callable[[Tensor, dict], Tensor]], params: list[Tensor],
                      states: list[dict]) -> dict[str, list[Tensor]]:
        """name -> [local_tensor(fn(param, state))]; names mapped to one function share one list (the
        launcher then reads an in-place update's params once)."""
        built: dict[Any, list[Tensor]] = {}
        for fn in per_tensor.values():
            if fn not in built:
                built[fn] = [local_tensor(fn(p, s)) for p, s in zip(params, states)]
        return {name: built[fn] for name, fn in per_tensor.items()}

    def _run_plan(self, plan: dict, grads: list[Tensor], error_word: Optional[Tensor] = None, **flags: Any) -> None:
        """Run the plan's fused update (one launch on the Triton path); it advances the step counts too."""
        if plan["has_dtensors"]:
            grads = [local_tensor(g) for g in grads]
        lists = dict(plan["lists"])
        sources, destinations = lists.pop("sources"), lists.pop("destinations")
        _dispatch.adam_update(
            plan["backend"], sources, grads, plan["exp_avgs"], plan["exp_avg_sqs"], plan["steps"], destinations,
            self._hyper_rows(), plan["rows"], max_exp_avg_sqs=plan["max_exp_avg_sqs"],
            hyper_table=self._hyper_table, cache=plan["cache"], error_word=error_word, **plan["scales"], **lists,
            **flags)

    # -------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loading, except that moments take this optimizer's state precision and ``step`` goes
        where this path reads it."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        self._check_saved_state(saved_ids, saved_state, params)
        super().load_state_dict(state_dict)
        self._state_version += 1
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            saved = saved_state[saved_id]
            fixed = self._moments_as_saved(saved, p)
            for key, value in saved.items():
                if key in fixed or key in SCALE_KEYS:
                    continue
                if not isinstance(value, Tensor):
                    fixed[key] = value
                elif key == "step":
                    fixed[key] = value.detach().to(device=self._step_device(p), dtype=torch.float32).clone()
                elif not (key == "max_exp_avg_sq" and self.state_precision == "int8"):
                    fixed[key] = _like_param(value, p, self._moment_dtype(p) if key in MOMENT_KEYS else p.dtype)
            self.state[p] = fixed

    def _moments_as_saved(self, saved: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        """exp_avg and exp_avg_sq of a saved state in this optimizer's precision: copied when the formats
        agree, otherwise decoded from 8-bit codes or encoded into them (functional.quantize_moment_)."""
        out: dict[str, Tensor] = {}
        to_codes = self.state_precision == "int8"
        for key, scale_key, signed in (("exp_avg", "exp_avg_scale", True), ("exp_avg_sq", "exp_avg_sq_scale", False)):
            value = saved.get(key)
            if not isinstance(value, Tensor):
                continue
            value = value.detach().to(p.device)
            from_codes = scale_key in saved
            scales = saved[scale_key].detach().to(p.device, torch.float32) if from_codes else None
            if from_codes and F.is_legacy_scales(scales):
                # written by the earlier 8-bit code: decoded by it, then stored as this optimizer stores moments
                value, from_codes = F.dequantize_legacy_moment(value, scales, signed), False
            if from_codes and to_codes:
                out[key] = _like_param(value, p, value.dtype)
                out[scale_key] = scales.clone()
            elif from_codes:  # a sharded state is decoded shard by shard, with the scales of that shard
                values = _on_shard(lambda codes: F.dequantize_moment(codes, scales, signed), value)
                out[key] = _like_param(values, p, self._moment_dtype(p))
            elif to_codes:
                out[key] = torch.empty_like(p, dtype=F.QUANT_DTYPES[signed])
                local = local_tensor(p)
                out[scale_key] = torch.empty(F.quant_blocks(local.numel()), dtype=torch.float32, device=local.device)
                F.quantize_moment_(local_tensor(_like_param(value, p, torch.float32)), local_tensor(out[key]),
                                   out[scale_key], signed)
            else:
                out[key] = _like_param(value, p, self._moment_dtype(p))
        return out

    @staticmethod
    def _check_saved_state(saved_ids: list, saved_state: dict, params: list[Tensor]) -> None:
        """Refuse, before anything changes, state tensors that cannot belong to their param."""
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if not isinstance(value, Tensor) or key == "step":
                    continue
                if key in SCALE_KEYS:  # one per block of this rank's shard of a sharded param
                    blocks = F.quant_blocks(local_tensor(p).numel())
                    if is_dtensor(value) or value.numel() != blocks:
                        raise ValueError(f"state {key!r} of param {saved_id} has {value.numel()} block scales, "
                                         f"the param needs {blocks}"
                                         + (" on this rank (load sharded state through also_fused.checkpoint)"
                                            if is_dtensor(p) or is_dtensor(value) else ""))
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"state {key!r} of param {saved_id} has shape {tuple(value.shape)}, "
                                     f"the param has {tuple(p.shape)}")
                sharded_param = is_dtensor(p)
                if sharded_param != is_dtensor(value):
                    raise ValueError(
                        f"state {key!r} of param {saved_id} is {'not ' if sharded_param else ''}a DTensor "
                        f"but its param is{'' if sharded_param else ' not'}: load sharded (FSDP2) state "
                        "through torch.distributed.checkpoint.state_dict (also_fused.checkpoint for ALSO)")

    def _buckets(self, items: Iterable[tuple[Tensor, int]], *flag_names: str) -> dict[tuple, list]:
        """Group (param, group index) pairs by device, dtype and the per-group flags named."""
        buckets: dict[tuple, list] = {}
        for p, gi in items:
            group = self.param_groups[gi]
            key = (p.device, p.dtype) + tuple(bool(group.get(f, False)) for f in flag_names)
            buckets.setdefault(key, []).append((p, gi))
        return buckets


def _on_shard(fn: Callable[[Tensor], Tensor], value: Tensor) -> Tensor:
    """``fn`` of a plain tensor, or of a DTensor's local shard wrapped back into a DTensor laid out alike."""
    if not is_dtensor(value):
        return fn(value)
    return DTensor.from_local(fn(value.to_local()), value.device_mesh, value.placements, run_check=False,
                              shape=value.shape, stride=value.stride())


def _like_param(value: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of a saved state tensor on the param's device, in ``dtype`` and in the param's layout."""
    value = value.detach().to(device=p.device, dtype=dtype)
    if is_dtensor(value) or value.stride() == p.stride():
        return value.clone()
    return torch.empty_like(p, dtype=dtype).copy_(value)
