"""Generated Triton kernels for flex attention: forward, backward, short-query decode.

    out, lse = flex_attention_triton(q, k, v, score_graph=..., mask_graph=..., block_mask=...,
                                     scale=..., return_lse=..., kernel_options=...,
                                     dropout_p=0.0, dropout_seed=None)

Autograd-capable (dq, dk, dv and the captured float tensors of the score_mod that require
grad). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

Layering: `forward.py` / `backward.py` / `decode.py` hold the kernel templates;
`flexattn.codegen` fills their holes with the mods; this module picks tile configs,
prepares the BlockMask tensors and launches (through `launcher.py`); `tiered.py` chooses
between a new mask's own kernels and its tile-table form; `replay.py` re-runs the recorded
launches of a call whose signature was seen before.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace

import torch
import triton

from .. import codegen
from ..autodiff import grad_slots as buffer_grad_slots
from ..options import check_option_keys
from .forward import FWD_TEMPLATE
from .backward import BWD_TEMPLATE
from . import replay, tiered
from .launcher import launch_cached, next_pow2, cdiv, recording

LOG2E = 1.4426950408889634


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound
    with int(array), which numpy >= 2.3 refuses for 1-d arrays. Under TRITON_INTERPRET=1
    only, make `__index__` read the single element instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter
    if getattr(interpreter, "_flexattn_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._flexattn_patched = True


_interpreter_compat()


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_kernel_options(kernel_options) -> dict:
    opts = check_option_keys(kernel_options or {})
    for key in ("BLOCK_M", "BLOCK_N", "bwd_BLOCK_M", "bwd_BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2",
                "BLOCK_N2", "decode_BLOCK_N"):
        if key in opts:
            v = opts[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
                raise ValueError(f"kernel_options[{key!r}] must be a power of two >= 16, got {v!r}")
    for key in ("num_warps", "bwd_num_warps", "decode_num_warps"):
        if key in opts and opts[key] not in (1, 2, 4, 8, 16):
            raise ValueError(f"kernel_options[{key!r}] must be one of 1, 2, 4, 8, 16, got {opts[key]!r}")
    for key in ("num_stages", "bwd_num_stages", "decode_num_stages"):
        if key in opts and (not isinstance(opts[key], int) or not 1 <= opts[key] <= 6):
            raise ValueError(f"kernel_options[{key!r}] must be an int in 1..6, got {opts[key]!r}")
    for key in ("AUTOTUNE", "TIERED"):
        if key in opts and not isinstance(opts[key], bool):
            raise ValueError(f"kernel_options[{key!r}] must be True or False, got {opts[key]!r}")
    return opts


# ---- validation ----------------------------------------------------------------------

def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (t.device.index or 0) == (device.index or 0) \
        if device.type == "cuda" else t.device.type == device.type


def validate(q, k, v, score_graph, mask_graph, block_mask) -> None:
    """Errors the kernels cannot recover from, raised before any launch."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dtype not in SUPPORTED_DTYPES:
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
        if not _on(t, dev):
            raise ValueError(f"{name} is on {t.device} but query is on {dev}: move it with .to({str(dev)!r})")
    if block_mask is not None and not _on(block_mask.kv_num_blocks, dev):
        raise ValueError(f"block_mask is on {block_mask.kv_num_blocks.device} but query is on {dev}: "
                         f"use block_mask.to({str(dev)!r}) or create_block_mask(..., device={str(dev)!r})")
    for argument, g in (("score_mod", score_graph), ("block_mask.mask_mod", mask_graph)):
        for i, t in enumerate(g.buffers if g is not None else []):
            if not _on(t, dev):
                raise ValueError(f"{argument} captures a tensor of shape {tuple(t.shape)} on {t.device}, "
                                 f"but query is on {dev}: move the captured tensor with .to({str(dev)!r})")
    if block_mask is not None:
        qb, kvb = block_mask.BLOCK_SIZE
        for name, b in (("q", qb), ("kv", kvb)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"block_mask.BLOCK_SIZE: the Triton kernels need power-of-two blocks >= 16, "
                                 f"got a {name} block of {b}; rebuild it with BLOCK_SIZE=128")


