"""The kernels' Triton source: a template (forward.py, backward.py, decode.py) with its
holes filled by `flexattn.codegen` for the call's mods, loaded as a module and cached per
(kind, mod structures, gradient slots, index width, tanh form).
"""
from __future__ import annotations

import re

from .. import codegen
from .backward import BWD_TEMPLATE
from .common_source import COMMON_SOURCE
from .decode import DECODE_TEMPLATE
from .forward import FWD_TEMPLATE
from .hopper_backward import HOPPER_BWD_TEMPLATE
from .hopper_forward import HOPPER_FWD_TEMPLATE
from .interpreter import apply_interpreter_fix

# each Triton template after the shared helpers it calls (common_source); the Gluon one alone
TEMPLATES = {"fwd": COMMON_SOURCE + FWD_TEMPLATE, "bwd": COMMON_SOURCE + BWD_TEMPLATE,
             "decode": COMMON_SOURCE + DECODE_TEMPLATE, "fwd_hopper": COMMON_SOURCE + HOPPER_FWD_TEMPLATE,
             "bwd_hopper": COMMON_SOURCE + HOPPER_BWD_TEMPLATE}
# kind -> the kernel names of its generated module
KERNEL_NAMES = {"fwd": ("flex_fwd",), "decode": ("flex_decode",), "bwd": ("flex_bwd_dq", "flex_bwd_dkdv"),
                "fwd_hopper": ("flex_fwd_hopper",), "bwd_hopper": ("flex_bwd_dkdv_hopper",)}


def step_kernels(kind: str) -> tuple:
    """The (module kind, kernel name) of each generated kernel a step of `kind` launches (a step:
    a forward path, or "bwd" / "bwd_hopper" for the backward). The Hopper backward runs the Triton
    dq kernel first, which writes lse2 and delta and zeroes dq's float32 buffer."""
    if kind == "bwd_hopper":
        return ("bwd", "flex_bwd_dq"), ("bwd_hopper", "flex_bwd_dkdv_hopper")
    return tuple((kind, name) for name in KERNEL_NAMES[kind])


# The kernels whose mods take small index sums in float32 (codegen's small_indices). Not the
# backward: its dk/dv kernel holds the kv axis fixed, the compiler hoists the broadcast float
# kv tile out of the loop, and at D=128 (already at 255 registers) that spilled: ALiBi
# fwd+bwd went from 1.06-1.08x to 1.01-1.05x torch on the H200 (run 10).
FLOAT_INDEX_KINDS = ("fwd", "decode", "fwd_hopper")

# The kernels whose tile-table lookup reads its slot per row, as one int32 (the others once
# per tile, as 16-bit halves: codegen._tile_table_body).
SLOT_PER_ROW_KINDS = ("fwd",)

# the kinds whose templates take the score_mod's derivative and the gradients' buffers
GRAD_KINDS = ("bwd", "bwd_hopper")

# kernel parameters that carry the call's dropout seed (see fill)
DROPOUT_VALUES = ("seed_lo", "seed_hi", "drop_threshold")

_HOLE = re.compile(r"\{[A-Z][A-Z0-9_]*\}")


def _trail(params: list[str]) -> str:
    return "".join(p + ", " for p in params)


def _lead(params: list[str]) -> str:
    return "".join(", " + p for p in params)


