"""What Adam, AdamW and ALSO share: state layout, backend choice, bucketing, state_dict handling."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from . import _dispatch

# state entries kept in float32 whatever the param dtype; the others follow the param
FP32_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PARAM_DTYPE_STATE_KEYS = ("iterate", "prev_grad", "extrapolated")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if isinstance(lr, Tensor):
        raise TypeError("lr must be a Python float (a tensor lr is not supported)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"Invalid betas: {betas} (each must lie in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class AdamFamily(torch.optim.Optimizer):
    """Base of the Adam-style optimizers here: one fused update per (device, dtype, flags) bucket."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str) -> None:
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("complex parameters are not supported")
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")
        self.backend = backend
        self._resolved: dict[torch.device, str] = {}
        self._kernel_caches: dict[tuple, dict] = {}
        self._hyper_table = _dispatch.HyperTable()

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

    def _hyper_rows(self) -> list[tuple[float, float, float, float, float]]:
        return [(float(g["lr"]), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                 float(g["weight_decay"])) for g in self.param_groups]

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=self._step_device(p))
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.contiguous_format)
        return state

    @staticmethod
    def _check_grad(p: Tensor) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported")
        if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
            raise RuntimeError(f"gradient of shape {tuple(p.grad.shape)}, dtype {p.grad.dtype}, device "
                               f"{p.grad.device} does not match its parameter ({tuple(p.shape)}, {p.dtype}, "
                               f"{p.device})")
        if not p.is_contiguous() or not p.grad.is_contiguous():
            raise RuntimeError("parameters and their gradients must be contiguous")

    def _cache(self, key: tuple) -> dict:
        return self._kernel_caches.setdefault(key, {})

    def _update(self, key: tuple, sources: list[Tensor], grads: list[Tensor], states: list[dict],
                destinations: list[Tensor], rows: list[int], **flags: Any) -> None:
        """One fused update of a bucket: tensors on one device with one dtype and one set of flags."""
        if not sources:
            return
        backend = self._backend_for(sources[0].device)
        amsgrad = "max_exp_avg_sq" in states[0]
        _dispatch.adam_update(
            backend, sources, grads,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], destinations, self._hyper_rows(), rows,
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else None,
            hyper_table=self._hyper_table, cache=self._cache(key), **flags)

    # -------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loading, except that moments stay float32 and ``step`` goes where this path reads it."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            fixed = {}
            for key, value in saved_state[saved_id].items():
                if not isinstance(value, Tensor):
                    fixed[key] = value
                elif key == "step":
                    fixed[key] = value.detach().to(device=self._step_device(p), dtype=torch.float32).clone()
                elif key in FP32_STATE_KEYS:
                    fixed[key] = value.detach().to(device=p.device, dtype=torch.float32).clone()
                else:
                    fixed[key] = value.detach().to(device=p.device, dtype=p.dtype).clone()
            self.state[p] = fixed

    def _buckets(self, items: Iterable[tuple[Tensor, int]], *flag_names: str) -> dict[tuple, list]:
        """Group (param, group index) pairs by device, dtype and the per-group flags named."""
        buckets: dict[tuple, list] = {}
        for p, gi in items:
            group = self.param_groups[gi]
            key = (p.device, p.dtype) + tuple(bool(group.get(f, False)) for f in flag_names)
            buckets.setdefault(key, []).append((p, gi))
        return buckets


def check_finite_or_raise(tensor: Tensor, what: str) -> Optional[str]:
    """Return an error message when ``tensor`` holds NaN or inf (one host sync), else None."""
    if not bool(torch.isfinite(tensor).all()):
        return f"{what} contain NaN or inf"
    return None
