"""flexattn: a FlexAttention-style attention compiler on torch + Triton.

    from flexattn import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=4096, KV_LEN=4096)
    out = flex_attention(q, k, v, block_mask=block_mask)

Public names are imported lazily (on first use), so `import flexattn` stays cheap and
a stage's module loads only when it is needed.
"""
import importlib

_EXPORTS = {
    "TraceError": "trace", "trace_mask": "trace", "trace_score": "trace",
    "Graph": "ir", "Node": "ir", "IRError": "ir",
    "evaluate": "evaluate",
    "BlockMask": "block_mask", "create_block_mask": "build_mask", "create_mask": "build_mask",
    "and_masks": "masks", "or_masks": "masks", "noop_mask": "masks",
    "flex_attention": "attention", "AuxRequest": "attention", "AuxOutput": "attention",
    "FlexKernelOptions": "attention",
    "dropout_mask": "dropout",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
