"""One optimizer step whose input the device may still reject, as a transaction over the parts it changes.

With ``validate=True`` on the Triton kernels, a step's input is checked on the device and the host learns
of a rejection only later (``_input_errors``); the kernels of a rejected step write nothing, but the host
side of the step (the previous batch kept for the next extrapolation, Adam state entries created or
dropped, the API in use) has moved on and must be put back. A ``StepTransaction`` holds that undo:

* ``begin``: each part that takes part (``Participant``) gives a snapshot of its host-side state;
* ``record``: during the step, a part logs what else it changed, as a function that reverts it;
* ``commit``: the step is queued with the device checks, with ``undo`` to run if it is rejected
  (on a CPU the check is read at once);
* ``undo``: the recorded changes reverted newest first, then every part restored to its snapshot.

Without device checks (``errors`` None) nothing is recorded and ``commit`` does nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

from ._input_errors import DeviceInputErrors


class Participant(Protocol):
    def snapshot(self) -> Any:
        """The host-side state a rejected step must give back."""

    def restore(self, snapshot: Any) -> None:
        """Put back what ``snapshot`` returned."""


class StepTransaction:
    """The undo of one step: snapshots of its participants and the changes they recorded."""

    __slots__ = ("errors", "_snapshots", "_undo_log")

    def __init__(self, errors: Optional[DeviceInputErrors], participants: Sequence[Participant]) -> None:
        self.errors = errors
        self._snapshots = [(part, part.snapshot()) for part in participants]
        self._undo_log: list[Callable[[], None]] = []

    @property
    def recording(self) -> bool:
        """Whether changes need recording: only a step the device may still reject is undone later."""
        return self.errors is not None

    def record(self, undo: Callable[[], None]) -> None:
        if self.errors is not None:
            self._undo_log.append(undo)

    def undo(self) -> None:
        for revert in reversed(self._undo_log):
            revert()
        for part, snapshot in reversed(self._snapshots):
            part.restore(snapshot)

    def commit(self, step_index: int, reported: bool = False) -> None:
        """Queue the step (``step_index`` names it in an error) with the device checks; ``reported``: its
        last kernel wrote the step's report slot."""
        if self.errors is not None:
            self.errors.after_step(step_index, self.undo, reported)
