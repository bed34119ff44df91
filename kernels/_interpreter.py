"""Compatibility of Triton's CPU interpreter (TRITON_INTERPRET=1) with NumPy >= 2.3.

The interpreter keeps scalars as one-element arrays and converts them with int(array), which newer
NumPy rejects for arrays with a dimension; loops with run-time bounds then fail. .item() accepts
them. Imported by every kernel module; does nothing unless the interpreter is on.
"""
from __future__ import annotations

import os


def enable_interpreter_compat() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_also_index_compat", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._also_index_compat = True
