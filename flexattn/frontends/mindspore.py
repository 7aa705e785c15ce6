"""A MindSpore-style front end: ``flash_attention_score`` (Ascend FlashAttentionScore semantics).

    from flexattn.frontends.mindspore import flash_attention_score
    out = flash_attention_score(q, k, v, head_num=8, input_layout="BSH", sparse_mode=2,
                                scalar_value=1 / 8)

Semantics (``mindspore.ops.flash_attention_score``)::

    attention_out = Dropout(Softmax(Mask(scale * (query @ key^T) + pse, atten_mask)), keep_prob) @ value

with ``scale = scalar_value`` and ``pse = real_shift``, added *after* scaling.

Layouts (``input_layout``): ``BSH`` ``[B, S, N*D]``, ``BNSD``, ``SBH`` ``[S, B, N*D]``,
``BSND`` and ``TND`` ``[T, N, D]`` (packed variable-length sequences, described by
``actual_seq_qlen`` / ``actual_seq_kvlen``: cumulative end offsets such as ``[2, 5, 9]``).
The output has the query's layout and dtype. GQA: key/value may have N2 heads with N2
dividing N1 = ``head_num``.

Masks - ``attn_mask`` is bool/uint8 with **1/True = discard** (the opposite of torch):

===========  ==================================================================================
sparse_mode  mask
===========  ==================================================================================
0            band ``-pre_tokens <= kv - q <= next_tokens`` (top-left origin; the defaults keep
             everything), AND ``attn_mask`` if given (``[S1, S2]``, ``[B, 1, S1, S2]`` or
             ``[B, N1, S1, S2]``)
1            ``attn_mask`` only (required); pre/next_tokens ignored
2            causal, top-left aligned (``kv <= q``)
3            causal, bottom-right aligned (``kv <= q + S2 - S1``)
4            band with bottom-right origin: ``-pre_tokens <= kv - q - (S2 - S1) <= next_tokens``
5            prefix: ``kv <= q + S2 - S1`` or ``kv < prefix[b]`` (``prefix``: B ints),
             AND ``attn_mask`` if given
6, 7, 8      raise NotImplementedError (as MindSpore, which reserves them)
===========  ==================================================================================

For modes 2, 3 and 4 MindSpore expects ``attn_mask`` to be the *compressed* ``[2048, 2048]``
lower-triangular matrix, an optimisation hint for its kernel; here the mode alone defines the
mask, so it may be omitted; if given, its shape is checked and its contents are not used.
With TND, every mode applies inside each packed sequence (mode 5 is not supported, as in
MindSpore).

``real_shift`` (pse): ``[B, N1, S1, S2]`` or ``[1, N1, S1, S2]``; or the compressed ALiBi form
``[B or 1, N1, 1024, S2]`` for ``S1 > 1024``, holding the *last* 1024 rows: a bias that
depends only on ``kv - q`` (ALiBi), so row ``q < S1 - 1024`` is read from row 0 shifted by
``S1 - 1024 - q`` columns.

Dropout: ``keep_prob`` in (0, 1]. With ``drop_mask`` (uint8 ``[B, N1, S1, S2 // 8]``, bit-packed,
bit ``k`` of byte ``j`` (least significant first) = keep flag of key ``8 j + k``) that exact
pattern is applied: ``P * mask / keep_prob``. It is computed with two calls of flexattn's
kernels: the full softmax normaliser ``lse`` and the attention restricted to the kept keys
(``out_kept``, ``lse_kept``, the keep pattern a captured-tensor mask_mod); then
``out = out_kept * exp(lse_kept - lse) / keep_prob``, which is exactly the dropped-out
attention, differentiable through both calls. Without ``drop_mask``, ``keep_prob < 1`` uses
flexattn's in-kernel dropout with ``p = 1 - keep_prob``.

Not supported (raise): ``padding_mask`` (reserved by MindSpore), ``real_shift`` and
``drop_mask`` with the TND layout.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import masks as _masks

__all__ = ["flash_attention_score", "LAYOUTS"]

LAYOUTS = ("BSH", "BNSD", "SBH", "BSND", "TND")
INT_MAX = 2147483647
BLOCK_SIZE = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _err(msg):
    return ValueError(f"flash_attention_score: {msg}")


# ---------------------------------------------------------------------------------------
# Layouts

def _to_bnsd(x: torch.Tensor, layout: str, heads: Optional[int], name: str, D: Optional[int] = None):
    """x in `layout` -> [B, N, S, D]; `heads` known (query) or derived from D (key/value)."""
    expect_dim = 3 if layout in ("BSH", "SBH", "TND") else 4
    if x.dim() != expect_dim:
        shapes = {"BSH": "(B, S, H)", "SBH": "(S, B, H)", "BNSD": "(B, N, S, D)", "BSND": "(B, S, N, D)",
                  "TND": "(T, N, D)"}
        raise _err(f"{name} must be {expect_dim}-D {shapes[layout]} for input_layout={layout!r}, "
                   f"got shape {tuple(x.shape)}")
    if layout in ("BSH", "SBH"):
        if layout == "SBH":
            x = x.transpose(0, 1)
        Bx, S, H = x.shape
        if heads is None:
            if H % D:
                raise _err(f"{name}'s hidden size {H} is not a multiple of the head size D={D}")
            heads = H // D
        elif H % heads:
            raise _err(f"query's hidden size H1={H} is not divisible by head_num={heads}")
        return x.reshape(Bx, S, heads, H // heads).transpose(1, 2)
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    return x.transpose(0, 1).unsqueeze(0)  # TND -> [1, N, T, D]


def _from_bnsd(out: torch.Tensor, layout: str):
    B, N, S, D = out.shape
    if layout == "BSH":
        return out.transpose(1, 2).reshape(B, S, N * D)
    if layout == "SBH":
        return out.permute(2, 0, 1, 3).reshape(S, B, N * D)
    if layout == "BNSD":
        return out
    if layout == "BSND":
        return out.transpose(1, 2)
    return out[0].transpose(0, 1)  # TND


def _cumulative(x, name, total):
    if x is None:
        raise _err(f"input_layout='TND' needs {name} (cumulative end offsets of the packed sequences, e.g. "
                   f"[2, 5, 9])")
    t = torch.as_tensor(x).detach().to("cpu", torch.int64).reshape(-1)
    if t.numel() == 0 or (t[1:] < t[:-1]).any() or int(t[0]) < 0:
        raise _err(f"{name} must be non-decreasing non-negative cumulative lengths, got {t.tolist()}")
    if int(t[-1]) != total:
        raise _err(f"the last value of {name} must equal the packed length {total}, got {int(t[-1])}")
    return [0] + t.tolist()


# ---------------------------------------------------------------------------------------

def _bound(tokens: int, name: str, limit: int) -> Optional[int]:
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"flash_attention_score: {name} must be an int, got {type(tokens).__name__}")
    return None if tokens >= limit else int(tokens)


def _check_band(pre, nxt, S1, S2):
    if pre < 0 and nxt < 0:
        raise _err(f"pre_tokens={pre} and next_tokens={nxt} are both negative: the band is empty")
    if pre + nxt < 0:
        raise _err(f"pre_tokens + next_tokens must be >= 0 (got {pre} + {nxt}): with a negative next_tokens, "
                   f"pre_tokens must be >= |next_tokens|, and with a negative pre_tokens, next_tokens must be "
                   f">= |pre_tokens|")
    if nxt < 0 and -nxt >= S2:
        raise _err(f"|next_tokens|={-nxt} must be < S2={S2}")
    if pre < 0 and -pre >= S1:
        raise _err(f"|pre_tokens|={-pre} must be < S1={S1}")


def _keep_mask_mod(attn_mask: torch.Tensor, B: int, N1: int, S1: int, S2: int, compressed_ok: bool):
    """attn_mask (1 = discard) -> mask_mod keeping attn_mask == 0, or None for the compressed form."""
    if attn_mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"flash_attention_score: attn_mask must be bool or uint8 (1/True = discard), "
                        f"got {attn_mask.dtype}")
    shape = tuple(attn_mask.shape)
    if compressed_ok and shape == (2048, 2048):
        return None
    allowed = [(S1, S2), (B, 1, S1, S2), (B, N1, S1, S2)]
    if shape not in allowed:
        extra = " or the compressed (2048, 2048)" if compressed_ok else ""
        raise _err(f"attn_mask must have shape (S1, S2), (B, 1, S1, S2) or (B, N1, S1, S2) = {allowed}{extra}, "
                   f"got {shape}")
    keep = (attn_mask == 0)
    if keep.dim() == 2:
        def attn_mask_keep(b, h, q_idx, kv_idx):
            return keep[q_idx, kv_idx]
    elif keep.shape[1] == 1:
        def attn_mask_keep(b, h, q_idx, kv_idx):
            return keep[b, 0, q_idx, kv_idx]
    else:
        def attn_mask_keep(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx, kv_idx]
    return _masks._named(attn_mask_keep, "attn_mask")


def _real_shift_mod(rs: torch.Tensor, B, N1, S1, S2, device):
    if not isinstance(rs, torch.Tensor) or not rs.dtype.is_floating_point:
        raise TypeError(f"flash_attention_score: real_shift must be a float tensor, got "
                        f"{rs.dtype if isinstance(rs, torch.Tensor) else type(rs).__name__}")
    shape = tuple(rs.shape)
    if rs.dim() != 4 or shape[0] not in (1, B) or shape[1] != N1 or shape[3] != S2 or \
            shape[2] not in ((S1, 1024) if S1 > 1024 else (S1,)):
        rows = f"S1={S1}" + (" or 1024 (compressed ALiBi form)" if S1 > 1024 else "")
        raise _err(f"real_shift must have shape (B, N1, S1, S2) or (1, N1, S1, S2) = ({B} or 1, {N1}, {rows}, {S2}), "
                   f"got {shape}")
    rs = rs.to(device)
    bb = shape[0] > 1
    if shape[2] == S1:
        def real_shift(score, b, h, q_idx, kv_idx):
            return score + rs[b if bb else 0, h, q_idx, kv_idx]
        return _masks._named(real_shift, "real_shift")
    first = S1 - 1024  # the stored rows are S1-1024 .. S1-1

    def real_shift_alibi(score, b, h, q_idx, kv_idx):
        row = torch.clamp(q_idx - first, min=0)
        col = torch.clamp(kv_idx + torch.clamp(first - q_idx, min=0), max=S2 - 1)
        return score + rs[b if bb else 0, h, row, col]
    return _masks._named(real_shift_alibi, "real_shift_alibi_compressed")


def _unpack_drop_mask(drop_mask: torch.Tensor, B, N1, S1, S2):
    if drop_mask.dtype != torch.uint8:
        raise TypeError(f"flash_attention_score: drop_mask must be uint8 (bit-packed), got {drop_mask.dtype}")
    if S2 % 8:
        raise _err(f"drop_mask needs S2 to be a multiple of 8, got S2={S2}")
    if tuple(drop_mask.shape) != (B, N1, S1, S2 // 8):
        raise _err(f"drop_mask must have shape (B, N1, S1, S2 // 8) = {(B, N1, S1, S2 // 8)}, got "
                   f"{tuple(drop_mask.shape)}")
    bits = torch.arange(8, device=drop_mask.device, dtype=torch.uint8)
    keep = ((drop_mask.unsqueeze(-1) >> bits) & 1).bool()
    return keep.reshape(B, N1, S1, S2)


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                          keep_prob=1.0, scalar_value=1.0, pre_tokens=INT_MAX, next_tokens=INT_MAX,
                          inner_precise=0, input_layout="BSH", sparse_mode=0):
    """FlashAttentionScore: see the module docstring for every argument. Returns attention_out
    (the query's shape, layout and dtype). Differentiable w.r.t. query, key, value and real_shift."""
    from ..attention import flex_attention
    from ..build_mask import create_block_mask
    from ..masks import and_masks
    from ..varlen import create_varlen_block_mask, varlen_mask_mod

    # ---- arguments -----------------------------------------------------------------
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention_score: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"flash_attention_score: {name} must be float16 or bfloat16 (float32 accepted too), "
                            f"got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"flash_attention_score: query, key and value must have the same dtype, got "
                        f"{query.dtype}, {key.dtype} and {value.dtype}")
    if not isinstance(input_layout, str) or input_layout not in LAYOUTS:
        raise _err(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")
    if isinstance(head_num, bool) or not isinstance(head_num, int) or head_num <= 0:
        raise _err(f"head_num must be a positive int, got {head_num!r}")
    if isinstance(sparse_mode, bool) or not isinstance(sparse_mode, int):
        raise TypeError(f"flash_attention_score: sparse_mode must be an int, got {type(sparse_mode).__name__}")
    if sparse_mode in (6, 7, 8):
        raise NotImplementedError(f"flash_attention_score: sparse_mode={sparse_mode} is reserved and not supported "
                                  f"(as in MindSpore); use 0-5")
    if not 0 <= sparse_mode <= 5:
        raise _err(f"sparse_mode must be in 0..8 (6-8 not supported), got {sparse_mode}")
    if inner_precise not in (0, 1, 2, 3):
        raise _err(f"inner_precise must be 0, 1, 2 or 3, got {inner_precise!r}")
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)) or not 0.0 < keep_prob <= 1.0:
        raise _err(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    if padding_mask is not None:
        raise NotImplementedError("flash_attention_score: padding_mask is a reserved parameter (not implemented "
                                  "in MindSpore either); pass None")
    if drop_mask is not None and keep_prob == 1.0:
        raise _err("drop_mask must be None when keep_prob is 1.0")
    if isinstance(scalar_value, bool) or not isinstance(scalar_value, (int, float)):
        raise TypeError(f"flash_attention_score: scalar_value must be a float, got {type(scalar_value).__name__}")
    tnd = input_layout == "TND"
    if not tnd and (actual_seq_qlen is not None or actual_seq_kvlen is not None):
        raise _err(f"actual_seq_qlen / actual_seq_kvlen are only used with input_layout='TND', got "
                   f"input_layout={input_layout!r}")

    # ---- layouts -------------------------------------------------------------------
    q = _to_bnsd(query, input_layout, head_num, "query")
    B, N1, S1, D = q.shape
    if input_layout in ("BNSD", "BSND", "TND") and N1 != head_num:
        raise _err(f"head_num={head_num} but query has N1={N1} heads (shape {tuple(query.shape)})")
    k = _to_bnsd(key, input_layout, None, "key", D)
    v = _to_bnsd(value, input_layout, None, "value", D)
    if key.shape != value.shape:
        raise _err(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if k.shape[0] != B:
        raise _err(f"query and key must have the same batch size, got {B} and {k.shape[0]}")
    if k.shape[3] != D:
        raise _err(f"query and key must have the same head size D, got {D} and {k.shape[3]}")
    N2, S2 = k.shape[1], k.shape[2]
    if N1 % N2:
        raise _err(f"the number of key/value heads N2={N2} must divide head_num N1={N1}")

    # ---- mask ----------------------------------------------------------------------
    limit_pre, limit_next = S1 + S2 + 1, S1 + S2 + 1
    pre = _bound(pre_tokens, "pre_tokens", limit_pre)
    nxt = _bound(next_tokens, "next_tokens", limit_next)
    if sparse_mode in (0, 4):
        _check_band(pre_tokens, next_tokens, S1, S2)
    extra = []  # tensor mask_mods ANDed with the structural mask
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"flash_attention_score: attn_mask must be a Tensor, got {type(attn_mask).__name__}")
        m = _keep_mask_mod(attn_mask.to(q.device), B, N1, S1, S2, compressed_ok=sparse_mode in (2, 3, 4))
        if m is not None:
            if sparse_mode in (2, 3, 4):
                raise _err(f"sparse_mode={sparse_mode} takes the compressed (2048, 2048) attn_mask (or none), "
                           f"got shape {tuple(attn_mask.shape)}")
            extra.append(m)
    elif sparse_mode == 1:
        raise _err("sparse_mode=1 (allMask) needs the full attn_mask")

    causal, window, align = False, None, "top_left"
    if sparse_mode == 0:
        window = (pre, nxt) if (pre is not None or nxt is not None) else None
    elif sparse_mode == 2:
        causal = True
    elif sparse_mode == 3:
        causal, align = True, "bottom_right"
    elif sparse_mode == 4:
        window, align = (pre, nxt), "bottom_right"
    elif sparse_mode == 5:
        if tnd:
            raise _err("sparse_mode=5 (prefix) is not supported with input_layout='TND'")
        if prefix is None:
            raise _err("sparse_mode=5 needs prefix (one int per batch)")
        pf = torch.as_tensor(prefix).reshape(-1).to(device=q.device, dtype=torch.int64)
        if pf.numel() != B:
            raise _err(f"prefix must hold B={B} values, got {pf.numel()}")
        extra.append(_masks.prefix_lm(pf, "bottom_right", q_len=S1, kv_len=S2))

    if tnd:
        cu_q = _cumulative(actual_seq_qlen, "actual_seq_qlen", S1)
        cu_k = _cumulative(actual_seq_kvlen, "actual_seq_kvlen", S2)
        if len(cu_q) != len(cu_k):
            raise _err(f"actual_seq_qlen has {len(cu_q) - 1} sequences but actual_seq_kvlen {len(cu_k) - 1}")
        if real_shift is not None or drop_mask is not None:
            raise NotImplementedError("flash_attention_score: real_shift and drop_mask are not supported with "
                                      "input_layout='TND'")
    else:
        cu_q, cu_k = [0, S1], [0, S2]

    score_mod = None
    if real_shift is not None:
        score_mod = _real_shift_mod(real_shift, B, N1, S1, S2, q.device)

    def block_mask_for(extra_mods):
        if sparse_mode == 5:  # the prefix mask replaces the causal structure
            base = None
        else:
            base = varlen_mask_mod(cu_q, cu_k, causal=causal, window=window, align=align, Q_LEN=S1, KV_LEN=S2,
                                   device=q.device)
        if not extra_mods:
            return create_varlen_block_mask(cu_q, cu_k, causal=causal, window=window, align=align,
                                            Q_LEN=S1, KV_LEN=S2, BLOCK_SIZE=BLOCK_SIZE, device=q.device)
        mods_ = ([base] if base is not None else []) + list(extra_mods)
        mm = mods_[0] if len(mods_) == 1 else and_masks(*mods_)
        return create_block_mask(mm, B, N1, S1, S2, device=q.device, BLOCK_SIZE=BLOCK_SIZE)

    block_mask = block_mask_for(extra)
    gqa = N1 != N2
    scale = float(scalar_value)

    if drop_mask is None:
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                             dropout_p=1.0 - float(keep_prob))
    else:
        keep = _unpack_drop_mask(drop_mask.to(q.device), B, N1, S1, S2)

        def drop_mask_keep(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx, kv_idx]
        kept_mask = block_mask_for(extra + [drop_mask_keep])
        _, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=gqa, return_lse=True)
        out_kept, lse_kept = flex_attention(q, k, v, score_mod=score_mod, block_mask=kept_mask, scale=scale,
                                            enable_gqa=gqa, return_lse=True)
        # out_kept is normalised over the kept keys: rescale to the full normaliser, then 1/keep_prob.
        ratio = torch.where(torch.isinf(lse_kept), torch.zeros_like(lse_kept), torch.exp(lse_kept - lse))
        out = (out_kept.float() * ratio.unsqueeze(-1).float() / float(keep_prob)).to(q.dtype)
    return _from_bnsd(out, input_layout)
