"""Repeated launches of a Triton kernel without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds, specialises and hashes every argument on each call: tens
of microseconds of host time, paid once per kernel per optimizer step. A ``Launcher`` makes the first
launch of each specialisation that way, keeps the compiled kernel it returns, and launches that
directly afterwards. Triton specialises pointer arguments on their element type and 16-byte alignment, and integers on
being 1 or a multiple of 16 and on their width; the launcher keys its compiled kernels on those, and takes
Triton's own path whenever it cannot reuse one safely (launch hooks installed, the interpreter, a
device other than the current one, a Triton without these internals).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

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
        self._compiled: Dict[tuple, Any] = {}

    def __call__(self, grid: int, device: torch.device, *args: Any) -> None:
        key = self._specialisation(args) if device.type == "cuda" and _knobs is not None else None
        compiled = self._compiled.get(key) if key is not None else None
        if (compiled is not None and _no_launch_hooks()
                and device.index == torch.cuda.current_device()):
            full = self._full_args(args)
            compiled.run(grid, 1, 1, raw_stream(device), compiled.function, compiled.packed_metadata,
                         None, None, None, *full)
            return
        compiled = self.kernel[(grid,)](*args, **self.constexprs, **self.options)
        if (key is not None and hasattr(compiled, "packed_metadata")
                and device.index == torch.cuda.current_device()):
            self._compiled[key] = compiled

    def _full_args(self, args: Sequence[Any]) -> list:
        n, runtime, fixed = self._layout
        full: list = [None] * n
        for i, value in zip(runtime, args):
            full[i] = value
        for i, value in fixed.items():
            full[i] = value
        return full

    @staticmethod
    def _specialisation(args: Sequence[Any]) -> Optional[tuple]:
        spec = []
        for a in args:
            if isinstance(a, torch.Tensor):  # the pointer's element type and alignment
                spec.append((a.dtype, a.data_ptr() & 15 == 0))
            elif isinstance(a, bool) or isinstance(a, float):
                spec.append(type(a))
            elif isinstance(a, int):
                spec.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
            else:
                return None
        return tuple(spec)


_LAUNCHERS: Dict[tuple, Launcher] = {}


def launch(kernel: Any, grid: int, device: torch.device, *args: Any, num_warps: int = 4, **constexprs: Any) -> None:
    """``kernel[(grid,)](*args, **constexprs, num_warps=num_warps)`` through a shared ``Launcher``."""
    key = (kernel, num_warps, tuple(constexprs.items()))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = Launcher(kernel, constexprs, dict(num_warps=num_warps))
    launcher(grid, device, *args)
