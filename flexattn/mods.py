"""A library of named score_mods: ALiBi, tanh soft-capping, relative position bias, dense bias.

Every builder returns a traceable ``score_mod(score, b, h, q_idx, kv_idx) -> score`` with a
readable ``__name__``; `compose` chains several. Captured tensors (slopes, tables, biases)
are read by the compiled kernels in place, so new values in the same tensor never
recompile, and gradients flow to them when they require grad (where the backend supports
captured-buffer gradients).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .masks import alignment_offset, _named

__all__ = ["alibi", "alibi_slopes", "softcap", "relative_bias", "dense_bias", "compose", "identity"]

ScoreMod = Callable


def identity() -> ScoreMod:
    """Leave the score unchanged."""
    def identity_score(score, b, h, q_idx, kv_idx):
        return score
    return _named(identity_score, "identity")


def alibi_slopes(num_heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ALiBi slopes of Press et al. (2022) for ``num_heads`` heads.

    For a power of two ``n``: ``m_i = 2 ** (-8 (i + 1) / n)``, i = 0..n-1. Otherwise the
    slopes of the closest lower power of two ``n0``, followed by every other slope of
    ``2 * n0`` starting from its first (indices 0, 2, 4, ...: exponents -4/n0, -12/n0, ...,
    the ones the ``n0`` list does not hold) until ``num_heads``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n0 = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = pow2(n0)
    if n0 < num_heads:
        slopes += pow2(2 * n0)[0::2][: num_heads - n0]
    return torch.tensor(slopes, dtype=dtype, device=device)


def alibi(slopes: torch.Tensor, *, symmetric: bool = False, align: str = "top_left",
          q_len: Optional[int] = None, kv_len: Optional[int] = None) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * d`` with ``d = kv_idx - q_idx - offset`` (``<= 0`` under a
    causal mask, so farther keys get a larger penalty), or with ``symmetric=True``
    ``score - slopes[h] * |d|`` (FlashAttention's ``alibi_slopes`` is the symmetric,
    bottom-right form). ``slopes``: float tensor ``[H]`` (see `alibi_slopes`) or ``[B, H]``.
    """
    if not isinstance(slopes, torch.Tensor) or slopes.dim() not in (1, 2) or not slopes.dtype.is_floating_point:
        raise ValueError(f"alibi: slopes must be a float tensor of shape [H] or [B, H], got "
                         f"{slopes.dtype if isinstance(slopes, torch.Tensor) else type(slopes).__name__}"
                         f"{' of shape ' + str(tuple(slopes.shape)) if isinstance(slopes, torch.Tensor) else ''}")
    off = alignment_offset(align, q_len, kv_len, "alibi")
    batched = slopes.dim() == 2

    def slope(b, h):
        return slopes[b, h] if batched else slopes[h]

    def dist(q_idx, kv_idx):
        return kv_idx - q_idx if off == 0 else kv_idx - q_idx - off

    if symmetric:
        def alibi_score(score, b, h, q_idx, kv_idx):
            return score - slope(b, h) * dist(q_idx, kv_idx).abs()
    else:
        def alibi_score(score, b, h, q_idx, kv_idx):
            return score + slope(b, h) * dist(q_idx, kv_idx)
    name = "alibi" + ("_symmetric" if symmetric else "") + ("" if align == "top_left" else "_bottom_right")
    return _named(alibi_score, name)


def softcap(cap: float) -> ScoreMod:
    """Tanh soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"softcap: cap must be a positive number, got {cap!r}")
    cap = float(cap)

    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return _named(softcap_score, f"softcap_{cap:g}".replace(".", "p"))


def relative_bias(table: torch.Tensor, max_distance: Optional[int] = None) -> ScoreMod:
    """Learned relative position bias: ``score + table[..., clamp(kv_idx - q_idx, -M, M) + M]``.

    ``table`` is ``[2M + 1]`` (shared) or ``[H, 2M + 1]`` (per head); ``M = max_distance``
    defaults to ``(table.shape[-1] - 1) // 2``; distances beyond ``M`` share the edge entry.
    """
    if not isinstance(table, torch.Tensor) or table.dim() not in (1, 2) or not table.dtype.is_floating_point:
        raise ValueError(f"relative_bias: table must be a float tensor of shape [2M+1] or [H, 2M+1], got "
                         f"{table.dtype if isinstance(table, torch.Tensor) else type(table).__name__}")
    n = table.shape[-1]
    M = (n - 1) // 2 if max_distance is None else int(max_distance)
    if n != 2 * M + 1:
        raise ValueError(f"relative_bias: table's last dimension must be 2 * max_distance + 1 = {2 * M + 1}, got {n}")
    per_head = table.dim() == 2

    if per_head:
        def relative_bias_score(score, b, h, q_idx, kv_idx):
            return score + table[h, torch.clamp(kv_idx - q_idx, -M, M) + M]
    else:
        def relative_bias_score(score, b, h, q_idx, kv_idx):
            return score + table[torch.clamp(kv_idx - q_idx, -M, M) + M]
    return _named(relative_bias_score, "relative_bias")


def dense_bias(bias: torch.Tensor) -> ScoreMod:
    """A dense additive bias: ``score + bias[b, h, q_idx, kv_idx]``.

    ``bias`` is ``[L, S]``, ``[H, L, S]`` or ``[B, H, L, S]``; dimensions of size 1 (or
    expanded with stride 0) broadcast. ``-inf`` entries mask the key.
    """
    if not isinstance(bias, torch.Tensor) or bias.dim() not in (2, 3, 4) or not bias.dtype.is_floating_point:
        raise ValueError(f"dense_bias: bias must be a float tensor of shape [L, S], [H, L, S] or [B, H, L, S], "
                         f"got {bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}"
                         f"{' of shape ' + str(tuple(bias.shape)) if isinstance(bias, torch.Tensor) else ''}")
    t = bias
    while t.dim() < 4:
        t = t.unsqueeze(0)
    # Collapse broadcast (size-1 or stride-0) dimensions to one element, indexed by 0.
    for d in range(2):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    bB, bH = t.shape[0] > 1, t.shape[1] > 1
    bq_one, bk_one = t.shape[2] == 1, t.shape[3] == 1

    def dense_bias_score(score, b, h, q_idx, kv_idx):
        return score + t[b if bB else 0, h if bH else 0, 0 if bq_one else q_idx, 0 if bk_one else kv_idx]
    dense_bias_score.bias = t
    return _named(dense_bias_score, "dense_bias")


def compose(*score_mods: ScoreMod) -> ScoreMod:
    """Apply score_mods left to right: ``compose(f, g)(s, ...) == g(f(s, ...), ...)``. None is skipped."""
    mods = [m for m in score_mods if m is not None]
    if not mods:
        return identity()
    if len(mods) == 1:
        return mods[0]

    def composed(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score
    return _named(composed, "_then_".join(getattr(m, "__name__", "mod") for m in mods))
