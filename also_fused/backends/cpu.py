"""The CPU backend: the compiled single-pass updates of ``cpu_fused`` where they apply, the reference elsewhere."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import cpu_fused
from .reference import ReferenceBackend


class CpuBackend(ReferenceBackend):
    """CPU tensors: the Adam-family update, the pi step, the weighted loss's weights and the host-side value
    checks' (min, max) from the extension; everything it does not cover runs the reference."""

    name = "cpu"

    _adam_step = staticmethod(cpu_fused.adam_step)

    def weighted_loss(self, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float, *,
                      error_word: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
        if losses.dtype == torch.float32:
            weights = cpu_fused.sample_weights(pi, group_ids, loss_scale)
            if weights is not None:
                return torch.dot(weights, losses)  # its backward, grad * weights, runs in torch's autograd
        return super().weighted_loss(pi, group_ids, losses, loss_scale)

    def pi_update(self, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
                  second_out: Optional[Tensor] = None, error_word: Optional[Tensor] = None,
                  mean_out: Optional[Tensor] = None, report_out: Optional[Tensor] = None,
                  cache: Optional[dict] = None, workspace: Optional[dict] = None, **hyper: Any) -> bool:
        if cpu_fused.pi_update(pi, group_ids, losses, out=out, second_out=second_out, mean_out=mean_out,
                               scratch=workspace, **hyper):
            return False
        return super().pi_update(pi, group_ids, losses, out=out, second_out=second_out, mean_out=mean_out, **hyper)

    def pi_phases(self, pi: Tensor, group_ids: Tensor, losses: Tensor, log_pi_reg: Optional[Tensor]) -> Any:
        # the extension's phases wherever its pi_update would run (the same tensor conditions)
        if cpu_fused.pi_phases_apply(pi, group_ids, losses, log_pi_reg):
            return cpu_fused.CpuPiPhases
        return super().pi_phases(pi, group_ids, losses, log_pi_reg)

    def value_range(self, values: Tensor) -> tuple:
        extremes = cpu_fused.value_range(values)
        return super().value_range(values) if extremes is None else extremes