def fill(template: str, score_graph, mask_graph, grad_slots=None, small_indices=False, slot_per_row=False,
         fast_tanh=False) -> str:
    """`template` with its holes filled for these (kernel) graphs, after codegen.PRELUDE;
    ValueError if a hole is left. slot_per_row: the tile-table lookup's print for the kernel
    (codegen._tile_table_body; SLOT_PER_ROW_KINDS); small_indices, fast_tanh: codegen.TritonPrinter."""
    sp = codegen.buffer_params(score_graph, "sb")
    mp = codegen.buffer_params(mask_graph, "mb")
    parts = {
        "{SCORE_MOD}": codegen.mod_function("score_mod", score_graph, "score", "sb", small_indices,
                                           fast_tanh=fast_tanh),
        "{MASK_MOD}": codegen.mod_function("mask_mod", mask_graph, "mask", "mb", small_indices, slot_per_row,
                                          fast_tanh),
        "{SCORE_BUF_PARAMS_TRAIL}": _trail(sp), "{MASK_BUF_PARAMS_TRAIL}": _trail(mp),
        "{SCORE_BUF_ARGS_TRAIL}": _trail(sp), "{MASK_BUF_ARGS_TRAIL}": _trail(mp),
        "{SCORE_BUF_ARGS}": _lead(sp), "{MASK_BUF_ARGS}": _lead(mp),
    }
    if grad_slots is not None:
        gp = [f"gsb{s}_ptr" for s in grad_slots]
        parts["{SCORE_MOD_BWD}"] = codegen.mod_backward_function("score_mod_bwd", score_graph, "sb", grad_slots,
                                                                small_indices, fast_tanh)
        parts["{GRAD_BUF_PARAMS_TRAIL}"] = _trail(gp)
        parts["{GRAD_BUF_ARGS_TRAIL}"] = _trail(gp)
        parts["{GRAD_BUF_ARGS}"] = _lead(gp)
    src = template
    for hole, text in parts.items():
        src = src.replace(hole, text)
    left = sorted(set(_HOLE.findall(src)))
    if left:
        raise ValueError(f"kernel template: hole(s) {left} left unfilled; fill() knows {sorted(parts)}")
    # the mods' params are plain values: no recompile when one becomes 1 or a multiple of 16.
    # (Captured tensors' sizes stay specialised: a size divisible by 16 lets Triton prove a
    # gather's bounds mask constant over 16 lanes - doc_id[kv] - measured 9% on document 8K.)
    params = codegen.param_names(score_graph, "sb") + codegen.param_names(mask_graph, "mb")
    # nor the dropout seed's halves and threshold: a value that is 1 would become a constexpr
    # (a recompile per such seed, and the dropout hash does not compile with a constexpr seed)
    params = [p for p in DROPOUT_VALUES if f"{p}," in template] + params
    if params:
        for jit in ("@triton.jit", "@gluon.jit"):  # the Hopper template is Gluon source
            src = src.replace(f"{jit}\ndef flex_", f"{jit}(do_not_specialize={params!r})\ndef flex_")
    return codegen.PRELUDE + src


def float_indices(kind: str, small_indices: bool) -> bool:
    """Whether `kind`'s mods print small index sums in float32 (FLOAT_INDEX_KINDS)."""
    return small_indices and kind in FLOAT_INDEX_KINDS


def source(kind: str, score_graph, mask_graph, grad_slots, small_indices: bool, fast_tanh: bool = False) -> str:
    """The Triton source of `kind` ("fwd", "bwd", "decode", "fwd_hopper") for these (kernel) graphs;
    grad_slots only for "bwd"; small_indices, fast_tanh: Plan.small_indices, Plan.fast_tanh."""
    return fill(TEMPLATES[kind], score_graph, mask_graph, list(grad_slots) if kind in GRAD_KINDS else None,
                float_indices(kind, small_indices), kind in SLOT_PER_ROW_KINDS, fast_tanh)


_MODULES: dict = {}


def load(kind: str, score_graph, mask_graph, grad_slots=None, small_indices=False, fast_tanh=False):
    """The generated module for (kind, score structure, mask structure, grad slots, whether
    the indices are below codegen.SMALL_INDEX_LIMIT, whether tanh is the hardware's approximate one)."""
    key = (kind, score_graph.structure_key() if score_graph is not None else None,
           mask_graph.structure_key() if mask_graph is not None else None,
           tuple(grad_slots) if grad_slots is not None else None, float_indices(kind, small_indices), fast_tanh)
    mod = _MODULES.get(key)
    if mod is None:
        apply_interpreter_fix()
        src = source(kind, score_graph, mask_graph, grad_slots, small_indices, fast_tanh)
        mod = _MODULES[key] = codegen.load_module(src, f"flex_{kind}")
    return mod


def generated_source(score_graph, mask_graph, kind: str = "fwd", grad_slots=(), small_indices=True,
                     fast_tanh=False) -> str:
    """The Triton source the kernels of `kind` ("fwd", "bwd", "decode") run for these mods
    (by default for batch, heads and lengths below codegen.SMALL_INDEX_LIMIT, and inputs not in
    codegen.FAST_TANH_DTYPES)."""
    score_graph, mask_graph = codegen.kernel_graph(score_graph), codegen.kernel_graph(mask_graph)
    return source(kind, score_graph, mask_graph, grad_slots, small_indices, fast_tanh)
