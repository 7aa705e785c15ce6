"""The front half of flex_attention, shared by eager (`attention.py`) and compiled
(`compiled.py`) calls: the argument checks, the scale, the backend choice, the traced mods.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .block_mask import BlockMask
from .masks import noop_mask
from .checks import check_dropout, check_options_arg, check_qkv, check_scale
from .ir import Graph
from .options import choose_backend
from .trace import check_buffers_device, trace_mask, trace_score


class Arguments(NamedTuple):
    """flex_attention's checked non-tensor arguments."""
    scale: float
    backend: str    # "cpu" or "triton"
    options: dict   # kernel_options; BACKEND only as the kernels' forward choice ("triton" / "hopper")
    dropout_p: float


def check_arguments(query, key, value, scale, enable_gqa, kernel_options, dropout_p, dropout_seed,
                    generator) -> Arguments:
    """Every check on q, k, v and the plain arguments, then the backend choice
    (options.choose_backend)."""
    check_qkv(query, key, value, enable_gqa)
    scale = check_scale(scale, query.shape[-1])
    options = dict(check_options_arg(kernel_options))
    dropout_p = check_dropout(dropout_p, dropout_seed, generator)
    request = options.pop("BACKEND", "auto")
    backend = choose_backend(request, query.device, query.dtype)
    if backend == "triton" and request in ("triton", "hopper"):
        options["BACKEND"] = request  # the kernels read it: which forward kernel (kernels.hopper_forward)
    if backend == "cpu" and query.device.type != "cpu":
        raise ValueError(f"kernel_options['BACKEND'] = 'cpu' needs CPU tensors, but query is on {query.device}; "
                         f"move the inputs with .cpu() or use BACKEND='auto'")
    return Arguments(scale, backend, options, dropout_p)


def trace_score_mod(score_mod, device) -> Optional[Graph]:
    """score_mod traced (None stays None), its captured tensors checked to be on `device`."""
    if score_mod is None:
        return None
    if isinstance(score_mod, BlockMask):
        raise TypeError("score_mod got a BlockMask; pass it as block_mask=... instead")
    if not callable(score_mod):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score or None, "
                        f"got {type(score_mod).__name__}")
    graph = trace_score(score_mod, "score_mod")  # checks the arity; cached per mod and captured state
    check_buffers_device(graph, device, "score_mod")
    return graph


def mask_graph_of(bm: BlockMask, device) -> Optional[Graph]:
    """The traced mask of `bm` for its partial blocks (None: attend everywhere inside them)."""
    graph = bm.mask_graph
    if graph is None and bm.mask_mod is not None and bm.mask_mod is not noop_mask:
        graph = trace_mask(bm.mask_mod, "block_mask.mask_mod")  # a sliced mask's mod raises here
    if graph is not None:
        check_buffers_device(graph, device, "block_mask.mask_mod")
    return graph
