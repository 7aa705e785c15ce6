"""A library of named mask_mods, with no implicit alignment.

Every builder returns a plain traceable ``mask_mod(b, h, q_idx, kv_idx) -> bool`` whose
``__name__`` says what it is (``causal_bottom_right``, ``sliding_window_128_0``, ...), so
the printed IR and the cache are readable. Combine them with `flexattn.and_masks` /
`flexattn.or_masks` and pass them to `flexattn.create_block_mask`.

Alignment
---------
When the query and key lengths differ, "causal" can mean two things, and every builder that
depends on the diagonal takes ``align``:

* ``"top_left"`` (default): the diagonal starts at (0, 0); query ``i`` sees keys ``j <= i``.
* ``"bottom_right"``: the diagonal ends at (Q_LEN-1, KV_LEN-1); query ``i`` sees keys
  ``j <= i + (KV_LEN - Q_LEN)`` - the convention of FlashAttention >= 2.1, xFormers'
  ``...FromBottomRight`` biases and decoding with a KV cache. It needs the lengths, so these
  builders take ``q_len=`` and ``kv_len=`` and raise if they are missing.

For one (b, h, q_idx, kv_idx), every builder here keeps the key iff the formula in its
docstring holds; ``d = kv_idx - q_idx - offset`` with ``offset = 0`` (top_left) or
``KV_LEN - Q_LEN`` (bottom_right) is the (aligned) distance along the diagonal.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .trace import check_arity

__all__ = [
    "causal", "sliding_window", "band", "prefix_lm", "document", "dilated_sliding_window",
    "chunked", "full", "padding", "doc_ids_from_cu_seqlens", "alignment_offset",
    "noop_mask", "and_masks", "or_masks",
]

MaskMod = Callable


def _named(fn, name: str, doc: str | None = None):
    fn.__name__ = name
    fn.__qualname__ = name
    if doc:
        fn.__doc__ = doc
    return fn


def alignment_offset(align: str, q_len: Optional[int], kv_len: Optional[int], builder: str) -> int:
    """The diagonal's offset: 0 for "top_left", KV_LEN - Q_LEN for "bottom_right"."""
    if align == "top_left":
        return 0
    if align == "bottom_right":
        if q_len is None or kv_len is None:
            raise ValueError(
                f"{builder}(align='bottom_right') needs the sequence lengths to place the diagonal: "
                f"pass q_len= and kv_len= (got q_len={q_len!r}, kv_len={kv_len!r}), "
                f"or use align='top_left'")
        return int(kv_len) - int(q_len)
    raise ValueError(f"{builder}: align must be 'top_left' or 'bottom_right', got {align!r}")


def _align_suffix(align: str) -> str:
    return "" if align == "top_left" else "_bottom_right"


