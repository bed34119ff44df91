"""What Adam, AdamW and ALSO's theta update share: the state layout, a backend per device, the step plans,
state_dict loading."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from . import _checks, rounding, storage
from ._dtensor import local_tensor
from ._plans import Plan, StepPlanner
from ._state_io import MOMENT_KEYS, SCALE_KEYS, check_saved_state, stored_state
from ._step_hooks import profiler_enabled
from .backends import BACKENDS, Backend, resolve_backend
from .update_spec import AdamSpec, GradScaling

__all__ = ["AdamFamily", "MOMENT_KEYS", "SCALE_KEYS", "STATE_PRECISIONS", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# state_precision -> the moments' dtype (None: the param's, as torch.optim keeps them; int8: 8-bit codes
# with block scales, see storage.quantize_moment_)
STATE_PRECISIONS = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


class AdamFamily(torch.optim.Optimizer):
    """Base of the Adam-style optimizers here: one fused update per (device, dtype, flags) bucket.

    A subclass's ``step`` gets its buckets' plans from ``self._planner`` (``_plans.StepPlanner``), each
    with this step's gradients, and runs each with ``_run_plan`` and the ``AdamSpec`` of its formula."""

    _CACHES = ("_backends", "_planner")  # set by _reset_caches, left out of a copy
    # torch.amp.GradScaler.step hands this optimizer its scale and found_inf (``grad_scale``, ``found_inf``
    # attributes) instead of unscaling the gradients itself and reading found_inf on the host
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str,
                 state_precision: str = "float32") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        devices = {p.device for group in self.param_groups for p in group["params"]}
        self._check_devices(devices)
        for device in devices:
            self.backend_at(device)  # refuse a device the chosen backend cannot run on, before any step

    def _check_devices(self, devices: set[torch.device]) -> None:
        """Refuse params on devices this optimizer cannot update together (every set is fine here)."""

    def _reset_caches(self) -> None:
        """What is derived from the params and the state and rebuilt on demand: at construction, and in a
        copy (``__setstate__``), whose cached launches would otherwise hold the original's tensors."""
        self._backends: dict[torch.device, Backend] = {}
        # any change to the set or layout of state tensors bumps _state_version, which the plans check
        self._planner = StepPlanner(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; with ``set_to_none`` and no profiler recording, without the profiler
        label that torch.optim opens on every call."""
        if not set_to_none or profiler_enabled():
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

    # ------------------------------------------------- for the step planner and checkpointing
    @property
    def state_version(self) -> int:
        """Bumped by every change of the set or layout of state tensors (cached plans check it)."""
        return self._state_version

    def backend_at(self, device: torch.device) -> Backend:
        """The backend that updates this optimizer's params on ``device`` (chosen once per device)."""
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = resolve_backend(self.backend, device)
        return backend

    def _backend_for(self, device: torch.device) -> str:
        """The name of ``backend_at(device)``: "reference", "cpu" or "triton"."""
        return self.backend_at(device).name

    def init_state(self, p: Tensor, amsgrad: bool) -> dict:
        """The state of ``p``, created (zeros, step 0) if it has none yet."""
        state = self.state[p]
        if "step" not in state:
            self._state_version += 1
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.backend_at(p.device).step_device)
            # laid out like the param (channels_last stays channels_last): the kernels run elementwise
            # over the flat storage of param, gradient and state together
            dtype = self._moment_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.uint8 if dtype == torch.int8 else dtype)
            if dtype == torch.int8:
                # one scale per block of this rank's shard (plain tensors; also_fused.checkpoint shards them)
                local = local_tensor(p)
                for key in SCALE_KEYS:
                    state[key] = torch.zeros(storage.quant_blocks(local.numel()), dtype=torch.float32,
                                             device=local.device)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        return state

    # ----------------------------------------------------------------- helpers
    def _hyper_rows(self) -> list[tuple[Any, Any, Any, Any, Any]]:
        """(lr, beta1, beta2, eps, weight_decay) of every param group, floats or tensors as the user set them."""
        return [(g["lr"], *g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if (getattr(self, "state_precision", None) == "int8"
                and param_group.get("amsgrad", self.defaults.get("amsgrad", False))):
            raise ValueError("state_precision='int8' does not support amsgrad")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("stochastic_rounding", False) and group.get("rounding_seed") is None:
            group["rounding_seed"] = _checks.rounding_seed(True, None)

    def rounding_seeds(self, params: list[Tensor], group_indices: list[int]) -> list[int]:
        """Each param's stochastic-rounding seed: its group's ``rounding_seed`` mixed with the param's
        position over the param groups (docs/algorithm.md sec. 14)."""
        position = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return [rounding.tensor_seed(int(self.param_groups[gi]["rounding_seed"]), position[id(p)])
                for p, gi in zip(params, group_indices)]

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype the moments of ``p`` are stored in (the update itself runs in float32)."""
        return STATE_PRECISIONS[self.state_precision] or p.dtype

    def _grad_scaling(self) -> Optional[GradScaling]:
        """GradScaler's scale and found_inf while ``GradScaler.step`` runs this optimizer's step, else None."""
        return GradScaling.from_optimizer(self)

    def _run_plan(self, plan: Plan, grads: list[Tensor], spec: AdamSpec, error_word: Optional[Tensor] = None,
                  report_out: Optional[Tensor] = None, scaling: Optional[GradScaling] = None) -> None:
        """Run the plan's fused update (one launch on the Triton path); it advances the step counts too."""
        plan.backend.adam_update(plan.tensors, plan.local_grads(grads), self._hyper_rows(), spec, cache=plan.cache,
                                 error_word=error_word, report_out=report_out, scaling=scaling)

    # -------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loading, except that moments take this optimizer's state precision and ``step`` goes
        where this path reads it."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        check_saved_state(saved_ids, saved_state, params)
        super().load_state_dict(state_dict)
        self._state_version += 1
        for saved_id, p in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[p] = stored_state(saved_state[saved_id], p, self._moment_dtype(p),
                                             self.state_precision == "int8", self.backend_at(p.device).step_device)
