"""Step plans: the tensor lists of the fused updates, built once and reused while nothing changes.

An optimizer step updates its params bucket by bucket (one bucket per device, dtype and per-group
flags such as amsgrad): one ``Plan`` per bucket holds the bucket's ``AdamTensors``, its backend and
the launch cache the backend keeps. ``StepPlanner`` builds the plans of a pass (a ``tag``: "step",
"fused", the closure API's passes), caches them per set of params, and, per pass, remembers the
last step's signature (params, which had gradients, flags, state layout): a step whose signature is
unchanged reuses its plans after a few whole-list checks, with no Python loop over the params.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ._dtensor import DTensor, is_dtensor, local_tensor
from .storage import dense_like
from .update_spec import AdamTensors

if TYPE_CHECKING:
    from ._adam_family import AdamFamily
    from .backends import Backend

# the name of a per-tensor list (sources, destinations, save_grads_to, ...) -> the tensor of (param, state)
PerTensor = dict[str, Callable[[Tensor, dict], Tensor]]
_is_contiguous = Tensor.is_contiguous
_stride = Tensor.stride


# plans kept per optimizer: one per bucket of the step inside the backward pass (hundreds for a large model)
# besides the step's few; past this many they are all dropped (a model whose buckets change every step)
_MAX_PLANS = 4096


def grads_by_param(items: list[tuple[Tensor, int]], grads: Optional[list[Tensor]] = None) -> dict[int, Tensor]:
    """id(param) -> its gradient: ``grads[i]`` for ``items[i]``, or each param's ``.grad`` without ``grads``."""
    if grads is None:
        return {id(p): p.grad for p, _ in items}
    if len(grads) != len(items):
        raise ValueError(f"{len(grads)} gradients for {len(items)} params")
    return {id(p): g for (p, _), g in zip(items, grads)}


def param_itself(p: Tensor, state: dict) -> Tensor:
    """The param (the sources and destinations of an update in place)."""
    return p


