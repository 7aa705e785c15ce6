"""Evaluate an IR graph with torch on (broadcastable) index tensors.

This is the exact interpreter: `create_block_mask` uses it on the tiles the analysis could
not decide, `create_mask` on everything, and the CPU attention path for score_mod and
mask_mod inside each tile. Inputs broadcast like torch tensors, so a tile is evaluated by
passing `q_idx` shaped [..., M, 1] and `kv_idx` shaped [..., 1, N].

Rows (`vload`, see flexattn.ir) are evaluated inside their `rowsum` only: a row of the
common shape [..., M, N] would hold M*N*R values. A rowsum of the product of two row loads
(`torch.dot(q_rope[b, h, q_idx], k_rope[b, h, kv_idx])`) is one einsum over the rows as
they are read ([..., M, 1, R] and [..., 1, N, R]: a matrix product, never a product of
the common shape); any other rowsum runs over chunks of the row's dimension, with at most
ROW_CHUNK_ELEMENTS elements in flight per chunk.
"""
from __future__ import annotations

import string

import torch

from .ir import Graph, Node, TORCH_IMPL

ROW_CHUNK_ELEMENTS = 1 << 22


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
        if n.row:
            continue  # evaluated inside its rowsum
        if n.op == "rowsum":
            v = _rowsum(graph, n, env, values, where)
        elif n.op == "input":
            v = values[n.args[0]]
            if v is None:
                raise ValueError(f"evaluating a {graph.kind} mod needs input {n.args[0]!r}")
        elif n.op == "const":
            v = n.args[0]
        elif n.op == "param":
            v = graph.params[n.args[0]]
        elif n.op == "buffer":
            v = bufs[n.args[0]]
        else:
            v = _node_value(graph, n, env, values, where)
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


def _node_value(graph: Graph, n: Node, env: dict, values: dict, where):
    """The value of non-leaf node n (not a rowsum) from its arguments' values in env."""
    if n.op == "cast":
        return _as_tensor(env[id(n.args[0])], values).to(n.dtype)
    if n.op in ("load", "vload"):
        return _load(graph, n, env[id(n.args[0])], [env[id(a)] for a in n.args[1:]], where)
    args = [env[id(a)] for a in n.args]
    if len(args) == 1 and not isinstance(args[0], torch.Tensor):
        # torch's unary functions take tensors only (a derivative graph negates
        # constants): a 0-d tensor promotes like the Python number, and float64
        # keeps the number as it is
        x = args[0]
        args = [torch.as_tensor(x, dtype=torch.float64) if isinstance(x, float) else torch.as_tensor(x)]
    return TORCH_IMPL[n.op](*args)


def _rowsum(graph: Graph, n: Node, env: dict, values: dict, where):
    """rowsum(x): x's row nodes evaluated with a trailing row dimension (scalar arguments
    get a size-1 one), summed over it - by one einsum for a product of two row loads,
    else chunk by chunk of the row dimension."""
    x = n.args[0]
    rows = [r for r in graph.upstream([x]) if r.row]
    if x.op == "mul" and all(a.op == "vload" for a in x.args):
        a, b = (_node_value(graph, r, env, values, where) for r in x.args)
        if a.dtype == b.dtype == x.dtype:
            return _row_dot(a, b).to(n.dtype)
    read = {id(r): _node_value(graph, r, env, values, where) for r in rows if r.op == "vload"}
    length = next(iter(read.values())).shape[-1]
    shape = torch.broadcast_shapes(*[torch.as_tensor(v).shape for v in values.values() if v is not None])
    chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, shape.numel()))
    total = None
    for d0 in range(0, length, chunk):
        local = dict(env)
        for r in rows:
            if r.op == "vload":
                v = read[id(r)][..., d0:d0 + chunk]
            else:
                args = {id(a): local[id(a)] if a.row else _with_row_dim(local[id(a)]) for a in r.args}
                v = _node_value(graph, r, args, values, where)
            local[id(r)] = v
        part = TORCH_IMPL["rowsum"](local[id(x)])
        total = part if total is None else total + part
    if total is None:  # a row of length 0 sums to 0
        total = torch.zeros((), dtype=n.dtype)
    return total.to(n.dtype)


def _with_row_dim(v):
    """A scalar node's value as an operand of a row op: a trailing size-1 dimension."""
    return v.unsqueeze(-1) if isinstance(v, torch.Tensor) and v.dim() else v


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) over the broadcast of a [..., R] and b [..., R] as one einsum: a
    dimension where one side has size 1 is an outer-product index of the other side, one
    where both have size 1 stays 1 - no tensor of the broadcast shape times R is made."""
    nd = max(a.dim(), b.dim())
    a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (nd - b.dim()) + tuple(b.shape))
    letters = iter(string.ascii_letters)
    ia, ib, io, squeeze_a, squeeze_b = [], [], [], [], []
    for d in range(nd - 1):
        sa, sb = a.shape[d], b.shape[d]
        c = next(letters)
        if sa == 1 and sb == 1:
            squeeze_a.append(d); squeeze_b.append(d); io.append(None)
        elif sa == 1:
            squeeze_a.append(d); ib.append(c); io.append(c)
        elif sb == 1:
            squeeze_b.append(d); ia.append(c); io.append(c)
        else:
            ia.append(c); ib.append(c); io.append(c)
    r = next(letters)
    a2 = a.squeeze(squeeze_a) if squeeze_a else a
    b2 = b.squeeze(squeeze_b) if squeeze_b else b
    out = torch.einsum(f"{''.join(ia)}{r},{''.join(ib)}{r}->{''.join(c for c in io if c)}", a2, b2)
    return out.reshape([1 if c is None else out.shape[[x for x in io if x].index(c)] for c in io])


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
