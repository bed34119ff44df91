"""Triton's interpreter with every memory access checked against the launch's tensors.

Inside ``checked_accesses()`` each load, store and atomic that a kernel makes in the interpreter must address, at
every lane its mask keeps, bytes inside the storage of one of that launch's tensor arguments (or of the tensors
``reachable()`` names: those a kernel reaches through a table of addresses, as the multi-tensor Adam kernel does);
otherwise the launch raises ``OutOfBounds`` naming the kernel. On a GPU such an access is an illegal memory access
or a silent write into another tensor; the interpreter alone would read or write whatever host memory lies there.
Built on the interpreter's internals (``GridExecutor``, ``InterpreterBuilder``); ``available()`` says whether this
Triton has them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import numpy as np


_WRAPPED = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")


class OutOfBounds(AssertionError):
    pass


def _interpreter():
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return None
    builder = getattr(interp, "InterpreterBuilder", None)
    if (builder is None or not hasattr(interp, "GridExecutor") or not hasattr(interp, "_get_np_dtype")
            or not all(hasattr(builder, name) for name in _WRAPPED)
            or not hasattr(interp.GridExecutor, "_init_args_hst")):
        return None
    return interp


def available() -> bool:
    return _interpreter() is not None


def _span(tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of a tensor's storage (some launches write past a view on purpose:
    the staged weighted loss writes the mean and a copy of the losses after its row's weights)."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


@contextlib.contextmanager
def checked_accesses(reachable: Optional[Callable[[], Iterable]] = None) -> Iterator[dict]:
    """Check every interpreted access until exit; yields counters {"checked": accesses, "launches": launches}.
    ``reachable()``, called at each launch, gives more tensors its kernel may address."""
    interp = _interpreter()
    if interp is None:
        raise RuntimeError("this Triton's interpreter lacks the internals the checks need")
    executor, builder = interp.GridExecutor, interp.InterpreterBuilder
    saved = {name: getattr(builder, name) for name in _WRAPPED}
    saved_init = executor._init_args_hst
    launch = {"kernel": None, "spans": []}
    counts = {"checked": 0, "launches": 0}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        tensors = list(args_hst) + list(kwargs_hst.values()) + (list(reachable()) if reachable is not None else [])
        spans = [_span(a) for a in tensors if hasattr(a, "data_ptr")]
        launch.update(kernel=getattr(self.fn, "__name__", repr(self.fn)), spans=spans)
        counts["launches"] += 1
        return args_hst, kwargs_hst

    def check(ptrs, mask, what: str) -> None:
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addresses = np.asarray(ptrs.data, dtype=np.int64).reshape(-1)
        if mask is not None:
            addresses = addresses[np.asarray(mask.data, dtype=bool).reshape(-1)]
        if addresses.size == 0:
            return
        counts["checked"] += 1
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in launch["spans"]:
            inside |= (addresses >= lo) & (addresses + size <= hi)
        if not inside.all():
            outside = addresses[~inside][:4].tolist()
            raise OutOfBounds(f"{launch['kernel']}: {what} of {size}-byte elements at {outside} lies outside its "
                              f"tensors {launch['spans']}")

    def masked_load(self, ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return saved["create_masked_load"](self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return saved["create_masked_store"](self, ptrs, value, mask, *rest)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        check(ptr, mask, "atomic")
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, cmp, val, *rest):
        check(ptr, None, "atomic compare-and-swap")
        return saved["create_atomic_cas"](self, ptr, cmp, val, *rest)

    executor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    try:
        yield counts
    finally:
        executor._init_args_hst = saved_init
        for name, fn in saved.items():
            setattr(builder, name, fn)
