"""A fix for Triton's interpreter (TRITON_INTERPRET=1), applied once by `source.load`
before the first generated kernel is loaded; nothing happens outside the interpreter.

Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
int(array), which numpy >= 2.3 refuses for 1-d arrays: `__index__` then reads the single
element instead.
"""
from __future__ import annotations

import os

_applied = False


def apply_interpreter_fix() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter  # (only the interpreter needs it)
    if getattr(interpreter, "_flexattn_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._flexattn_patched = True
