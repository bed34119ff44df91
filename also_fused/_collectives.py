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
    return gather_with_sizes(tensors, group)[0]


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


# ---------------------------------------------------------------- sharded pi
# With ``shard_pi`` each rank of the group owns the groups [start, stop) of pi, a run of whole blocks of
# ``functional.PI_BLOCK`` groups (the blocks split as evenly as they go, the first ranks taking one more). The
# pi step's normaliser is summed block by block in block order (``functional.pi_update_from_sums``), so that
# the ranks, from the max over every rank and every rank's block partials, compute bitwise the pi of the
# unsharded step.
def rank_of(group: Any) -> int:
    return dist.get_rank(group)


def shard_blocks(n_groups: int, world: int) -> list[tuple[int, int]]:
    """(first block, number of blocks) of each rank, in rank order."""
    blocks = -(-n_groups // F.PI_BLOCK)
    base, extra = divmod(blocks, world)
    out, first = [], 0
    for r in range(world):
        count = base + (1 if r < extra else 0)
        out.append((first, count))
        first += count
    return out


def shard_bounds(n_groups: int, world: int, rank: int) -> tuple[int, int]:
    """The groups [start, stop) that ``rank`` of ``world`` owns (empty where there are fewer blocks than ranks)."""
    first, count = shard_blocks(n_groups, world)[rank]
    return min(n_groups, first * F.PI_BLOCK), min(n_groups, (first + count) * F.PI_BLOCK)


def agree_on_error(error: Optional[BaseException], group: Any, device: torch.device) -> None:
    """Raise on every rank when a rank refused its input (one MAX all-reduce of a flag): a rank's own error as it
    is, on the others a ValueError naming the rank; before any state changes, so that every rank keeps it."""
    flags = torch.tensor([0 if error is None else 1, -1 if error is None else rank_of(group)], dtype=torch.int64,
                         device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flags[0]) != 0:
        raise ValueError(f"rank {int(flags[1])} of the process group refused its batch (see its error); every "
                         "rank's step is rejected, pi is unchanged")


def gather_with_sizes(tensors: list[Tensor], group: Any) -> tuple[list[Tensor], list[int]]:
    """``gather_ragged`` and the length each rank gave."""
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
    return out, sizes_host


def values_at(local: Tensor, ids: Tensor, start: int, stop: int, group: Any) -> Tensor:
    """``local``'s entries at every rank's ``ids`` from their owners: this rank gets v[ids_i] for its own ids
    (0 for an id that no rank owns, i.e. outside [0, n_groups)). An all-gather of the ids and one SUM all-reduce
    of the gathered values, each filled in by its owner alone (x + 0 = x: the values arrive unchanged)."""
    (every,), sizes = gather_with_sizes([ids], group)
    mine = (every >= start) & (every < stop)
    values = torch.zeros(every.shape, dtype=local.dtype, device=local.device)
    values[mine] = local[every[mine] - start]
    dist.all_reduce(values, group=group)
    offset = sum(sizes[:rank_of(group)])
    return values[offset:offset + ids.numel()]


def sharded_step_inputs(ids: Tensor, losses: Tensor, n_groups: int, reduction: str, group: Any, start: int,
                        stop: int) -> tuple[Optional[Tensor], Tensor]:
    """``pi_step_inputs`` for the groups [start, stop) of this rank: the same collective as the unsharded step
    (the dense all-reduce only while it moves fewer bytes than the pairs, so that its n_groups floats stay
    within the pairs' size), then this rank's part: (None, S[start:stop]), or the (id - start, term) pairs of
    its groups in the gathered order (each group's sum then adds its terms in the order of the unsharded step)."""
    if reduction != "sum":
        raise NotImplementedError("sharded pi takes the sum reduction")
    losses = losses.float()
    if dense_is_cheaper(n_groups, ids.numel(), group):
        sums = F.scatter_group_losses(losses, ids, n_groups)
        dist.all_reduce(sums, group=group)
        return None, sums[start:stop].clone()
    every_id, every_loss = gather_ragged([ids, losses], group)
    mine = (every_id >= start) & (every_id < stop)
    return every_id[mine] - start, every_loss[mine]


def global_max(local_max: Tensor, group: Any) -> Tensor:
    """The max over every rank (0-d float64; exact in any order)."""
    out = local_max.reshape(1).clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out.reshape(())


def gather_known_lengths(local: Tensor, lengths: list[int], group: Any) -> Tensor:
    """Every rank's 1-D ``local`` concatenated in rank order, each rank's length ``lengths[rank]`` known on
    every rank (one all-gather of the longest, padded)."""
    padded = torch.zeros(max(lengths), dtype=local.dtype, device=local.device)
    padded[:local.numel()] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:k] for part, k in zip(parts, lengths)])


