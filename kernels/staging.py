"""Small host arrays uploaded to the device without a host sync (imports only torch and ``also_fused._cuda``).

Uploads go through a ring of pinned host slots and are copied to the device asynchronously on the
current stream. Before a half of the ring is written again, one event (recorded after that half's
last copy) must have completed: a query, never a wait; if the GPU is that far behind, a fresh ring is
taken instead (the caching host allocator keeps the old one alive until its copies are done). So an
upload costs a slot write and one copy, with no ``pin_memory()`` and one event record per half ring.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._cuda import current_stream, raw_stream

_RING = 16
_HALF = _RING // 2


class _Ring:
    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, raw_stream: int) -> None:
        self.buf = torch.empty((_RING,) + shape, dtype=dtype, pin_memory=True)
        self.slots = [(self.buf[i], self.buf[i].numpy()) for i in range(_RING)]
        self.events: List[Optional[torch.cuda.Event]] = [None, None]  # after the last copy of each half
        self.next = 0
        self.raw_stream = raw_stream
        self.stream = current_stream(device)


class PinnedUploader:
    """Asynchronous host -> device copies of small arrays through reused pinned slots."""

    def __init__(self) -> None:
        self._rings: Dict[tuple, _Ring] = {}

    def upload(self, values: Sequence, out: torch.Tensor) -> torch.Tensor:
        """Copy ``values`` (a flat sequence or nested rows, as numpy takes them) into ``out`` on the device.

        The copy is ordered on the current stream like a kernel, so ``out`` may be a table that an
        earlier kernel on this stream still reads: the copy runs after it."""
        if out.device.type != "cuda":
            out.copy_(torch.tensor(values, dtype=out.dtype).reshape(out.shape))
            return out
        key = (tuple(out.shape), out.dtype)
        stream = raw_stream(out.device)
        ring = self._rings.get(key)
        if ring is None or ring.raw_stream != stream:
            ring = self._rings[key] = _Ring(key[0], out.dtype, out.device, stream)
        i = ring.next
        if i % _HALF == 0:
            event = ring.events[i // _HALF]
            if event is not None and not event.query():
                # that half is still in flight
                ring = self._rings[key] = _Ring(key[0], out.dtype, out.device, stream)
        slot, host = ring.slots[i]
        host[...] = values  # float64 -> float32 rounds to nearest
        out.copy_(slot, non_blocking=True)
        if i % _HALF == _HALF - 1:
            event = ring.events[i // _HALF] = ring.events[i // _HALF] or torch.cuda.Event()
            event.record(ring.stream)
        ring.next = (i + 1) % _RING
        return out
