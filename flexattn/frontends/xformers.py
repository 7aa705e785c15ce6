"""An xFormers-style front end: ``memory_efficient_attention`` and the ``attn_bias`` classes.

    from flexattn.frontends.xformers import memory_efficient_attention, BlockDiagonalMask

    attn_bias, x = BlockDiagonalMask.from_tensor_list([x0, x1, x2])   # pack 3 sequences
    out = memory_efficient_attention(q, k, v, attn_bias=attn_bias.make_causal())

Semantics follow ``xformers.ops.memory_efficient_attention`` (fmha):

    scores = query @ key^T * scale + attn_bias     (scale defaults to 1 / sqrt(K))
    out    = dropout(softmax(scores), p) @ value

Layouts: ``[B, M, H, K]`` (BMHK), ``[B, M, K]`` (BMK, one head) and ``[B, M, G, H, K]``
(BMGHK: G groups of H query heads; key/value ``[B, N, G, H, K]`` usually expanded with
stride 0 along H, or ``[B, N, G, 1, K]`` - grouped-query attention with G kv heads).

Every bias class is turned into an exact block-sparse `BlockMask` (built from its sequence
boundaries by `flexattn.varlen`, never by evaluating the mask everywhere) and, for tensor
biases, a score_mod that reads the tensor; then `flexattn.flex_attention` runs. There is no
second set of kernels. ``op`` arguments are accepted and ignored (there is one backend).

Differences from xFormers (documented, deliberate):
* fully masked query rows give 0 (xFormers' kernels differ between ops);
* ``lse`` is ``[B, H, M]`` (``[B, G, H, M]`` for BMGHK, ``[B, M]`` for BMK) with no padding of M;
* with ``p > 0`` the split ``memory_efficient_attention_forward_requires_grad`` /
  ``memory_efficient_attention_backward`` pair needs the same ``seed=`` in both calls,
  so the backward replays the forward's dropout pattern.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import mods as _mods

__all__ = [
    "memory_efficient_attention", "memory_efficient_attention_forward",
    "memory_efficient_attention_forward_requires_grad", "memory_efficient_attention_backward",
    "merge_attentions", "AttentionBias", "LowerTriangularMask", "LowerTriangularFromBottomRightMask",
    "LowerTriangularFromBottomRightLocalAttentionMask", "LowerTriangularMaskWithTensorBias",
    "BlockDiagonalMask", "BlockDiagonalCausalMask", "BlockDiagonalCausalFromBottomRightMask",
    "BlockDiagonalCausalLocalAttentionMask", "BlockDiagonalCausalLocalAttentionFromBottomRightMask",
    "BlockDiagonalCausalWithOffsetPaddedKeysMask",
]

BLOCK_SIZE = 128


# ---------------------------------------------------------------------------------------
# Sequence-length bookkeeping

@dataclass
class _SeqLenInfo:
    """Start offsets of packed sequences: sequence i is ``[seqstart[i], seqstart[i+1])``."""
    seqstart: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: List[int]

    @classmethod
    def from_seqlens(cls, seqlens: Iterable[int], *, device=None) -> "_SeqLenInfo":
        starts = [0]
        lens = []
        for x in seqlens:
            x = int(x)
            if x < 0:
                raise ValueError(f"sequence lengths must be >= 0, got {x}")
            lens.append(x)
            starts.append(starts[-1] + x)
        if not lens:
            raise ValueError("at least one sequence length is needed, got an empty list")
        return cls(seqstart=torch.tensor(starts, dtype=torch.int32, device=device),
                   max_seqlen=max(lens), min_seqlen=min(lens), seqstart_py=starts)

    def intervals(self) -> Iterable[Tuple[int, int]]:
        yield from zip(self.seqstart_py[:-1], self.seqstart_py[1:])

    @property
    def seqlens(self) -> List[int]:
        return [b - a for a, b in self.intervals()]

    @property
    def total(self) -> int:
        return self.seqstart_py[-1]

    def split(self, x: torch.Tensor, batch_sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        if x.shape[0] != 1:
            raise ValueError(f"split expects a packed tensor with batch size 1, got shape {tuple(x.shape)}")
        if x.shape[1] != self.total:
            raise ValueError(f"split: the tensor has {x.shape[1]} positions along dim 1 but the sequences "
                             f"add up to {self.total}")
        if batch_sizes is None:
            batch_sizes = [1] * len(self.seqlens)
        out, i = [], 0
        for bs in batch_sizes:
            a, b = self.seqstart_py[i], self.seqstart_py[i + bs]
            lens = set(self.seqlens[i:i + bs])
            if len(lens) != 1:
                raise ValueError(f"split: sequences {i}..{i + bs - 1} of one tensor must have equal lengths, "
                                 f"got {sorted(lens)}")
            out.append(x[:, a:b].reshape(bs, b - a if bs == 0 else (b - a) // bs, *x.shape[2:]))
            i += bs
        return out


@dataclass
class _PaddedSeqLenInfo(_SeqLenInfo):
    """Keys stored in fixed-size slots: sequence i is ``[i*padding, i*padding + seqlen[i])``."""
    seqlen: torch.Tensor = None
    seqlen_py: List[int] = field(default_factory=list)
    padding: int = 0

    @classmethod
    def from_seqlens_padded(cls, seqlens: Sequence[int], padding: int, *, device=None) -> "_PaddedSeqLenInfo":
        seqlens = [int(x) for x in seqlens]
        if any(s > padding for s in seqlens):
            raise ValueError(f"every key sequence length must be <= padding={padding}, got {seqlens}")
        if any(s < 0 for s in seqlens):
            raise ValueError(f"key sequence lengths must be >= 0, got {seqlens}")
        starts = list(range(0, padding * (len(seqlens) + 1), padding))
        return cls(seqstart=torch.tensor(starts, dtype=torch.int32, device=device),
                   max_seqlen=max(seqlens), min_seqlen=min(seqlens), seqstart_py=starts,
                   seqlen=torch.tensor(seqlens, dtype=torch.int32, device=device), seqlen_py=seqlens,
                   padding=padding)

    def intervals(self) -> Iterable[Tuple[int, int]]:
        for start, n in zip(self.seqstart_py, self.seqlen_py):
            yield start, start + n

    @property
    def seqlens(self) -> List[int]:
        return list(self.seqlen_py)

    @property
    def total(self) -> int:
        return self.padding * len(self.seqlen_py)


# ---------------------------------------------------------------------------------------
# Bias classes

class AttentionBias:
    """Base class of the structured biases accepted as ``attn_bias``.

    ``materialize(shape)`` returns the equivalent dense additive bias (0 where attended,
    -inf where masked, plus any tensor bias)."""

    # (causal, window=(left, right), align) inside each block
    _causal = False
    _window: Optional[Tuple[Optional[int], Optional[int]]] = None
    _align = "top_left"

    def _segments(self, M: int, N: int):
        """(cu_seqlens_q, cu_seqlens_kv, seqused_kv) describing the block structure for (M, N)."""
        return [0, M], [0, N], None

    def _check(self, B: int, M: int, N: int) -> None:
        pass

    def _tensor_bias(self) -> Optional[torch.Tensor]:
        return None

    def _block_mask(self, M: int, N: int, device):
        from ..varlen import create_varlen_block_mask
        cu_q, cu_k, used = self._segments(M, N)
        return create_varlen_block_mask(cu_q, cu_k, causal=self._causal, window=self._window, align=self._align,
                                        Q_LEN=M, KV_LEN=N, BLOCK_SIZE=BLOCK_SIZE, seqused_kv=used, device=device)

    def _mask_mod(self, M: int, N: int, device="cpu"):
        from ..varlen import varlen_mask_mod
        cu_q, cu_k, used = self._segments(M, N)
        return varlen_mask_mod(cu_q, cu_k, causal=self._causal, window=self._window, align=self._align,
                               Q_LEN=M, KV_LEN=N, seqused_kv=used, device=device)

    def materialize(self, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Dense bias of ``shape`` (``[..., M, N]``): 0 where attended, -inf where masked."""
        if len(shape) < 2:
            raise ValueError(f"materialize needs a shape [..., M, N], got {tuple(shape)}")
        M, N = int(shape[-2]), int(shape[-1])
        self._check(1, M, N)
        mod = self._mask_mod(M, N, device)
        i32 = dict(dtype=torch.int32, device=device)
        keep = mod(torch.zeros((), **i32), torch.zeros((), **i32), torch.arange(M, **i32)[:, None],
                   torch.arange(N, **i32)[None, :])
        create_as = torch.float32 if dtype == torch.bfloat16 else dtype
        out = torch.zeros(M, N, dtype=create_as, device=device).masked_fill(~keep, float("-inf"))
        bias = self._tensor_bias()
        if bias is not None:
            out = out + bias.to(device=device, dtype=create_as)
        return torch.broadcast_to(out, tuple(shape)).to(dtype).clone()


