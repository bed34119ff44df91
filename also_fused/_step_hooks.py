"""The optimizers' ``step`` wrapper: torch.optim's hooks and profiler label, gradients off, eager under
``torch.compile``."""
from __future__ import annotations

import functools
from itertools import chain
from typing import Any, Callable, TypeVar

import torch
import torch.optim.optimizer as _torch_optimizer

_profiler_enabled = torch._C._autograd._profiler_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {})
StepFn = TypeVar("StepFn", bound=Callable[..., Any])


def profiler_enabled() -> bool:
    return _profiler_enabled()


class grad_disabled:
    """``with torch.no_grad():`` for code that runs every step or every bucket: the same switch of grad mode,
    restored on exit, at a fraction of the host cost (``torch.no_grad()`` costs a few microseconds a use)."""

    __slots__ = ("_was_enabled",)

    def __enter__(self) -> None:
        self._was_enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)

    def __exit__(self, *exc_info: Any) -> None:
        _set_grad_enabled(self._was_enabled)


def without_grad(fn: StepFn) -> StepFn:
    """``@torch.no_grad()`` for a method called every step, at a fraction of its host cost."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(was_enabled)

    return wrapper  # type: ignore[return-value]


def optimizer_step(step: StepFn) -> StepFn:
    """Wraps the optimizers' ``step``: gradients off, eager under ``torch.compile`` (a graph break), and
    torch.optim's step hooks and ``Optimizer.step#<class>.step`` profiler label, as torch.optim's own
    wrapper gives them (marked ``hooked``, so torch.optim does not wrap it again). The label is opened
    only while a profiler records: torch.optim opens it on every call, several microseconds of host time."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _step_with_hooks(step, args, kwargs)
        return _step_with_hooks(step, args, kwargs)

    wrapped = torch.compiler.disable(wrapper)
    wrapped.hooked = True
    return wrapped  # type: ignore[return-value]


def _step_with_hooks(step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if _GLOBAL_PRE_HOOKS or self._optimizer_step_pre_hooks:
        for pre_hook in chain(_GLOBAL_PRE_HOOKS.values(), self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    grad_enabled = torch.is_grad_enabled()
    _set_grad_enabled(False)
    try:
        out = step(*args, **kwargs)
    finally:
        _set_grad_enabled(grad_enabled)
    self._optimizer_step_code()
    if self._optimizer_step_post_hooks or _GLOBAL_POST_HOOKS:
        for post_hook in chain(self._optimizer_step_post_hooks.values(), _GLOBAL_POST_HOOKS.values()):
            post_hook(self, args, kwargs)
    return out
