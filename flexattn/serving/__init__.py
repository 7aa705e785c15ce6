"""flexattn.serving: attention for inference engines - a paged KV cache, batches of
sequences of different lengths (continuous batching), decode, speculative tree
verification and chunked prefill, with flexattn's mods in global positions.

    cache.py      PagedKVCache: the page pool, per-sequence page tables, reserve / append / free
    attention.py  paged_attention: the entry point (checks, then the CPU path or the kernels)
    masks.py      create_cache_block_mask, tree_mask, tree_ancestors: logical BlockMasks
    checks.py     the input checks, run before anything launches
    cpu.py        the CPU path, reading K/V through the page table

The Triton side is flexattn.kernels.paged (tiling) over the split-KV kernel of
flexattn.kernels.decode, whose contiguous cache is the page-table-free case of one kernel.
"""
from .attention import paged_attention
from .cache import PagedKVCache
from .masks import create_cache_block_mask, tree_ancestors, tree_mask

__all__ = ["PagedKVCache", "paged_attention", "create_cache_block_mask", "tree_mask", "tree_ancestors"]