@dataclass(eq=False)
class Plan:
    """The fused update of one bucket: its params (with their state dicts), tensor lists and backend."""

    device: torch.device
    dtype: torch.dtype
    flags: dict[str, bool]  # the per-group flags the bucket shares (amsgrad, maximize, ...)
    params: list[Tensor]
    states: list[dict]
    tensors: AdamTensors
    backend: "Backend"
    cache: dict  # the backend's launch cache for this bucket
    has_dtensors: bool

    def local_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradients as the update reads them (a DTensor's local shard)."""
        return [local_tensor(g) for g in grads] if self.has_dtensors else grads


class StepPlanner:
    """The plans of an optimizer's passes: built on demand, cached while the params and the state layout
    are unchanged (``AdamFamily.state_version`` counts every change of the layout)."""

    def __init__(self, optimizer: "AdamFamily") -> None:
        self._optimizer = optimizer
        # (tag, flags, params) -> (state version, plans)
        self._plans: dict[tuple, tuple[int, list[Plan]]] = {}
        # per pass: the signature of the last step and its plans with the positions of their gradients
        self._last_step: dict[str, tuple] = {}

    def clear(self) -> None:
        """Forget every plan (their lists hold state tensors that were replaced)."""
        self._plans.clear()

    def grad_items(self) -> list[tuple[Tensor, int]]:
        """(param, group index) of every param with a gradient; sparse gradients are refused, and so are
        params and gradients that are not dense in one shared layout (contiguous or channels_last).

        Runs every step over every param, so it reads as little as it can: torch itself keeps a
        .grad's shape, dtype and device equal to its param's."""
        items = []
        append = items.append
        dtensor = DTensor
        for gi, group in enumerate(self._optimizer.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                local = p
                if dtensor is not None and isinstance(g, dtensor):
                    # a plain tensor's properties cost less to read than a DTensor's
                    g, local = g._local_tensor, p._local_tensor
                if g.layout is not torch.strided:
                    raise RuntimeError("sparse gradients are not supported")
                if not dense_like(g, local):
                    raise RuntimeError("parameters and their gradients must be dense in one layout "
                                       "(contiguous, or channels_last with equal strides)")
                append((p, gi))
        return items

    def with_grads(self, tag: str, flag_names: tuple[str, ...], per_tensor: PerTensor) -> list[tuple[Plan, list[Tensor]]]:
        """The plans of ``plans_for(tag, grad_items(), ...)``, each with its gradients: those of the last
        step when ``reused`` finds nothing changed, else built (and remembered for the next step)."""
        reused = self.reused(tag, flag_names)
        if reused is not None:
            return reused
        signature, flat, grads = self._signature(flag_names)
        plans = self.plans_for(tag, self.grad_items(), flag_names, per_tensor)
        position = {id(p): i for i, p in enumerate(flat)}
        # per plan: None when all its params are contiguous, else their strides (a gradient with its
        # param's strides is dense in its layout: the check of a channels_last model's step)
        entries = [(plan, [position[id(p)] for p in plan.params],
                    None if all(map(_is_contiguous, plan.params)) else tuple(map(_stride, plan.params)))
                   for plan in plans]
        if not any(plan.has_dtensors for plan in plans):
            self._last_step[tag] = (signature, entries)
        return [(plan, [grads[i] for i in positions]) for plan, positions, _ in entries]

    def reused(self, tag: str, flag_names: tuple[str, ...]) -> Optional[list[tuple[Plan, list[Tensor]]]]:
        """The last step's plans of ``tag`` with this step's gradients, if the params, which of them have a
        gradient, the flags and the state layout are unchanged and the gradients are plain dense tensors in
        their param's layout (as autograd makes them); else None. A few whole-list checks, no Python loop
        over the params, and nothing is built or changed."""
        last = self._last_step.get(tag)
        if last is None:
            return None
        signature, _, grads = self._signature(flag_names)
        if last[0] != signature:
            return None
        out = []
        for plan, positions, strides in last[1]:
            plan_grads = [grads[i] for i in positions]
            if strides is None:
                if not all(map(_is_contiguous, plan_grads)):
                    return None
            elif tuple(map(_stride, plan_grads)) != strides and not all(map(dense_like, plan_grads, plan.params)):
                return None
            out.append((plan, plan_grads))
        return out

    def _signature(self, flag_names: tuple[str, ...]) -> tuple[tuple, list[Tensor], list[Optional[Tensor]]]:
        groups = self._optimizer.param_groups
        flat = list(chain.from_iterable([g["params"] for g in groups]))
        grads = [p.grad for p in flat]
        signature = (tuple(map(id, flat)), tuple(map(type, grads)),
                     tuple([tuple([g.get(f, False) for f in flag_names]) for g in groups]),
                     self._optimizer.state_version)
        return signature, flat, grads

    def plans_for(self, tag: str, items: list[tuple[Tensor, int]], flag_names: tuple[str, ...],
                  per_tensor: PerTensor) -> list[Plan]:
        """One plan per (device, dtype, flags) bucket of ``items``: the tensor lists of its update.

        The lists hold local shards (``local_tensor``): the update of a DTensor param is the update of
        its shard, elementwise, with state sharded like the param. ``per_tensor`` maps a list name
        ("sources", "destinations", "prior_grads", ...) to a function of (param, state)."""
        optimizer = self._optimizer
        groups = optimizer.param_groups
        # keyed by the local tensors: FSDP2 may give a DTensor param a new shard object (e.g. when
        # loading a model state_dict), and a plan must never keep updating a stale one
        flags = tuple([tuple([bool(g.get(f, False)) for f in flag_names]) for g in groups])
        if DTensor is None:
            key = (tag, flags, tuple([id(p) for p, _ in items]))
        else:
            key = (tag, flags, tuple([id(p._local_tensor if isinstance(p, DTensor) else p) for p, _ in items]))
        cached = self._plans.get(key)
        if cached is not None and cached[0] == optimizer.state_version:
            return cached[1]
        # a build that creates state tensors bumps the version: it is rebuilt once more next time,
        # when lists chosen by the presence of a state entry (e.g. the iterate) see it
        version = optimizer.state_version
        plans = [self._build(bucket_flags, bucket, per_tensor)
                 for bucket_flags, bucket in _buckets(items, groups, flag_names).items()]
        if len(self._plans) > _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = (version, plans)
        return plans

    def _build(self, bucket: tuple, items: list[tuple[Tensor, int]], per_tensor: PerTensor) -> Plan:
        device, dtype, flags = bucket
        flags = dict(flags)
        params = [p for p, _ in items]
        amsgrad = flags.get("amsgrad", False)
        states = [self._optimizer.init_state(p, amsgrad) for p in params]
        lists = _tensor_lists(per_tensor, params, states)
        quantized = "exp_avg_scale" in states[0]
        stochastic = flags.get("stochastic_rounding", False)
        tensors = AdamTensors(
            rounding_seeds=self._optimizer.rounding_seeds(params, [gi for _, gi in items]) if stochastic else None,
            sources=lists.pop("sources"), destinations=lists.pop("destinations"),
            exp_avgs=[local_tensor(s["exp_avg"]) for s in states],
            exp_avg_sqs=[local_tensor(s["exp_avg_sq"]) for s in states],
            steps=[s["step"] for s in states], hyper_rows=[gi for _, gi in items],
            max_exp_avg_sqs=[local_tensor(s["max_exp_avg_sq"]) for s in states] if amsgrad else None,
            exp_avg_scales=[s["exp_avg_scale"] for s in states] if quantized else None,
            exp_avg_sq_scales=[s["exp_avg_sq_scale"] for s in states] if quantized else None,
            **lists)
        return Plan(device=device, dtype=dtype, flags=flags, params=params, states=states, tensors=tensors,
                    backend=self._optimizer.backend_at(params[0].device), cache={},
                    has_dtensors=any(is_dtensor(p) for p in params))


def _buckets(items: Iterable[tuple[Tensor, int]], groups: list[dict], flag_names: tuple[str, ...]) -> dict[tuple, list]:
    """Group (param, group index) pairs by device, dtype and the per-group flags named."""
    buckets: dict[tuple, list] = {}
    for p, gi in items:
        group = groups[gi]
        key = (p.device, p.dtype, tuple((f, bool(group.get(f, False))) for f in flag_names))
        buckets.setdefault(key, []).append((p, gi))
    return buckets


def _tensor_lists(per_tensor: PerTensor, params: list[Tensor], states: list[dict]) -> dict[str, list[Tensor]]:
    """name -> [local_tensor(fn(param, state))]; names mapped to one function share one list (the
    launcher then reads an in-place update's params once)."""
    built: dict[Any, list[Tensor]] = {}
    for fn in per_tensor.values():
        if fn not in built:
            built[fn] = [local_tensor(fn(p, s)) for p, s in zip(params, states)]
    return {name: built[fn] for name, fn in per_tensor.items()}
