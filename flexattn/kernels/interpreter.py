"""Fixes for Triton's interpreter (TRITON_INTERPRET=1), applied once by `source.load`
before the first generated kernel is loaded; nothing happens outside the interpreter.

* Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
  int(array), which numpy >= 2.3 refuses for 1-d arrays: `__index__` then reads the single
  element instead.
* Triton 3.9's interpreter computes `scalar_bool & tensor_bool` (a bounds check on a batch or
  head index and-ed with one on a row index, as the mods' loads do) as an int32 array, which
  its masked loads, stores and atomics then refuse ("mask has unsupported dtype"): such a
  mask is made bool again before them.
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
    _bool_masks(interpreter.InterpreterBuilder, interpreter.TensorHandle)
    interpreter._flexattn_patched = True


# builder method -> the position of its mask argument (after self)
_MASK_ARGUMENT = {"create_masked_load": 1, "create_masked_store": 2, "create_atomic_rmw": 3}


def _bool_masks(builder, handle) -> None:
    import numpy as np
    import triton.language as tl

    for name, at in _MASK_ARGUMENT.items():
        original = getattr(builder, name, None)
        if original is None:
            continue

        def fixed(self, *args, _original=original, _at=at):
            mask = args[_at] if len(args) > _at else None
            if mask is not None and mask.data.dtype != np.bool_:
                args = (*args[:_at], handle(mask.data.astype(np.bool_), tl.int1), *args[_at + 1:])
            return _original(self, *args)

        setattr(builder, name, fixed)
