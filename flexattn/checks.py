"""Input checks, written once: eager (`attention.py`), compiled (`compiled.py`), the front
ends and the Triton kernels (`check_kernel_inputs`) raise the same errors from here.

Each error is a ValueError / TypeError whose text names the argument, what was expected,
what came, and the fix. No Triton import: the CPU path runs these checks too.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .block_mask import _DEFAULT_BLOCK, BlockMask
from .options import BACKENDS, TORCH_BACKENDS, check_option_keys

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton kernels take no float64
MAX_HEAD_DIM = 256  # the Triton kernels' largest head dim


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether devices `a` and `b` are one device (an index of None counts as 0)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def check_gqa(Hq: int, Hkv: int) -> None:
    """Grouped-query attention: the query heads must be a multiple of the kv heads."""
    if Hq % Hkv:
        raise ValueError(f"with enable_gqa=True the number of query heads must be a multiple of the number of "
                         f"key/value heads, got Hq={Hq} and Hkv={Hkv}; use Hkv dividing Hq")


def check_qkv(q, k, v, enable_gqa: bool) -> None:
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
        check_gqa(Hq, Hkv)


def check_scale(scale, E: int) -> float:
    """The softmax scale as a float (None: 1 / sqrt(E))."""
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a float or None (meaning 1/sqrt(E) = {1.0 / math.sqrt(E):.4g}), "
                        f"got {type(scale).__name__}; pass a Python number, e.g. scale=0.125")
    return float(scale)


def check_options_arg(kernel_options) -> dict:
    """flex_attention's kernel_options argument: a dict (or None) of known keys, BACKEND valid."""
    if kernel_options is None:
        return {}
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}; "
                        f"e.g. kernel_options={{'BACKEND': 'cpu'}}")
    opts = check_option_keys(kernel_options)  # unknown keys raise on every backend
    backend = opts.get("BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"kernel_options['BACKEND'] must be one of {BACKENDS} (or torch's "
                         f"{tuple(TORCH_BACKENDS)}), got {backend!r}")
    return opts


def check_dropout(dropout_p, dropout_seed, generator) -> float:
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


def check_block_mask(bm, B: int, Hq: int, L: int, S: int, device) -> None:
    if not isinstance(bm, BlockMask):
        if callable(bm):
            raise TypeError(f"block_mask must be a BlockMask, got the callable {getattr(bm, '__name__', bm)!r}; "
                            f"a mask_mod goes through create_block_mask first: "
                            f"block_mask=create_block_mask(mask_mod, B, H, Q_LEN={L}, KV_LEN={S})")
        raise TypeError(f"block_mask must be a flexattn.BlockMask, a torch.nn.attention.flex_attention.BlockMask "
                        f"or None, got {type(bm).__module__}.{type(bm).__qualname__}; build one with "
                        f"flexattn.create_block_mask(mask_mod, B, H, Q_LEN={L}, KV_LEN={S})")
    if tuple(bm.seq_lengths) != (L, S):
        raise ValueError(f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(bm.seq_lengths)} but the inputs have "
                         f"query length {L} and key/value length {S}; build it with create_block_mask(..., "
                         f"Q_LEN={L}, KV_LEN={S}), or shorten it with block_mask._adjust({L}, {S}) (crop)")
    check_block_mask_device(bm, device)
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


def check_block_mask_device(bm, device) -> None:
    dev = bm.kv_num_blocks.device
    if not same_device(dev, device):
        raise ValueError(f"block_mask is on {dev} but the inputs are on {device}; "
                         f"move it with block_mask.to({str(device)!r}) or pass device= to create_block_mask")


def check_kernel_inputs(q, k, v, score_graph, mask_graph, block_mask) -> None:
    """What the Triton kernels cannot take, raised before any launch (the kernels' entry
    points are public too: benchmarks call them without flex_attention's checks)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name}: the Triton kernels take float16, bfloat16 or float32, got {t.dtype}; "
                             f"cast with .to(torch.bfloat16)")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor (B, H, S, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, d in (("query/key head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: the Triton kernels take head dims 1..{MAX_HEAD_DIM}, got {d}; "
                             f"use the CPU path or split the heads")
    dev = q.device
    for name, t in (("key", k), ("value", v)):
        if not same_device(t.device, dev):
            raise ValueError(f"{name} is on {t.device} but query is on {dev}: move it with .to({str(dev)!r})")
    check_gqa(q.shape[1], k.shape[1])
    if block_mask is not None:
        check_block_mask_device(block_mask, dev)
    for argument, g in (("score_mod", score_graph), ("block_mask.mask_mod", mask_graph)):
        for t in (g.buffers if g is not None else []):
            if not same_device(t.device, dev):
                raise ValueError(f"{argument} captures a tensor of shape {tuple(t.shape)} on {t.device}, "
                                 f"but query is on {dev}: move the captured tensor with .to({str(dev)!r})")
    if block_mask is not None:
        qb, kvb = block_mask.BLOCK_SIZE
        for name, b in (("q", qb), ("kv", kvb)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"block_mask.BLOCK_SIZE: the Triton kernels need power-of-two blocks >= 16, "
                                 f"got a {name} block of {b}; rebuild it with BLOCK_SIZE={_DEFAULT_BLOCK}")
