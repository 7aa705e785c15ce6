"""The block-sparse tiled attention path for CPU tensors (forward and backward).

For each q-tile it runs an online softmax over the kv blocks the BlockMask lists for that
q-block: *partial* blocks with the mask evaluated on the tile, *full* blocks without it;
empty blocks are never visited. Work is vectorised over (batch, query head): for a q-tile
and a slot j, every (b, h) gathers its own j-th kv block by index, and (b, h) pairs with
fewer than j+1 blocks mask that slot out. Memory is O(B * H * tile * (tile + D)) besides the
inputs, outputs and dk/dv accumulators - never O(L * S).

Numerics: fp16/bf16/fp32 inputs compute in float32, float64 inputs in float64. The output
is in q.dtype; lse (natural log) is float32, or float64 for float64 inputs (as torch does).
Fully masked rows give out 0, lse -inf and zero gradients.

The backward recomputes each tile (no stored probabilities): P = exp(score - lse),
dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dlse), then through score_mod by
torch.autograd.grad on the tile (which also yields the gradients of captured tensors that
require grad), dQ += dS K * scale, dK += dS^T Q * scale. Dropout replays its hash per tile.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .call import attend, needs_grad
from .evaluate import evaluate
from .dropout import dropout_keep
from .ir import Graph

NEG_INF = float("-inf")
# kernel_options keys this path reads; other keys (GPU tuning) are ignored here.
CPU_OPTION_KEYS = ("BLOCK_M", "BLOCK_N")


@dataclass
class CpuRun:
    """Everything about one call except the tensors autograd tracks; runs it for
    flexattn.call (forward / backward, gradients for the captured tensors in grad_slots)."""
    score_graph: Optional[Graph]
    mask_graph: Optional[Graph]
    scale: float
    q_block: int
    kv_block: int
    tile_m: int
    tile_n: int
    # the BlockMask's block lists [Bm, Hm, nQ(, n)]; Bm/Hm of 1 broadcast over batch/heads
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_num: Optional[torch.Tensor]
    full_idx: Optional[torch.Tensor]
    dropout_p: float
    dropout_seed: int
    compute_dtype: torch.dtype
    grad_slots: tuple = ()  # the score_mod's captured float tensors that require grad

    def forward(self, q, k, v, score_bufs, mask_bufs):
        return _forward(self, q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs):
        return _backward(self, q, k, v, out, lse, dout, dlse, score_bufs)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_sizes(kernel_options: dict, q_block: int, kv_block: int) -> tuple[int, int]:
    sizes = []
    for key, block, which in (("BLOCK_M", q_block, "Q"), ("BLOCK_N", kv_block, "KV")):
        t = kernel_options.get(key, block)
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0 or block % t:
            raise ValueError(f"kernel_options[{key!r}] must be a positive int dividing the BlockMask's "
                             f"{which} block size {block}, got {t!r}; use a divisor of {block} or leave it unset")
        sizes.append(t)
    return sizes[0], sizes[1]


# ---------------------------------------------------------------------------------------
# Traversal: the single definition of which (q-tile, kv columns) pairs are visited.
#
# A q-tile meets the kv blocks its q-block lists in a few large chunks - all of its partial
# blocks, then all of its full blocks, each cut only where the chunk's score matrix would
# pass _CHUNK_ELEMS - so the number of torch operations per call grows with the number of
# q-tiles, not with the number of blocks (each operation is large: few thread-pool
# rendezvous, which is what collapses on a machine whose cores are busy). A chunk whose
# blocks are consecutive (and the same for every (b, h)) reads K and V as a slice, without
# a gather.

# score-matrix elements (B * Hq * tile_m * columns) per chunk: 16 MiB of float32
_CHUNK_ELEMS = 1 << 22


@dataclass
class _KVTile:
    pos: torch.Tensor                # [Bm, Hm, N] int64 kv positions, clamped into [0, S) (safe to gather)
    valid: Optional[torch.Tensor]    # [Bm, Hm, 1, N] bool: a real block slot and position < S (None: all)
    partial: bool                    # evaluate the mask_mod on this tile
    span: Optional[tuple] = None     # (p0, p1): pos is arange(p0, p1), the same for every (b, h)


def _kv_tiles(run: CpuRun, i: int, S: int, cols: int) -> Iterator[_KVTile]:
    """kv chunks of q-block i (at most `cols` columns each, whole blocks): partial blocks,
    then full blocks."""
    device = run.kv_num.device
    kvb = run.kv_block
    sub = torch.arange(kvb, device=device)
    per = max(1, cols // kvb)
    for num, idx, partial in ((run.kv_num, run.kv_idx, True), (run.full_num, run.full_idx, False)):
        if num is None:
            continue
        num_i = num[:, :, i]
        n_slots = int(num_i.max()) if num_i.numel() else 0
        n_kv_blocks = idx.shape[-1]
        for j0 in range(0, n_slots, per):
            j1 = min(n_slots, j0 + per)
            blk = idx[:, :, i, j0:j1].long().clamp(0, max(n_kv_blocks - 1, 0))  # unused slots may hold anything
            if blk.shape[0] == 1 and blk.shape[1] == 1 and int(num_i.min()) >= j1:
                row = blk[0, 0]
                b0 = int(row[0])
                if int(row[-1]) - b0 == j1 - j0 - 1 and (j1 - j0 < 3 or bool((row.diff() == 1).all())):
                    p0, p1 = b0 * kvb, min((b0 + j1 - j0) * kvb, S)
                    yield _KVTile(torch.arange(p0, p1, device=device).view(1, 1, -1), None, partial, (p0, p1))
                    continue
            pos = (blk[..., None] * kvb + sub).flatten(-2)
            valid = (torch.arange(j0, j1, device=device) < num_i[..., None]).repeat_interleave(kvb, -1) & (pos < S)
            yield _KVTile(pos.clamp(max=S - 1), valid[..., None, :], partial)


def _q_tiles(run: CpuRun, L: int) -> Iterator[tuple[int, int, int]]:
    """(q-block index, first row, end row) of every q-tile."""
    for i in range(math.ceil(L / run.q_block)):
        for q0 in range(i * run.q_block, min(L, (i + 1) * run.q_block), run.tile_m):
            yield i, q0, min(L, q0 + run.tile_m, (i + 1) * run.q_block)


def _chunk_cols(run: CpuRun, B: int, Hq: int) -> int:
    return max(run.kv_block, _CHUNK_ELEMS // max(1, B * Hq * run.tile_m))


class _Indices:
    """int32 index tensors of the mods, shaped to broadcast against a [B, Hq, M, N] tile."""

    def __init__(self, B: int, Hq: int, Hkv: int, device):
        self.b = torch.arange(B, dtype=torch.int32, device=device).view(B, 1, 1, 1)
        self.h = torch.arange(Hq, dtype=torch.int32, device=device).view(1, Hq, 1, 1)
        self.group = Hq // Hkv
        # gather indices for k/v [B, Hkv, S, D]: batch and the kv head each query head reads
        self.gb = torch.arange(B, device=device).view(B, 1, 1)
        self.gh = (torch.arange(Hq, device=device) // (Hq // Hkv)).view(1, Hq, 1)

    @staticmethod
    def q(q0: int, q1: int, device) -> torch.Tensor:
        return torch.arange(q0, q1, dtype=torch.int32, device=device).view(1, 1, -1, 1)

    def gather(self, x: torch.Tensor, tile: _KVTile, dtype) -> torch.Tensor:
        """x [B, Hkv, S, D] at the tile's positions, per query head: [B, Hq, N, D]."""
        if tile.span is not None:
            g = x[:, :, tile.span[0]:tile.span[1]]
        elif tile.pos.shape[0] == 1 and tile.pos.shape[1] == 1:
            g = x.index_select(2, tile.pos.view(-1))
        else:
            return x[self.gb, self.gh, tile.pos].to(dtype)
        g = g.to(dtype)
        return g.repeat_interleave(self.group, dim=1) if self.group > 1 else g

    def scatter_add(self, acc: torch.Tensor, tile: _KVTile, val: torch.Tensor) -> None:
        """acc [B, Hkv, S, D] += val [B, Hq, N, D] at the tile's positions (query heads of a
        kv head summed)."""
        if tile.span is None and not (tile.pos.shape[0] == 1 and tile.pos.shape[1] == 1):
            acc.index_put_((self.gb, self.gh, tile.pos), val, accumulate=True)
            return
        if self.group > 1:
            B, Hq, N, D = val.shape
            val = val.view(B, Hq // self.group, self.group, N, D).sum(2)
        if tile.span is not None:
            acc[:, :, tile.span[0]:tile.span[1]] += val
        else:
            acc.index_add_(2, tile.pos.view(-1), val)


def _scores(run: CpuRun, idx: _Indices, qt, kt, q_idx, tile: _KVTile, *, s0=None, buffers=None):
    """(pre-mod score, post-mod score, the keep-able mask or None: all kept). The caller
    sets the post-mod score to -inf where the mask is False."""
    kv_idx = tile.pos.to(torch.int32)[..., None, :]
    if s0 is None:
        s0 = (qt @ kt.transpose(-1, -2)) * run.scale
    allowed = tile.valid
    if tile.partial and run.mask_graph is not None:
        m = evaluate(run.mask_graph, b=idx.b, h=idx.h, q_idx=q_idx, kv_idx=kv_idx)
        allowed = m if allowed is None else allowed & m
    s = s0
    if run.score_graph is not None:
        # captured-tensor reads must be in bounds only where the mask keeps (elsewhere clamped)
        s = evaluate(run.score_graph, score=s0, b=idx.b, h=idx.h, q_idx=q_idx, kv_idx=kv_idx,
                     buffers=buffers, where=allowed).to(run.compute_dtype)
    return s0, s, allowed


def _keep(run: CpuRun, idx: _Indices, q_idx, tile: _KVTile):
    return dropout_keep(run.dropout_seed, run.dropout_p, idx.b, idx.h, q_idx, tile.pos[..., None, :])


# ---------------------------------------------------------------------------------------
# Running the q-tiles: one task per thread, each with single-threaded torch operations
#
# torch's own parallelism splits every operation over the thread pool and waits for all
# threads at its end; with more busy threads than cores a descheduled thread stalls every
# one of those rendezvous, and a call made of hundreds of operations collapses (tens of
# seconds where one large kernel takes twice its quiet time). Here the q-tiles are dealt
# out to torch.get_num_threads() Python threads instead, each running its torch operations
# on one thread (the heavy ones release the GIL), so a call has one rendezvous: its end.
# Backward accumulators (dk, dv, captured-tensor gradients) are per thread, summed after.

_THREADS_LOCK = threading.Lock()


def _over_q_tiles(run: CpuRun, tiles: list, fn, new_acc, dynamic: bool) -> list:
    """Call fn(i, q0, q1, acc) for every q-tile; returns the accumulators (one per thread).
    dynamic: threads take the next tile when done with one (the costliest - most listed
    blocks - first), so a thread the OS deschedules holds up no other; otherwise the tiles,
    costliest first, are dealt round-robin, so which tiles sum into which accumulator, in
    which order, is the same on every run (bitwise-reproducible gradients)."""
    total = torch.get_num_threads()
    n = min(total, len(tiles))
    if n <= 1 or not _THREADS_LOCK.acquire(blocking=False):   # one pool at a time; others run here
        acc = new_acc()
        for t in tiles:
            fn(*t, acc)
        return [acc]
    try:
        cost = run.kv_num.sum((0, 1)) + (0 if run.full_num is None else run.full_num.sum((0, 1)))
        cost = cost.tolist()
        ranked = sorted(tiles, key=lambda t: -cost[t[0]] * (t[2] - t[1]))
        shared = iter(ranked)
        take = threading.Lock()
        grad_mode = torch.is_grad_enabled()
        accs = [new_acc() for _ in range(n)]

        def work(w):
            torch.set_num_threads(1)   # this thread's operations: one thread each
            mine = None if dynamic else iter(ranked[w::n])
            with torch.set_grad_enabled(grad_mode):
                while True:
                    if mine is None:
                        with take:
                            t = next(shared, None)
                    else:
                        t = next(mine, None)
                    if t is None:
                        return
                    fn(*t, accs[w])

        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(work, w) for w in range(n)]:
                f.result()
        return accs
    finally:
        torch.set_num_threads(total)
        _THREADS_LOCK.release()


