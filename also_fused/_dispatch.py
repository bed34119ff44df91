"""Choice between the reference path and the Triton kernels, and the calls into either."""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import functional as F

BACKENDS = ("auto", "reference", "triton")
_warned_fallback = False


def triton_available() -> tuple[bool, str]:
    """(True, "") when the Triton kernels import, else (False, why)."""
    try:
        import triton  # noqa: F401

        from .kernels import multi_tensor_adam  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" | "reference" | "triton" to the path that runs for tensors on ``device``."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    ok, why = triton_available()
    runs_here = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' needs the Triton kernels, which failed to import ({why})")
        if not runs_here:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}"
            )
        return "triton"
    if device.type == "cuda":
        if ok:
            return "triton"
        if not _warned_fallback:
            warnings.warn(f"also_fused: Triton kernels unavailable ({why}); using the reference path on {device}")
            _warned_fallback = True
    return "reference"


class HyperTable:
    """The kernels' hyper-parameter table on the device, rebuilt only when a value changes."""

    def __init__(self) -> None:
        self._tables: dict[torch.device, tuple[tuple, Tensor]] = {}

    def get(self, rows: Sequence[tuple[float, ...]], device: torch.device) -> Tensor:
        key = tuple(rows)
        cached = self._tables.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        from .kernels.multi_tensor_adam import hyper_table

        host = hyper_table(rows)
        table = cached[1] if cached is not None and cached[1].shape == host.shape else None
        if table is None:
            table = torch.empty_like(host, device=device)
        if device.type == "cuda":
            host = host.pin_memory()
        table.copy_(host, non_blocking=True)
        self._tables[device] = (key, table)
        return table


def adam_update(
    backend: str,
    sources: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    destinations: Sequence[Tensor],
    hyper: Sequence[tuple[float, float, float, float, float]],
    hyper_rows: Sequence[int],
    *,
    hyper_table: Optional[HyperTable] = None,
    cache: Optional[dict] = None,
    **flags: Any,
) -> None:
    """One Adam-style update of a list of tensors sharing one device and one param dtype."""
    if len(sources) == 0:
        return
    if backend == "reference":
        F.adam_update_reference(sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, hyper,
                                hyper_rows, **flags)
        return
    from .kernels.multi_tensor_adam import multi_tensor_adam_

    table = (hyper_table or HyperTable()).get(hyper, sources[0].device)
    multi_tensor_adam_(sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, table, hyper_rows,
                       cache=cache, static_lists=cache is not None, **flags)


def pi_update(backend: str, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
              second_out: Optional[Tensor] = None, **hyper: Any) -> None:
    """out = PiUpdate(pi, G); second_out = PiUpdate(out, G) (optimistic loop API)."""
    if backend == "reference":
        new = F.pi_update_reference(pi, group_ids, losses, **hyper)
        out.copy_(new)
        if second_out is not None:
            second_out.copy_(F.pi_update_reference(out, group_ids, losses, **hyper))
        return
    from .kernels.group_pi import pi_update as pi_update_kernel

    pi_update_kernel(pi, group_ids, losses, out=out, second_out=second_out, **hyper)


def weighted_loss(backend: str, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float) -> Tensor:
    if backend == "reference":
        return F.weighted_loss_reference(pi, group_ids, losses, loss_scale)
    from .kernels.losses import weighted_loss as weighted_loss_kernel

    return weighted_loss_kernel(pi, group_ids, losses, loss_scale)
