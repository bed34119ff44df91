"""Bad input found on the device, reported on the host without a host sync.

The kernels OR error bits (``kernels.error_word``) into a sticky int32 word on the device; every
update kernel of a step reads it and changes nothing while it is set, so a rejected step (and every
step queued after it before the host learns of it) is a no-op on the device. After each step the
word is copied asynchronously into pinned host memory; the host reads that copy once its event has
completed (``poll``), undoes the host-side bookkeeping of the rejected steps, clears the word and
raises, naming the first step that was not taken. On a CPU the word is read at once.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels.error_word import ID_OUT_OF_RANGE, NON_FINITE_LOSS
from .kernels.staging import current_stream

Undo = Callable[[], None]


class DeviceInputErrors:
    """The error word of one optimizer and the queue of steps whose word the host has not read yet."""

    def __init__(self, device: torch.device, n_groups: int) -> None:
        self.word = torch.zeros((), dtype=torch.int32, device=device)
        self.deferred = device.type == "cuda"
        self._n_groups = n_groups
        self._pending: deque[tuple[int, Tensor, Optional[torch.cuda.Event], Undo]] = deque()
        self._spare: list[tuple[Tensor, torch.cuda.Event]] = []

    def after_step(self, step_index: int, undo: Undo) -> None:
        """Queue the word as it stands after step ``step_index``; ``undo`` reverts that step's host state."""
        if self.word.device.type == "cuda":
            host, event = self._spare.pop() if self._spare else (
                torch.empty((), dtype=torch.int32, pin_memory=True), torch.cuda.Event())
            host.copy_(self.word, non_blocking=True)
            event.record(current_stream(self.word.device))
        else:
            host, event = self.word.clone(), None
        self._pending.append((step_index, host, event, undo))
        if not self.deferred:
            self.poll()

    def check_now(self, what: str) -> None:
        """Without deferral (CPU): raise at once if a kernel of the current call set the word, and clear it."""
        if self.deferred:
            return
        bits = int(self.word)
        if bits:
            self.word.zero_()
            raise ValueError(self.describe(bits, what))

    def poll(self, wait: bool = False) -> None:
        """Raise for the first queued step whose word is set, once readable; ``wait`` waits for the GPU."""
        while self._pending:
            step_index, host, event, _ = self._pending[0]
            if not wait and self._in_flight(event):
                return
            if event is not None:
                event.synchronize()
            bits = int(host)
            if bits:
                self._reject_from(step_index, bits)
            self._pending.popleft()
            if event is not None:
                self._spare.append((host, event))

    @staticmethod
    def _in_flight(event: Optional[torch.cuda.Event]) -> bool:
        return event is not None and not event.query()

    def _reject_from(self, step_index: int, bits: int) -> None:
        later = len(self._pending) - 1
        while self._pending:  # newest first: every step queued after the rejected one was a no-op too
            _, host, event, undo = self._pending.pop()
            undo()
            if event is not None:
                self._spare.append((host, event))
        self.word.zero_()
        tail = f"; the {later} step(s) queued after it were not taken either" if later else ""
        raise ValueError(f"{self.describe(bits, f'step {step_index}')} (found on the device){tail}")

    def describe(self, bits: int, what: str) -> str:
        reasons = []
        if bits & ID_OUT_OF_RANGE:
            reasons.append(f"group_ids must lie in [0, {self._n_groups})")
        if bits & NON_FINITE_LOSS:
            reasons.append("per-sample losses contain NaN or inf")
        return f"{' and '.join(reasons)}; {what} was not taken"