# ---------------------------------------------------------------------------------------
# Forward

def _forward(run: CpuRun, q, k, v):
    B, Hq, L, _ = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    cdt, dev = run.compute_dtype, q.device
    idx = _Indices(B, Hq, Hkv, dev)
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, L, dtype=cdt, device=dev)
    drop_scale = 1.0 / (1.0 - run.dropout_p)
    cols = _chunk_cols(run, B, Hq)

    def q_tile(i, q0, q1, _acc):
        M = q1 - q0
        qt = q[:, :, q0:q1].to(cdt)
        q_idx = idx.q(q0, q1, dev)
        m = torch.full((B, Hq, M, 1), NEG_INF, dtype=cdt, device=dev)   # running row max
        l = torch.zeros(B, Hq, M, 1, dtype=cdt, device=dev)             # running sum of exp
        acc = torch.zeros(B, Hq, M, Ev, dtype=cdt, device=dev)
        for tile in _kv_tiles(run, i, S, cols):
            kt = idx.gather(k, tile, cdt)
            vt = idx.gather(v, tile, cdt)
            _, s, allowed = _scores(run, idx, qt, kt, q_idx, tile)
            if allowed is not None:
                s = s.masked_fill(~allowed, NEG_INF)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)   # rows with nothing yet: no -inf - -inf
            alpha = torch.exp(m - m_safe)
            p = torch.exp(s - m_safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            if run.dropout_p > 0:
                p = p * _keep(run, idx, q_idx, tile) * drop_scale
            acc = acc * alpha + p @ vt
            m = m_new
        empty = l == 0
        out[:, :, q0:q1] = (acc / torch.where(empty, 1.0, l)).to(q.dtype)
        lse[:, :, q0:q1] = torch.where(empty, NEG_INF, m + torch.log(torch.where(empty, 1.0, l))).squeeze(-1)

    _over_q_tiles(run, list(_q_tiles(run, L)), q_tile, lambda: None, dynamic=True)
    return out, lse


# ---------------------------------------------------------------------------------------
# Backward

def _backward(run: CpuRun, q, k, v, out, lse, dout, dlse, buffers):
    """(dq, dk, dv, [gradient of each captured tensor in run.grad_slots])."""
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    cdt, dev = run.compute_dtype, q.device
    idx = _Indices(B, Hq, Hkv, dev)
    dq = torch.zeros(q.shape, dtype=cdt, device=dev)
    dk = torch.zeros(k.shape, dtype=cdt, device=dev)
    dv = torch.zeros(v.shape, dtype=cdt, device=dev)
    # copies of the captured tensors that require grad: autograd.grad on each tile fills them
    grad_slots = run.grad_slots
    grad_bufs = [b.detach().requires_grad_(True) if j in grad_slots else b for j, b in enumerate(buffers)]
    dbufs = [torch.zeros_like(buffers[j]) for j in grad_slots]
    dout = dout.to(cdt)
    delta = (dout * out.to(cdt)).sum(-1, keepdim=True)                   # rowsum(dO * O)
    dlse = torch.zeros_like(delta) if dlse is None else dlse.to(cdt).unsqueeze(-1)
    # rows with lse = -inf are fully masked: +inf makes every p = exp(s - lse) exactly 0
    lse_safe = torch.where(lse == NEG_INF, float("inf"), lse).unsqueeze(-1).to(cdt)
    drop_scale = 1.0 / (1.0 - run.dropout_p)
    cols = _chunk_cols(run, B, Hq)

    def q_tile(i, q0, q1, accs):
        dk, dv, dbufs = accs
        qt = q[:, :, q0:q1].to(cdt)
        dot = dout[:, :, q0:q1]
        q_idx = idx.q(q0, q1, dev)
        row = (slice(None), slice(None), slice(q0, q1))
        dqt = torch.zeros_like(qt)
        for tile in _kv_tiles(run, i, S, cols):
            kt = idx.gather(k, tile, cdt)
            vt = idx.gather(v, tile, cdt)
            s0 = (qt @ kt.transpose(-1, -2)) * run.scale
            with torch.enable_grad():
                if run.score_graph is not None:
                    s0.requires_grad_(True)
                _, s, allowed = _scores(run, idx, qt, kt, q_idx, tile, s0=s0, buffers=grad_bufs)
            s_kept = s.detach() if allowed is None else s.detach().masked_fill(~allowed, NEG_INF)
            p = torch.exp(s_kept - lse_safe[row])
            dp = dot @ vt.transpose(-1, -2)
            if run.dropout_p > 0:
                keep = _keep(run, idx, q_idx, tile).to(cdt) * drop_scale  # bool * float would be float32
                pd, dp = p * keep, dp * keep
            else:
                pd = p
            ds = p * (dp - delta[row] + dlse[row])
            if run.score_graph is not None:
                wrt = [s0] + [grad_bufs[j] for j in grad_slots]
                grads = torch.autograd.grad(s, wrt, ds, allow_unused=True) if s.requires_grad else [None] * len(wrt)
                # a score_mod that ignores `score` passes no gradient to it
                ds = torch.zeros_like(s0) if grads[0] is None else grads[0].expand_as(s0)
                if allowed is not None:
                    ds = ds.masked_fill(~allowed, 0.0)   # a mod's inf/NaN slope where masked must not leak
                for n, g in enumerate(grads[1:]):
                    if g is not None:
                        dbufs[n] += g
            dqt += (ds @ kt) * run.scale
            idx.scatter_add(dk, tile, (ds.transpose(-1, -2) @ qt) * run.scale)
            idx.scatter_add(dv, tile, pd.transpose(-1, -2) @ dot)
        dq[row] = dqt

    def new_accs():
        return (torch.zeros(k.shape, dtype=cdt, device=dev), torch.zeros(v.shape, dtype=cdt, device=dev),
                [torch.zeros_like(buffers[j]) for j in grad_slots])

    for dk_w, dv_w, dbufs_w in _over_q_tiles(run, list(_q_tiles(run, L)), q_tile, new_accs, dynamic=False):
        dk += dk_w
        dv += dv_w
        for n, g in enumerate(dbufs_w):
            dbufs[n] += g
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbufs


def make_run(dtype, *, score_graph, mask_graph, block_size, kv_blocks, scale, kernel_options, dropout_p,
             dropout_seed, grad_slots=()) -> CpuRun:
    """The run of one call; kv_blocks = (kv_num_blocks, kv_indices, full_kv_num_blocks or
    None, full_kv_indices or None) of the BlockMask; grad_slots: see CpuRun."""
    q_block, kv_block = block_size
    tile_m, tile_n = _tile_sizes(kernel_options or {}, q_block, kv_block)
    kv_num, kv_idx, full_num, full_idx = kv_blocks
    return CpuRun(score_graph=score_graph, mask_graph=mask_graph, scale=float(scale),
                 q_block=q_block, kv_block=kv_block, tile_m=tile_m, tile_n=tile_n,
                 kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx,
                 dropout_p=float(dropout_p), dropout_seed=int(dropout_seed or 0),
                 compute_dtype=_compute_dtype(dtype), grad_slots=tuple(grad_slots))


def flex_attention_cpu(q, k, v, *, score_graph, mask_graph, block_mask, scale, kernel_options, dropout_p,
                       dropout_seed):
    """Block-sparse tiled attention on CPU tensors -> (out [B,Hq,L,Ev] in q.dtype, lse [B,Hq,L]).

    Inputs are validated by flexattn.attention.flex_attention; `block_mask` is a BlockMask
    whose lengths match the inputs, `score_graph`/`mask_graph` traced IR graphs or None.
    Differentiable w.r.t. q, k, v and the score graph's captured float tensors.
    `kernel_options` may set BLOCK_M / BLOCK_N, tile sizes dividing the BlockMask's blocks.
    """
    block_mask.validate()  # hand-built block lists: checked once per mask
    buffers = list(score_graph.buffers) if score_graph is not None else []
    run = make_run(q.dtype, score_graph=score_graph, mask_graph=mask_graph, block_size=block_mask.BLOCK_SIZE,
                   kv_blocks=(block_mask.kv_num_blocks, block_mask.kv_indices,
                              block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
                   scale=scale, kernel_options=kernel_options, dropout_p=dropout_p, dropout_seed=dropout_seed,
                   grad_slots=float_grad_slots(buffers))
    mask_bufs = list(mask_graph.buffers) if mask_graph is not None else []
    return attend(run, q, k, v, buffers, mask_bufs, needs_grad(q, k, v, buffers))


def float_grad_slots(buffers) -> tuple:
    """The CPU path's gradient slots: every captured float tensor that requires grad (read
    by score_mod or not: an unread one gets a zero gradient)."""
    return tuple(j for j, b in enumerate(buffers) if b.requires_grad and b.is_floating_point())