class LowerTriangularMask(AttentionBias):
    """Causal mask, top-left aligned: query i attends to keys j <= i."""
    _causal = True

    def add_bias(self, bias: torch.Tensor) -> "LowerTriangularMaskWithTensorBias":
        """Causal mask plus an additive tensor bias."""
        return LowerTriangularMaskWithTensorBias(bias)


class LowerTriangularMaskWithTensorBias(LowerTriangularMask):
    """Top-left causal mask plus a dense additive bias ``[B, H, M, N]`` (broadcastable)."""

    def __init__(self, bias: torch.Tensor):
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(f"LowerTriangularMaskWithTensorBias expects a float tensor bias, got {type(bias).__name__}")
        self._bias = bias

    def _tensor_bias(self):
        return self._bias


class LowerTriangularFromBottomRightMask(AttentionBias):
    """Causal mask, bottom-right aligned: query i attends to keys j <= i + (N - M)."""
    _causal = True
    _align = "bottom_right"

    def make_local_attention(self, window_size: int) -> "LowerTriangularFromBottomRightLocalAttentionMask":
        return LowerTriangularFromBottomRightLocalAttentionMask(window_size)


class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    """Bottom-right causal and local: keys j with i + (N - M) - window_size < j <= i + (N - M)."""

    def __init__(self, window_size: int):
        _check_window(window_size)
        self._window_size = int(window_size)
        self._window = (self._window_size - 1, 0)


