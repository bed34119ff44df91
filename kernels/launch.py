"""Repeated launches of a Triton kernel without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds, specialises and hashes every argument on each call: tens
of microseconds of host time, paid once per kernel per optimizer step. A ``Launcher`` makes the first
launch of each specialisation that way, keeps the compiled kernel it returns, and launches that
directly afterwards: through Triton's C launch function when the kernel needs no scratch memory, with
the tensors' addresses read once and passed as integers (given tensors, Triton's launcher asks the
driver for each one's device address on every call; the first launch of a specialisation still
passes the tensors, so the driver has checked that each is device-accessible). Triton specialises
pointer arguments on their element type and 16-byte alignment, and integers on being 1 or a multiple
of 16 and on their width; the launcher keys its compiled kernels on those, and takes Triton's own path
whenever it cannot reuse one safely (launch hooks installed, the interpreter, a device other than the
current one, a Triton without these internals).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import triton

from .staging import raw_stream

try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: always take its own path
    _knobs = None



def _no_launch_hooks() -> bool:
    runtime = _knobs.runtime
    return not any(getattr(hook, "calls", hook is not None) for hook in
                   (runtime.launch_enter_hook, runtime.launch_exit_hook))


class Launcher:
    """Launches ``kernel`` with fixed constexprs and options; runtime arguments in the kernel's order."""

    def __init__(self, kernel: Any, constexprs: Dict[str, Any], options: Dict[str, Any]) -> None:
        self.kernel = kernel
        self.constexprs = constexprs
        self.options = options
        names = list(kernel.arg_names)
        runtime = [i for i, name in enumerate(names) if name not in constexprs]
        self._layout = (len(names), runtime, {names.index(k): v for k, v in constexprs.items() if k in names})
        # constexprs after every runtime argument (the usual order): the full list is the runtime values + these
        self._tail = ([constexprs[name] for name in names[len(runtime):]]
                      if runtime == list(range(len(runtime))) else None)
        self._compiled: Dict[tuple, tuple] = {}

    def __call__(self, grid: int, device: torch.device, *args: Any) -> None:
        key = None
        if device.type == "cuda" and _knobs is not None:
            key, raw = self._specialisation(args)
            entry = self._compiled.get(key) if key is not None else None
            if entry is not None and _no_launch_hooks() and device.index == torch.cuda.current_device():
                run, head = entry
                run(grid, 1, 1, raw_stream(device), *head, *self._full_args(raw))
                return
        compiled = self.kernel[(grid,)](*args, **self.constexprs, **self.options)
        if (key is not None and hasattr(compiled, "packed_metadata")
                and device.index == torch.cuda.current_device()):
            self._compiled[key] = _entry(compiled)

    def _full_args(self, args: list) -> list:
        if self._tail is not None:
            return args + self._tail
        n, runtime, fixed = self._layout
        full: list = [None] * n
        for i, value in zip(runtime, args):
            full[i] = value
        for i, value in fixed.items():
            full[i] = value
        return full

    @staticmethod
    def _specialisation(args: Sequence[Any]) -> tuple[Optional[tuple], Optional[list]]:
        """(key, args with each tensor replaced by its address), or (None, None) for an argument it cannot key."""
        spec = []
        raw = list(args)
        for i, a in enumerate(args):
            kind = type(a)
            if kind is float or kind is bool:
                spec.append(kind)
            elif kind is int:
                spec.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
            elif isinstance(a, torch.Tensor):  # the pointer's element type and alignment
                address = raw[i] = a.data_ptr()
                spec.append((a.dtype, address & 15 == 0))
            else:
                return None, None
        return tuple(spec), raw


# Triton releases whose C launch function takes the arguments _entry passes it (checked against their
# CUDA launcher); any other goes through ``compiled.run``
_DIRECT_LAUNCH_TRITON = ("3.6.",)


def _entry(compiled: Any) -> tuple:
    """(function, leading arguments) that launch ``compiled`` given (grid, 1, 1, stream, *leading, *args):
    Triton's C launch function itself when the kernel needs no scratch memory, else ``compiled.run``."""
    run = compiled.run
    try:
        direct = (triton.__version__.startswith(_DIRECT_LAUNCH_TRITON) and type(run).__name__ == "CudaLauncher"
                  and not (run.global_scratch_size or run.profile_scratch_size))
        if direct:
            return run.launch, (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                                compiled.packed_metadata, None, None, None)
    except AttributeError:  # another Triton's launcher: its documented entry point
        pass
    return run, (compiled.function, compiled.packed_metadata, None, None, None)


_LAUNCHERS: Dict[tuple, Launcher] = {}


def launch(kernel: Any, grid: int, device: torch.device, *args: Any, num_warps: int = 4, **constexprs: Any) -> None:
    """``kernel[(grid,)](*args, **constexprs, num_warps=num_warps)`` through a shared ``Launcher``."""
    key = (kernel, num_warps, tuple(constexprs.items()))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = Launcher(kernel, constexprs, dict(num_warps=num_warps))
    launcher(grid, device, *args)
