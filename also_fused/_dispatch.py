"""Choice between the reference path and the Triton kernels, and the calls into either."""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import cpu_fused
from . import functional as F

BACKENDS = ("auto", "reference", "triton")
_warned_fallback = False
_warned_cpu_fallback = False


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
    global _warned_fallback, _warned_cpu_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto" and device.type == "cpu":
        ok, why = cpu_fused.available()
        if ok:
            return "cpu"
        if not _warned_cpu_fallback:
            warnings.warn(f"also_fused: fast CPU path unavailable ({why}); using the reference path on cpu")
            _warned_cpu_fallback = True
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
    """The kernels' hyper-parameters: a device table rewritten in place only when a value changes, and
    the per-step values (lr, 1 - lr*wd) as launch arguments where the kernel takes them.

    With at most ``MAX_LR_ARGS`` param groups of float hyper-parameters, an lr schedule changes only
    the launch arguments: the table is keyed by the betas, eps and weight decay. Otherwise a changed
    row is uploaded through reused pinned buffers (``kernels.staging``): one small asynchronous copy,
    no host sync. Rows holding tensors (a tensor ``lr`` or ``betas``, as for a captured step driven by
    a scheduler) are computed on the device every call, without leaving it.
    """

    def __init__(self) -> None:
        self._tables: dict[torch.device, tuple[Any, Tensor]] = {}
        self._uploads: Optional[Any] = None

    def get(self, rows: Sequence[tuple[Any, ...]], device: torch.device
            ) -> tuple[Tensor, Optional[list[tuple[float, float]]]]:
        """(table, lr_args) for ``multi_tensor_adam_``; lr_args is None when the table's lr columns apply."""
        if any(isinstance(v, Tensor) for row in rows for v in row):
            table = torch.stack([_device_hyper_row(row, device) for row in rows]).float()
            self._tables.pop(device, None)
            return table, None
        lr_args = None
        if len(rows) <= _kernel("multi_tensor_adam").MAX_LR_ARGS:
            lr_args = [(lr, 1.0 - lr * wd) for lr, _, _, _, wd in rows]
            key = tuple(row[1:] for row in rows)
        else:
            key = tuple(rows)
        cached = self._tables.get(device)
        if cached is not None and cached[0] == key:
            return cached[1], lr_args
        table = cached[1] if cached is not None and cached[1].shape[0] == len(rows) else None
        if table is None:
            table = torch.empty(len(rows), _kernel("multi_tensor_adam").HYPER_COLS, dtype=torch.float32,
                                device=device)
        if self._uploads is None:
            from .kernels.staging import PinnedUploader

            self._uploads = PinnedUploader()
        self._uploads.upload(_kernel("multi_tensor_adam").hyper_rows_float64(rows), table)
        self._tables[device] = (key, table)
        return table, lr_args