def _check_window(window_size):
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be an int, got {type(window_size).__name__}")
    if window_size <= 0:
        raise ValueError(f"Expected `window_size > 0`, but window_size={window_size}")


@dataclass
class BlockDiagonalMask(AttentionBias):
    """Packed sequences: query sequence i attends only to key sequence i (all of it).

    Use with a batch of 1 whose sequence dimension concatenates the sequences
    (`from_tensor_list` packs tensors; `split` unpacks outputs)."""
    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo
    _batch_sizes: Optional[Sequence[int]] = None

    def __post_init__(self):
        if len(self.q_seqinfo.seqlens) != len(self.k_seqinfo.seqlens):
            raise ValueError(f"q_seqinfo has {len(self.q_seqinfo.seqlens)} sequences but k_seqinfo has "
                             f"{len(self.k_seqinfo.seqlens)}: they must describe the same sequences")

    def _segments(self, M, N):
        return self.q_seqinfo.seqstart_py, self.k_seqinfo.seqstart_py, None

    def _check(self, B, M, N):
        if B != 1:
            raise ValueError(f"{type(self).__name__} expects a batch size of 1 (sequences concatenated along "
                             f"the sequence dimension; BlockDiagonalMask.from_tensor_list packs them), but the "
                             f"batch size is {B}")
        if M != self.q_seqinfo.total or N != self.k_seqinfo.total:
            raise ValueError(f"{type(self).__name__} describes {self.q_seqinfo.total} queries and "
                             f"{self.k_seqinfo.total} keys, but the inputs have {M} queries and {N} keys")

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Optional[Sequence[int]] = None, *,
                     device=None) -> "BlockDiagonalMask":
        """From the query (and optionally key) sequence lengths."""
        if kv_seqlen is not None and len(kv_seqlen) != len(q_seqlen):
            raise ValueError(f"q_seqlen has {len(q_seqlen)} entries but kv_seqlen has {len(kv_seqlen)}; "
                             f"give one key length per query sequence")
        q = _SeqLenInfo.from_seqlens(q_seqlen, device=device)
        k = q if kv_seqlen is None else _SeqLenInfo.from_seqlens(kv_seqlen, device=device)
        return cls(q_seqinfo=q, k_seqinfo=k)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[torch.Tensor]) -> Tuple["BlockDiagonalMask", torch.Tensor]:
        """Pack tensors ``[B_i, M_i, ...]`` into one ``[1, sum B_i*M_i, ...]`` and its mask."""
        if not tensors:
            raise ValueError("from_tensor_list needs at least one tensor")
        batch_sizes = [t.shape[0] for t in tensors]
        seqlens = []
        for t in tensors:
            seqlens += [t.shape[1]] * t.shape[0]
        bias = cls.from_seqlens(seqlens, device=tensors[0].device)
        bias._batch_sizes = batch_sizes
        packed = torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)
        return bias, packed

    @classmethod
    def from_tensor_lists_qkv(cls, tensors_q: Sequence[torch.Tensor], tensors_k: Sequence[torch.Tensor],
                              tensors_v: Optional[Sequence[torch.Tensor]] = None):
        """Pack lists of queries, keys (and values) at once; returns (bias, q, k, v or None)."""
        if len(tensors_q) != len(tensors_k):
            raise ValueError(f"{len(tensors_q)} query tensors but {len(tensors_k)} key tensors")
        q_lens, k_lens = [], []
        for tq, tk in zip(tensors_q, tensors_k):
            if tq.shape[0] != tk.shape[0]:
                raise ValueError(f"query and key tensors must have equal batch sizes, got {tq.shape[0]} and {tk.shape[0]}")
            q_lens += [tq.shape[1]] * tq.shape[0]
            k_lens += [tk.shape[1]] * tk.shape[0]
        bias = cls.from_seqlens(q_lens, k_lens, device=tensors_q[0].device)
        bias._batch_sizes = [t.shape[0] for t in tensors_q]
        cat = lambda ts: torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in ts], dim=1)
        return bias, cat(tensors_q), cat(tensors_k), None if tensors_v is None else cat(tensors_v)

    def split_queries(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def split_kv(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.k_seqinfo.split(tensor, self._batch_sizes)

    def split(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Unpack a packed ``[1, total, ...]`` tensor (e.g. the output) into the original list."""
        if self.q_seqinfo is not self.k_seqinfo and self.q_seqinfo.seqstart_py != self.k_seqinfo.seqstart_py:
            raise ValueError("split() needs equal query and key splits; use split_queries() or split_kv()")
        return self.split_queries(tensor)

    def _derived(self, cls, **extra):
        return cls(q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo, _batch_sizes=self._batch_sizes, **extra)

    def make_causal(self) -> "BlockDiagonalCausalMask":
        """Each block causal, top-left aligned."""
        return self._derived(BlockDiagonalCausalMask)

    def make_causal_from_bottomright(self) -> "BlockDiagonalCausalFromBottomRightMask":
        """Each block causal, bottom-right aligned (needs keys >= queries in every block)."""
        return self._derived(BlockDiagonalCausalFromBottomRightMask)

    def make_local_attention(self, window_size: int) -> "BlockDiagonalCausalLocalAttentionMask":
        """Each block causal and local (keys i - window_size < j <= i), top-left aligned."""
        return self._derived(BlockDiagonalCausalLocalAttentionMask, _window_size=window_size)

    def make_local_attention_from_bottomright(self, window_size: int
                                              ) -> "BlockDiagonalCausalLocalAttentionFromBottomRightMask":
        """Each block causal and local, bottom-right aligned."""
        return self._derived(BlockDiagonalCausalLocalAttentionFromBottomRightMask, _window_size=window_size)


@dataclass
class BlockDiagonalCausalMask(BlockDiagonalMask):
    """Block diagonal, each block causal with top-left alignment (query i sees keys j <= i of its block)."""
    _causal = True


@dataclass
class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
    """Block diagonal, each block causal with bottom-right alignment: query i of a block with
    m queries and n keys sees keys j <= i + n - m. Every block needs n >= m."""
    _causal = True
    _align = "bottom_right"

    def __post_init__(self):
        super().__post_init__()
        for i, ((qa, qb), (ka, kb)) in enumerate(zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals())):
            nq, nk = qb - qa, kb - ka
            if nk < nq:
                raise ValueError(f"Block #{i} has num_keys={nk} and num_queries={nq}. Expected `num_keys >= num_queries`")


@dataclass
class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
    """Block diagonal, causal and local: query i sees keys i - window_size < j <= i of its block."""
    _window_size: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_window(self._window_size)
        for q, k in zip(self.q_seqinfo.seqlens, self.k_seqinfo.seqlens):
            if q - self._window_size >= k:
                raise RuntimeError(f"No keys are attended in q_seqlen {q} k_seqlen {k} with sliding window "
                                   f"{self._window_size}")
        self._window = (self._window_size - 1, 0)


@dataclass
class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
    """Block diagonal, bottom-right causal and local: query i sees keys
    i + n - m - window_size < j <= i + n - m of its block."""
    _window_size: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_window(self._window_size)
        self._window = (self._window_size - 1, 0)


@dataclass
class BlockDiagonalCausalWithOffsetPaddedKeysMask(AttentionBias):
    """Decoding with a padded KV cache: queries packed (``q_seqinfo``), keys in fixed slots of
    ``padding`` positions of which the first ``seqlen[i]`` are real (``k_seqinfo``). Query i
    of sequence s sees the real keys j <= i + seqlen_k(s) - seqlen_q(s) of slot s
    (causal, bottom-right aligned)."""
    q_seqinfo: _SeqLenInfo
    k_seqinfo: _PaddedSeqLenInfo
    _causal = True
    _align = "bottom_right"

    def __post_init__(self):
        if len(self.q_seqinfo.seqlens) != len(self.k_seqinfo.seqlen_py):
            raise ValueError(f"q_seqinfo has {len(self.q_seqinfo.seqlens)} sequences but k_seqinfo has "
                             f"{len(self.k_seqinfo.seqlen_py)}")

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_padding: int, kv_seqlen: Sequence[int],
                     causal_diagonal=None, *, device=None) -> "BlockDiagonalCausalWithOffsetPaddedKeysMask":
        if causal_diagonal is not None:
            raise ValueError("causal_diagonal is not supported (xFormers deprecated it); the causal diagonal is "
                             "always bottom-right aligned per sequence")
        if len(q_seqlen) != len(kv_seqlen):
            raise ValueError(f"q_seqlen has {len(q_seqlen)} entries but kv_seqlen has {len(kv_seqlen)}")
        return cls(q_seqinfo=_SeqLenInfo.from_seqlens(q_seqlen, device=device),
                   k_seqinfo=_PaddedSeqLenInfo.from_seqlens_padded(kv_seqlen, kv_padding, device=device))

    def _segments(self, M, N):
        return self.q_seqinfo.seqstart_py, self.k_seqinfo.seqstart_py, self.k_seqinfo.seqlen_py

    def _check(self, B, M, N):
        BlockDiagonalMask._check(self, B, M, N)


# ---------------------------------------------------------------------------------------
# Layouts

def _check_inputs(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    nd = query.ndim
    if nd not in (3, 4, 5) or key.ndim != nd or value.ndim != nd:
        raise ValueError(f"Query/Key/Value should all have BMGHK, BMHK or BMK shape.\n"
                         f"  query.shape: {tuple(query.shape)}\n  key.shape  : {tuple(key.shape)}\n"
                         f"  value.shape: {tuple(value.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"Query/Key/Value should all have the same dtype\n  query.dtype: {query.dtype}\n"
                         f"  key.dtype  : {key.dtype}\n  value.dtype: {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"Query/Key/Value should all be on the same device, got {query.device}, {key.device}, "
                         f"{value.device}")
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"Incompatible batch sizes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)} (dimension 0 must match)")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same sequence length N (dimension 1), got "
                         f"key {tuple(key.shape)} and value {tuple(value.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same embedding size K (last dimension), got "
                         f"query {tuple(query.shape)} and key {tuple(key.shape)}")
    if key.shape[2:-1] != value.shape[2:-1]:
        raise ValueError(f"key and value must have the same heads dimensions, got key {tuple(key.shape)} "
                         f"and value {tuple(value.shape)}")
    if nd == 4 and key.shape[2] != query.shape[2]:
        raise ValueError(f"BMHK inputs must have the same number of heads H (dimension 2) in query and key/value, "
                         f"got query {tuple(query.shape)} and key {tuple(key.shape)}; for grouped-query "
                         f"attention use the 5-D BMGHK layout")
    if nd == 5:
        if key.shape[2] != query.shape[2]:
            raise ValueError(f"BMGHK inputs must have the same number of groups G (dimension 2), got "
                             f"query {tuple(query.shape)} and key {tuple(key.shape)}")
        if key.shape[3] not in (1, query.shape[3]):
            raise ValueError(f"BMGHK key/value must have H={query.shape[3]} heads per group (usually expanded "
                             f"with stride 0) or 1, got key {tuple(key.shape)}")


def _to_bhmk(query, key, value):
    """(q [B, Hq, M, K], k [B, Hkv, N, K], v [B, Hkv, N, Kv], enable_gqa, heads shape of the output)."""
    nd = query.ndim
    if nd == 3:
        return query[:, None], key[:, None], value[:, None], False
    if nd == 4:
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), False
    B, M, G, H, K = query.shape
    q = query.permute(0, 2, 3, 1, 4).reshape(B, G * H, M, K)
    if key.shape[3] == 1 or (H > 1 and key.stride(3) == 0 and value.stride(3) == 0):
        k = key[:, :, :, 0].transpose(1, 2)  # [B, G, N, K]: one kv head per group
        v = value[:, :, :, 0].transpose(1, 2)
        return q, k, v, G != G * H
    k = key.permute(0, 2, 3, 1, 4).reshape(B, G * H, key.shape[1], key.shape[-1])
    v = value.permute(0, 2, 3, 1, 4).reshape(B, G * H, value.shape[1], value.shape[-1])
    return q, k, v, False


def _from_bhmk(out, lse, query):
    nd = query.ndim
    if nd == 3:
        return out[:, 0], (None if lse is None else lse[:, 0])
    if nd == 4:
        return out.transpose(1, 2), lse
    B, M, G, H, _ = query.shape
    o = out.reshape(B, G, H, M, out.shape[-1]).permute(0, 3, 1, 2, 4)
    return o, (None if lse is None else lse.reshape(B, G, H, M))


def _bias_tensor_4d(bias: torch.Tensor, query, B: int, Hq: int, M: int, N: int, name="attn_bias") -> torch.Tensor:
    """Bring a tensor bias to a broadcastable [B|1, Hq|1, M, N] view."""
    nd = query.ndim
    t = bias
    if nd == 5:
        G, H = query.shape[2], query.shape[3]
        if t.dim() != 5:
            raise ValueError(f"{name} for BMGHK inputs must be 5-D [B, G, H, M, N] = [{B}, {G}, {H}, {M}, {N}] "
                             f"(broadcastable), got shape {tuple(bias.shape)}")
        try:
            t = torch.broadcast_to(t, (B, G, H, M, N))
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(bias.shape)} does not broadcast to [B, G, H, M, N] = "
                             f"[{B}, {G}, {H}, {M}, {N}]") from None
        if t.stride(1) == 0 and t.stride(2) == 0:  # same bias for every head
            return t[:, :1, :1].reshape(B, 1, M, N)
        return t.reshape(B, G * H, M, N)
    expected = (B, M, N) if nd == 3 else (B, Hq, M, N)
    if t.dim() == 3 and nd == 4:
        if t.shape[0] == B * Hq:  # legacy [B*H, M, N]
            t = t.reshape(B, Hq, *t.shape[1:])
        else:
            t = t[:, None] if t.shape[0] in (1, B) and Hq == 1 else t[None]
    elif nd == 3 and t.dim() == 3:
        t = t[:, None]
    elif t.dim() == 2:
        t = t[None, None]
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape {expected} (broadcastable), got {tuple(bias.shape)}")
    try:
        torch.broadcast_to(t, (B, Hq, M, N))
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(bias.shape)} does not broadcast to {expected}") from None
    return t


def _plan(attn_bias, query, B, Hq, M, N, device):
    """(score_mod, block_mask) for an attn_bias."""
    if attn_bias is None:
        return None, None
    if isinstance(attn_bias, torch.Tensor):
        if not attn_bias.dtype.is_floating_point:
            raise TypeError(f"a tensor attn_bias must be floating point (an additive bias; use -inf to mask), "
                            f"got {attn_bias.dtype}")
        if attn_bias.device != query.device:
            raise ValueError(f"attn_bias is on {attn_bias.device} but query is on {query.device}")
        return _mods.dense_bias(_bias_tensor_4d(attn_bias, query, B, Hq, M, N)), None
    if not isinstance(attn_bias, AttentionBias):
        raise TypeError(f"attn_bias must be None, a tensor or an AttentionBias (e.g. LowerTriangularMask()), "
                        f"got {type(attn_bias).__name__}")
    attn_bias._check(B, M, N)
    score_mod = None
    tb = attn_bias._tensor_bias()
    if tb is not None:
        score_mod = _mods.dense_bias(_bias_tensor_4d(tb.to(query.device), query, B, Hq, M, N, "the tensor bias"))
    return score_mod, attn_bias._block_mask(M, N, query.device)


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"dropout probability p must be a number in [0, 1), got {p!r}")
    return float(p)


def _attention(query, key, value, attn_bias, p, scale, *, return_lse, seed=None, output_dtype=None):
    from ..attention import flex_attention
    _check_inputs(query, key, value)
    p = _check_p(p)
    q, k, v, gqa = _to_bhmk(query, key, value)
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    score_mod, block_mask = _plan(attn_bias, query, B, Hq, M, N, query.device)
    res = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                         return_lse=return_lse, dropout_p=p, dropout_seed=seed)
    out, lse = res if return_lse else (res, None)
    out, lse = _from_bhmk(out, lse, query)
    if output_dtype is not None:
        out = out.to(output_dtype)
    return out, lse


# ---------------------------------------------------------------------------------------
# Public functions

def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attn_bias: Optional[Union[torch.Tensor, AttentionBias]] = None, p: float = 0.0,
                               scale: Optional[float] = None, *, op=None,
                               output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Attention ``softmax(query @ key^T * scale + attn_bias) @ value`` with dropout ``p``.

    query ``[B, M, H, K]`` (or ``[B, M, K]``, or ``[B, M, G, H, K]``), key ``[B, N, H, K]``,
    value ``[B, N, H, Kv]``; returns ``[B, M, H, Kv]`` in the query's layout. Differentiable.
    ``attn_bias``: None, a float tensor broadcastable to ``[B, H, M, N]`` (-inf masks), or
    one of the bias classes of this module. ``op`` is ignored.
    """
    return _attention(query, key, value, attn_bias, p, scale, return_lse=False, output_dtype=output_dtype)[0]


def memory_efficient_attention_forward(query, key, value, attn_bias=None, p: float = 0.0, scale=None, *,
                                       op=None, output_dtype=None) -> torch.Tensor:
    """Forward only (the output does not require grad)."""
    with torch.no_grad():
        return memory_efficient_attention(query, key, value, attn_bias, p, scale, output_dtype=output_dtype)


def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p: float = 0.0,
                                                     scale=None, *, op=None, output_dtype=None,
                                                     seed: Optional[int] = None):
    """Forward that also returns the log-sum-exp: ``(out, lse)``, for a later
    `memory_efficient_attention_backward`. ``lse`` is float32 ``[B, H, M]`` (natural log).
    With ``p > 0`` pass ``seed=`` (and the same seed to the backward)."""
    p = _check_p(p)
    if p > 0 and seed is None:
        raise ValueError("memory_efficient_attention_forward_requires_grad with p > 0 needs seed=<int> (pass the "
                         "same seed to memory_efficient_attention_backward so it replays the dropout pattern)")
    with torch.no_grad():
        return _attention(query, key, value, attn_bias, p, scale, return_lse=True, seed=seed,
                          output_dtype=output_dtype)


def memory_efficient_attention_backward(grad: torch.Tensor, output: torch.Tensor, lse: torch.Tensor,
                                        query, key, value, attn_bias=None, p: float = 0.0, scale=None, *,
                                        op=None, seed: Optional[int] = None):
    """Gradients ``(grad_query, grad_key, grad_value)`` of the attention for the output
    gradient ``grad`` (recomputed through flexattn's own backward; ``output`` and ``lse`` are
    checked for shape only). With ``p > 0`` pass the forward's ``seed=``."""
    p = _check_p(p)
    if p > 0 and seed is None:
        raise ValueError("memory_efficient_attention_backward with p > 0 needs seed=<int>, the one given to "
                         "memory_efficient_attention_forward_requires_grad (to replay its dropout pattern)")
    if grad.shape != output.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but output has shape {tuple(output.shape)}")
    with torch.enable_grad():
        q = query.detach().requires_grad_(True)
        k = key.detach().requires_grad_(True)
        v = value.detach().requires_grad_(True)
        out, _ = _attention(q, k, v, attn_bias, p, scale, return_lse=True, seed=seed)
        if out.shape != output.shape:
            raise ValueError(f"output has shape {tuple(output.shape)}, expected {tuple(out.shape)}")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return dq, dk, dv


def merge_attentions(attn_split: Union[torch.Tensor, Sequence[torch.Tensor]],
                     lse_split: Union[torch.Tensor, Sequence[torch.Tensor]], write_lse: bool = True,
                     output_dtype: Optional[torch.dtype] = None):
    """Combine attention outputs over disjoint key sets into the attention over their union.

    ``attn_split``: ``[S, B, M, G, H, K]`` or a list of S tensors ``[B, M, G, H, K]``
    (``[B, M, H, K]`` works too); ``lse_split``: ``[S, B, G, H, M]`` or a list of
    ``[B, G, H, M]`` (``[B, H, M]``). With ``w_i = exp(lse_i - lse)`` and
    ``lse = log(sum_i exp(lse_i))``: ``out = sum_i w_i * out_i``. Parts with lse = -inf
    (no key attended) contribute nothing; rows where every part is -inf give 0 and lse -inf.
    Returns ``(out, lse if write_lse else None)``; differentiable.
    """
    attn = torch.stack(list(attn_split)) if not isinstance(attn_split, torch.Tensor) else attn_split
    lse = torch.stack(list(lse_split)) if not isinstance(lse_split, torch.Tensor) else lse_split
    if attn.dim() not in (5, 6) or lse.dim() != attn.dim() - 1:
        raise ValueError(f"merge_attentions expects attn [S, B, M, (G,) H, K] and lse [S, B, (G,) H, M], got "
                         f"attn {tuple(attn.shape)} and lse {tuple(lse.shape)}")
    if attn.shape[0] != lse.shape[0]:
        raise ValueError(f"{attn.shape[0]} attention parts but {lse.shape[0]} lse parts")
    # lse [S, B, (G,) H, M] -> [S, B, M, (G,) H, 1] to line up with attn
    ct = torch.float64 if torch.float64 in (attn.dtype, lse.dtype) else torch.float32
    lse_b = lse.movedim(-1, 2).unsqueeze(-1).to(ct)
    if lse_b.shape[:-1] != attn.shape[:-1]:
        raise ValueError(f"attn {tuple(attn.shape)} and lse {tuple(lse.shape)} do not describe the same rows")
    m = lse_b.amax(0, keepdim=True)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_b - m_safe)                      # 0 for parts with lse -inf
    total = w.sum(0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = (w * attn.to(ct)).sum(0) / safe_total
    out = out.to(output_dtype or attn.dtype)
    if not write_lse:
        return out, None
    lse_out = torch.where(total > 0, torch.log(safe_total) + m_safe[0], torch.full_like(total, float("-inf")))
    return out, lse_out.squeeze(-1).movedim(1, -1)
