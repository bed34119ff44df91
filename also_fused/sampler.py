"""A batch sampler that draws ids by the current pi of ALSO or of GroupWeights (object-level weighting)."""
from __future__ import annotations

from typing import Iterator, Optional, Union

import torch
from torch.utils.data import Sampler

from .also import ALSO
from .group_weights import GroupWeights


class PiBatchSampler(Sampler[list[int]]):
    """Yields ``num_batches`` batches of distinct ids from ``optimizer.select_batch`` (re-read every batch).

    ``optimizer`` is an ``ALSO`` or a ``GroupWeights``. With ``n_groups = len(dataset)`` each sample
    is its own group, so ``DataLoader(dataset, batch_sampler=PiBatchSampler(opt, threshold, num_batches))``
    feeds the samples pi currently favours. The batch size follows pi (see ``GroupWeights.select_batch``).
    With a sharded pi (``shard_pi=True``) every batch is a collective that gives every rank the same ids:
    every rank iterates its sampler in step, and takes its share of a batch itself (e.g. ``ids[rank::world]``).
    """

    def __init__(self, optimizer: Union[ALSO, GroupWeights], threshold: float, num_batches: int,
                 strategy: str = "pi", order: str = "desc", generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(optimizer, (ALSO, GroupWeights)):
            raise TypeError("PiBatchSampler needs an also_fused.ALSO optimizer or an also_fused.GroupWeights")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.optimizer = optimizer
        self.threshold = threshold
        self.num_batches = num_batches
        self.strategy = strategy
        self.order = order
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            _, ids = self.optimizer.select_batch(self.threshold, self.strategy, self.order, self.generator)
            yield ids.tolist()

    def __len__(self) -> int:
        return self.num_batches
