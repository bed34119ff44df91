"""Loading saved Adam-family state into an optimizer's layout: its state precision (moments in another dtype
or as 8-bit codes), its params' devices and layouts, the device its step counts live on."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import storage
from ._dtensor import is_dtensor, local_tensor, on_shard

# the moments, stored at the optimizer's state precision; the other state entries follow the param
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# the 8-bit moments' block scales (one float32 per block of the local shard)
SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")


def check_saved_state(saved_ids: list, saved_state: dict, params: list[Tensor]) -> None:
    """Refuse, before anything changes, state tensors that cannot belong to their param."""
    for saved_id, p in zip(saved_ids, params):
        for key, value in saved_state.get(saved_id, {}).items():
            if not isinstance(value, Tensor) or key == "step":
                continue
            if key in SCALE_KEYS:  # one per block of this rank's shard of a sharded param
                blocks = storage.quant_blocks(local_tensor(p).numel())
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


def stored_state(saved: dict[str, Any], p: Tensor, moment_dtype: torch.dtype, to_codes: bool,
                 step_device: torch.device) -> dict[str, Any]:
    """A param's saved state as the optimizer stores it: moments in ``moment_dtype`` (or 8-bit codes when
    ``to_codes``), ``step`` a float32 tensor on ``step_device``, every other tensor like the param."""
    fixed = _moments_as_saved(saved, p, moment_dtype, to_codes)
    for key, value in saved.items():
        if key in fixed or key in SCALE_KEYS:
            continue
        if not isinstance(value, Tensor):
            fixed[key] = value
        elif key == "step":
            fixed[key] = value.detach().to(device=step_device, dtype=torch.float32).clone()
        elif not (key == "max_exp_avg_sq" and to_codes):
            fixed[key] = like_param(value, p, moment_dtype if key in MOMENT_KEYS else p.dtype)
    return fixed


def _moments_as_saved(saved: dict[str, Any], p: Tensor, moment_dtype: torch.dtype, to_codes: bool
                      ) -> dict[str, Tensor]:
    """exp_avg and exp_avg_sq of a saved state in the optimizer's precision: copied when the formats
    agree, otherwise decoded from 8-bit codes or encoded into them (storage.quantize_moment_)."""
    out: dict[str, Tensor] = {}
    for key, scale_key, signed in (("exp_avg", "exp_avg_scale", True), ("exp_avg_sq", "exp_avg_sq_scale", False)):
        value = saved.get(key)
        if not isinstance(value, Tensor):
            continue
        value = value.detach().to(p.device)
        from_codes = scale_key in saved
        scales = saved[scale_key].detach().to(p.device, torch.float32) if from_codes else None
        if from_codes and storage.is_legacy_scales(scales):
            # written by the earlier 8-bit code: decoded by it, then stored as this optimizer stores moments
            value, from_codes = storage.dequantize_legacy_moment(value, scales, signed), False
        if from_codes and to_codes:
            out[key] = like_param(value, p, value.dtype)
            out[scale_key] = scales.clone()
        elif from_codes:  # a sharded state is decoded shard by shard, with the scales of that shard
            values = on_shard(lambda codes: storage.dequantize_moment(codes, scales, signed), value)
            out[key] = like_param(values, p, moment_dtype)
        elif to_codes:
            out[key] = torch.empty_like(p, dtype=storage.QUANT_DTYPES[signed])
            local = local_tensor(p)
            out[scale_key] = torch.empty(storage.quant_blocks(local.numel()), dtype=torch.float32, device=local.device)
            storage.quantize_moment_(local_tensor(like_param(value, p, torch.float32)), local_tensor(out[key]),
                                     out[scale_key], signed)
        else:
            out[key] = like_param(value, p, moment_dtype)
    return out


def like_param(value: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of a saved state tensor on the param's device, in ``dtype`` and in the param's layout."""
    value = value.detach().to(device=p.device, dtype=dtype)
    if is_dtensor(value) or value.stride() == p.stride():
        return value.clone()
    return torch.empty_like(p, dtype=dtype).copy_(value)
