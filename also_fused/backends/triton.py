"""The Triton backend: the kernels of ``also_fused.kernels`` on CUDA tensors (or CPU tensors through Triton's
interpreter). It owns what the kernels keep between steps: the hyper-parameter table and a zero error word;
the per-bucket launch caches are the callers' (a dict each)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .. import functional as F
from .._checks import aminmax_on_host
from ..kernels import group_pi, losses as loss_kernels, mass_search, multi_tensor_adam
from ..kernels.staging import PinnedUploader
from ..update_spec import AdamSpec, AdamTensors, GradScaling, HyperRow


class HyperTable:
    """The kernels' hyper-parameters: a device table rewritten in place only when a value changes, and
    the per-step values (lr, 1 - lr*wd) as launch arguments where the kernel takes them.

    With at most ``MAX_LR_ARGS`` param groups of float hyper-parameters, an lr schedule changes only
    the launch arguments: the table is keyed by the betas, eps and weight decay. Otherwise a changed
    row is uploaded through reused pinned buffers (``kernels.staging``): one small asynchronous copy,
    no host sync. Rows holding tensors (a tensor ``lr`` or ``betas``, as for a captured step driven by
    a scheduler) are computed on the device every call, without leaving it.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._table: Optional[tuple[Any, Tensor]] = None  # (key, table)
        self._uploads: Optional[PinnedUploader] = None

    def get(self, rows: Sequence[HyperRow]) -> tuple[Tensor, Optional[list[tuple[float, float]]]]:
        """(table, lr_args) for ``multi_tensor_adam.adam_step``; lr_args is None when the table's lr columns apply."""
        if any(isinstance(v, Tensor) for row in rows for v in row):
            table = torch.stack([_device_hyper_row(row, self._device) for row in rows]).float()
            self._table = None
            return table, None
        lr_args = None
        if len(rows) <= multi_tensor_adam.MAX_LR_ARGS:
            lr_args = [(lr, 1.0 - lr * wd) for lr, _, _, _, wd in rows]
            key = tuple(row[1:] for row in rows)
        else:
            key = tuple(rows)
        cached = self._table
        if cached is not None and cached[0] == key:
            return cached[1], lr_args
        table = cached[1] if cached is not None and cached[1].shape[0] == len(rows) else None
        if table is None:
            table = torch.empty(len(rows), multi_tensor_adam.HYPER_COLS, dtype=torch.float32, device=self._device)
        if self._uploads is None:
            self._uploads = PinnedUploader()
        self._uploads.upload(multi_tensor_adam.hyper_rows_float64(rows), table)
        self._table = (key, table)
        return table, lr_args


def _device_hyper_row(row: HyperRow, device: torch.device) -> Tensor:
    """(lr, beta1, beta2, eps, wd) with tensor entries -> the table row of ``hyper_table``, in float64 on the device."""
    lr, b1, b2, eps, wd = (torch.as_tensor(v, dtype=torch.float64).to(device, non_blocking=True).reshape(())
                           for v in row)
    return torch.stack([lr, b1, b2, eps, wd, 1.0 - b1, 1.0 - b2, torch.log(b1), torch.log(b2), 1.0 - lr * wd])


class TritonBackend:
    """The kernels: values checked on the device without a host sync, a step's report written by its last
    kernel, small pi steps staged in the weighted loss's launch."""

    name = "triton"
    checks_values_on_device = True
    reports_steps = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_device = device  # the kernels read and advance the step counts on the device
        self._hyper_table = HyperTable(device)
        self._zero_word: Optional[Tensor] = None

    def __reduce__(self) -> tuple:
        return type(self), (self.device,)  # a copy is a fresh backend: its tables are rebuilt on demand

    def __repr__(self) -> str:
        return f"TritonBackend({self.device})"

    @property
    def zero_word(self) -> Tensor:
        """An error word that no kernel ever sets, for calls without checks."""
        if self._zero_word is None:
            self._zero_word = torch.zeros((), dtype=torch.int32, device=self.device)
        return self._zero_word

    def adam_update(self, tensors: AdamTensors, grads: Sequence[Tensor], hyper: Sequence[HyperRow],
                    spec: AdamSpec, *, cache: Optional[dict] = None, error_word: Optional[Tensor] = None,
                    report_out: Optional[Tensor] = None, scaling: Optional[GradScaling] = None) -> None:
        table, lr_args = self._hyper_table.get(hyper)
        multi_tensor_adam.adam_step(tensors, grads, table, spec, cache=cache, static_lists=cache is not None,
                                    error_word=self.zero_word if error_word is None else error_word,
                                    lr_args=lr_args, report_out=report_out, scaling=scaling)

    def weighted_loss(self, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float, *,
                      error_word: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
        return loss_kernels.weighted_loss_checked(pi, group_ids, losses, loss_scale, error_word, cache=cache)

    def pi_update(self, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
                  second_out: Optional[Tensor] = None, error_word: Optional[Tensor] = None,
                  mean_out: Optional[Tensor] = None, report_out: Optional[Tensor] = None,
                  cache: Optional[dict] = None, workspace: Optional[dict] = None, **hyper: Any) -> bool:
        group_pi.pi_update_checked(pi, group_ids.contiguous(), losses.detach().contiguous(), out=out,
                                   second_out=second_out, error_word=self.zero_word if error_word is None else error_word,
                                   mean_out=mean_out, report_out=report_out, cache=cache, workspace=workspace, **hyper)
        return report_out is not None

    def pi_phases(self, pi: Tensor, group_ids: Tensor, losses: Tensor, log_pi_reg: Optional[Tensor]) -> Any:
        # no kernel of the sharded step yet: torch ops on the device (the reference's maths, not the kernels' bits)
        return F.ReferencePiPhases

    def staged_pi_max_batch(self, n_groups: int) -> int:
        return group_pi.single_program_max_batch(n_groups)

    def pi_stage(self, n_groups: int) -> Tensor:
        return group_pi.pi_stage(n_groups, self.device)

    def commit_pi_stage(self, stage: Tensor, pi: Tensor, pi_mid: Optional[Tensor]) -> None:
        group_pi.commit_pi_stage(stage, pi, pi_mid)

    def staged_pi_step(self, pi: Tensor, pi_mid: Optional[Tensor], stage: Tensor, log_pi_reg: Optional[Tensor],
                       error_word: Optional[Tensor]) -> group_pi.StagedPiStep:
        return group_pi.StagedPiStep(pi, pi_mid, stage, log_pi_reg, error_word)

    def flag_bad_batch(self, error_word: Tensor, n_groups: int, group_ids: Optional[Tensor] = None,
                       losses: Optional[Tensor] = None) -> None:
        loss_kernels.flag_bad_batch_(error_word, n_groups, group_ids, losses)

    def rgd_loss(self, losses: Tensor, temperature: float) -> Tensor:
        return loss_kernels.rgd_loss(losses, temperature)

    def mass_cutoff(self, pi: Tensor, threshold: float, order: str) -> int:
        return mass_search.mass_cutoff(pi, threshold, order)

    value_range = staticmethod(aminmax_on_host)
