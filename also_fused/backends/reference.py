"""The reference backend: ``functional``'s pure-torch maths on any device (the source of truth)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .. import functional as F
from .._checks import aminmax_on_host
from ..update_spec import AdamSpec, AdamTensors, GradScaling, HyperRow


def float_rows(hyper: Sequence[HyperRow]) -> list[tuple[float, ...]]:
    """Hyper-parameter rows as floats (a tensor lr or beta is read on the host here)."""
    return [tuple(float(v) for v in row) for row in hyper]


class ReferenceBackend:
    """Torch ops, one tensor at a time; values are checked on the host, and staging is not offered."""

    name = "reference"
    checks_values_on_device = False
    reports_steps = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_device = torch.device("cpu")  # the reference reads the step counts on the host

    def __reduce__(self) -> tuple:
        return type(self), (self.device,)  # a copy is a fresh backend for the same device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"

    def adam_update(self, tensors: AdamTensors, grads: Sequence[Tensor], hyper: Sequence[HyperRow],
                    spec: AdamSpec, *, cache: Optional[dict] = None, error_word: Optional[Tensor] = None,
                    report_out: Optional[Tensor] = None, scaling: Optional[GradScaling] = None) -> None:
        self._adam_step(tensors, grads, float_rows(hyper), spec, scaling)

    # the update with float hyper-parameters (a tensor lr or beta was read on the host)
    _adam_step = staticmethod(F.adam_step)

    def weighted_loss(self, pi: Tensor, group_ids: Tensor, losses: Tensor, loss_scale: float, *,
                      error_word: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
        return F.weighted_loss_reference(pi, group_ids, losses, loss_scale)

    def pi_update(self, pi: Tensor, group_ids: Tensor, losses: Tensor, *, out: Tensor,
                  second_out: Optional[Tensor] = None, error_word: Optional[Tensor] = None,
                  mean_out: Optional[Tensor] = None, report_out: Optional[Tensor] = None,
                  cache: Optional[dict] = None, workspace: Optional[dict] = None, **hyper: Any) -> bool:
        if mean_out is not None:
            mean_out.copy_(losses.float().mean())
        new = F.pi_update_reference(pi, group_ids, losses, **hyper)
        out.copy_(new)
        if second_out is not None:
            second_out.copy_(F.pi_update_reference(out, group_ids, losses, **hyper))
        return False

    def pi_phases(self, pi: Tensor, group_ids: Tensor, losses: Tensor, log_pi_reg: Optional[Tensor]) -> Any:
        return F.ReferencePiPhases

    def staged_pi_max_batch(self, n_groups: int) -> int:
        return 0

    def pi_stage(self, n_groups: int) -> Tensor:
        raise NotImplementedError(f"the {self.name} backend stages no pi step")

    def commit_pi_stage(self, stage: Tensor, pi: Tensor, pi_mid: Optional[Tensor]) -> None:
        raise NotImplementedError(f"the {self.name} backend stages no pi step")

    def staged_pi_step(self, pi: Tensor, pi_mid: Optional[Tensor], stage: Tensor, log_pi_reg: Optional[Tensor],
                       error_word: Optional[Tensor]) -> Any:
        raise NotImplementedError(f"the {self.name} backend stages no pi step")

    def flag_bad_batch(self, error_word: Tensor, n_groups: int, group_ids: Optional[Tensor] = None,
                       losses: Optional[Tensor] = None) -> None:
        raise NotImplementedError(f"the {self.name} backend checks values on the host")

    def rgd_loss(self, losses: Tensor, temperature: float) -> Tensor:
        return F.rgd_loss_reference(losses, temperature)

    def mass_cutoff(self, pi: Tensor, threshold: float, order: str) -> int:
        return F.mass_cutoff(pi, threshold, order)

    value_range = staticmethod(aminmax_on_host)
