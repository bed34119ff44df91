"""Bad input found on the device, reported on the host without a host sync.

The kernels OR error bits (``error_bits``) into a sticky int32 word on the device; every
update kernel of a step reads it and changes nothing while it is set, so a rejected step (and every
step queued after it before the host learns of it) is a no-op on the device. A kernel of each step
launched after all of its checks (the pi step's, or the theta update's when the pi step was staged
by ``weighted_loss``) writes the word, with ``REPORTED`` set, into that step's slot of a ring in pinned
host memory (on the paths without such a kernel an asynchronous copy does). The host reads a slot once it is
written (``poll``: a memory read, no CUDA call), undoes the host-side bookkeeping of the rejected
steps, clears the word and raises, naming the first step that was not taken. On a CPU the word is
read at once.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import Tensor

from ._cuda import raw_stream_of_index
from .error_bits import ID_OUT_OF_RANGE, NON_FINITE_LOSS, REPORTED, report

Undo = Callable[[], None]
RING = 256  # steps whose report the host has not read yet, at most (then it waits for the device)
SLOT_STRIDE = 4  # int32 per slot
# whether the current CUDA stream is capturing, without torch.cuda's Python wrapper
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
CAPTURE_REFUSED = ("validate=True checks each step's input on the device and reports it to the host step by "
                   "step, which a CUDA-graph replay cannot do: capture with validate=False (ids outside "
                   "[0, n_groups) are then ignored and losses are not checked)")


class DeviceInputErrors:
    """The error word of one optimizer and the queue of steps whose report the host has not read yet."""

    def __init__(self, device: torch.device, n_groups: int) -> None:
        self.word = torch.zeros((), dtype=torch.int32, device=device)
        self.deferred = device.type == "cuda"
        self._device = device
        self._cuda_index = device.index if self.deferred else None
        self._n_groups = n_groups
        self._new_ring()

    def _new_ring(self) -> None:
        # one slot per 16 bytes: every slot has the alignment the kernels were compiled for (a kept
        # launch, kernels.launch, is reused only for pointers of the same 16-byte alignment)
        reports = torch.zeros(RING, SLOT_STRIDE, dtype=torch.int32, pin_memory=self._device.type == "cuda")
        self._slots = list(reports[:, 0].unbind())  # 0-d views, the kernels' destinations
        self._values = reports[:, 0].numpy()  # the same memory, read by the host
        self._next = 0  # the slot of the step being taken
        self._pending: deque[tuple[int, int, Undo]] = deque()  # (step index, slot, undo) in step order

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) gets the word and a ring of its own; the steps still to be read
        cannot be copied (their undo acts on the original), so the owner waits for them first."""
        if self._pending:
            raise RuntimeError("internal: copy the owner of the device checks, which reads its steps first")
        return dict(word=self.word, deferred=self.deferred, device=self._device, n_groups=self._n_groups)

    def __setstate__(self, state: dict) -> None:
        self.word, self.deferred = state["word"], state["deferred"]
        self._device, self._n_groups = state["device"], state["n_groups"]
        self._cuda_index = self._device.index if self.deferred else None
        self._new_ring()

    def report_slot(self) -> Tensor:
        """The (cleared) slot into which the last kernel of the step being taken writes ``word | REPORTED``."""
        if len(self._pending) >= RING:
            raise RuntimeError("internal: every report slot is in use")  # poll() keeps one free
        self._values[self._next] = 0
        return self._slots[self._next]

    def after_step(self, step_index: int, undo: Undo, reported: bool = False) -> None:
        """Queue step ``step_index``; ``undo`` reverts its host state. ``reported``: its last kernel wrote
        ``report_slot()``; otherwise the word is copied there now (asynchronously on a GPU)."""
        if not reported:
            report(self.word, self.report_slot())
        self._pending.append((step_index, self._next, undo))
        self._next = (self._next + 1) % RING
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
        """Raise for the first queued step whose word is set, once reported; ``wait`` waits for the GPU
        (as it does, whatever ``wait`` says, when every slot but one is in use). Called first by every
        step and weighted loss, it also refuses to run inside a CUDA-graph capture (``_capturing``)."""
        if self._capturing():
            raise RuntimeError(CAPTURE_REFUSED)
        pending = self._pending
        if not pending:
            return
        wait = wait or len(pending) >= RING - 1
        while pending:
            step_index, slot, _ = pending[0]
            value = int(self._values[slot])
            if self._in_flight(value):
                if not wait:
                    return
                value = self._wait(slot)
            bits = value & ~REPORTED
            if bits:
                self._reject_from(step_index, bits)
            pending.popleft()

    def _capturing(self) -> bool:
        # the device checks report to the host once per step taken; a replayed CUDA graph takes steps the
        # host never sees (a rejected replay would leave every later replay a silent no-op). CUDA captures no
        # work on a device's default stream (raw id 0), so only other streams pay the query, a driver call
        index = self._cuda_index
        return index is not None and raw_stream_of_index(index) != 0 and _stream_capturing()

    @staticmethod
    def _in_flight(value: int) -> bool:
        return not value & REPORTED

    def _wait(self, slot: int) -> int:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        value = int(self._values[slot])
        if not value & REPORTED:
            raise RuntimeError("internal: a step finished on the device without reporting its input check")
        return value

    def _reject_from(self, step_index: int, bits: int) -> None:
        later = len(self._pending) - 1
        while self._pending:  # newest first: every step queued after the rejected one was a no-op too
            self._pending.pop()[2]()
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