def every_block_partial(partials: Tensor, n_groups: int, group: Any) -> Tensor:
    """Every rank's block partials in block order (each rank's count known from the layout)."""
    counts = [count for _, count in shard_blocks(n_groups, dist.get_world_size(group))]
    return gather_known_lengths(partials, counts, group)


def gather_shards(local: Tensor, n_groups: int, group: Any) -> Tensor:
    """The whole vector from every rank's shard (n_groups entries on every rank)."""
    world = dist.get_world_size(group)
    lengths = [stop - start for start, stop in (shard_bounds(n_groups, world, r) for r in range(world))]
    return gather_known_lengths(local, lengths, group)


def all_reduce_sum(values: Tensor, group: Any) -> Tensor:
    dist.all_reduce(values, group=group)
    return values


def broadcast_seed(seed: int, group: Any, device: torch.device) -> int:
    """The first rank's seed on every rank."""
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t)


def sharded_select_batch(local: Tensor, n_groups: int, threshold: float, strategy: str, order: str,
                         generator: Optional[torch.Generator], group: Any) -> tuple[int, Tensor]:
    """``functional.select_batch`` over a sharded pi; every rank gets the same (batch size, ids).

    Up to ``SORTED_CUTOFF_MAX_GROUPS`` groups pi is gathered (a few hundred KB) and the unsharded function runs on
    it: the unsharded draw. Beyond, no rank holds more than its shard: the cutoff is ``functional.mass_cutoff``'s
    search with each probe's mass all-reduced over the ranks (float64 partial sums: it may differ from the
    unsharded cutoff only where the threshold lies within rounding of a partial sum, as the search does from the
    sort), and the ids are the k smallest of E_i / p_i (E_i ~ Exp(1); 1 for ``"uniform"``) over every shard:
    each rank's k smallest, gathered, and the k smallest of those (``draw_without_replacement``'s exponential
    race: the unsharded draw's distribution), from random numbers seeded by the first rank's ``generator``."""
    F._check_selection(strategy, order)
    if n_groups <= F.SORTED_CUTOFF_MAX_GROUPS:
        return F.select_batch(gather_shards(local, n_groups, group), threshold, strategy, order, generator)
    position = sharded_mass_cutoff(local, n_groups, threshold, order, group)
    k = max(1, n_groups - position)
    return k, sharded_race(local, n_groups, k, strategy, generator, group)


def sharded_mass_cutoff(local: Tensor, n_groups: int, threshold: float, order: str, group: Any) -> int:
    """``functional.mass_cutoff`` of the whole pi from its shards (the masses and counts all-reduced)."""

    def reduced(*parts: Tensor) -> Tensor:  # float64 sums over every rank (counts exact below 2^53)
        return all_reduce_sum(torch.stack([p.to(torch.float64) for p in parts]), group)

    return F.mass_cutoff(local, threshold, order, n_total=n_groups, reduce=reduced)


def sharded_race(local: Tensor, n_groups: int, k: int, strategy: str, generator: Optional[torch.Generator],
                 group: Any) -> Tensor:
    """k distinct ids, the k smallest arrival times E_i / p_i over every rank's shard, in arrival order."""
    world, rank = dist.get_world_size(group), rank_of(group)
    start, _ = shard_bounds(n_groups, world, rank)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device))
    seed = broadcast_seed(seed, group, local.device)
    mine = torch.Generator(device=gen_device).manual_seed((seed + 0x9E3779B97F4A7C15 * (rank + 1)) % 2 ** 63)
    arrivals = torch.empty(local.shape, dtype=torch.float32, device=gen_device).exponential_(generator=mine)
    if strategy == "pi":
        arrivals.div_(local.detach().float().to(gen_device))
    arrivals = arrivals.to(local.device)
    take = min(k, arrivals.numel())
    times, where = torch.topk(arrivals, take, largest=False, sorted=True)
    widest = min(k, max(stop - begin for begin, stop in (shard_bounds(n_groups, world, r) for r in range(world))))
    padded_times = torch.full((widest,), float("inf"), dtype=torch.float32, device=local.device)
    padded_ids = torch.full((widest,), n_groups, dtype=torch.int64, device=local.device)
    padded_times[:take], padded_ids[:take] = times, where + start
    (every_time, every_id) = ([torch.empty_like(padded_times) for _ in range(world)],
                              [torch.empty_like(padded_ids) for _ in range(world)])
    dist.all_gather(every_time, padded_times, group=group)
    dist.all_gather(every_id, padded_ids, group=group)
    times, ids = torch.cat(every_time), torch.cat(every_id)
    # by (time, id): ties (the inf of p_i = 0, the padding) by id, so that the padding (id n_groups) comes last
    by_id = torch.argsort(ids, stable=True)
    times, ids = times[by_id], ids[by_id]
    return ids[torch.sort(times, stable=True).indices[:k]]