def _check_int(name: str, value, builder: str, *, allow_none: bool = False, minimum: int | None = None):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{builder}: {name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{builder}: {name} must be >= {minimum}, got {value}")
    return value


def full() -> MaskMod:
    """Keep everything (no mask)."""
    def full_mask(b, h, q_idx, kv_idx):
        return q_idx >= 0
    return _named(full_mask, "full")


def causal(align: str = "top_left", *, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Causal mask: keep iff ``kv_idx <= q_idx + offset`` (offset 0 for top_left,
    ``kv_len - q_len`` for bottom_right, which needs ``q_len`` and ``kv_len``)."""
    off = alignment_offset(align, q_len, kv_len, "causal")
    if off == 0:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx
    return _named(causal_mask, "causal" + _align_suffix(align))


def sliding_window(left: Optional[int], right: Optional[int] = 0, *, align: str = "top_left",
                   q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Sliding window: keep iff ``-left <= kv_idx - q_idx - offset <= right``.

    ``left`` keys before the (aligned) diagonal and ``right`` keys after it are kept; None
    means unbounded on that side. ``sliding_window(w - 1, 0)`` is causal attention to the
    last ``w`` tokens (Mistral's window ``w``). Negative values shift the band off the
    diagonal (``left + right >= 0`` is required, else the band is empty).
    """
    _check_int("left", left, "sliding_window", allow_none=True)
    _check_int("right", right, "sliding_window", allow_none=True)
    if left is not None and right is not None and left + right < 0:
        raise ValueError(f"sliding_window: the band [-left, right] = [{-left}, {right}] is empty "
                         f"(left + right = {left + right} < 0); make left + right >= 0")
    off = alignment_offset(align, q_len, kv_len, "sliding_window")
    return _band(left, right, off, f"sliding_window_{_fmt(left)}_{_fmt(right)}{_align_suffix(align)}")


def band(pre_tokens: Optional[int], next_tokens: Optional[int], *, align: str = "top_left",
         q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """MindSpore / Ascend style band: keep iff ``-pre_tokens <= kv_idx - q_idx - offset <= next_tokens``.

    The same mask as ``sliding_window(pre_tokens, next_tokens)``, under the names MindSpore
    uses (``pre_tokens`` keys before the diagonal, ``next_tokens`` after it)."""
    _check_int("pre_tokens", pre_tokens, "band", allow_none=True)
    _check_int("next_tokens", next_tokens, "band", allow_none=True)
    if pre_tokens is not None and next_tokens is not None and pre_tokens + next_tokens < 0:
        raise ValueError(f"band: pre_tokens + next_tokens = {pre_tokens + next_tokens} < 0 leaves no key "
                         f"for any query; make pre_tokens + next_tokens >= 0")
    off = alignment_offset(align, q_len, kv_len, "band")
    return _band(pre_tokens, next_tokens, off, f"band_{_fmt(pre_tokens)}_{_fmt(next_tokens)}{_align_suffix(align)}")


def _fmt(v) -> str:
    return "inf" if v is None else (str(v) if v >= 0 else f"m{-v}")


def _band(left, right, off, name):
    if left is None and right is None:
        def band_mask(b, h, q_idx, kv_idx):
            return q_idx >= 0
    elif left is None:
        def band_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + (off + right)
    elif right is None:
        def band_mask(b, h, q_idx, kv_idx):
            return kv_idx >= q_idx + (off - left)
    else:
        def band_mask(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx + (off - left)) & (kv_idx <= q_idx + (off + right))
    return _named(band_mask, name)


def dilated_sliding_window(left: Optional[int], right: Optional[int] = 0, dilation: int = 2, *,
                           align: str = "top_left", q_len: Optional[int] = None,
                           kv_len: Optional[int] = None) -> MaskMod:
    """Dilated sliding window: keep iff ``-left <= d <= right`` and ``d % dilation == 0``,
    ``d = kv_idx - q_idx - offset`` (every ``dilation``-th key of the window, the diagonal
    included)."""
    _check_int("dilation", dilation, "dilated_sliding_window", minimum=1)
    window = sliding_window(left, right, align=align, q_len=q_len, kv_len=kv_len)
    off = alignment_offset(align, q_len, kv_len, "dilated_sliding_window")

    def dilated_sliding_window_mask(b, h, q_idx, kv_idx):
        d = kv_idx - q_idx if off == 0 else kv_idx - q_idx - off
        return window(b, h, q_idx, kv_idx) & (d % dilation == 0)
    return _named(dilated_sliding_window_mask,
                  f"dilated_sliding_window_{_fmt(left)}_{_fmt(right)}_d{dilation}{_align_suffix(align)}")


def chunked(chunk_size: int) -> MaskMod:
    """Chunked (block-local) attention: keep iff ``q_idx // chunk_size == kv_idx // chunk_size``.

    Llama-4-style chunked causal attention is ``and_masks(causal(), chunked(n))``."""
    _check_int("chunk_size", chunk_size, "chunked", minimum=1)

    def chunked_mask(b, h, q_idx, kv_idx):
        return (q_idx // chunk_size) == (kv_idx // chunk_size)
    return _named(chunked_mask, f"chunked_{chunk_size}")


def prefix_lm(prefix_len: Union[int, torch.Tensor], align: str = "top_left", *,
              q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Prefix-LM: keep iff ``kv_idx < prefix_len[b]`` or ``kv_idx <= q_idx + offset``.

    ``prefix_len`` is an int (every batch element) or an integer tensor of shape ``[B]``
    (captured: new values in the same tensor never recompile)."""
    causal_part = causal(align, q_len=q_len, kv_len=kv_len)
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.dtype.is_floating_point or prefix_len.dtype == torch.bool:
            raise ValueError(f"prefix_lm: prefix_len must be an int or an integer tensor of shape [B], "
                             f"got a {prefix_len.dtype} tensor of shape {tuple(prefix_len.shape)}")
        plen = prefix_len

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < plen[b]) | causal_part(b, h, q_idx, kv_idx)
    else:
        _check_int("prefix_len", prefix_len, "prefix_lm", minimum=0)

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix_len) | causal_part(b, h, q_idx, kv_idx)
    return _named(prefix_lm_mask, "prefix_lm" + _align_suffix(align))


def padding(kv_lens: torch.Tensor, q_lens: Optional[torch.Tensor] = None) -> MaskMod:
    """Key (and optionally query) padding: keep iff ``kv_idx < kv_lens[b]`` (and ``q_idx < q_lens[b]``)."""
    for name, t in (("kv_lens", kv_lens), ("q_lens", q_lens)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1):
            raise ValueError(f"padding: {name} must be an integer tensor of shape [B], got {t!r}")
    if q_lens is None:
        def padding_mask(b, h, q_idx, kv_idx):
            return kv_idx < kv_lens[b]
    else:
        def padding_mask(b, h, q_idx, kv_idx):
            return (kv_idx < kv_lens[b]) & (q_idx < q_lens[b])
    return _named(padding_mask, "padding")


# ---------------------------------------------------------------------------------------
# Documents (packed sequences)

def doc_ids_from_cu_seqlens(cu_seqlens, total: Optional[int] = None, fill: int = -1,
                            device=None) -> torch.Tensor:
    """``[cu[-1]]`` (or ``[total]``) int32 tensor: position -> its document; ``fill`` past the end.

    ``cu_seqlens`` is ``[0, end_0, end_1, ...]`` (FlashAttention's varlen convention)."""
    cu = _as_cu(cu_seqlens, "cu_seqlens")
    n = int(cu[-1]) if total is None else int(total)
    if n < int(cu[-1]):
        raise ValueError(f"total={n} is shorter than cu_seqlens[-1]={int(cu[-1])}")
    lens = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), lens)
    if n > len(ids):
        ids = torch.cat([ids, torch.full((n - len(ids),), fill, dtype=torch.int32)])
    return ids.to(device if device is not None else (cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else "cpu"))


def _as_cu(cu, name) -> torch.Tensor:
    t = torch.as_tensor(cu).detach().to("cpu", torch.int64).reshape(-1)
    if t.numel() < 1:
        raise ValueError(f"{name} must hold at least one entry (0), got {cu!r}")
    if int(t[0]) != 0:
        raise ValueError(f"{name} must start at 0 (cumulative sequence lengths [0, len_0, len_0+len_1, ...]), "
                         f"got {t.tolist()[:8]}")
    if (t[1:] < t[:-1]).any():
        raise ValueError(f"{name} must be non-decreasing, got {t.tolist()[:16]}")
    return t


def _runs(ids: torch.Tensor):
    """(start of the run each position is in, length of the document of each position) for
    an int tensor [..., L] of document ids (documents are contiguous runs)."""
    L = ids.shape[-1]
    pos = torch.arange(L, device=ids.device).expand_as(ids)
    new = torch.ones_like(ids, dtype=torch.bool)
    if L > 1:
        new[..., 1:] = ids[..., 1:] != ids[..., :-1]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(-1).values
    return start


def _doc_lengths(ids: torch.Tensor, num_docs: int) -> torch.Tensor:
    """[..., num_docs] count of each (non-negative) id along the last dim."""
    flat = ids.reshape(-1, ids.shape[-1]).long()
    out = torch.zeros(flat.shape[0], num_docs + 1, dtype=torch.int64, device=ids.device)
    safe = torch.where(flat >= 0, flat, torch.full_like(flat, num_docs))
    out.scatter_add_(1, safe, torch.ones_like(safe))
    return out[:, :num_docs].reshape(*ids.shape[:-1], num_docs)


def document(doc_ids: Optional[torch.Tensor] = None, *, cu_seqlens=None, kv_doc_ids: Optional[torch.Tensor] = None,
             cu_seqlens_kv=None, inner: Optional[MaskMod] = None, align: str = "top_left",
             q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Document (packed-sequence) mask: keep iff the query and key are in the same document
    and ``inner(b, h, q_local, kv_local)`` holds.

    Give the documents either as ``doc_ids`` (an integer tensor ``[L]`` or ``[B, L]``,
    documents are contiguous runs of equal ids, negative ids never match) or as
    ``cu_seqlens`` (``[0, end_0, end_1, ...]``). Keys may be split differently from queries
    (cross attention, KV caches): pass ``kv_doc_ids`` or ``cu_seqlens_kv``; document ``d``
    of the queries matches document ``d`` of the keys.

    ``inner`` sees positions local to the document: ``kv_local = kv_idx - start_kv(d)`` and
    ``q_local = q_idx - start_q(d)`` for ``align="top_left"``, or
    ``q_local = q_idx - start_q(d) + (len_kv(d) - len_q(d))`` for ``align="bottom_right"``
    (each document's diagonal ends at its own last key). So ``inner=causal()`` is causal
    within each document, with the chosen alignment; ``inner=None`` keeps the whole document.

    ``q_len`` / ``kv_len`` pad the captured id tensors (with non-matching ids) when the mask
    will be evaluated past the last document.
    """
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"document: align must be 'top_left' or 'bottom_right', got {align!r}")
    if (doc_ids is None) == (cu_seqlens is None):
        raise ValueError("document: give exactly one of doc_ids= (a tensor of document ids per position) "
                         "and cu_seqlens= (cumulative lengths [0, end_0, end_1, ...])")
    if kv_doc_ids is not None and cu_seqlens_kv is not None:
        raise ValueError("document: give at most one of kv_doc_ids= and cu_seqlens_kv=")
    if cu_seqlens is not None:
        if kv_doc_ids is not None:
            raise ValueError("document: with cu_seqlens= give the keys' split as cu_seqlens_kv=, not kv_doc_ids=")
        q_ids = doc_ids_from_cu_seqlens(cu_seqlens, q_len, fill=-1)
        kv_ids = doc_ids_from_cu_seqlens(cu_seqlens if cu_seqlens_kv is None else cu_seqlens_kv,
                                         kv_len, fill=-2)
        n_q, n_kv = len(_as_cu(cu_seqlens, "cu_seqlens")) - 1, len(_as_cu(
            cu_seqlens if cu_seqlens_kv is None else cu_seqlens_kv, "cu_seqlens_kv")) - 1
        if n_q != n_kv:
            raise ValueError(f"document: cu_seqlens has {n_q} documents but cu_seqlens_kv has {n_kv}; "
                             f"they must describe the same documents")
    else:
        if cu_seqlens_kv is not None:
            raise ValueError("document: with doc_ids= give the keys' split as kv_doc_ids=, not cu_seqlens_kv=")
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() not in (1, 2) or \
                doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"document: doc_ids must be an integer tensor of shape [L] or [B, L], got "
                             f"{doc_ids.dtype if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__}"
                             f"{' of shape ' + str(tuple(doc_ids.shape)) if isinstance(doc_ids, torch.Tensor) else ''}")
        q_ids = _pad_ids(doc_ids.to(torch.int32), q_len, -1)
        kv_ids = q_ids if kv_doc_ids is None else _pad_ids(kv_doc_ids.to(torch.int32), kv_len, -2)
        if kv_doc_ids is None and kv_len is not None and kv_len > q_ids.shape[-1]:
            kv_ids = _pad_ids(doc_ids.to(torch.int32), kv_len, -2)
        if q_ids.dim() != kv_ids.dim():
            raise ValueError(f"document: doc_ids has shape {tuple(q_ids.shape)} but kv_doc_ids has shape "
                             f"{tuple(kv_ids.shape)}: both [L] or both [B, L]")
    batched = q_ids.dim() == 2
    name = "document" if inner is None else f"document_{getattr(inner, '__name__', 'inner')}"
    name += _align_suffix(align)

    if inner is None:
        if batched:
            def document_mask(b, h, q_idx, kv_idx):
                return q_ids[b, q_idx] == kv_ids[b, kv_idx]
        else:
            def document_mask(b, h, q_idx, kv_idx):
                return q_ids[q_idx] == kv_ids[kv_idx]
        return _named(document_mask, name)

    # Local coordinates: q_local = q_idx - q_base[q_idx], kv_local = kv_idx - kv_start[kv_idx].
    q_start = _runs(q_ids)
    kv_start = _runs(kv_ids)
    q_base = q_start
    if align == "bottom_right":
        num_docs = int(max(int(q_ids.max()) if q_ids.numel() else -1,
                           int(kv_ids.max()) if kv_ids.numel() else -1)) + 1
        q_len_d = _doc_lengths(q_ids, num_docs)
        kv_len_d = _doc_lengths(kv_ids, num_docs)
        shift_d = kv_len_d - q_len_d  # [..., num_docs]
        safe = q_ids.long().clamp(min=0)
        shift = torch.gather(shift_d, -1, safe) if num_docs else torch.zeros_like(safe)
        q_base = q_start - torch.where(q_ids >= 0, shift, torch.zeros_like(shift))
    q_base = q_base.to(torch.int32)
    kv_start = kv_start.to(torch.int32)
    if batched:
        def document_mask(b, h, q_idx, kv_idx):
            same = q_ids[b, q_idx] == kv_ids[b, kv_idx]
            return same & inner(b, h, q_idx - q_base[b, q_idx], kv_idx - kv_start[b, kv_idx])
    else:
        def document_mask(b, h, q_idx, kv_idx):
            same = q_ids[q_idx] == kv_ids[kv_idx]
            return same & inner(b, h, q_idx - q_base[q_idx], kv_idx - kv_start[kv_idx])
    return _named(document_mask, name)


def _pad_ids(ids: torch.Tensor, length: Optional[int], fill: int) -> torch.Tensor:
    if length is None or length <= ids.shape[-1]:
        return ids
    pad = torch.full((*ids.shape[:-1], length - ids.shape[-1]), fill, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, pad], dim=-1)


# ---------------------------------------------------------------------------------------
# Combinators (traceable: they only use & and |)

def noop_mask(b, h, q_idx, kv_idx):
    """Attend everywhere."""
    return torch.ones_like(q_idx, dtype=torch.bool)


def and_masks(*mask_mods: Callable) -> Callable:
    """The mask_mod that is true where every one of `mask_mods` is true."""
    _check_mods(mask_mods, "and_masks")

    def and_mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    and_mask.__name__ = "and_masks(" + ", ".join(getattr(m, "__name__", "?") for m in mask_mods) + ")"
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """The mask_mod that is true where at least one of `mask_mods` is true."""
    _check_mods(mask_mods, "or_masks")

    def or_mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    or_mask.__name__ = "or_masks(" + ", ".join(getattr(m, "__name__", "?") for m in mask_mods) + ")"
    return or_mask


def _check_mods(mods, fn):
    if not mods:
        raise TypeError(f"{fn}() needs at least one mask_mod, got none")
    for i, m in enumerate(mods):
        check_arity(m, "mask", f"{fn} argument {i}")
