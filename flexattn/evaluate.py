"""Evaluate an IR graph with torch on (broadcastable) index tensors.

This is the exact interpreter: `create_block_mask` uses it on the tiles the analysis could
not decide, `create_mask` on everything, and the CPU attention path for score_mod and
mask_mod inside each tile. Inputs broadcast like torch tensors, so a tile is evaluated by
passing `q_idx` shaped [..., M, 1] and `kv_idx` shaped [..., 1, N].
"""
from __future__ import annotations

import torch

from .ir import Graph, Node, TORCH_IMPL


def evaluate(graph: Graph, *, b, h, q_idx, kv_idx, score=None, buffers=None, where=None) -> torch.Tensor:
    """Run `graph` on the given inputs; returns a tensor of their broadcast shape.

    `buffers` replaces `graph.buffers` (same order) - the CPU backward passes copies that
    require grad. Loads out of a buffer's bounds raise IndexError naming the buffer.
    `where` (bool, broadcastable to the inputs; the CPU path passes the positions the mask
    keeps): only loads at those positions must be in bounds; elsewhere an index out of
    bounds is clamped into them, so what the result holds there is unspecified (the caller
    discards it) but nothing raises.
    """
    values = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx, "score": score}
    bufs = graph.buffers if buffers is None else buffers
    env: dict[int, object] = {}
    for n in graph.live_nodes():
        if n.op == "input":
            v = values[n.args[0]]
            if v is None:
                raise ValueError(f"evaluating a {graph.kind} mod needs input {n.args[0]!r}")
        elif n.op == "const":
            v = n.args[0]
        elif n.op == "param":
            v = graph.params[n.args[0]]
        elif n.op == "buffer":
            v = bufs[n.args[0]]
        elif n.op == "cast":
            v = _as_tensor(env[id(n.args[0])], values).to(n.dtype)
        elif n.op == "load":
            v = _load(graph, n, env[id(n.args[0])], [env[id(a)] for a in n.args[1:]], where)
        else:
            args = [env[id(a)] for a in n.args]
            if len(args) == 1 and not isinstance(args[0], torch.Tensor):
                # torch's unary functions take tensors only (a derivative graph negates
                # constants): a 0-d tensor promotes like the Python number, and float64
                # keeps the number as it is
                x = args[0]
                args = [torch.as_tensor(x, dtype=torch.float64) if isinstance(x, float) else torch.as_tensor(x)]
            v = TORCH_IMPL[n.op](*args)
        env[id(n)] = v
    out = _as_tensor(env[id(graph.output)], values)
    # A score graph is traced with a float32 score; evaluated on a float64 score (the CPU
    # path for float64 inputs) its float result keeps the wider dtype instead of rounding.
    keep_float = graph.kind == "score" and out.dtype.is_floating_point and score is not None \
        and out.dtype == torch.promote_types(out.dtype, graph.output.dtype)
    if out.dtype != graph.output.dtype and not keep_float:
        out = out.to(graph.output.dtype)
    shape = torch.broadcast_shapes(*[torch.as_tensor(v).shape for v in values.values() if v is not None])
    return out.expand(shape) if out.shape != shape else out


def _as_tensor(v, values) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    device = next((x.device for x in values.values() if isinstance(x, torch.Tensor)), None)
    return torch.tensor(v, device=device)


def _load(graph: Graph, node: Node, buf: torch.Tensor, indices: list, where=None):
    if not indices:
        return buf
    idx = []
    for dim, i in enumerate(indices):
        i = torch.as_tensor(i, device=buf.device)
        if i.numel():
            lo, hi = int(i.min()), int(i.max())
            if (lo < 0 or hi >= buf.shape[dim]) and where is not None:
                out = (i < 0) | (i >= buf.shape[dim])
                kept = out & where
                if bool(kept.any()):   # report the first index read at a kept position
                    bad = torch.broadcast_to(i, kept.shape)[kept]
                    lo, hi = int(bad.min()), int(bad.max())
                else:                  # only positions the mask removes: read in bounds, discarded
                    lo, hi = 0, 0
                    i = i.clamp(0, buf.shape[dim] - 1)
            if lo < 0 or hi >= buf.shape[dim]:
                raise IndexError(
                    f"{graph.kind}_mod {graph.fn_name!r} reads buf{node.args[0].args[0]} (a captured tensor of "
                    f"shape {tuple(buf.shape)}) at index {lo if lo < 0 else hi} in dimension {dim}, outside "
                    f"[0, {buf.shape[dim]}): make the captured tensor cover every (b, h, q_idx, kv_idx) "
                    f"the mod is evaluated at")
        idx.append(i.long())
    return buf[tuple(idx)]
