"""Context parallelism: one attention over the ranks of a torch.distributed process group,
the sequence sharded across them, communication decided by the BlockMask.

    from flexattn import create_block_mask
    from flexattn import distributed as cp

    bm = create_block_mask(mask_mod, None, None, N, N)        # global, the same on every rank
    q, k, v = (cp.shard(t, 2, balance="head_tail") for t in (q_full, k_full, v_full))
    out = cp.flex_attention(q, k, v, score_mod, bm, balance="head_tail")
    out_full = cp.unshard(out, 2, balance="head_tail", seq_len=N)

Modules: layout (who holds which tokens), mask_rows (what the mask says per q-block row),
plan (who needs which kv blocks), global_mods (local mods on global positions), exchange
(the autograd-aware P2P fetch), overlap (the fetch overlapped with the local calls, parts
merged by lse), agree (checks every rank passes), sharding (shard / unshard), attention
(flex_attention).
"""
from .attention import flex_attention
from .layout import Layout, balanced_layout, make_layout
from .plan import WorldPlan, world_plan
from .sharding import shard, unshard

__all__ = ["Layout", "WorldPlan", "balanced_layout", "flex_attention", "make_layout", "shard", "unshard",
           "world_plan"]