_KERNEL_MODULES: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """The module ``kernels.<name>``, imported on first use (Triton may be missing on the reference path)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f".kernels.{name}", __package__)
    return module


def _device_hyper_row(row: tuple[Any, ...], device: torch.device) -> Tensor:
    """(lr, beta1, beta2, eps, wd) with tensor entries -> the table row of ``hyper_table``, in float64 on the device."""
    lr, b1, b2, eps, wd = (torch.as_tensor(v, dtype=torch.float64).to(device, non_blocking=True).reshape(())
                           for v in row)
    return torch.stack([lr, b1, b2, eps, wd, 1.0 - b1, 1.0 - b2, torch.log(b1), torch.log(b2), 1.0 - lr * wd])


def adam_update(
    backend: str,
    sources: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    destinations: Sequence[Tensor],
    hyper: Sequence[tuple[Any, Any, Any, Any, Any]],
    hyper_rows: Sequence[int],
    *,
    hyper_table: Optional[HyperTable] = None,
    cache: Optional[dict] = None,
    error_word: Optional[Tensor] = None,
    **flags: Any,
) -> None:
    """One Adam-style update of a list of tensors sharing one device and one param dtype.

    ``steps`` hold the counts before the call; both paths advance them (see ``adam_update_reference``).
    ``error_word`` (kernels only): a non-zero device word makes the update a no-op that restores the params.
    """
    if len(sources) == 0:
        return
    if backend in ("reference", "cpu"):
        rows = [tuple(float(v) for v in row) for row in hyper]  # a tensor lr or beta is read on the host here
        update = F.adam_update_reference if backend == "reference" else cpu_fused.adam_update
        update(sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, rows, hyper_rows, **flags)
        return
    table, lr_args = (hyper_table or HyperTable()).get(hyper, sources[0].device)
    _kernel("multi_tensor_adam").multi_tensor_adam_(
        sources, grads, exp_avgs, exp_avg_sqs, steps, destinations, table, hyper_rows, cache=cache,
        static_lists=cache is not None, error_word=error_word, lr_args=lr_args, **flags)


def pi_update(backend: str, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
              second_out: Optional[Tensor] = None, error_word: Optional[Tensor] = None,
              mean_out: Optional[Tensor] = None, report_out: Optional[Tensor] = None, cache: Optional[dict] = None,
              **hyper: Any) -> bool:
    """out = PiUpdate(pi, G); second_out = PiUpdate(out, G) (optimistic loop API); ``mean_out`` = the
    losses' mean (a 0-d float32 tensor, if given). The optimizers' own tensors: pi, out, second_out and
    log_pi_reg are contiguous float32 on pi's device, ids and losses checked by ``_checks``.

    ``error_word`` (kernels only): nothing is written while it is non-zero; ``report_out`` then receives
    the word for the host (``_input_errors``). Returns whether it was written. ``cache`` (kernels only):
    a dict kept by the caller between calls of one use, for the launch (see ``kernels.launch``)."""
    if backend in ("reference", "cpu"):
        if backend == "cpu" and cpu_fused.pi_update(pi, group_ids, losses, out=out, second_out=second_out,
                                                    mean_out=mean_out, **hyper):
            return False
        if mean_out is not None:
            mean_out.copy_(losses.float().mean())
        new = F.pi_update_reference(pi, group_ids, losses, **hyper)
        out.copy_(new)
        if second_out is not None:
            second_out.copy_(F.pi_update_reference(out, group_ids, losses, **hyper))
        return False
    _kernel("group_pi").pi_update_checked(pi, group_ids.contiguous(), losses.detach().contiguous(), out=out,
                                          second_out=second_out, error_word=error_word, mean_out=mean_out,
                                          report_out=report_out, cache=cache, **hyper)
    return report_out is not None


def weighted_loss(backend: str, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float,
                  error_word: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
    """loss_scale * sum_i pi[g_i] l_i; on the kernels, bad ids and non-finite losses also set ``error_word``.
    pi is the optimizers' own (1-D float32), ids and losses checked by ``_checks``; ``cache`` as for ``pi_update``."""
    if backend == "cpu" and losses.dtype == torch.float32:
        weights = cpu_fused.sample_weights(pi, group_ids, loss_scale)
        if weights is not None:
            return torch.dot(weights, losses)  # its backward, grad * weights, runs in torch's autograd
    if backend in ("reference", "cpu"):
        return F.weighted_loss_reference(pi, group_ids, losses, loss_scale)
    return _kernel("losses").weighted_loss_checked(pi, group_ids, losses, loss_scale, error_word, cache=cache)


def staged_pi_max_batch(backend: str, n_groups: int) -> int:
    """The largest batch for which ``staged_pi_step`` runs over n_groups groups (0: never, e.g. where the kernels
    do not run): the single-program pi step's limit."""
    return _kernel("group_pi").single_program_max_batch(n_groups) if backend == "triton" else 0


def pi_stage(n_groups: int, device: torch.device) -> Tensor:
    """The buffer in which ``staged_pi_step`` stages a pi step (kernels only)."""
    return _kernel("group_pi").pi_stage(n_groups, device)


def commit_pi_stage(stage: Tensor, pi: Tensor, pi_mid: Optional[Tensor]) -> None:
    """pi (and pi_mid) <- the staged pi step (kernels only)."""
    _kernel("group_pi").commit_pi_stage(stage, pi, pi_mid)


def staged_pi_step(pi: Tensor, pi_mid: Optional[Tensor], stage: Tensor, log_pi_reg: Optional[Tensor],
                   error_word: Optional[Tensor]) -> Any:
    """The weighted loss with its batch's pi step staged, in one launch, bound to these tensors (kernels only;
    ``kernels.group_pi.StagedPiStep``)."""
    return _kernel("group_pi").StagedPiStep(pi, pi_mid, stage, log_pi_reg, error_word)


def flag_bad_batch(error_word: Tensor, n_groups: int, group_ids: Optional[Tensor] = None,
                   losses: Optional[Tensor] = None) -> None:
    """Set the error word's bits for out-of-range ids and non-finite losses, on the device (kernels only)."""
    _kernel("losses").flag_bad_batch_(error_word, n_groups, group_ids, losses)
