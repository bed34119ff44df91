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

from .._cuda import current_device_index, raw_stream, raw_stream_of_index

try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: always take its own path
    _knobs = None



def _no_launch_hooks() -> bool:
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    # a HookChain holds its hooks in .calls; a Triton that takes one callable holds it or None
    return not (getattr(enter, "calls", enter is not None) or getattr(leave, "calls", leave is not None))


_TENSOR, _FLOAT, _OTHER = range(3)  # how a kept launch checks a varying argument


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

    def prepare(self, device: torch.device, args: Sequence[Any], varying: Sequence[int]) -> Optional["PreparedLaunch"]:
        """The launch of ``args`` kept for repeats in which only the arguments at positions ``varying``
        change (each keeping its specialisation); None where that is not possible: not on CUDA, the
        specialisation not compiled yet (after the first launch it is), or Triton's own path needed."""
        if device.type != "cuda" or _knobs is None or device.index != torch.cuda.current_device():
            return None
        key, raw = self._specialisation(args)
        entry = self._compiled.get(key) if key is not None else None
        if entry is None:
            return None
        return PreparedLaunch(entry, self._full_args(raw), [self._position(i) for i in varying],
                              [key[i] for i in varying], device)

    def _position(self, runtime_index: int) -> int:
        return runtime_index if self._tail is not None else self._layout[1][runtime_index]

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


class PreparedLaunch:
    """A compiled kernel with its whole argument list kept: a call rewrites only the varying arguments
    (a tensor by its address), after checking that each keeps the specialisation it was compiled for;
    it returns False, launching nothing, when one does not (or launch hooks are installed, or another
    device is current), and the caller then launches through ``Launcher``."""

    __slots__ = ("_run", "_head", "_args", "_varying", "_index")

    def __init__(self, entry: tuple, args: list, slots: list, specs: list, device: torch.device) -> None:
        self._run, self._head = entry
        self._args, self._index = args, device.index
        # (argument position, how it is checked, its specialisation): a tensor keeps (dtype, 16-byte aligned)
        self._varying = [(slot, _FLOAT if spec is float else _TENSOR if type(spec) is tuple and len(spec) == 2
                          else _OTHER, spec) for slot, spec in zip(slots, specs)]

    def __call__(self, grid: int, *values: Any) -> bool:
        if current_device_index() != self._index or not _no_launch_hooks():
            return False
        args = self._args
        for (slot, kind, spec), value in zip(self._varying, values):
            if kind == _TENSOR:
                address = value.data_ptr()
                if value.dtype is not spec[0] or (address & 15 == 0) is not spec[1]:
                    return False
                value = address
            elif kind == _FLOAT:
                if type(value) is not float:
                    return False
            elif Launcher._specialisation((value,))[0] != (spec,):
                return False
            args[slot] = value
        self._run(grid, 1, 1, raw_stream_of_index(self._index), *self._head, *args)
        return True


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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (``triton.cdiv`` costs about a microsecond per call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), for host integers, as ``triton.next_power_of_2``."""
    return 1 << max(n - 1, 0).bit_length()


def shared_launcher(kernel: Any, num_warps: int = 4, **constexprs: Any) -> Launcher:
    """The ``Launcher`` of ``kernel`` with these constexprs, shared by every caller."""
    key = (kernel, num_warps, tuple(constexprs.items()))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = Launcher(kernel, constexprs, dict(num_warps=num_warps))
    return launcher


def launch(kernel: Any, grid: int, device: torch.device, *args: Any, num_warps: int = 4, **constexprs: Any) -> None:
    """``kernel[(grid,)](*args, **constexprs, num_warps=num_warps)`` through a shared ``Launcher``."""
    shared_launcher(kernel, num_warps, **constexprs)(grid, device, *args)


def launch_cached(cache: Optional[dict], key: tuple, kernel: Any, grid: int, device: torch.device, args: Sequence[Any],
                  varying: Sequence[int], num_warps: int = 4, **constexprs: Any) -> None:
    """``launch`` for a caller that repeats it with only the arguments at positions ``varying`` changed:
    ``key`` must name everything else (the constexprs, the other arguments, their tensors' addresses).
    ``cache`` (a dict the caller keeps, or None) holds the prepared launch of the last key."""
    if cache is not None:
        prepared = cache.get(key)
        if prepared is not None and prepared(grid, *[args[i] for i in varying]):
            return
    launcher = shared_launcher(kernel, num_warps, **constexprs)
    launcher(grid, device, *args)
    if cache is not None:
        cache.clear()
        prepared = launcher.prepare(device, args, varying)
        if prepared is not None:
            cache[key] = prepared
