"""Regenerate the docs' pictures: one PNG per mask of flexattn.masks (docs/gallery/*.png) and
the BlockMask picture of docs/compiler.md. Run from the repository root:

    python docs/gen_gallery.py
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flexattn import and_masks, create_block_mask, create_mask, masks  # noqa: E402
from flexattn.varlen import create_varlen_block_mask  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gallery")
L, S = 32, 32

GALLERY = {
    "causal": (masks.causal(), L, S),
    "causal_bottom_right": (masks.causal("bottom_right", q_len=24, kv_len=32), 24, 32),
    "sliding_window": (masks.sliding_window(6, 0), L, S),
    "band": (masks.band(4, 2), L, S),
    "dilated_sliding_window": (masks.dilated_sliding_window(12, 0, 3), L, S),
    "chunked_causal": (and_masks(masks.causal(), masks.chunked(8)), L, S),
    "prefix_lm": (masks.prefix_lm(10), L, S),
    "document_causal": (masks.document(cu_seqlens=[0, 7, 19, 26, 32], inner=masks.causal()), L, S),
    "document_bottom_right": (masks.document(cu_seqlens=[0, 4, 10, 16], cu_seqlens_kv=[0, 8, 20, 32],
                                             inner=masks.causal(), align="bottom_right"), 16, 32),
}


def draw(name, dense, path):
    fig, ax = plt.subplots(figsize=(3, 3 * dense.shape[0] / dense.shape[1] + 0.3), dpi=100)
    ax.imshow(dense, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("kv_idx", fontsize=8)
    ax.set_ylabel("q_idx", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, (mod, q_len, kv_len) in GALLERY.items():
        dense = create_mask(mod, 1, 1, q_len, kv_len)[0, 0].float().numpy()
        draw(name, dense, os.path.join(OUT, f"{name}.png"))
    # BlockMask picture: packed documents, causal, 16x16 blocks of a 128x128 mask
    bm = create_varlen_block_mask([0, 20, 70, 128], causal=True, BLOCK_SIZE=16)
    states = bm.block_states()[0, 0].float().numpy()
    dense = create_mask(bm.mask_mod, 1, 1, 128, 128)[0, 0].float().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4), dpi=100)
    axes[0].imshow(dense, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    axes[0].set_title("mask (128 x 128)", fontsize=9)
    axes[1].imshow(states, cmap="Greens", vmin=0, vmax=2.3, interpolation="nearest")
    for (i, j), s in __import__("numpy").ndenumerate(states):
        axes[1].text(j, i, "FPE"[2 - int(s)] if s else "", ha="center", va="center", fontsize=6)
    axes[1].set_title("BlockMask: F full, P partial, (blank) empty", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "blockmask.png"))
    plt.close(fig)
    print(f"wrote {len(GALLERY) + 1} PNGs to {OUT}")


if __name__ == "__main__":
    main()
