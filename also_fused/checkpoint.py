"""ALSO's optimizer state through torch.distributed.checkpoint (FSDP2 shards, DDP replicas).

Drop-ins for ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` and
``set_optimizer_state_dict``. Two things differ from torch.optim's optimizers, so ALSO (and its
theta update alone, ``also_fused.theta.ThetaAdam``) needs them:

* pi and the rest of ALSO's replicated state (pi_mid, pi_reg, the previous batch, the API in use)
  travel as one ``"also"`` entry (``"theta"`` for ThetaAdam), which torch's functions would drop;
* with a sharded pi (``shard_pi=True``) that entry is each rank's own, under ``"also_shard<rank>of<world>"``,
  and loads into the same number of ranks;
* in optimistic mode each param has one extra buffer whose name depends on the API and on
  ``eval()``: the iterate x (loop API, training), the extrapolated point y (loop API, eval) or
  d_prev (closure API). It is saved as ``"optimistic_buffer"``, with ``"optimistic_buffer_holds"``
  naming it, so that the template built from a fresh optimizer matches any checkpoint.

Sharded state stays sharded (DTensors like their params); a run saved with ``dcp.save`` and
restored with ``dcp.load`` into the template of a fresh optimizer continues bit-identically.
8-bit moments (``state_precision="int8"``) of sharded params keep one scale per block of each rank's
own shard: those travel as one row per rank of a DTensor, so they load into the same sharding only
(also_fused.Adam/AdamW's too). Any other optimizer passes straight through to torch's functions.
"""
from __future__ import annotations

import io
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.tensor import DTensor, Shard

from ._state_io import SCALE_KEYS
from .storage import quant_blocks
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
        return _shard_scales(dsd.get_optimizer_state_dict(model, optimizer, options=options))
    _refuse_flattened(options)
    optimizer.materialize_state()
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
    osd[_extra_key(optimizer)] = _pack(optimizer.extra_state())
    return _shard_scales(osd)


def set_optimizer_state_dict(model: nn.Module, optimizer: Any, optim_state_dict: dict[str, Any], *,
                             options: Optional[dsd.StateDictOptions] = None) -> None:
    """Load what ``get_optimizer_state_dict`` gave (after ``dcp.load`` filled it) into ``optimizer``.

    A mismatched checkpoint (n_groups, mode or group_reduction) raises ValueError before anything changes."""
    if not isinstance(optimizer, ThetaAdam):
        dsd.set_optimizer_state_dict(model, optimizer, _local_scales(optim_state_dict), options=options)
        return
    _refuse_flattened(options)
    osd = _local_scales(optim_state_dict)
    key = _extra_key(optimizer)
    blob = osd.pop(key, None)
    if blob is None:
        raise ValueError(f"the optimizer state has no {key!r} entry: save it with "
                         "also_fused.checkpoint.get_optimizer_state_dict (a sharded pi loads into the sharding, "
                         "number of ranks and n_groups it was saved from)")
    extra = _unpack(blob)
    optimizer.check_extra_state(extra)
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
    optimizer.materialize_state()  # torch's loader would otherwise take a step to create the state
    with optimizer.extra_state_for_load(extra):
        dsd.set_optimizer_state_dict(model, optimizer, osd, options=options)


# 8-bit moments travel under their own keys: a template of another state precision then finds no match
# (torch.distributed.checkpoint refuses it) instead of casting codes to numbers
CODE_KEYS = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}


def _shard_scales(osd: dict[str, Any]) -> dict[str, Any]:
    """8-bit moments: codes under CODE_KEYS, and for sharded params each rank's block scales (one per 1024
    elements of its own shard, a plain tensor in the optimizer) as one row of a DTensor [world, widest
    shard's blocks] sharded by rows, so that every rank saves and loads its own. Other state as it is."""
    state = {}
    for fqn, entries in osd["state"].items():
        if any(k in entries for k in SCALE_KEYS):
            entries = dict(entries)  # the optimizer's own dicts: never modify them
            codes = entries["exp_avg"]
            if isinstance(codes, DTensor):
                for key in SCALE_KEYS:
                    entries[key] = _scales_as_rows(codes, entries[key])
            for key, coded in CODE_KEYS.items():
                entries[coded] = entries.pop(key)
        state[fqn] = entries
    return dict(osd, state=state)


def _local_scales(osd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``_shard_scales``: the codes under their own keys, this rank's row of scales cut to
    its shard's blocks."""
    state = {}
    for fqn, entries in osd["state"].items():
        if any(k in entries for k in CODE_KEYS.values()):
            entries = dict(entries)
            for key, coded in CODE_KEYS.items():
                entries[key] = entries.pop(coded)
            codes = entries["exp_avg"]
            if isinstance(codes, DTensor):
                blocks = quant_blocks(codes.to_local().numel())
                for key in SCALE_KEYS:
                    row = entries[key].to_local() if isinstance(entries[key], DTensor) else entries[key]
                    if row.dim() != 2 or row.shape[0] != 1 or row.shape[1] < blocks:
                        raise ValueError(f"param {fqn}: {key} holds {tuple(row.shape)} scales on this rank, its "
                                         f"shard needs 1 x {blocks}: load 8-bit moments into the sharding they "
                                         "were saved from")
                    entries[key] = row[0, :blocks].clone()
        state[fqn] = entries
    return dict(osd, state=state)


def _scales_as_rows(codes: DTensor, scales: torch.Tensor) -> DTensor:
    mesh, placements = codes.device_mesh, tuple(codes.placements)
    if mesh.ndim != 1 or placements != (Shard(0),) or codes.ndim == 0:
        raise NotImplementedError(f"state_precision='int8' checkpoints params sharded along dim 0 of a 1-D mesh; "
                                  f"this one is {placements} on a {mesh.ndim}-D mesh")
    world, rows = mesh.size(), codes.shape[0]
    per_row = codes.numel() // rows if rows else 0
    width = max(1, quant_blocks(min(-(-rows // world), rows) * per_row))  # rank 0 holds the widest shard
    padded = torch.ones(1, width, dtype=scales.dtype, device=scales.device)  # 1.0: a valid scale, never read
    padded[0, :scales.numel()] = scales
    return DTensor.from_local(padded, mesh, [Shard(0)], run_check=False, shape=(world, width), stride=(width, 1))


def _extra_key(optimizer: Any) -> str:
    """The key of the optimizer's own entry: ``"also"`` (``"theta"``), replicated; with a sharded pi each rank's
    entry holds its shard of pi, so it travels under a key of that rank's own, ``"also_shard<rank>of<world>"``
    (``dcp.save`` keeps one copy of what every rank saves under one key)."""
    weights = getattr(optimizer, "weights", None)
    if weights is None or not weights.sharded:
        return optimizer.EXTRA_KEY
    rank, world = weights.shard_rank
    return f"{optimizer.EXTRA_KEY}_shard{rank}of{world}"


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
