"""PNG pictures of masks and attention scores (matplotlib, an optional extra).

    save_mask_png(block_mask, "mask.png")               # block level: full / partial / empty
    save_mask_png(mask_mod, "mask.png", Q_LEN=256, KV_LEN=256, element_level=True)
    save_scores_png(q, k, "scores.png", score_mod=..., block_mask=..., probabilities=True)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# colours of empty / partial / full blocks
_COLOURS = ("#ffffff", "#f2a541", "#1f4e79")
_MAX_ELEMENT_CELLS = 4096 * 4096  # element-level pictures only for small masks


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("flexattn.viz needs matplotlib: pip install flexattn[viz] (or pip install matplotlib)") from None
    return plt


def save_mask_png(block_mask_or_mask_mod, path: str, *, b: int = 0, h: int = 0, Q_LEN: Optional[int] = None,
                  KV_LEN: Optional[int] = None, BLOCK_SIZE=128, element_level: bool = False, title: str = None) -> str:
    """Save a picture of one (b, h) of a mask.

    Block level (default): each block coloured empty / partial / full. A mask_mod is first
    built into a BlockMask with Q_LEN / KV_LEN / BLOCK_SIZE. element_level=True draws the
    dense mask itself (needs the mask_mod and at most 4096 x 4096 positions)."""
    from .block_mask import BlockMask
    from .build_mask import create_block_mask, create_mask
    plt = _plt()
    if isinstance(block_mask_or_mask_mod, BlockMask):
        bm = block_mask_or_mask_mod
        mask_mod = bm.mask_mod if bm.mask_graph is not None else None
        Q_LEN, KV_LEN = bm.seq_lengths
    elif callable(block_mask_or_mask_mod):
        if Q_LEN is None or KV_LEN is None:
            raise ValueError("save_mask_png of a mask_mod needs Q_LEN and KV_LEN, e.g. Q_LEN=1024, KV_LEN=1024")
        mask_mod = block_mask_or_mask_mod
        bm = None if element_level else create_block_mask(mask_mod, b + 1, h + 1, Q_LEN, KV_LEN, BLOCK_SIZE=BLOCK_SIZE)
    else:
        raise TypeError(f"save_mask_png takes a BlockMask or a mask_mod, got {type(block_mask_or_mask_mod).__name__}")
    fig, ax = plt.subplots(figsize=(6, 6 * min(4.0, max(0.25, Q_LEN / KV_LEN))))
    if element_level:
        if mask_mod is None:
            raise ValueError("element_level=True needs the mask_mod (this BlockMask was built from blocks only)")
        if Q_LEN * KV_LEN > _MAX_ELEMENT_CELLS:
            raise ValueError(f"element_level=True draws every position: at most {_MAX_ELEMENT_CELLS} cells, "
                             f"got {Q_LEN} x {KV_LEN}; use the block-level picture instead")
        dense = create_mask(mask_mod, b + 1, h + 1, Q_LEN, KV_LEN)[b, h]
        ax.imshow(dense.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    else:
        from matplotlib.colors import ListedColormap
        st = bm.block_states()
        st = st[min(b, st.shape[0] - 1), min(h, st.shape[1] - 1)]
        ax.imshow(st.numpy(), cmap=ListedColormap(list(_COLOURS)), vmin=0, vmax=2, interpolation="nearest")
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=c, label=l) for c, l in zip(_COLOURS, ("empty", "partial", "full"))],
                  loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_xlabel("kv" + ("" if element_level else " block"))
    ax.set_ylabel("q" + ("" if element_level else " block"))
    ax.set_title(title or f"mask (b={b}, h={h})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def save_scores_png(q: torch.Tensor, k: torch.Tensor, path: str, *, b: int = 0, h: int = 0,
                    score_mod: Optional[Callable] = None, block_mask=None, scale: Optional[float] = None,
                    probabilities: bool = True, title: str = None) -> str:
    """Save a heat map of one (b, h) of the attention scores (after score_mod and the mask)
    or, with probabilities=True, of softmax of them. q [B, H, L, E], k [B, Hkv, S, E]
    (GQA: query head h reads kv head h // (H // Hkv)); O(L * S) memory."""
    from .evaluate import evaluate
    from .trace import trace_score
    plt = _plt()
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [B, H, L, E], got {tuple(q.shape)} and {tuple(k.shape)}")
    L, S, E = q.shape[2], k.shape[2], q.shape[3]
    hk = h // max(1, q.shape[1] // k.shape[1])
    s = (q[b, h].double() @ k[b, hk].double().T) * (scale if scale is not None else 1 / math.sqrt(E))
    i32 = dict(dtype=torch.int32, device=q.device)
    idx = dict(b=torch.tensor(b, **i32), h=torch.tensor(h, **i32), q_idx=torch.arange(L, **i32)[:, None],
               kv_idx=torch.arange(S, **i32)[None, :])
    if score_mod is not None:
        s = evaluate(trace_score(score_mod), score=s.float(), **idx).double()
    if block_mask is not None and block_mask.mask_graph is not None:
        keep = evaluate(block_mask.mask_graph, **idx)
        s = s.masked_fill(~keep, float("-inf"))
    if probabilities:
        s = torch.softmax(s, -1).nan_to_num(0.0)
    fig, ax = plt.subplots(figsize=(6, 6 * min(4.0, max(0.25, L / S))))
    img = ax.imshow(s.detach().cpu().float().numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(img, ax=ax, shrink=0.8)
    ax.set_xlabel("kv")
    ax.set_ylabel("q")
    ax.set_title(title or f"{'probabilities' if probabilities else 'scores'} (b={b}, h={h})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
