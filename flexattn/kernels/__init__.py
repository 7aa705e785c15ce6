"""Generated Triton kernels for flex attention: forward, backward, short-query decode.

    out, lse = flex_attention_triton(q, k, v, score_graph=..., mask_graph=..., block_mask=...,
                                     scale=..., kernel_options=..., dropout_p=0.0, dropout_seed=None)

Autograd-capable (dq, dk, dv and the captured float tensors of the score_mod that require
grad). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

The modules, in the order a call meets them (each imports only those above it):

    config.py     device class, tile rules (one table per kernel), launch arguments they share
    launcher.py   launching a compiled kernel without the JIT's per-call work; shared-memory fallback
    blocks.py     the BlockMask as the kernels read it (KernelBlocks)
    forward.py    forward template + its config + launcher (flex_forward)
    backward.py   backward templates + config + launcher (flex_backward)
    decode.py     short-query split-KV template + launcher (decode_forward; merge.py merges)
    paged.py      the same kernel over cached sequences, paged or not (flexattn.serving's launches)
    source.py     template filling (flexattn.codegen fills the holes), module cache
    interpreter.py  a fix for Triton's interpreter, applied by source.load
    plan.py       the Plan of a call, built in one place
    autotune.py   timing candidate configs (kernel_options AUTOTUNE)
    tiered.py     a new mask's first calls through its tile-table form while its own kernels compile
    replay.py     re-running the recorded launches of a call signature seen before
    calls.py      the entry point: plan or replay, then flexattn.call's autograd path
"""
from __future__ import annotations

from ..options import check_kernel_options
from .blocks import KernelBlocks, blocks_of, expand_blocks
from .calls import PlannedRun, flex_attention_triton, launch_bwd, launch_fwd, run_backward, run_forward
from .config import default_bwd_config, default_fwd_config
from .plan import Plan, build_plan, make_plan, small_indices
from .source import generated_source

__all__ = ["KernelBlocks", "Plan", "PlannedRun", "blocks_of", "build_plan", "check_kernel_options", "default_bwd_config",
           "default_fwd_config", "expand_blocks", "flex_attention_triton", "generated_source", "launch_bwd",
           "launch_fwd", "make_plan", "run_backward", "run_forward", "small_indices"]
