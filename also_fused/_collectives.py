"""torch.distributed for the group weights: every rank takes the same pi step, from every rank's batch.

The pi step of N ranks uses the losses of all of them: an all-reduce of the dense per-group sums
(and counts, for group means) when that moves fewer bytes, else an all-gather of the (id, loss)
pairs in rank order. Either way every rank reduces the same values in the same order, so pi stays
bitwise equal across ranks. The device error word is all-reduced too, so every rank rejects the
same step. Every call here is a collective: all ranks of the group must make it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F

_DIST_AVAILABLE = dist.is_available()


def reduce_group(process_group: Optional[Any]) -> Optional[Any]:
    """The group whose ranks share pi: the one given, else the default group if it has several ranks."""
    if process_group is not None:
        return process_group
    if _DIST_AVAILABLE and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world_size(group: Any) -> int:
    return dist.get_world_size(group)


def share_error_word(word: Tensor, group: Any) -> None:
    """The bitwise OR, in effect, of every rank's error word (a MAX all-reduce of the set bits)."""
    dist.all_reduce(word, op=dist.ReduceOp.MAX, group=group)


def dense_is_cheaper(n_groups: int, n_samples: int, group: Any) -> bool:
    """Whether an all-reduce of n_groups floats moves fewer bytes than all-gathering 12-byte
    (id, loss) pairs of every rank."""
    return 4 * n_groups <= 12 * n_samples * dist.get_world_size(group)


def gather_ragged(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Each 1-D tensor (one length per rank) concatenated over the ranks in rank order."""
    world = dist.get_world_size(group)
    n = tensors[0].numel()
    size = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_host = [int(s) for s in sizes]
    longest = max(sizes_host)
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(longest - n)])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([part[:k] for part, k in zip(parts, sizes_host)]))
    return out


def group_counts(ids: Tensor, n_groups: int, group: Any) -> Tensor:
    """C_j = number of samples of group j over every rank's batch (float32 [n_groups])."""
    if dense_is_cheaper(n_groups, ids.numel(), group):
        counts = F.group_counts(ids, n_groups)
        dist.all_reduce(counts, group=group)
        return counts
    return F.group_counts(gather_ragged([ids], group)[0], n_groups)


def pi_step_inputs(ids: Tensor, losses: Tensor, n_groups: int, reduction: str,
                   group: Any) -> tuple[Optional[Tensor], Tensor]:
    """What the pi step consumes, over every rank's batch: (None, dense S) after an all-reduce of the
    per-group sums (group means: sums / counts), or the gathered (ids, per-sample terms)."""
    losses = losses.float()
    if dense_is_cheaper(n_groups, ids.numel(), group):
        sums = F.scatter_group_losses(losses, ids, n_groups)
        if reduction == "mean":
            counts = F.group_counts(ids, n_groups)
            both = torch.stack([sums, counts])
            dist.all_reduce(both, group=group)
            sums = both[0] / both[1].clamp_min(1.0)
        else:
            dist.all_reduce(sums, group=group)
        return None, sums
    ids, losses = gather_ragged([ids, losses], group)
    return ids, F.pi_step_terms(losses, ids, n_groups, reduction)
