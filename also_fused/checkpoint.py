"""ALSO's optimizer state through torch.distributed.checkpoint (FSDP2 shards, DDP replicas).

Drop-ins for ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` and
``set_optimizer_state_dict``. Two things differ from torch.optim's optimizers, so ALSO (and its
theta update alone, ``also_fused.theta.ThetaAdam``) needs them:

* pi and the rest of ALSO's replicated state (pi_mid, pi_reg, the previous batch, the API in use)
  travel as one ``"also"`` entry (``"theta"`` for ThetaAdam), which torch's functions would drop;
* in optimistic mode each param has one extra buffer whose name depends on the API and on
  ``eval()``: the iterate x (loop API, training), the extrapolated point y (loop API, eval) or
  d_prev (closure API). It is saved as ``"optimistic_buffer"``, with ``"optimistic_buffer_holds"``
  naming it, so that the template built from a fresh optimizer matches any checkpoint.

Sharded state stays sharded (DTensors like their params); a run saved with ``dcp.save`` and
restored with ``dcp.load`` into the template of a fresh optimizer continues bit-identically.
Any other optimizer passes straight through to torch's functions.
"""
from __future__ import annotations

import io
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd

from .theta import ThetaAdam

BUFFER = "optimistic_buffer"
HOLDS = "optimistic_buffer_holds"
BUFFER_KEYS = ("iterate", "extrapolated", "prev_grad")
NO_BUFFER = "none"


def get_optimizer_state_dict(model: nn.Module, optimizer: Any, *,
                             options: Optional[dsd.StateDictOptions] = None) -> dict[str, Any]:
    """The optimizer's state_dict for ``dcp.save`` / as the template of ``dcp.load`` (keys are FQNs).

    For ALSO and ThetaAdam, every trainable param gets its Adam state first (zeros, step 0, as a
    first step would create it), so that a fresh optimizer's template lists everything a checkpoint
    can hold."""
    if not isinstance(optimizer, ThetaAdam):
        return dsd.get_optimizer_state_dict(model, optimizer, options=options)
    _refuse_flattened(options)
    optimizer._materialize_state()
    osd = dsd.get_optimizer_state_dict(model, optimizer, options=options)
    if optimizer.mode == "optimistic":
        dtypes = {fqn: p.dtype for saved, group in zip(osd["param_groups"], optimizer.param_groups)
                  for fqn, p in zip(saved["params"], group["params"])}
        state = {}
        for fqn, entries in osd["state"].items():
            entries = dict(entries)  # the optimizer's own dicts: never modify them
            held = [k for k in BUFFER_KEYS if k in entries]
            if len(held) > 1:
                raise RuntimeError(f"param {fqn} holds several optimistic buffers {held}")
            if held:
                entries[BUFFER] = entries.pop(held[0])
                entries[HOLDS] = held[0]
            elif "exp_avg" in entries:
                entries[BUFFER] = torch.zeros_like(entries["exp_avg"], dtype=dtypes[fqn])
                entries[HOLDS] = NO_BUFFER
            state[fqn] = entries
        osd["state"] = state
    osd[optimizer._EXTRA_KEY] = _pack(optimizer._extra_state())
    return osd


def set_optimizer_state_dict(model: nn.Module, optimizer: Any, optim_state_dict: dict[str, Any], *,
                             options: Optional[dsd.StateDictOptions] = None) -> None:
    """Load what ``get_optimizer_state_dict`` gave (after ``dcp.load`` filled it) into ``optimizer``.

    A mismatched checkpoint (n_groups, mode or group_reduction) raises ValueError before anything changes."""
    if not isinstance(optimizer, ThetaAdam):
        dsd.set_optimizer_state_dict(model, optimizer, optim_state_dict, options=options)
        return
    _refuse_flattened(options)
    osd = dict(optim_state_dict)
    blob = osd.pop(optimizer._EXTRA_KEY, None)
    if blob is None:
        raise ValueError(f"the optimizer state has no {optimizer._EXTRA_KEY!r} entry: save it with "
                         "also_fused.checkpoint.get_optimizer_state_dict")
    extra = _unpack(blob)
    optimizer._check_extra(extra)
    state = {}
    for fqn, entries in osd["state"].items():
        entries = dict(entries)
        holds, buffer = entries.pop(HOLDS, NO_BUFFER), entries.pop(BUFFER, None)
        if holds != NO_BUFFER:
            if holds not in BUFFER_KEYS or buffer is None:
                raise ValueError(f"param {fqn}: bad optimistic buffer entry {holds!r}")
            entries[holds] = buffer
        state[fqn] = entries
    osd["state"] = state
    optimizer._materialize_state()  # torch's loader would otherwise take a step to create the state
    optimizer._staged_extra = extra
    try:
        dsd.set_optimizer_state_dict(model, optimizer, osd, options=options)
    finally:
        optimizer._staged_extra = None


def _refuse_flattened(options: Optional[dsd.StateDictOptions]) -> None:
    if options is not None and options.flatten_optimizer_state_dict:
        raise ValueError("flatten_optimizer_state_dict is not supported for ALSO")


def _pack(extra: dict[str, Any]) -> bytes:
    """ALSO's replicated state as one opaque entry (the previous batch has no fixed shape)."""
    on_host = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    buffer = io.BytesIO()
    torch.save(on_host, buffer)
    return buffer.getvalue()


def _unpack(blob: Any) -> dict[str, Any]:
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"the 'also' entry must be the bytes that get_optimizer_state_dict made, got "
                         f"{type(blob).__name__}")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