# ---- configs -------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "interp"
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_key(index: int) -> str:  # asked on every call: the capability query is not free
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def default_fwd_config(device, dtype, d: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward."""
    dmax = max(_pow2(d), _pow2(dv))
    dk = _device_key(device)
    if dk == "interp":
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return (64, 32, 4, 3) if dmax <= 128 else (32, 32, 4, 2)
    if dk.startswith("sm9") or dk.startswith("sm1"):
        if dmax in _FWD_OVERRIDE:
            return _FWD_OVERRIDE[dmax]
        if dmax <= 64:  # measured on H100 (S=8K): 128x128/4/3 1.05x torch; 8 warps 0.85x
            return 128, 128, 4, 3
        if dmax <= 128:
            # measured on H100 (S=8K): 128x128/8/3 492 TFLOP/s dense vs 457-463 for
            # 128x64/8/3, 128x128/8/2, 128x64/8/4. 3 stages: with 2 the pipeliner issues the next K/V copy at the end of an
            # iteration and waits on it at the start of the next (no overlap); 128x128x3
            # stages needs 224 KB of shared memory (the launch falls back if it lacks it)
            return 128, 128, 8, 3
        return 64, 64, 4, 2
    if dmax <= 128:
        return 128, 64, 4 if dmax <= 64 else 8, 3
    return 64, 32, 4, 2


def default_bwd_config(device, dtype, d: int, dv: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): tiles of the dk/dv
    kernel (q tile walked, kv tile owned) and of the dq kernel (q tile owned, kv tile walked)."""
    dmax = max(_pow2(d), _pow2(dv))
    dk = _device_key(device)
    if dk == "interp":
        return 32, 32, 32, 32, 4, 1
    if dtype == torch.float32:
        return (32, 32, 32, 32, 4, 1) if dmax <= 128 else (16, 16, 16, 16, 4, 1)
    if dk.startswith("sm9") or dk.startswith("sm1"):
        # measured on H100 (S=8K, benchmarks/sweep_configs.py): D=128 best with the dq kernel
        # owning 128 q rows and walking 64-wide kv tiles (64x128 for dq: 0.83x of it); D=64
        # best with 64-square tiles and 4 warps (1.05-1.09x the 128-row dq config)
        if dmax in _BWD_OVERRIDE:
            return _BWD_OVERRIDE[dmax]
        if dmax <= 64:
            return 64, 64, 64, 64, 4, 3
        if dmax <= 128:
            return 64, 128, 128, 64, 8, 3
        return 32, 64, 32, 64, 4, 2
    if dmax <= 128:
        return 64, 64, 64, 64, 4, 2
    return 32, 32, 32, 32, 4, 1


# per padded head dim: configs a sweep may set (benchmarks/sweep_configs.py); empty by default
_FWD_OVERRIDE: dict = {}
_BWD_OVERRIDE: dict = {}


def _fit(tile: int, block: int, length: int) -> int:
    """Largest power-of-two tile <= the requested one that divides the BlockMask block."""
    tile = min(tile, block, max(16, next_pow2(length)))
    while block % tile:
        tile //= 2
    return max(tile, 16)


# ---- block masks ---------------------------------------------------------------------

@dataclass
class _Blocks:
    """The BlockMask tensors the kernels read, broadcast to [B, Hq, ...] (stride 0)."""
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor | None
    full_kv_idx: torch.Tensor | None
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor | None
    full_q_idx: torch.Tensor | None
    block: tuple[int, int]

    @property
    def has_full(self) -> bool:
        return self.full_kv_num is not None


_DENSE_CACHE: dict = {}


def _dense_blocks(L: int, S: int, device) -> _Blocks:
    """No block_mask: every block is visited; edge blocks holding padding are partial."""
    key = (L, S, str(device))
    if key in _DENSE_CACHE:
        return _DENSE_CACHE[key]
    QB = KVB = 128
    nq, nk = -(-L // QB), -(-S // KVB)
    full = torch.ones(nq, nk, dtype=torch.bool)
    if S % KVB:
        full[:, -1] = False
    if L % QB:
        full[-1, :] = False
    part = ~full

    def ordered(sel):  # rows of sel -> (count, ascending indices, then the rest)
        n = sel.sum(-1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return n.view(1, 1, -1).to(device), idx.view(1, 1, *idx.shape).to(device)

    kn, ki = ordered(part)
    fkn, fki = ordered(full)
    qn, qi = ordered(part.t())
    fqn, fqi = ordered(full.t())
    blocks = _Blocks(kn, ki, fkn, fki, qn, qi, fqn, fqi, (QB, KVB))
    _DENSE_CACHE[key] = blocks
    return blocks


def _blocks_of(block_mask, B, Hq, L, S, device) -> _Blocks:
    """The kernels' view of the BlockMask, cached on it per (B, Hq): a call with a BlockMask
    already seen makes no torch ops (dtype casts / expands cost ~10 us each per call)."""
    if block_mask is not None:
        key = (B, Hq, L, S, block_mask.kv_num_blocks.data_ptr(), block_mask.kv_indices.data_ptr())
        cache = block_mask.__dict__.setdefault("_flexattn_blocks", {}) if hasattr(block_mask, "__dict__") else {}
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _blocks_of_uncached(block_mask, B, Hq, L, S, device)
        return hit
    return _blocks_of_uncached(block_mask, B, Hq, L, S, device)


def _blocks_of_uncached(block_mask, B, Hq, L, S, device) -> _Blocks:
    if block_mask is None:
        b = _dense_blocks(L, S, device)
    else:
        bm = block_mask
        b = _Blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                    bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices,
                    tuple(bm.BLOCK_SIZE))
    return expand_blocks(b, B, Hq)


def expand_blocks(b: _Blocks, B: int, Hq: int) -> _Blocks:
    """`b` as the kernels read it: int32, unit stride along the last dim, broadcast to [B, Hq, ...]."""
    def ex(t):
        if t is None:
            return None
        if t.dtype != torch.int32:
            t = t.to(torch.int32)
        if t.stride(-1) != 1:
            t = t.contiguous()
        return t.expand(B, Hq, *t.shape[2:])

    return _Blocks(ex(b.kv_num), ex(b.kv_idx), ex(b.full_kv_num), ex(b.full_kv_idx),
                   ex(b.q_num), ex(b.q_idx), ex(b.full_q_num), ex(b.full_q_idx), b.block)


def _bm_strides(num, idx):
    return [*num.stride()[:3], *idx.stride()[:3]]


# ---- source generation ---------------------------------------------------------------

def _trail(params: list[str]) -> str:
    return "".join(p + ", " for p in params)


def _lead(params: list[str]) -> str:
    return "".join(", " + p for p in params)


def _fill(template: str, score_graph, mask_graph, grad_slots=None, small_indices=False) -> str:
    sp = codegen.buffer_params(score_graph, "sb")
    mp = codegen.buffer_params(mask_graph, "mb")
    parts = {
        "{SCORE_MOD}": codegen.mod_function("score_mod", score_graph, "score", "sb", small_indices),
        "{MASK_MOD}": codegen.mod_function("mask_mod", mask_graph, "mask", "mb", small_indices),
        "{SCORE_BUF_PARAMS_TRAIL}": _trail(sp), "{MASK_BUF_PARAMS_TRAIL}": _trail(mp),
        "{SCORE_BUF_ARGS_TRAIL}": _trail(sp), "{MASK_BUF_ARGS_TRAIL}": _trail(mp),
        "{SCORE_BUF_ARGS}": _lead(sp), "{MASK_BUF_ARGS}": _lead(mp),
    }
    if grad_slots is not None:
        gp = [f"gsb{s}_ptr" for s in grad_slots]
        parts["{SCORE_MOD_BWD}"] = codegen.mod_backward_function("score_mod_bwd", score_graph, "sb", grad_slots,
                                                                small_indices)
        parts["{GRAD_BUF_PARAMS_TRAIL}"] = _trail(gp)
        parts["{GRAD_BUF_ARGS_TRAIL}"] = _trail(gp)
        parts["{GRAD_BUF_ARGS}"] = _lead(gp)
    src = template
    for hole, text in parts.items():
        src = src.replace(hole, text)
    # the mods' params are plain values: no recompile when one becomes 1 or a multiple of 16.
    # (Captured tensors' sizes stay specialised: a size divisible by 16 lets Triton prove a
    # gather's bounds mask constant over 16 lanes - doc_id[kv] - measured 9% on document 8K.)
    params = codegen.param_names(score_graph, "sb") + codegen.param_names(mask_graph, "mb")
    if params:
        src = src.replace("@triton.jit\ndef flex_", f"@triton.jit(do_not_specialize={params!r})\ndef flex_")
    return codegen.PRELUDE + src


_SRC_CACHE: dict = {}


# The kernels whose mods take small index sums in float32 (codegen's small_indices). Not the
# backward: its dk/dv kernel holds the kv axis fixed, the compiler hoists the broadcast float
# kv tile out of the loop, and at D=128 (already at 255 registers) that spilled: ALiBi
# fwd+bwd went from 1.06-1.08x to 1.01-1.05x torch on the H200 (run 10).
FLOAT_INDEX_KINDS = ("fwd", "decode")


def _source(kind: str, score_graph, mask_graph, grad_slots, float_indices: bool) -> str:
    """The Triton source of `kind`'s template filled for these (kernel) graphs; grad_slots
    only for "bwd"; float_indices: _float_indices' answer."""
    if kind == "decode":
        from .decode import DECODE_TEMPLATE as template  # noqa: N811
    else:
        template = {"fwd": FWD_TEMPLATE, "bwd": BWD_TEMPLATE}[kind]
    return _fill(template, score_graph, mask_graph, list(grad_slots) if kind == "bwd" else None, float_indices)


def _float_indices(kind: str, small_indices: bool) -> bool:
    """Whether `kind`'s mods print small index sums in float32 (FLOAT_INDEX_KINDS)."""
    return small_indices and kind in FLOAT_INDEX_KINDS


def _module(kind: str, score_graph, mask_graph, grad_slots=None, small_indices=False):
    """The generated module for (kind, score structure, mask structure, grad slots, whether
    the indices are below codegen.SMALL_INDEX_LIMIT)."""
    float_indices = _float_indices(kind, small_indices)
    key = (kind, score_graph.structure_key() if score_graph is not None else None,
           mask_graph.structure_key() if mask_graph is not None else None,
           tuple(grad_slots) if grad_slots is not None else None, float_indices)
    mod = _SRC_CACHE.get(key)
    if mod is None:
        src = _source(kind, score_graph, mask_graph, grad_slots, float_indices)
        mod = _SRC_CACHE[key] = codegen.load_module(src, f"flex_{kind}")
    return mod


def generated_source(score_graph, mask_graph, kind: str = "fwd", grad_slots=(), small_indices=True) -> str:
    """The Triton source the kernels of `kind` ("fwd", "bwd", "decode") run for these mods
    (by default for batch, heads and lengths below codegen.SMALL_INDEX_LIMIT)."""
    score_graph, mask_graph = codegen.kernel_graph(score_graph), codegen.kernel_graph(mask_graph)
    return _source(kind, score_graph, mask_graph, grad_slots, _float_indices(kind, small_indices))


# ---- launches ------------------------------------------------------------------------

@dataclass
class Plan:
    score_graph: object
    mask_graph: object
    blocks: _Blocks
    scale: float
    opts: dict
    dropout_p: float
    dropout_seed: int | None
    grad_slots: tuple
    score_bufs: list  # the captured tensors the kernels read (the graphs' by default)
    mask_bufs: list
    small_indices: bool = False  # batch, heads and lengths below codegen.SMALL_INDEX_LIMIT
    tiering: tuple | None = None  # ("own" | "tile_form", the other plan): see kernels.tiered
    modules: dict = field(default_factory=dict)  # kind -> generated module, memo of plan_module


def plan_module(plan: Plan, kind: str):
    """The generated module of `kind` ("fwd", "bwd", "decode") for the plan's mods."""
    mod = plan.modules.get(kind)
    if mod is None:
        mod = plan.modules[kind] = _module(kind, plan.score_graph, plan.mask_graph,
                                           list(plan.grad_slots) if kind == "bwd" else None, plan.small_indices)
    return mod


def _dot_precision(dtype, opts) -> str:
    if dtype == torch.float32 and not opts.get("ALLOW_TF32", False):
        return "ieee"
    return "tf32"


def _dropout_args(plan: Plan):
    if plan.dropout_p <= 0.0:
        return 1.0, 0, 0, 0
    from ..dropout import split_seed, signed32, dropout_threshold
    lo, hi = split_seed(plan.dropout_seed)
    return 1.0 / (1.0 - plan.dropout_p), signed32(lo), signed32(hi), signed32(dropout_threshold(plan.dropout_p))


def _fwd_cfg(plan: Plan, q, k, v, base=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): `base` (default: the autotuned config under
    kernel_options["AUTOTUNE"], else default_fwd_config) with the keys given in kernel_options
    applied and the tiles fitted to the BlockMask."""
    o = plan.opts
    if base is None and o.get("AUTOTUNE"):
        from .autotune import tuned_fwd_config  # it builds its candidates through base=
        return tuned_fwd_config(plan, q, k, v)
    dm, dn, dw, ds = base or default_fwd_config(q.device, q.dtype, q.shape[-1], v.shape[-1])
    bm = _fit(o.get("BLOCK_M", dm), plan.blocks.block[0], q.shape[2])
    bn = _fit(o.get("BLOCK_N", dn), plan.blocks.block[1], v.shape[2])
    return bm, bn, o.get("num_warps", dw), o.get("num_stages", ds)


_SHRUNK: dict = {}


def launch(kernel, grid, args, kwargs, key, shrink="BLOCK_N"):
    """Launch; if the config needs more shared memory than the GPU has (a captured-tensor
    gather can add scratch), retry with fewer stages, then a smaller inner-loop tile
    (`shrink`: the tile the loop walks, never the one the grid is made of); remember it."""
    kwargs = dict(kwargs, **_SHRUNK.get(key, {}))
    while True:
        try:
            return launch_cached(kernel, grid, args, kwargs)
        except triton.runtime.errors.OutOfResources:
            if kwargs["num_stages"] > 1:
                kwargs["num_stages"] -= 1
            elif kwargs[shrink] > 16:
                kwargs[shrink] //= 2
            else:
                raise
            _SHRUNK[key] = {"num_stages": kwargs["num_stages"], shrink: kwargs[shrink]}


def _needs_i64(*ts) -> bool:
    """True when an offset inside one (batch, head) slice of a [B, H, S, D] tensor can pass
    2^31 elements (then the kernels do their in-head address math in int64)."""
    for t in ts:
        if sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:])) >= 2 ** 31 - 1:
            return True
    return False


def forward(plan: Plan, q, k, v, return_lse: bool = True, cfg=None):
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    bm_, bn_, warps, stages = cfg or _fwd_cfg(plan, q, k, v)
    blk = plan.blocks
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    mod = plan_module(plan, "fwd")
    full_num = blk.full_kv_num if blk.has_full else blk.kv_num
    full_idx = blk.full_kv_idx if blk.has_full else blk.kv_idx
    drop_scale, lo, hi, thr = _dropout_args(plan)
    grid = (cdiv(L, bm_), B * Hq)
    args = (
        q, k, v, out, lse, blk.kv_num, blk.kv_idx, full_num, full_idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_bm_strides(blk.kv_num, blk.kv_idx), *_bm_strides(full_num, full_idx),
        Hq, L, S, plan.scale, plan.scale * LOG2E, drop_scale, lo, hi, thr,
        *codegen.buffer_args(plan.score_graph, plan.score_bufs), *codegen.buffer_args(plan.mask_graph, plan.mask_bufs))
    kwargs = dict(
        GQA_GROUP=Hq // Hkv, HAS_FULL=blk.has_full, HAS_SCORE_MOD=plan.score_graph is not None,
        HAS_DROPOUT=plan.dropout_p > 0, OUTPUT_LSE=True,
        QK_HEAD=E, QK_HEAD_PAD=_pow2(E), V_HEAD=Ev, V_HEAD_PAD=_pow2(Ev),
        BLOCK_M=bm_, BLOCK_N=bn_, SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
        Q_DIVISIBLE=L % blk.block[0] == 0, KV_DIVISIBLE=S % blk.block[1] == 0,
        DOT_PRECISION=_dot_precision(q.dtype, plan.opts), OFFS_64=_needs_i64(k, v),
        SCALE_POSITIVE=plan.scale > 0, num_warps=warps, num_stages=stages)
    launch(mod.flex_fwd, grid, args, kwargs, ("fwd", id(mod), q.dtype, E, Ev, bm_, bn_, warps, stages))
    return out, lse


def _bwd_cfg(plan: Plan, q, k, v, out, lse, dout, dlse, score_bufs, base=None):
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): `base` (default: the
    autotuned config under kernel_options["AUTOTUNE"], else default_bwd_config) with the keys
    given in kernel_options applied and the tiles fitted to the BlockMask."""
    o = plan.opts
    if base is None and o.get("AUTOTUNE"):
        from .autotune import tuned_bwd_config  # it builds its candidates through base=
        return tuned_bwd_config(plan, q, k, v, out, lse, dout, dlse, score_bufs)
    dm1, dn1, dm2, dn2, dw, ds = base or default_bwd_config(q.device, q.dtype, q.shape[-1], v.shape[-1])
    m1 = o.get("bwd_BLOCK_M", o.get("BLOCK_M1", dm1))
    n1 = o.get("bwd_BLOCK_N", o.get("BLOCK_N1", dn1))
    m2 = o.get("bwd_BLOCK_M", o.get("BLOCK_M2", dm2))
    n2 = o.get("bwd_BLOCK_N", o.get("BLOCK_N2", dn2))
    qb, kvb = plan.blocks.block
    L, S = q.shape[2], v.shape[2]
    return (_fit(m1, qb, L), _fit(n1, kvb, S), _fit(m2, qb, L), _fit(n2, kvb, S),
            o.get("bwd_num_warps", dw), o.get("bwd_num_stages", ds))


def backward(plan: Plan, q, k, v, out, lse, dout, dlse, score_bufs, cfg=None):
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    m1, n1, m2, n2, warps, stages = cfg or _bwd_cfg(plan, q, k, v, out, lse, dout, dlse, score_bufs)
    blk = plan.blocks
    # delta = rowsum(dO * O) - dlse and lse in the log2 domain: the dq kernel computes and
    # writes them, the dk/dv kernel (launched after it) reads them
    delta = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    lse = lse if lse.is_contiguous() else lse.contiguous()  # both read as flat [B*Hq*L]
    if dlse is not None and not dlse.is_contiguous():
        dlse = dlse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grad_slots = plan.grad_slots
    det = bool(plan.opts.get("DETERMINISTIC", False))
    gbufs = [torch.zeros(score_bufs[s].shape, dtype=torch.int64 if det else torch.float32, device=q.device)
             for s in grad_slots]
    # the atomics index the gradient buffers with the captured tensors' strides
    sbufs = list(score_bufs)
    for s in grad_slots:
        if sbufs[s].stride() != gbufs[grad_slots.index(s)].stride():
            sbufs[s] = sbufs[s].contiguous()
    sg = plan.score_graph
    sargs = codegen.buffer_args(sg, sbufs)
    mod = plan_module(plan, "bwd")
    drop_scale, lo, hi, thr = _dropout_args(plan)
    common = dict(GQA_GROUP=Hq // Hkv, HAS_FULL=blk.has_full, HAS_SCORE_MOD=sg is not None,
                  HAS_DROPOUT=plan.dropout_p > 0,
                  QK_HEAD=E, QK_HEAD_PAD=_pow2(E), V_HEAD=Ev, V_HEAD_PAD=_pow2(Ev),
                  SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
                  # "divisible" = no block holds padding: then no tile needs bounds checks
                  Q_DIVISIBLE=L % blk.block[0] == 0, KV_DIVISIBLE=S % blk.block[1] == 0,
                  DOT_PRECISION=_dot_precision(q.dtype, plan.opts), DETERMINISTIC=det,
                  OFFS_64=_needs_i64(q, k, v, dout), num_warps=warps, num_stages=stages)
    margs = codegen.buffer_args(plan.mask_graph, plan.mask_bufs)
    full_num = blk.full_kv_num if blk.has_full else blk.kv_num
    full_idx = blk.full_kv_idx if blk.has_full else blk.kv_idx
    launch(mod.flex_bwd_dq, (cdiv(L, m2), B * Hq), (
        q, k, v, dout, dq, out, lse, lse if dlse is None else dlse, lse2, delta,
        blk.kv_num, blk.kv_idx, full_num, full_idx,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *out.stride(),
        *_bm_strides(blk.kv_num, blk.kv_idx), *_bm_strides(full_num, full_idx),
        Hq, L, S, plan.scale, drop_scale, lo, hi, thr, *sargs, *margs, *gbufs),
        dict(BLOCK_M=m2, BLOCK_N=n2, HAS_DLSE=dlse is not None, **common), ("dq", id(mod), q.dtype, E, Ev, m2, n2, warps, stages))
    fq_num = blk.full_q_num if blk.has_full else blk.q_num
    fq_idx = blk.full_q_idx if blk.has_full else blk.q_idx
    # dk/dv: the kv tile fixes the grid, so a shared-memory fallback shrinks the q tile
    launch(mod.flex_bwd_dkdv, (cdiv(S, n1), B * Hkv), (
        q, k, v, dout, dk, dv, lse2, delta, blk.q_num, blk.q_idx, fq_num, fq_idx,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *_bm_strides(blk.q_num, blk.q_idx), *_bm_strides(fq_num, fq_idx),
        Hq, Hkv, L, S, plan.scale, drop_scale, lo, hi, thr, *sargs, *margs, *gbufs),
        dict(BLOCK_M=m1, BLOCK_N=n1, **common), ("dkdv", id(mod), q.dtype, E, Ev, m1, n1, warps, stages), shrink="BLOCK_M")
    if det:
        gbufs = [g.double() / 4294967296.0 for g in gbufs]
    buf_grads = [g.to(score_bufs[s].dtype) for g, s in zip(gbufs, grad_slots)]
    return dq, dk, dv, buf_grads


class _FlexTriton(torch.autograd.Function):
    """`run` (a _Planned or a _CachedCall) does the launches; mask_bufs are the call's
    captured mask tensors (no gradients flow into them)."""

    @staticmethod
    def forward(ctx, run, mask_bufs, q, k, v, *score_bufs):
        out, lse = run.forward(q, k, v, score_bufs, mask_bufs)
        ctx.run, ctx.mask_bufs = run, mask_bufs
        ctx.save_for_backward(q, k, v, out, lse, *score_bufs)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *score_bufs = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        run = ctx.run
        dq, dk, dv, buf_grads = run.backward(q, k, v, out, lse, dout, dlse, score_bufs, ctx.mask_bufs)
        grads = [None] * len(score_bufs)
        for s, g in zip(run.grad_slots, buf_grads):
            grads[s] = g
        return (None, None, dq, dk, dv, *grads)


def _run_forward(plan, q, k, v):
    from .decode import use_decode, decode_forward
    run, kind = (decode_forward, "decode") if use_decode(plan, q, v) else (forward, "fwd")
    out, lse = run(plan, q, k, v)
    tiered.after_launch(kind, plan, lambda other: _captured(run, other, q, k, v))
    return out, lse


def _run_backward(plan, q, k, v, out, lse, dout, dlse, score_bufs):
    grads = backward(plan, q, k, v, out, lse, dout, dlse, score_bufs)
    tiered.after_launch("bwd", plan, lambda other: _captured(backward, other, q, k, v, out, lse, dout, dlse,
                                                            score_bufs))
    return grads


class _Planned:
    """A call that is not cached: its plan (with the call's captured tensors) runs the
    normal launch path."""

    def __init__(self, plan):
        self.plan = plan
        self.grad_slots = plan.grad_slots

    def forward(self, q, k, v, score_bufs, mask_bufs):
        return _run_forward(self.plan, q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs):
        return _run_backward(self.plan, q, k, v, out, lse, dout, dlse, score_bufs)


class _CachedCall:
    """A call signature seen before (kernels.replay): its plan with the mods' captured
    tensors unbound, and per launch path (forward or decode; backward per dout / dlse
    layout) its replay, recorded the first time the path runs (None: not replayable)."""

    def __init__(self, plan, kinds, score_graph, mask_graph):
        # the modules are picked by the graphs' structure, which reads the captured tensors'
        # dtypes and ranks: generate them while the plan has those tensors
        for kind in kinds:
            plan_module(plan, kind)
        strip = lambda g: None if g is None else g._with_buffers([])  # noqa: E731
        self.plan = replace(plan, score_graph=strip(plan.score_graph), mask_graph=strip(plan.mask_graph),
                            score_bufs=[], mask_bufs=[])
        self.fwd_kind = kinds[0]
        from .decode import decode_forward
        self.fwd_fn = decode_forward if self.fwd_kind == "decode" else forward
        self.grad_slots = plan.grad_slots
        self.replays: dict = {}
        self.keep = [g._memo for g in (score_graph, mask_graph) if g is not None]  # see replay._graph_key

    def plan_for(self, score_bufs, mask_bufs) -> Plan:
        """The cached plan bound to this call's captured tensors."""
        p = self.plan
        bind = lambda g, bufs: None if g is None else g._with_buffers(list(bufs))  # noqa: E731
        return replace(p, score_graph=bind(p.score_graph, score_bufs), mask_graph=bind(p.mask_graph, mask_bufs),
                       score_bufs=list(score_bufs), mask_bufs=list(mask_bufs))

    def _run(self, key, inputs, fn, args_of, results_of):
        """fn(*args_of()) through its replay for `key` when there is one; the first time, run
        normally and record the replay. Returns (the replay's result tensors, or fn's value;
        whether it was replayed)."""
        rep = self.replays.get(key)
        if rep is not None:
            result = rep(inputs)
            if result is not None:
                return result, True
        args = args_of()
        value = fn(*args)
        if key not in self.replays:
            self.replays[key] = replay.Replay.record(fn, args, inputs, results_of)
        return value, False

    def forward(self, q, k, v, score_bufs, mask_bufs):
        (out, lse), _ = self._run(self.fwd_kind, (q, k, v, *score_bufs, *mask_bufs), self.fwd_fn,
                                  lambda: (self.plan_for(score_bufs, mask_bufs), q, k, v), lambda r: r)
        return out, lse

    def backward(self, q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs):
        key = ("bwd", dout.stride(), None if dlse is None else dlse.stride())
        inputs = (q, k, v, out, lse, dout, *([] if dlse is None else [dlse]), *score_bufs, *mask_bufs)
        # gradients into captured tensors start as zeros: such a backward is not replayable
        # (the recording sees the zeros); its replay would return dq, dk, dv only
        value, replayed = self._run(
            key, inputs, backward,
            lambda: (self.plan_for(score_bufs, mask_bufs), q, k, v, out, lse, dout, dlse, score_bufs),
            lambda r: [*r[:3], *r[3]])
        return (*value, []) if replayed else value


def _captured(fn, *args) -> list:
    """The launches `fn(*args)` makes, recorded instead of run."""
    with recording() as launches:
        fn(*args)
    return launches


def make_plan(q, k, v, *, score_graph, mask_graph, block_mask, scale, kernel_options,
              dropout_p=0.0, dropout_seed=None) -> Plan:
    opts = check_kernel_options(kernel_options)
    validate(q, k, v, score_graph, mask_graph, block_mask)
    B, Hq, L, E = q.shape
    S = k.shape[2]
    if Hq % k.shape[1]:
        raise ValueError(f"query has {Hq} heads, key {k.shape[1]}: the query heads must be a multiple "
                         f"of the kv heads (GQA)")
    blocks = _blocks_of(block_mask, B, Hq, L, S, q.device)
    if mask_graph is None and block_mask is not None:
        mask_graph = getattr(block_mask, "mask_graph", None)
    # the kernels see the mods with their number constants as arguments (codegen.kernel_graph)
    score_graph, mask_graph = codegen.kernel_graph(score_graph), codegen.kernel_graph(mask_graph)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    if dropout_p and dropout_seed is None:
        from ..dropout import draw_seed
        dropout_seed = draw_seed()
    return Plan(score_graph, mask_graph, blocks, float(scale), opts, float(dropout_p or 0.0),
                dropout_seed, buffer_grad_slots(score_graph), list(score_graph.buffers) if score_graph is not None else [],
                list(mask_graph.buffers) if mask_graph is not None else [],
                small_indices=small_indices(q, k))


def small_indices(q, k) -> bool:
    """Whether batch, heads and lengths are below codegen.SMALL_INDEX_LIMIT (Plan.small_indices)."""
    return max(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) < codegen.SMALL_INDEX_LIMIT


def flex_attention_triton(q, k, v, *, score_graph=None, mask_graph=None, block_mask=None, scale=None,
                          return_lse=False, kernel_options=None, dropout_p=0.0, dropout_seed=None):
    """(out [B,Hq,L,Ev] in q.dtype, lse [B,Hq,L] float32 natural log) - see CONTRACTS.md."""
    if mask_graph is None and block_mask is not None:
        mask_graph = getattr(block_mask, "mask_graph", None)
    score_bufs = score_graph.buffers if score_graph is not None else []
    mask_bufs = mask_graph.buffers if mask_graph is not None else []
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                              or any(t.requires_grad for t in score_bufs))
    # a call like one before replays its launches (kernels.replay); dropout draws a new seed
    key = calls = run = None
    if not dropout_p and replay.ENABLED:
        key = replay.call_key(q, k, v, score_graph, mask_graph, block_mask, scale, kernel_options, needs_grad)
        calls = replay.calls_of(block_mask)
        run = replay.lookup(calls, key)
    if run is None:
        plan = make_plan(q, k, v, score_graph=score_graph, mask_graph=mask_graph, block_mask=block_mask,
                         scale=scale, kernel_options=kernel_options, dropout_p=dropout_p,
                         dropout_seed=dropout_seed)
        from .decode import use_decode
        kinds = ("decode" if use_decode(plan, q, v) else "fwd",) + (("bwd",) if needs_grad else ())
        routed = tiered.route(plan, kinds, block_mask, q)
        if calls is not None and routed is plan:  # tiering settled: the same plan every call
            run = _CachedCall(plan, kinds, score_graph, mask_graph)
            replay.store(calls, key, run)
        else:
            run = _Planned(routed)
    if needs_grad:
        return _FlexTriton.apply(run, mask_bufs, q, k, v, *score_bufs)
    return run.forward(q, k, v, score_bufs, mask_bufs)
