"""flexattn: a FlexAttention-style attention compiler on torch + Triton.

    from flexattn import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=4096, KV_LEN=4096)
    out = flex_attention(q, k, v, block_mask=block_mask)
"""
from .trace import TraceError, trace_mask, trace_score
from .ir import Graph, Node, IRError
from .evaluate import evaluate
from .block_mask import BlockMask, create_block_mask, create_mask, and_masks, or_masks, noop_mask
from .attention import flex_attention

__all__ = [
    "BlockMask", "create_block_mask", "create_mask", "and_masks", "or_masks", "noop_mask",
    "flex_attention", "TraceError", "trace_mask", "trace_score", "Graph", "Node", "IRError", "evaluate",
]
__version__ = "0.1.0"
