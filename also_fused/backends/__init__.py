"""Where an optimizer's work runs: one backend object per optimizer and device, chosen once.

Three backends implement one small protocol (``Backend``): the pure-torch reference
(``ReferenceBackend``), the compiled CPU extension with the reference as its fallback
(``CpuBackend``), and the Triton kernels (``TritonBackend``: CUDA tensors, or CPU tensors through
Triton's interpreter). ``resolve_backend`` maps the user's choice ("auto", "reference", "triton")
and a device to a new instance. The optimizer classes call the protocol's methods and never branch
on a backend's name: where the backends behave differently, the protocol states it as a property.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .. import cpu_fused
from ..update_spec import AdamSpec, AdamTensors, GradScaling, HyperRow
from .cpu import CpuBackend
from .reference import ReferenceBackend

BACKENDS = ("auto", "reference", "triton")


class Backend(Protocol):
    """What the optimizers ask of a backend. Tensors handed in are the optimizers' own, checked by
    ``_checks`` (pi, out, second_out, log_pi_reg: contiguous float32 on the device; ids int64)."""

    name: str  # "reference", "cpu" or "triton"
    device: torch.device
    step_device: torch.device  # where the Adam step counts live (the host, unless the kernels read them)
    checks_values_on_device: bool  # ids and losses are checked by kernels (``flag_bad_batch``), not on the host
    reports_steps: bool  # a kernel can write a step's error report (``report_out``) itself

    def adam_update(self, tensors: AdamTensors, grads: Sequence[Tensor], hyper: Sequence[HyperRow],
                    spec: AdamSpec, *, cache: Optional[dict] = None, error_word: Optional[Tensor] = None,
                    report_out: Optional[Tensor] = None, scaling: Optional[GradScaling] = None) -> None:
        """``functional.adam_step`` of one bucket; ``cache``: a dict kept by the caller per bucket (the
        kernels keep their tables there); while ``error_word`` is set the update only restores the params.
        ``scaling``: GradScaler's scale and found_inf (``update_spec.GradScaling``), read on the device by
        the kernels and on the host elsewhere."""

    def weighted_loss(self, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float, *,
                      error_word: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
        """loss_scale * sum_i pi[g_i] l_i, differentiable in the losses; bad ids and non-finite losses set
        ``error_word`` where the backend checks values on the device."""

    def pi_update(self, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
                  second_out: Optional[Tensor] = None, error_word: Optional[Tensor] = None,
                  mean_out: Optional[Tensor] = None, report_out: Optional[Tensor] = None,
                  cache: Optional[dict] = None, workspace: Optional[dict] = None, **hyper: Any) -> bool:
        """out = PiUpdate(pi, G); second_out = PiUpdate(out, G); mean_out = the losses' mean. Nothing is
        written while ``error_word`` is set. Returns whether ``report_out`` was written."""

    def pi_phases(self, pi: Tensor, group_ids: Tensor, losses: Tensor, log_pi_reg: Optional[Tensor]) -> Any:
        """The pi step that ``pi_update`` takes on these tensors, in the phases of a sharded pi (``logits``,
        ``exp_blocks``, ``scale``: ``functional.ReferencePiPhases``' protocol); where ``pi_update`` runs the
        same phases over the whole of pi, a shard's phases give its slice bitwise."""

    def staged_pi_max_batch(self, n_groups: int) -> int:
        """The largest batch whose pi step ``staged_pi_step`` stages in the weighted loss's launch (0: none)."""

    def pi_stage(self, n_groups: int) -> Tensor:
        """The buffer in which ``staged_pi_step`` stages a pi step."""

    def commit_pi_stage(self, stage: Tensor, pi: Tensor, pi_mid: Optional[Tensor]) -> None:
        """pi (and pi_mid) <- the staged pi step."""

    def staged_pi_step(self, pi: Tensor, pi_mid: Optional[Tensor], stage: Tensor, log_pi_reg: Optional[Tensor],
                       error_word: Optional[Tensor]) -> Any:
        """The weighted loss with its batch's pi step staged, in one launch, bound to these tensors."""

    def flag_bad_batch(self, error_word: Tensor, n_groups: int, group_ids: Optional[Tensor] = None,
                       losses: Optional[Tensor] = None) -> None:
        """Set the error word's bits for out-of-range ids and non-finite losses, on the device."""

    def rgd_loss(self, losses: Tensor, temperature: float) -> Tensor:
        """mean_i exp(min(l_i, T)/(T+1)) l_i with the weights held constant."""

    def mass_cutoff(self, pi: Tensor, threshold: float, order: str) -> int:
        """select_batch's cutoff without a sort (``functional.mass_cutoff``); reads the result on the host."""

    def value_range(self, values: Tensor) -> tuple:
        """(min, max) of ids or losses, read on the host (NaN propagates), for the host-side checks."""


class _FallbackWarnings:
    """Each reason for falling back to the reference path is warned about once per process."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message)


FALLBACK_WARNINGS = _FallbackWarnings()


def triton_available() -> tuple[bool, str]:
    """(True, "") when the Triton kernels import, else (False, why)."""
    try:
        import triton  # noqa: F401

        from ..kernels import multi_tensor_adam  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """A new backend for tensors on ``device``: "reference" is the reference; "triton" the kernels (an error
    where they cannot run); "auto" the CPU extension on a CPU and the kernels on CUDA, each falling back to
    the reference (with one warning) where it is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return ReferenceBackend(device)
    if backend == "auto" and device.type == "cpu":
        ok, why = cpu_fused.available()
        if ok:
            return CpuBackend(device)
        FALLBACK_WARNINGS.warn("cpu", f"also_fused: fast CPU path unavailable ({why}); using the reference path "
                                      "on cpu")
        return ReferenceBackend(device)
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
    elif device.type != "cuda" or not ok:
        if device.type == "cuda":
            FALLBACK_WARNINGS.warn("triton", f"also_fused: Triton kernels unavailable ({why}); using the reference "
                                             f"path on {device}")
        return ReferenceBackend(device)
    from .triton import TritonBackend

    return TritonBackend(device)


__all__ = ["Backend", "BACKENDS", "CpuBackend", "ReferenceBackend", "resolve_backend", "triton_available",
           "interpreter_enabled", "FALLBACK_WARNINGS"]
