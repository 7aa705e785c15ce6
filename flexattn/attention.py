"""flex_attention: the public entry point - validate, trace the mods, dispatch to a backend.

Semantics follow torch.nn.attention.flex_attention.flex_attention:

    score = q @ k^T * scale                         (scale defaults to 1 / sqrt(E))
    score = score_mod(score, b, h, q_idx, kv_idx)   (if given)
    score = -inf where block_mask's mask_mod is False
    out   = softmax(score) @ v                      (lse = logsumexp(score), natural log;
                                                     max_scores = max(score) per row)

plus optional dropout on the probabilities (flexattn.dropout). Every check happens here,
before any backend runs, so bad input gets a ValueError/TypeError that names the argument,
what was expected, what came and the fix - never a deep traceback or a wrong answer.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .block_mask import BlockMask, as_block_mask
from .checks import check_block_mask
from .cpu import flex_attention_cpu
from .dropout import draw_seed
from .front import check_arguments, mask_graph_of, trace_score_mod
from .full_mask import full_block_mask

try:  # torch >= 2.9: the same classes, so code that imports them from torch passes them here
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # older torch: the same NamedTuples, defined here
    class AuxRequest(NamedTuple):
        """Which auxiliary outputs flex_attention(..., return_aux=AuxRequest(...)) returns."""
        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        """flex_attention's auxiliary outputs; a field is None unless it was requested."""
        lse: Optional[torch.Tensor] = None
        max_scores: Optional[torch.Tensor] = None

try:
    from torch.nn.attention.flex_attention import FlexKernelOptions
except ImportError:
    FlexKernelOptions = dict


def check_aux(return_lse, return_aux) -> bool:
    """Whether max_scores is computed; raises as torch does for return_lse with return_aux."""
    if return_aux is None:
        return False
    if return_lse:
        raise ValueError("Cannot specify both return_lse and return_aux. return_lse is deprecated, please use "
                         "return_aux=AuxRequest(lse=True) instead.")
    if not (isinstance(return_aux, tuple) and hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise TypeError(f"return_aux must be an AuxRequest (torch.nn.attention.flex_attention.AuxRequest or "
                        f"flexattn.AuxRequest) or None, got {type(return_aux).__name__}")
    return bool(return_aux.max_scores)


def finish(out, lse, return_lse, return_aux, max_scores=None):
    """flex_attention's return value: out, (out, lse), or (out, AuxOutput) for return_aux."""
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None,
                              max_scores=max_scores if return_aux.max_scores else None)
    return (out, lse) if return_lse else out


def flex_attention(query, key, value, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                   enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: Optional[dict] = None, *, return_aux: Optional[AuxRequest] = None,
                   dropout_p: float = 0.0,
                   dropout_seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """Attention with a traced score_mod and a block-sparse mask.

    query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev] (same dtype and device;
    Hq == Hkv, or Hq a multiple of Hkv with enable_gqa=True: query head hq reads kv head
    hq // (Hq // Hkv)). block_mask: a BlockMask for (L, S) from create_block_mask, or None
    (attend everywhere); a torch.nn.attention.flex_attention.BlockMask is taken too
    (BlockMask.from_torch, once per mask). Returns out [B, Hq, L, Ev] in query.dtype, and
    with return_lse=True also lse [B, Hq, L] (natural log; float32, float64 for float64
    inputs). Fully masked rows give out 0 and lse -inf. return_aux=AuxRequest(lse=...,
    max_scores=...) (torch >= 2.9's form; torch's or flexattn's AuxRequest) returns (out,
    AuxOutput(lse, max_scores)) instead, a field None unless requested; giving both
    return_lse and return_aux raises ValueError, as torch does. max_scores [B, Hq, L] is
    each row's largest score after scale, score_mod and mask (natural units, as the scores;
    lse's dtype; -inf on fully masked rows), not differentiable - as torch's.

    dropout_p in [0, 1) drops probabilities after the softmax (kept ones scaled by
    1 / (1 - dropout_p)) with a counter-based hash of (seed, b, hq, q_idx, kv_idx); the
    backward replays it. dropout_seed=None draws a seed from `generator` (or torch's
    default generator, so torch.manual_seed makes runs reproducible);
    flexattn.dropout_mask(seed, B, Hq, L, S, p) returns the pattern a seed gives.

    kernel_options: {"BACKEND": "auto" | "cpu" | "triton", ...}; "auto" picks the Triton
    kernels for CUDA tensors and the tiled CPU path otherwise. Other keys go to the backend.
    """
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        block_mask = _as_block_mask(block_mask)  # a torch BlockMask: converted once (cached on it)
    if torch.compiler.is_compiling():  # dynamo is tracing: the mods are traced outside it
        from .compiled import flex_attention_compiled  # (torch.compile only: not loaded before)
        return flex_attention_compiled(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                       kernel_options, dropout_p, dropout_seed, generator, return_aux)
    output_max = check_aux(return_lse, return_aux)
    args = check_arguments(query, key, value, scale, enable_gqa, kernel_options, dropout_p, dropout_seed, generator)
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    score_graph = trace_score_mod(score_mod, query.device)
    if block_mask is None:
        block_mask = full_block_mask(L, S, query.device)
    check_block_mask(block_mask, B, Hq, L, S, query.device)
    mask_graph = mask_graph_of(block_mask, query.device)

    if args.dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_seed(generator)
    run = flex_attention_cpu if args.backend == "cpu" else _kernels().flex_attention_triton
    out, lse, *max_scores = run(query, key, value, score_graph=score_graph, mask_graph=mask_graph,
                                block_mask=block_mask, scale=args.scale, kernel_options=args.options,
                                dropout_p=args.dropout_p, dropout_seed=0 if dropout_seed is None else int(dropout_seed),
                                output_max=output_max)
    return finish(out, lse, return_lse, return_aux, *max_scores)


_KERNELS = None
# the conversion runs outside a compiled graph (a graph break there): it traces the mask_mod;
# the reason is part of dynamo's error under fullgraph=True
_as_block_mask = torch.compiler.disable(
    as_block_mask, reason="converting a torch BlockMask to flexattn's traces its mask_mod in Python, outside any "
                          "torch.compile graph; with fullgraph=True, convert it outside the compiled function: "
                          "flexattn.BlockMask.from_torch(mask), or build it with flexattn.create_block_mask")


def _kernels():
    """flexattn.kernels, imported on first use (importing flexattn must not need Triton) and
    kept: an import statement per call costs microseconds."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels
        except ImportError as e:
            raise NotImplementedError(
                f"the Triton backend (flexattn.kernels.flex_attention_triton) is not available ({e}); "
                f"run on CPU tensors with kernel_options={{'BACKEND': 'cpu'}}") from e
        _KERNELS = kernels
    return _KERNELS
