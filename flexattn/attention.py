"""flex_attention: the public entry point - validate, trace the mods, dispatch to a backend.

Semantics follow torch.nn.attention.flex_attention.flex_attention:

    score = q @ k^T * scale                         (scale defaults to 1 / sqrt(E))
    score = score_mod(score, b, h, q_idx, kv_idx)   (if given)
    score = -inf where block_mask's mask_mod is False
    out   = softmax(score) @ v                      (lse = logsumexp(score), natural log)

plus optional dropout on the probabilities (flexattn.dropout). Every check happens here,
before any backend runs, so bad input gets a ValueError/TypeError that names the argument,
what was expected, what came and the fix - never a deep traceback or a wrong answer.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from numbers import Real
from typing import Callable, Optional

import torch

from .block_mask import BlockMask, FULL, PARTIAL, noop_mask
from .dropout import draw_seed
from .ir import Graph
from .options import check_option_keys
from .trace import check_buffers_device, trace_mask, trace_score

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "cpu", "triton")
_DEFAULT_BLOCK = 128


def flex_attention(query, key, value, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                   enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: Optional[dict] = None, *, dropout_p: float = 0.0,
                   dropout_seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """Attention with a traced score_mod and a block-sparse mask.

    query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev] (same dtype and device;
    Hq == Hkv, or Hq a multiple of Hkv with enable_gqa=True: query head hq reads kv head
    hq // (Hq // Hkv)). block_mask: a BlockMask for (L, S) from create_block_mask, or None
    (attend everywhere). Returns out [B, Hq, L, Ev] in query.dtype, and with return_lse=True
    also lse [B, Hq, L] (natural log; float32, float64 for float64 inputs). Fully masked
    rows give out 0 and lse -inf.

    dropout_p in [0, 1) drops probabilities after the softmax (kept ones scaled by
    1 / (1 - dropout_p)) with a counter-based hash of (seed, b, hq, q_idx, kv_idx); the
    backward replays it. dropout_seed=None draws a seed from `generator` (or torch's
    default generator, so torch.manual_seed makes runs reproducible);
    flexattn.dropout_mask(seed, B, Hq, L, S, p) returns the pattern a seed gives.

    kernel_options: {"BACKEND": "auto" | "cpu" | "triton", ...}; "auto" picks the Triton
    kernels for CUDA tensors and the tiled CPU path otherwise. Other keys go to the backend.
    """
    if torch.compiler.is_compiling():  # dynamo is tracing: the mods are traced outside it
        from .compiled import flex_attention_compiled
        return flex_attention_compiled(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                       kernel_options, dropout_p, dropout_seed, generator)
    _check_qkv(query, key, value, enable_gqa)
    B, Hq, L, E = query.shape
    S = key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    elif isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a float or None (meaning 1/sqrt(E) = {1.0 / math.sqrt(E):.4g}), "
                        f"got {type(scale).__name__}; pass a Python number, e.g. scale=0.125")
    kernel_options = _check_kernel_options(kernel_options)
    dropout_p = _check_dropout(dropout_p, dropout_seed, generator)

    score_graph = _trace_score_mod(score_mod, query.device)
    if block_mask is None:
        block_mask = _full_block_mask(L, S, query.device)
    _check_block_mask(block_mask, B, Hq, L, S, query.device)
    mask_graph = _mask_graph_of(block_mask, query.device)

    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_seed(generator)
    out, lse = _run(query, key, value, score_graph=score_graph, mask_graph=mask_graph,
                    block_mask=block_mask, scale=float(scale), return_lse=bool(return_lse),
                    kernel_options=kernel_options, dropout_p=dropout_p,
                    dropout_seed=0 if dropout_seed is None else int(dropout_seed))
    return (out, lse) if return_lse else out


def _default_cpu_backend(dtype: torch.dtype) -> str:
    backend = os.environ.get("FLEXATTN_BACKEND", "cpu")
    if backend not in ("cpu", "triton"):
        raise ValueError(f"environment variable FLEXATTN_BACKEND must be 'cpu' or 'triton', got {backend!r}")
    return "cpu" if dtype == torch.float64 else backend  # the kernels take no float64


def _run(q, k, v, *, score_graph, mask_graph, block_mask, scale, return_lse, kernel_options,
         dropout_p, dropout_seed):
    """The one dispatch point: CPU tensors -> the tiled CPU path; CUDA tensors, or
    kernel_options["BACKEND"] == "triton" -> the generated Triton kernels."""
    options = dict(kernel_options)
    backend = options.pop("BACKEND", "auto")
    if backend == "auto":
        # FLEXATTN_BACKEND=triton sends CPU tensors through the kernels too (with
        # TRITON_INTERPRET=1): how the front ends' tests exercise the generated kernels on CPU.
        backend = "triton" if q.device.type == "cuda" else _default_cpu_backend(q.dtype)
    args = dict(score_graph=score_graph, mask_graph=mask_graph, block_mask=block_mask, scale=scale,
                return_lse=return_lse, kernel_options=options, dropout_p=dropout_p, dropout_seed=dropout_seed)
    if backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"kernel_options['BACKEND'] = 'cpu' needs CPU tensors, but query is on {q.device}; "
                             f"move the inputs with .cpu() or use BACKEND='auto'")
        from .cpu import flex_attention_cpu
        return flex_attention_cpu(q, k, v, **args)
    return _kernels().flex_attention_triton(q, k, v, **args)


_KERNELS = None


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


# ---------------------------------------------------------------------------------------
# Validation

def _check_qkv(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if len(t.shape) != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}; "
                             f"reshape it, e.g. add a batch dimension with .unsqueeze(0)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32 and "
                            f"float64: convert with .to(torch.float32) (or another of those)")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension (shape {tuple(t.shape)}); every dimension must be >= 1")
    qs, ks, vs = q.shape, k.shape, v.shape  # (each .shape access builds a new torch.Size)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}; "
                        f"convert them with .to(query.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on the same device, got {q.device}, {k.device} and "
                         f"{v.device}; move them with .to(query.device)")
    if not (qs[0] == ks[0] == vs[0]):
        raise ValueError(f"query, key and value must have the same batch size, got {qs[0]}, {ks[0]} and "
                         f"{vs[0]} (shapes {tuple(qs)}, {tuple(ks)}, {tuple(vs)})")
    if ks[1] != vs[1]:
        raise ValueError(f"key and value must have the same number of heads, got {ks[1]} and {vs[1]} "
                         f"(shapes {tuple(ks)}, {tuple(vs)})")
    if ks[2] != vs[2]:
        raise ValueError(f"key and value must have the same sequence length, got {ks[2]} and {vs[2]} "
                         f"(shapes {tuple(ks)}, {tuple(vs)})")
    if qs[3] != ks[3]:
        raise ValueError(f"query and key must have the same head dimension E, got {qs[3]} and {ks[3]} "
                         f"(shapes {tuple(qs)}, {tuple(ks)}); only value's head dimension may differ")
    Hq, Hkv = qs[1], ks[1]
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"query has {Hq} heads but key/value have {Hkv}: they must be equal, or pass "
                             f"enable_gqa=True for grouped-query attention (Hq a multiple of Hkv)")
        if Hq % Hkv:
            raise ValueError(f"with enable_gqa=True the number of query heads must be a multiple of the number of "
                             f"key/value heads, got Hq={Hq} and Hkv={Hkv}; use Hkv dividing Hq")


def _check_kernel_options(kernel_options) -> dict:
    if kernel_options is None:
        return {}
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}; "
                        f"e.g. kernel_options={{'BACKEND': 'cpu'}}")
    backend = kernel_options.get("BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"kernel_options['BACKEND'] must be one of {BACKENDS}, got {backend!r}")
    return check_option_keys(kernel_options)  # unknown keys raise on every backend


def _check_dropout(dropout_p, dropout_seed, generator) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}; use 0.0 to disable dropout")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise TypeError(f"dropout_seed must be a Python int or None (draw one from the generator), "
                        f"got {type(dropout_seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return float(dropout_p)


def _trace_score_mod(score_mod, device) -> Optional[Graph]:
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


def _check_block_mask(bm, B: int, Hq: int, L: int, S: int, device) -> None:
    if not isinstance(bm, BlockMask):
        if callable(bm):
            raise TypeError(f"block_mask must be a BlockMask, got the callable {getattr(bm, '__name__', bm)!r}; "
                            f"a mask_mod goes through create_block_mask first: "
                            f"block_mask=create_block_mask(mask_mod, B, H, Q_LEN={L}, KV_LEN={S})")
        raise TypeError(f"block_mask must be a BlockMask or None, got {type(bm).__name__}; "
                        f"build one with create_block_mask(mask_mod, B, H, Q_LEN={L}, KV_LEN={S})")
    if tuple(bm.seq_lengths) != (L, S):
        raise ValueError(f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(bm.seq_lengths)} but the inputs have "
                         f"query length {L} and key/value length {S}; build it with create_block_mask(..., "
                         f"Q_LEN={L}, KV_LEN={S}), or shorten it with block_mask._adjust({L}, {S}) (crop)")
    dev = bm.kv_num_blocks.device
    if dev.type != device.type or (device.index is not None and dev.index not in (None, device.index)):
        raise ValueError(f"block_mask is on {dev} but the inputs are on {device}; "
                         f"move it with block_mask.to({str(device)!r}) or pass device= to create_block_mask")
    Bm, Hm = bm.kv_num_blocks.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(f"block_mask has batch/head sizes (B={Bm}, H={Hm}); each must be 1 (broadcast) or match "
                         f"the inputs (B={B}, query heads H={Hq}); build it with create_block_mask(mask_mod, "
                         f"B={B} or None, H={Hq} or None, ...)")
    qb, kvb = bm.BLOCK_SIZE
    nq, nkv = -(-L // qb), -(-S // kvb)
    if bm.kv_num_blocks.shape[2] < nq or bm.kv_indices.shape[3] < nkv:
        raise ValueError(f"block_mask has {bm.kv_num_blocks.shape[2]} q-blocks x {bm.kv_indices.shape[3]} kv-blocks "
                         f"of BLOCK_SIZE {bm.BLOCK_SIZE}, but (L={L}, S={S}) needs {nq} x {nkv}; rebuild it with "
                         f"create_block_mask(..., Q_LEN={L}, KV_LEN={S})")


def _mask_graph_of(bm: BlockMask, device) -> Optional[Graph]:
    """The traced mask of `bm` for its partial blocks (None: attend everywhere inside them)."""
    graph = bm.mask_graph
    if graph is None and bm.mask_mod is not None and bm.mask_mod is not noop_mask:
        graph = trace_mask(bm.mask_mod, "block_mask.mask_mod")  # a sliced mask's mod raises here
    if graph is not None:
        check_buffers_device(graph, device, "block_mask.mask_mod")
    return graph


_FULL_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # (L, S, device) -> BlockMask
_FULL_MASKS_MAX = 16


def _full_block_mask(L: int, S: int, device) -> BlockMask:
    """All blocks attended, built from the block grid (O(blocks)): full blocks inside,
    partial ones (padding) on the edges when a length is not a multiple of the block.
    Cached per (L, S, device): building one costs several small device ops per call."""
    key = (L, S, device)
    bm = _FULL_MASKS.get(key)
    if bm is None:
        bm = _FULL_MASKS[key] = _build_full_block_mask(L, S, device)
        while len(_FULL_MASKS) > _FULL_MASKS_MAX:
            _FULL_MASKS.popitem(last=False)
    return bm


def _build_full_block_mask(L: int, S: int, device) -> BlockMask:
    nq, nkv = -(-L // _DEFAULT_BLOCK), -(-S // _DEFAULT_BLOCK)
    state = torch.full((1, 1, nq, nkv), FULL, dtype=torch.int8, device=device)
    if L % _DEFAULT_BLOCK:
        state[..., -1, :] = PARTIAL
    if S % _DEFAULT_BLOCK:
        state[..., :, -1] = PARTIAL
    return BlockMask._from_state(state, (_DEFAULT_BLOCK, _DEFAULT_BLOCK), noop_mask, (L, S), None)
