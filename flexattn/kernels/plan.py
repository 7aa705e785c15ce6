"""The Plan: everything a call's launches need besides its tensors - built in one place
(`build_plan`), for the eager entry point (`make_plan`) and the custom op (flexattn.ops).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import codegen
from ..autodiff import grad_slots as buffer_grad_slots
from ..checks import check_kernel_inputs, check_scale
from ..dropout import draw_seed
from ..options import check_kernel_options
from .blocks import KernelBlocks, blocks_of
from .source import GRAD_KINDS, load


@dataclass
class Plan:
    score_graph: object  # kernel graphs (codegen.kernel_graph): number constants are arguments
    mask_graph: object
    blocks: KernelBlocks
    scale: float
    opts: dict
    dropout_p: float
    dropout_seed: int | None
    grad_slots: tuple
    score_bufs: list  # the captured tensors the kernels read (the graphs' by default)
    mask_bufs: list
    small_indices: bool = False  # batch, heads and lengths below codegen.SMALL_INDEX_LIMIT
    fast_tanh: bool = False  # tanh as the hardware's approximate one (codegen.FAST_TANH_DTYPES)
    tiering: tuple | None = None  # ("own" | "tile_form", the other plan, shape class): kernels.tiered
    output_max: bool = False  # the forward also returns max_scores (the row max of the scores)
    modules: dict = field(default_factory=dict)  # kind -> generated module, memo of module()

    def module(self, kind: str):
        """The generated module of `kind` ("fwd", "bwd", "decode", "fwd_hopper", "bwd_hopper")
        for the plan's mods."""
        mod = self.modules.get(kind)
        if mod is None:
            mod = self.modules[kind] = load(kind, self.score_graph, self.mask_graph,
                                            list(self.grad_slots) if kind in GRAD_KINDS else None, self.small_indices,
                                            self.fast_tanh)
        return mod


def small_indices(q, k) -> bool:
    """Whether batch, heads and lengths are below codegen.SMALL_INDEX_LIMIT (Plan.small_indices)."""
    return max(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) < codegen.SMALL_INDEX_LIMIT


def fast_tanh(q) -> bool:
    """Whether the kernels for q print tanh as the hardware's approximate one (Plan.fast_tanh):
    16-bit inputs (codegen.FAST_TANH_DTYPES) on an NVIDIA GPU, outside the interpreter."""
    return q.dtype in codegen.FAST_TANH_DTYPES and q.device.type == "cuda" and codegen.HARDWARE_MATH


def build_plan(q, k, score_graph, mask_graph, blocks: KernelBlocks, scale: float, opts: dict, dropout_p,
               dropout_seed, grad_slots, output_max: bool = False) -> Plan:
    """The Plan of a call whose inputs are checked (flexattn.checks.check_kernel_inputs) and
    whose graphs are kernel graphs bound to the call's captured tensors. Under
    torch.use_deterministic_algorithms(True) the kernels run as with DETERMINISTIC=True unless
    kernel_options say otherwise (float atomics, whose order varies, then sum no gradient)."""
    if "DETERMINISTIC" not in opts and torch.are_deterministic_algorithms_enabled():
        opts = dict(opts, DETERMINISTIC=True)
    return Plan(score_graph, mask_graph, blocks, scale, opts, float(dropout_p or 0.0), dropout_seed,
                tuple(grad_slots), list(score_graph.buffers) if score_graph is not None else [],
                list(mask_graph.buffers) if mask_graph is not None else [], small_indices=small_indices(q, k),
                fast_tanh=fast_tanh(q), output_max=bool(output_max))


def make_plan(q, k, v, *, score_graph, mask_graph, block_mask, scale, kernel_options,
              dropout_p=0.0, dropout_seed=None, output_max=False) -> Plan:
    """The Plan of an eager call: traced graphs, a BlockMask (or None: attend everywhere)."""
    opts = check_kernel_options(kernel_options)
    if mask_graph is None and block_mask is not None:
        mask_graph = getattr(block_mask, "mask_graph", None)
    # the kernels see the mods with their number constants as arguments (codegen.kernel_graph)
    score_graph, mask_graph = codegen.kernel_graph(score_graph), codegen.kernel_graph(mask_graph)
    check_kernel_inputs(q, k, v, score_graph, mask_graph, block_mask)
    if dropout_p and dropout_seed is None:
        dropout_seed = draw_seed()
    blocks = blocks_of(block_mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    return build_plan(q, k, score_graph, mask_graph, blocks, check_scale(scale, q.shape[-1]), opts, dropout_p,
                      dropout_seed, buffer_grad_slots(score_graph), output_max)
