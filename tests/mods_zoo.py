"""The shared test set of mods: every test stage (BlockMask, CPU path, kernels) runs these.

    from mods_zoo import ZOO_NAMES, make_mod
    m = make_mod("document", B=2, H=4, L=129, S=113)
    m.name, m.score_mod, m.mask_mod, m.captured   # mods may be None; captured: float buffers

`make_mod` is deterministic: the same name and sizes give the same captured values. Float
captured tensors are drawn in float32 and then cast to `buffer_dtype`, so
`make_mod(..., buffer_dtype=torch.float64)` gives exactly the upcast buffers the float64
golden needs (the golden must see the same values as the run under test).

Sizes: B batch, H *query* heads, L query length, S kv length. A captured tensor indexed by
q_idx or kv_idx covers max(L, S) positions, so any q_len/kv_len pair within the sizes works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class ZooMod:
    name: str
    score_mod: Optional[Callable]
    mask_mod: Optional[Callable]
    # Float captured tensors by role (the ones whose grads a test checks when requires_grad).
    captured: dict = field(default_factory=dict)
    # Whether some query rows are fully masked (out 0, lse -inf, zero grads expected there).
    has_empty_rows: bool = False
    # The score_mod for the dense reference, where the mod's own spelling takes one (b, h,
    # q_idx, kv_idx) at a time (torch.dot of rows) and so cannot run on broadcast indices.
    reference_score_mod: Optional[Callable] = None


def _and_masks(*mods):
    try:
        from flexattn.masks import and_masks
        return and_masks(*mods)
    except ImportError:  # block_mask.py not written yet: an equivalent local composition
        def combined(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = out & m(b, h, q_idx, kv_idx)
            return out
        return combined


def _or_masks(*mods):
    try:
        from flexattn.masks import or_masks
        return or_masks(*mods)
    except ImportError:
        def combined(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = out | m(b, h, q_idx, kv_idx)
            return out
        return combined


# ---- plain mask mods ------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_mod(window: int):
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window
    return sliding_window


def prefix_mod(prefix_len: int):
    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix_len
    return prefix


def _float_gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32)


def make_mod(name: str, *, B: int, H: int, L: int, S: int, device="cpu",
             buffer_dtype=torch.float32, requires_grad: bool = False, seed: int = 0) -> ZooMod:
    """Build the zoo entry `name` for the given sizes (see the module docstring)."""
    N = max(L, S)
    rand = _float_gen(seed)

    def fbuf(t):  # a float captured tensor: same values for every buffer_dtype
        t = t.to(buffer_dtype).to(device)
        return t.requires_grad_(requires_grad)

    if name == "none":
        return ZooMod(name, None, None)
    if name == "causal":
        return ZooMod(name, None, causal)
    if name == "sliding_window":
        return ZooMod(name, None, sliding_window_mod(max(N // 8, 4)))
    if name == "prefix_lm":
        return ZooMod(name, None, _or_masks(prefix_mod(max(N // 5, 1)), causal))
    if name == "document":
        # Documents of uneven lengths; per-document causal via each document's start offset.
        g = torch.Generator().manual_seed(seed + 1)
        lengths = torch.randint(1, max(N // 3, 2) + 1, (N,), generator=g)
        doc_id = torch.repeat_interleave(torch.arange(N), lengths)[:N].to(torch.int32).to(device)
        n_docs = int(doc_id.max()) + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])[:n_docs]
        offsets = starts.to(torch.int32).to(device)

        def document(b, h, q_idx, kv_idx):
            same = doc_id[q_idx] == doc_id[kv_idx]
            return same & (q_idx - offsets[doc_id[q_idx]] >= kv_idx - offsets[doc_id[kv_idx]])
        return ZooMod(name, None, document)
    if name == "dilated_sliding_window":
        window, dilation = max(N // 10, 2), 3

        def dilated_sliding_window(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            return (d.abs() <= window * dilation) & (d % dilation == 0)
        return ZooMod(name, None, dilated_sliding_window)
    if name == "natten_2d":
        W, K = 8, 2  # the sequence as rows of width W; neighbourhood radius K in both directions

        def natten_2d(b, h, q_idx, kv_idx):
            dr = q_idx // W - kv_idx // W
            dc = q_idx % W - kv_idx % W
            return (dr.abs() <= K) & (dc.abs() <= K)
        return ZooMod(name, None, natten_2d)
    if name == "alibi_causal":
        def alibi(score, b, h, q_idx, kv_idx):
            slope = torch.exp2(-((h + 1) * 8.0 / H))
            return score - slope * (q_idx - kv_idx).abs()
        return ZooMod(name, alibi, causal)
    if name == "softcap":
        cap = 2.0

        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return ZooMod(name, softcap, None)
    if name == "rel_bias":
        bias_table = fbuf(0.5 * rand(H, L + S - 1))

        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + bias_table[h, q_idx - kv_idx + S - 1]
        return ZooMod(name, rel_bias, sliding_window_mod(max(N // 4, 4)), {"bias_table": bias_table})
    if name == "per_head_scale":
        per_head_scale = fbuf(1.0 + 0.25 * rand(H))

        def head_scale(score, b, h, q_idx, kv_idx):
            return score * per_head_scale[h]
        return ZooMod(name, head_scale, causal, {"per_head_scale": per_head_scale})
    if name == "multi_read":
        n = 7
        w = fbuf(0.5 * rand(n))

        def multi_read(score, b, h, q_idx, kv_idx):
            # the same captured tensor read twice: its grad sums both reads
            return score + w[q_idx % n] * w[kv_idx % n]
        return ZooMod(name, multi_read, None, {"w": w})
    if name == "empty_rows":
        def some_rows_empty(b, h, q_idx, kv_idx):
            return q_idx % 5 != 2
        return ZooMod(name, None, _and_masks(some_rows_empty, causal), has_empty_rows=True)
    if name == "and_or":
        # (sliding window AND causal) OR prefix, built by the combinators.
        mask = _or_masks(_and_masks(sliding_window_mod(max(N // 6, 3)), causal), prefix_mod(3))
        return ZooMod(name, None, mask)
    if name == "padding_bias":
        # Constant indices into multi-dim captured tensors (key padding [B, 1, N] as in
        # attention-mask APIs, a bias [1, H, N]): the printer must handle literal indices.
        g = torch.Generator().manual_seed(seed + 2)
        key_keep = torch.rand(B, 1, N, generator=g) > 0.25
        key_keep[:, 0, 0] = True  # every causal row keeps at least kv 0
        key_keep = key_keep.to(device)
        pad_bias = fbuf(0.5 * rand(1, H, N))

        def key_padding(b, h, q_idx, kv_idx):
            return key_keep[b, 0, kv_idx] & (q_idx >= kv_idx)

        def padding_bias(score, b, h, q_idx, kv_idx):
            return score + pad_bias[0, h, kv_idx]
        return ZooMod(name, padding_bias, key_padding, {"pad_bias": pad_bias})
    if name in ("mla_rope", "mla_rope_dot"):
        # MLA's decoupled RoPE: a rope part of q and k kept apart from the head dims, its dot
        # product added to the score inside the mod (rows of captured tensors, reduced)
        R, g = 8, 2 if H % 2 == 0 else 1
        rope_scale = 0.2
        q_rope = fbuf(0.5 * rand(B, H, N, R))
        if name == "mla_rope":  # one k_rope for every head, summed as (a * b).sum(-1)
            k_rope = fbuf(0.5 * rand(B, 1, N, R))

            def mla_rope(score, b, h, q_idx, kv_idx):
                return score + (q_rope[b, h, q_idx] * k_rope[b, 0, kv_idx]).sum(-1) * rope_scale
            return ZooMod(name, mla_rope, causal, {"q_rope": q_rope, "k_rope": k_rope})
        k_rope = fbuf(0.5 * rand(B, H // g, N, R))  # one per group of g query heads, torch.dot

        def mla_rope_dot(score, b, h, q_idx, kv_idx):
            return score + torch.dot(q_rope[b, h, q_idx], k_rope[b, h // g, kv_idx]) * rope_scale

        def broadcast(score, b, h, q_idx, kv_idx):
            return score + (q_rope[b, h, q_idx] * k_rope[b, h // g, kv_idx]).sum(dim=-1) * rope_scale
        return ZooMod(name, mla_rope_dot, None, {"q_rope": q_rope, "k_rope": k_rope}, reference_score_mod=broadcast)
    if name == "softcap_document":
        inner = make_mod("document", B=B, H=H, L=L, S=S, device=device, seed=seed)
        return ZooMod(name, make_mod("softcap", B=B, H=H, L=L, S=S).score_mod, inner.mask_mod)
    raise KeyError(f"unknown zoo mod {name!r}; known: {ZOO_NAMES}")


ZOO_NAMES = (
    "none", "causal", "sliding_window", "prefix_lm", "document", "dilated_sliding_window",
    "natten_2d", "alibi_causal", "softcap", "rel_bias", "per_head_scale", "multi_read",
    "empty_rows", "and_or", "softcap_document", "padding_bias",
)
# Entries with captured float tensors (grads checked when requires_grad=True).
ZOO_WITH_BUFFERS = ("rel_bias", "per_head_scale", "multi_read", "padding_bias")
# Mods that reduce rows of captured tensors (MLA's RoPE term); not in ZOO_NAMES (whose
# every test calls the mods on broadcast indices): use `reference_score_mod` for references.
ROW_ZOO_NAMES = ("mla_rope", "mla_rope_dot")
