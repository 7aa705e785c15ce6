"""The block-sparse tiled attention path for CPU tensors (forward and backward).

For each q-tile it runs an online softmax over the kv blocks the BlockMask lists for that
q-block: *partial* blocks with the mask evaluated on the tile, *full* blocks without it;
empty blocks are never visited. Work is vectorised over (batch, query head): for a q-tile
and a slot j, every (b, h) gathers its own j-th kv block by index, and (b, h) pairs with
fewer than j+1 blocks mask that slot out. Without a score_mod or dropout each chunk is
plain masked attention and runs in torch's fused CPU attention kernel (see "fused" below);
there a q-block whose partial and full blocks are consecutive (sliding windows, documents,
near the causal diagonal) meets them in one merged chunk (_merged_tile); where every
q-tile meets one chunk and the chunks come in a few shapes, the forward and the backward
stack the q-tiles of one shape into a few kernel calls per thread (see "batched kernel calls"
below), or, for the forward of a small call of one batch, run all its q-tiles as one kernel
call (_Flat: where every tile's span lies at one offset from its rows, K/V are a view, padded
at the ends, and 128-row tiles are halved where that saves scores); dk / dv gather rows first,
the kernel's own layout (_add_rows); and a call that attends exactly everywhere or exactly
causally runs whole rows per head in the kernel's own causal form (see "whole rows" below).
The last two run on the calling thread's OpenMP pool, as SDPA does (one kernel call per
call); the rest on flexattn's worker threads.

Memory, besides the inputs, outputs and per-thread dk/dv accumulators, is per thread one
chunk: its score / mask matrix, at most _CHUNK_ELEMS (4 MiB of float32) elements for chunks
with a mask (a merged chunk's mask: at most _MERGED_BLOCKS blocks wide), and its gathered
K/V rows (a slice - no copy - when the blocks are consecutive; full-block chunks of the
fused path may gather up to a whole row, B * Hq * S * D; a flat call with padded K/V holds
one copy of each, S plus at most a span's rows). Never O(L * S). fp16/bf16 inputs
add one float32 copy of k and v (and of out and dout in the backward, but for the fused one
on tall q-tiles), converted by the worker threads. A BlockMask used on this path keeps the plan of its batched forward
(see "batched kernel calls" below): the additive masks of its partial blocks, at most _PLAN_ELEMS
elements (16 MiB of float32; O(L * window), the blocks the mask lists as partial; the q-tiles
of a window whose masks are alike keep one, O(tile * window)); making the plan holds each
q-tile's bool mask of its chunk for a moment (O(L * window) bytes).

Numerics: fp16/bf16/fp32 inputs compute in float32, float64 inputs in float64. The output
is in q.dtype; lse (natural log) is float32, or float64 for float64 inputs (as torch does);
so are the row maxima of the scores (max_scores, the running max m of the online softmax)
when asked for (output_max: those calls do not take the fused kernel, which keeps no max).
Fully masked rows give out 0, lse -inf and zero gradients. The fused backward gives fp16/bf16
inputs to torch's kernel as they are where its q-tiles are tall (_NATIVE_ROWS; the kernel
accumulates in float32, as SDPA's backward does) and the CPU has products of that dtype
(_native_16bit); elsewhere float32 copies.

The softmax runs in base 2 (exp2 is the cheaper kernel; log2 e folded into the scores).
The backward recomputes each tile (no stored probabilities): P = exp(score - lse),
dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dlse), then through score_mod by
torch.autograd.grad on the tile (which also yields the gradients of captured tensors that
require grad), dQ += dS K * scale, dK += dS^T Q * scale. Dropout replays its hash per tile.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
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
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453   # softmax in base 2: exp2 is the cheaper kernel
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
    output_max: bool = False  # forward also returns max_scores (row max of the scores)
    plans: Optional[dict] = None  # the BlockMask's cache of plans (see _batched_plan; None: none kept)

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

# score-matrix elements (B * Hq * tile_m * columns) per chunk: 4 MiB of float32
_CHUNK_ELEMS = 1 << 20
# the most blocks a merged tile (partial and full blocks in one kernel call) spans
_MERGED_BLOCKS = 8


@dataclass
class _KVTile:
    pos: torch.Tensor                # [Bm, Hm, N] int64 kv positions, clamped into [0, S) (safe to gather)
    valid: Optional[torch.Tensor]    # [Bm, Hm, 1, N] bool: a real block slot and position < S (None: all)
    partial: bool                    # evaluate the mask_mod on this tile
    span: Optional[tuple] = None     # (p0, p1): pos is arange(p0, p1), the same for every (b, h)
    # a merged tile (partial and full blocks in one span): the columns of its partial blocks,
    # the only ones where the mask_mod is evaluated; None: every column is `partial`'s kind
    part_cols: Optional[torch.Tensor] = None


def _kv_tiles(run: CpuRun, i: int, S: int, cols: int, full_cols: Optional[int] = None,
              merged_cols: int = 0) -> Iterator[_KVTile]:
    """kv chunks of q-block i (at most `cols` columns each - `full_cols` for full blocks if
    given - whole blocks): partial blocks, then full blocks; or, where the q-block's partial
    and full blocks together are consecutive and span at most `merged_cols` columns, one
    merged tile (see _merged_tile)."""
    device = run.kv_num.device
    kvb = run.kv_block
    if merged_cols:
        tile = _merged_tile(run, i, S, merged_cols)
        if tile is not None:
            yield tile
            return
    sub = torch.arange(kvb, device=device)
    for num, idx, partial in ((run.kv_num, run.kv_idx, True), (run.full_num, run.full_idx, False)):
        if num is None:
            continue
        per = max(1, (cols if partial or full_cols is None else full_cols) // kvb)
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


def _merged_tile(run: CpuRun, i: int, S: int, max_cols: int) -> Optional[_KVTile]:
    """Q-block i's partial and full blocks as one slice of K/V, when the block lists are the
    same for every (b, h), both kinds are present, and together they are consecutive blocks
    spanning at most max_cols columns (sliding windows, documents, the diagonal of causal
    masks): one kernel call instead of two and their merge; the mask_mod is evaluated on the
    partial blocks' columns only. None otherwise."""
    if run.full_num is None or run.kv_num.shape[:2] != (1, 1) or run.full_num.shape[:2] != (1, 1):
        return None
    n_part, n_full = int(run.kv_num[0, 0, i]), int(run.full_num[0, 0, i])
    kvb = run.kv_block
    if n_part == 0 or n_full == 0 or (n_part + n_full) * kvb > max_cols:
        return None
    part = run.kv_idx[0, 0, i, :n_part].tolist()
    blocks = set(part) | set(run.full_idx[0, 0, i, :n_full].tolist())
    lo, hi = min(blocks), max(blocks)
    if len(blocks) != n_part + n_full or hi - lo + 1 != len(blocks) or lo < 0 or hi * kvb >= S:
        return None
    p0, p1 = lo * kvb, min((hi + 1) * kvb, S)
    device = run.kv_num.device
    cols = (torch.tensor(part, device=device)[:, None] * kvb - p0 + torch.arange(kvb, device=device)).flatten()
    return _KVTile(torch.arange(p0, p1, device=device).view(1, 1, -1), None, run.mask_graph is not None,
                   (p0, p1), cols[cols < p1 - p0] if run.mask_graph is not None else None)


def _q_tiles(run: CpuRun, L: int) -> Iterator[tuple[int, int, int]]:
    """(q-block index, first row, end row) of every q-tile."""
    for i in range(math.ceil(L / run.q_block)):
        for q0 in range(i * run.q_block, min(L, (i + 1) * run.q_block), run.tile_m):
            yield i, q0, min(L, q0 + run.tile_m, (i + 1) * run.q_block)


def _chunk_cols(run: CpuRun, B: int, Hq: int, rows: int = 0) -> int:
    return max(run.kv_block, _CHUNK_ELEMS // max(1, B * Hq * (rows or run.tile_m)))


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
        val = val.to(acc.dtype)   # (the fused kernel's fp16/bf16 gradients into float32 sums)
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


def _allowed(run: CpuRun, idx: _Indices, q_idx, tile: _KVTile) -> Optional[torch.Tensor]:
    """Where the tile may attend (bool, broadcastable to [B, Hq, M, N]), None: everywhere.
    The one place a tile's mask is made: every visited tile passes here."""
    allowed = tile.valid
    if tile.partial and run.mask_graph is not None:
        pos = tile.pos if tile.part_cols is None else tile.pos.index_select(-1, tile.part_cols)
        m = _unbroadcast(evaluate(run.mask_graph, b=idx.b, h=idx.h, q_idx=q_idx,
                                  kv_idx=pos.to(torch.int32)[..., None, :]))
        if tile.part_cols is not None:   # a merged tile: its full blocks' columns stay True
            m = torch.ones((*m.shape[:-1], tile.pos.shape[-1]), dtype=torch.bool,
                           device=m.device).index_copy_(-1, tile.part_cols, m)
        allowed = m if allowed is None else allowed & m
    return allowed


def _unbroadcast(m: torch.Tensor) -> torch.Tensor:
    """m without the batch / head extent it only has by broadcasting (a mask that reads
    neither b nor h stays [1, 1, M, N]: a fraction of the memory and of the work after)."""
    for d in range(m.dim() - 2):
        if m.shape[d] > 1 and m.stride(d) == 0:
            m = m.narrow(d, 0, 1)
    return m


def _scores(run: CpuRun, idx: _Indices, q_idx, tile: _KVTile, s0, allowed, buffers=None):
    """The score_mod on the tile's pre-mod scores s0 = scale * q @ k^T, in the compute dtype;
    the caller sets it to -inf where `allowed` (from _allowed) is False."""
    # captured-tensor reads must be in bounds only where the mask keeps (elsewhere clamped)
    return evaluate(run.score_graph, score=s0, b=idx.b, h=idx.h, q_idx=q_idx, kv_idx=tile.pos.to(torch.int32)[..., None, :],
                    buffers=buffers, where=allowed).to(run.compute_dtype)


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


class _Workers:
    """flexattn's worker threads, kept from call to call: starting threads in every call
    made the caller wait for each to be first scheduled (milliseconds apiece on a busy
    machine). They run nothing but q-tiles, so their one-thread setting reaches no other
    code. Used under _THREADS_LOCK; a forked child makes its own."""

    def __init__(self):
        self.pool, self.size, self.pid = None, 0, None

    def get(self, n: int) -> ThreadPoolExecutor:
        if self.pool is None or self.size < n or self.pid != os.getpid():
            if self.pool is not None and self.pid == os.getpid():
                self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(n, thread_name_prefix="flexattn-cpu")
            self.size, self.pid = n, os.getpid()
        return self.pool


_WORKERS = _Workers()

# Whether this process is a fork of one that may have used the calling thread's OpenMP team:
# libgomp's team in such a child lists threads that do not exist (its next parallel
# operation of more than one thread hangs), so a call that would run on that team
# (_on_caller_pool) runs on flexattn's workers there instead.
_FORKED = False


def _note_fork() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, "register_at_fork"):   # (POSIX)
    os.register_at_fork(after_in_child=_note_fork)


def _find_omp_set():
    """omp_set_num_threads of the OpenMP runtime torch loaded (the calling thread's setting),
    or None."""
    try:
        import ctypes
        return ctypes.CDLL(None).omp_set_num_threads if "OpenMP" in torch.__config__.parallel_info() else None
    except (OSError, AttributeError):
        return None


_OMP_SET = _find_omp_set()


@contextlib.contextmanager
def _serial_here():
    """Within: torch's operations on the calling thread run on one thread (its OpenMP setting,
    restored after). A kernel call on the caller's pool keeps its copies and conversions out
    of the pool: each parallel operation is a rendezvous, which on a busy machine waits for a
    descheduled pool thread."""
    n = torch.get_num_threads()
    if _OMP_SET is None or n == 1:
        yield
        return
    _OMP_SET(1)
    try:
        yield
    finally:
        _OMP_SET(n)


def _find_one_thread_here():
    """A function that makes torch's operations on the calling thread run on one thread -
    through the OpenMP and MKL calls whose setting is the calling thread's own, so no other
    thread and no process-wide default changes (torch.set_num_threads would also change the
    count every thread started later gets). None where this build's thread runtimes cannot
    be reached that way (the q-tiles then run on the calling thread)."""
    try:
        import ctypes
        import glob
        info = torch.__config__.parallel_info()
        omp = _OMP_SET
        if omp is None:
            return None
        mkl = None
        if "Math Kernel Library" in info:
            for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu*")):
                mkl = getattr(ctypes.CDLL(path), "MKL_Set_Num_Threads_Local", None)   # C entry, by value
                if mkl is not None:
                    break
            if mkl is None:
                return None
    except (OSError, AttributeError):
        return None

    def one_thread_here() -> bool:
        torch.get_num_threads()   # torch's first-use setup of this thread first, so it cannot undo ours
        omp(1)
        if mkl is not None:
            mkl(1)
        return torch.get_num_threads() == 1
    return one_thread_here


_ONE_THREAD_HERE = _find_one_thread_here()


def _over_q_tiles(run: CpuRun, tiles: list, fn, new_acc, dynamic: bool, prologue=None, ranked=False) -> list:
    """Call fn(i, q0, q1, acc) for every q-tile; returns the accumulators (one per thread,
    each made by new_acc() on its thread). prologue(w, n), if given, runs first on each of the
    n threads (w its number; see _in_compute_dtype), and no tile starts before every thread is
    done with it. dynamic: threads take the next tile when done with one (the costliest - most
    listed blocks - first), so a thread the OS deschedules holds up no other; otherwise the
    tiles, costliest first, are dealt round-robin, so which tiles sum into which accumulator,
    in which order, is the same on every run (bitwise-reproducible gradients). ranked: the
    tiles come costliest first already (and need not be q-tiles). The threads are
    flexattn's own (_Workers)."""
    n = min(torch.get_num_threads(), len(tiles))
    if n <= 1 or _ONE_THREAD_HERE is None or not _THREADS_LOCK.acquire(blocking=False):
        if prologue is not None:   # one pool at a time; others (and builds without _ONE_THREAD_HERE) run here
            prologue(0, 1)
        acc = new_acc()
        for t in tiles:
            fn(*t, acc)
        return [acc]
    try:
        if not ranked:
            cost = run.kv_num.sum((0, 1)) + (0 if run.full_num is None else run.full_num.sum((0, 1)))
            cost = cost.tolist()
            tiles = sorted(tiles, key=lambda t: -cost[t[0]] * (t[2] - t[1]))
        ranked = tiles
        shared = iter(ranked)
        take = threading.Lock()
        grad_mode = torch.is_grad_enabled()
        accs = [None] * n
        ready = threading.Barrier(n) if prologue is not None else None

        def work(w):
            # grad mode is thread-local: the caller's (off inside an autograd Function's
            # forward) for everything here, the prologue's conversions included
            with torch.set_grad_enabled(grad_mode):
                _work(w)

        def _work(w):
            try:
                if not _ONE_THREAD_HERE():
                    raise RuntimeError("flexattn's CPU path could not make its worker thread single-threaded")
                accs[w] = new_acc()   # zero-filled here, on one thread, not by a parallel operation
                if ready is not None:
                    prologue(w, n)
                    ready.wait()
            except BaseException:
                if ready is not None:
                    ready.abort()   # the other threads stop waiting (BrokenBarrierError)
                raise
            mine = None if dynamic else iter(ranked[w::n])
            while True:
                if mine is None:
                    with take:
                        t = next(shared, None)
                else:
                    t = next(mine, None)
                if t is None:
                    return
                fn(*t, accs[w])

        pool = _WORKERS.get(n)
        futures = [pool.submit(work, w) for w in range(n)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:   # the error itself rather than another thread's broken barrier
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return accs
    finally:
        _THREADS_LOCK.release()


def _in_compute_dtype(cdt, *xs):
    """([each x in cdt], prologue for _over_q_tiles or None): an x already in cdt as it is,
    the others as an empty tensor that prologue(w, n) fills - the w-th of n threads
    converting its share of the rows (dim 2) - so an fp16/bf16 call converts its inputs once,
    on the single-threaded workers, not by whole-tensor parallel operations whose rendezvous
    stalls on a busy machine."""
    outs, todo = [], []
    for x in xs:
        y = x if x.dtype == cdt else torch.empty(x.shape, dtype=cdt, device=x.device)
        outs.append(y)
        if y is not x:
            todo.append((x, y))

    def prologue(w: int, n: int) -> None:
        for x, y in todo:
            rows = slice(x.shape[2] * w // n, x.shape[2] * (w + 1) // n)
            y[:, :, rows] = x[:, :, rows]
    return outs, (prologue if todo else None)


# ---------------------------------------------------------------------------------------
# Forward

def _forward(run: CpuRun, q, k, v):
    B, Hq, L, _ = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    cdt, dev = run.compute_dtype, q.device
    if _fused(run, q, v) and not run.output_max:
        plan = _batched_plan(run, B, Hq, Hkv, L, S)
        if plan is not None and plan.causal is not None:
            return _whole_forward(run, plan.causal, q, k, v)
        if plan is not None and plan.flat is not None and not _FORKED:
            return _flat_forward(run, plan.flat, q, k, v)
        if plan is not None:
            return _batched_forward(run, plan, q, k, v)
    idx = _Indices(B, Hq, Hkv, dev)
    (k, v), convert = _in_compute_dtype(cdt, k, v)   # fp16/bf16: converted once, not per q-tile
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, L, dtype=cdt, device=dev)
    mx = torch.empty(B, Hq, L, dtype=cdt, device=dev) if run.output_max else None
    drop_scale = 1.0 / (1.0 - run.dropout_p)
    cols = _chunk_cols(run, B, Hq)
    score_bufs = run.score_graph.buffers if run.score_graph is not None else ()

    has_mod = run.score_graph is not None

    def q_tile(i, q0, q1, _acc):
        M = q1 - q0
        # the scale folded into q (a copy: the tile's own); without a score_mod the scores
        # come out in base 2 (times log2 e) straight from the matmul
        qs = q[:, :, q0:q1].to(cdt) * (run.scale if has_mod else run.scale * LOG2E)
        q_idx = idx.q(q0, q1, dev)
        m = torch.full((B, Hq, M, 1), NEG_INF, dtype=cdt, device=dev)   # running row max
        l = torch.zeros(B, Hq, M, 1, dtype=cdt, device=dev)             # running sum of exp
        acc = torch.zeros(B, Hq, M, Ev, dtype=cdt, device=dev)
        for tile in _kv_tiles(run, i, S, cols):
            kt = idx.gather(k, tile, cdt)
            vt = idx.gather(v, tile, cdt)
            s = qs @ kt.transpose(-1, -2)
            allowed = _allowed(run, idx, q_idx, tile)
            if has_mod:
                s = _owned(_scores(run, idx, q_idx, tile, s, allowed), s, score_bufs).mul_(LOG2E)   # base 2 from here
            if allowed is not None:
                s.masked_fill_(~allowed, NEG_INF)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)   # rows with nothing yet: no -inf - -inf
            alpha = torch.exp2(m - m_safe)
            p = s.sub_(m_safe).exp2_()   # s is not needed any more: p takes its memory
            l = l * alpha + p.sum(-1, keepdim=True)
            if run.dropout_p > 0:
                p = p * _keep(run, idx, q_idx, tile) * drop_scale
            acc.mul_(alpha)
            acc += p @ vt
            m = m_new
        empty = l == 0
        out[:, :, q0:q1] = (acc / torch.where(empty, 1.0, l)).to(q.dtype)
        lse[:, :, q0:q1] = torch.where(empty, NEG_INF, (m + torch.log2(torch.where(empty, 1.0, l))) * LN2).squeeze(-1)
        if mx is not None:
            mx[:, :, q0:q1] = (m * LN2).squeeze(-1)   # -inf on fully masked rows

    tiles = list(_q_tiles(run, L))
    if _fused(run, q, v) and mx is None:
        q_tile, tiles = _fused_forward_tile(run, idx, q, k, v, out, lse), _fused_q_tiles(run, L)
    _over_q_tiles(run, tiles, q_tile, lambda: None, dynamic=True, prologue=convert)
    return (out, lse) if mx is None else (out, lse, mx)


def _owned(s, s0, buffers=()):
    """s as a tensor the caller may overwrite: s0 (the caller's own) or a fresh result of
    the score_mod, else a copy (its result may be a broadcast, a view or a captured tensor)."""
    if s is s0:
        return s
    if (s.shape == s0.shape and s.is_contiguous() and s._base is None
            and all(s.data_ptr() != t.data_ptr() for t in (s0, *buffers))):
        return s
    return s.expand(s0.shape).clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# Without a score_mod or dropout: torch's fused CPU attention kernel on each chunk
#
# A chunk is then plain attention of the q-tile over the chunk's kv positions with an
# additive mask (0 / -inf, only where the tile has one), so torch's fused CPU flash-attention
# kernel (its blocked matmuls and vectorised softmax, what SDPA runs on CPU) computes it
# and its log-sum-exp; a q-tile's chunks merge by their log-sum-exps. Its backward
# decomposes the same way: given the *whole* row's out and lse, the kernel's gradients for a
# chunk are that chunk's share (P = exp(S - lse) restricted to its columns), so dq sums over
# chunks and dk/dv scatter to the chunk's positions. Memory stays O(tile * chunk) (the
# mask) plus the kernel's own per-thread buffers.

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_USE_FLASH = _FLASH is not None and _FLASH_BWD is not None   # tests switch it off to run the plain path


def _fused(run: CpuRun, q, v) -> bool:
    """Whether the call's chunks go to the fused kernel (which needs v's head size to be q's)."""
    return _USE_FLASH and run.score_graph is None and run.dropout_p == 0 and q.shape[-1] == v.shape[-1]


def _bias(allowed: Optional[torch.Tensor], tile: _KVTile, dtype):
    """(additive mask: 0 where allowed, -inf elsewhere, or None; [.., M, 1] bool: the rows
    with some position allowed, or None: all)."""
    if allowed is None:
        return None, None
    zero, neg_inf = (torch.full((), x, dtype=dtype, device=allowed.device) for x in (0.0, NEG_INF))
    # a merged tile holds a full block: every row has a position
    return torch.where(allowed, zero, neg_inf), None if tile.part_cols is not None else allowed.any(-1, keepdim=True)


def _merged_cols(run: CpuRun, B: int, Hq: int, rows: int) -> int:
    """The widest merged tile (see _merged_tile) of a q-tile of `rows` rows: its mask stays
    within _CHUNK_ELEMS (times B / Hq only where the mask_mod reads b / h) and within
    _MERGED_BLOCKS blocks (wider spans gain nothing from one call less but pay for a mask
    over their full blocks)."""
    lead = 1
    if run.mask_graph is not None:
        lead = (B if run.mask_graph.uses("b") else 1) * (Hq if run.mask_graph.uses("h") else 1)
    return min(_MERGED_BLOCKS * run.kv_block, _CHUNK_ELEMS // max(1, lead * rows))


def _fused_q_tiles(run: CpuRun, L: int) -> list:
    """The q-tiles of the fused path: runs of consecutive q-blocks whose block lists are
    identical (dense masks, the inside of long windows) form one tile, up to a few per
    thread - the kernel is faster on taller tiles."""
    tiles = list(_q_tiles(run, L))
    nq = math.ceil(L / run.q_block)
    if run.tile_m != run.q_block or nq < 2:
        return tiles
    same = torch.ones(nq - 1, dtype=torch.bool)
    for num, idx in ((run.kv_num, run.kv_idx), (run.full_num, run.full_idx)):
        if num is not None:
            same &= (num[:, :, 1:] == num[:, :, :-1]).flatten(0, 1).all(0)
            same &= (idx[:, :, 1:] == idx[:, :, :-1]).transpose(0, 2).flatten(1).all(1)
    cap = max(1, min(1024 // run.q_block, nq // (2 * torch.get_num_threads())))
    merged, same = [], same.tolist()
    for i, q0, q1 in tiles:
        if merged and same[i - 1] and (i - merged[-1][0]) < cap:
            merged[-1] = (merged[-1][0], merged[-1][1], q1)
        else:
            merged.append((i, q0, q1))
    return merged


def _fused_forward_tile(run: CpuRun, idx: _Indices, q, k, v, out, lse):
    S, cdt, dev = k.shape[2], run.compute_dtype, q.device

    def q_tile(i, q0, q1, _acc):
        qt = q[:, :, q0:q1].to(cdt)
        q_idx = idx.q(q0, q1, dev)
        o = l = None    # the q-tile's output and lse [.., M, 1] over the chunks so far
        B, Hq = q.shape[:2]
        for tile in _kv_tiles(run, i, S, _chunk_cols(run, B, Hq, q1 - q0), S, _merged_cols(run, B, Hq, q1 - q0)):
            bias, some = _bias(_allowed(run, idx, q_idx, tile), tile, cdt)
            o_c, l_c = _FLASH(qt, idx.gather(k, tile, cdt), idx.gather(v, tile, cdt), 0.0, False,
                              attn_mask=bias, scale=run.scale)
            l_c = l_c.to(cdt).unsqueeze(-1)
            if some is not None:
                l_c = l_c.masked_fill(~some, NEG_INF)   # the kernel's lse of a fully masked row is 0
            if o is None:
                o, l = o_c, l_c
                continue
            new = torch.logaddexp(l, l_c)
            safe = new.masked_fill(new == NEG_INF, 0.0)
            o = o * torch.exp(l - safe) + o_c * torch.exp(l_c - safe)
            l = new
        if o is None:   # no block listed
            out[:, :, q0:q1] = 0
            lse[:, :, q0:q1] = NEG_INF
        else:
            out[:, :, q0:q1] = o
            lse[:, :, q0:q1] = l.squeeze(-1)
    return q_tile


# ---------------------------------------------------------------------------------------
# The fused forward and backward in a few batched kernel calls
#
# Where a call's q-tiles meet their blocks in one chunk each and the chunks come in a few
# shapes (sliding windows, documents, short sequences), the q-tiles of one shape are
# stacked along the batch dimension and run as a few calls of the fused kernel per thread and
# shape (_shares): K/V as a strided view of the rows they read (or one gather), the additive masks
# made in advance. The plan - which rows meet which columns, and those masks, made by
# _allowed chunk by chunk as on the tile-by-tile path - is built once per BlockMask and
# shapes and kept on the BlockMask (made anew when its block lists or the mask's captured
# tensors change: their version counters). A call's work is then a handful of large
# single-threaded operations per worker thread, and none of the per-tile Python work, chunk
# merging or mask evaluation. Calls whose chunks fall into many shapes (long causal masks:
# one per full-block span), whose q-tiles meet several chunks, or whose masks would pass
# _PLAN_ELEMS keep the tile-by-tile path. The backward runs by the same plan (each tile's
# chunk is its rows' whole row, so the kernel's gradients given the rows' out and lse are
# theirs). A small call of one batch runs its forward as one kernel call instead (_Flat; its
# backward by the groups: on the workers, with _SHARES_PER_THREAD, it measured 0.72-0.97x the
# time of one flat kernel call at S=1K-2K, quiet and busy), and a dense or causal call as whole
# rows (_whole_rows): the plan says which.

_PLAN_GROUPS = 16          # the most chunk shapes of a batched forward
# Each group's tiles are cut into this many shares per thread: the threads take shares as they
# finish one, so a thread that is slower (its tiles costlier, or descheduled) holds up less of
# the call's end. 2-core AMD EPYC (AVX-512), torch 2.14, float32, B=1, H=8, D=64, 2 threads, 4 against
# 1 share, alternating in one process (benchmarks/ab_cpu_shares.py): fwd+bwd 0.83-0.84x the time at
# S=16K sliding window 256, 0.88-0.92x at S=4K, 0.97-1.02x S=4K document and S=1K; with two
# CPU-burning processes 0.81-1.06x (16K 0.91-0.92x); the forward even.
_SHARES_PER_THREAD = 4
_PLAN_ELEMS = 1 << 22      # the most mask elements a plan keeps (16 MiB of float32)
_SUM_PIECE = 1 << 16       # the fewest elements in a piece of the accumulators' sum (_summed)


@dataclass
class _Group:
    """The chunks of one shape: G q-tiles of M rows each meeting N kv columns."""
    rows: torch.Tensor               # [G * M] int64: the q rows of its tiles, tile after tile
    q0s: list                        # the first q row of each tile
    M: int
    N: int
    span: Optional[tuple]            # (p0, step): tile g reads K/V rows p0 + g*step + [0, N)
    p0s: Optional[list]              # else, where every tile reads a span: the first row of each
    pos: Optional[torch.Tensor]      # else [G * N] int64: the rows, tile after tile
    bias: Optional[torch.Tensor]     # [B or 1, G, Hq or 1, M, N] additive mask (0 / -inf), None: none
    some: Optional[torch.Tensor]     # [B or 1, G, Hq or 1, M]: rows with a position allowed, None: all

    @property
    def G(self) -> int:
        return self.rows.numel() // self.M


@dataclass
class _Flat:
    """A call of one batch whose q-tiles (all M rows, in order, covering q) each meet one
    span of K/V: the whole call as one kernel call, each tile's span widened to the widest,
    N (the widening masked out). Tile g reads K/V rows firsts[g] + [0, N) of K/V padded
    with pad[0] zero rows before and pad[1] after (pad (0, 0): K/V as they are)."""
    M: int
    N: int
    firsts: list
    step: Optional[int]              # firsts[g] = firsts[0] + g * step, or None: not evenly spaced
    pad: tuple
    bias: torch.Tensor               # [G, Hq or 1, M, N] additive mask (0 / -inf)
    some: Optional[torch.Tensor]     # [G, Hq or 1, M]: rows with a position allowed, None: all


@dataclass
class _Plan:
    groups: list
    bare: Optional[torch.Tensor]     # the rows of q-tiles that meet no block (out 0, lse -inf)
    # not None: the call attends exactly everywhere (False) or exactly where kv <= q (True) -
    # whole rows per head, the kernel's own causal form (_whole_rows); groups are then empty
    causal: Optional[bool] = None
    flat: Optional[_Flat] = None     # the call as one kernel call (_flat), where it pays


def _batched_plan(run: CpuRun, B: int, Hq: int, Hkv: int, L: int, S: int) -> Optional[_Plan]:
    """The plan of a batched forward (kept in run.plans), or None: the tile-by-tile path."""
    lists = (run.kv_num, run.kv_idx, run.full_num, run.full_idx)
    if run.plans is None or any(t is not None and t.shape[:2] != (1, 1) for t in lists):
        return None
    bufs = () if run.mask_graph is None else tuple(run.mask_graph.buffers)
    key = (B, Hq, Hkv, L, S, run.q_block, run.kv_block, run.tile_m, run.compute_dtype, torch.get_num_threads(),
           tuple(None if t is None else t._version for t in lists + bufs))
    hit = run.plans.get(key)
    # the same objects, not only equal versions (a copy of the BlockMask shares this cache)
    if hit is not None and hit[0] is run.mask_graph and all(a is b for a, b in zip(hit[1], lists + bufs)):
        return hit[2]
    plan = _make_plan(run, B, Hq, Hkv, L, S)
    run.plans.clear()   # one plan per mask: the latest shapes
    run.plans[key] = (run.mask_graph, lists + bufs, plan)
    return plan


def _make_plan(run: CpuRun, B: int, Hq: int, Hkv: int, L: int, S: int) -> Optional[_Plan]:
    dev, cdt = run.kv_num.device, run.compute_dtype
    idx = _Indices(B, Hq, Hkv, dev)
    causal = _whole_rows(run, idx, B, Hkv, L, S)
    if causal is not None:
        return _Plan([], None, causal)
    shapes: dict = {}   # (M, N) -> [(q0, tile)]
    bare, order = [], []   # order: (q0, M, tile, allowed) of every tile
    for i, q0, q1 in _fused_q_tiles(run, L):
        chunks = list(_kv_tiles(run, i, S, _chunk_cols(run, B, Hq, q1 - q0), S,
                                _merged_cols(run, B, Hq, q1 - q0)))
        if len(chunks) > 1:
            return None
        if not chunks:
            bare.append(torch.arange(q0, q1, device=dev))
            continue
        shapes.setdefault((q1 - q0, chunks[0].pos.shape[-1]), []).append((q0, chunks[0]))
        if len(shapes) > _PLAN_GROUPS:
            return None
    groups, elems = [], 0
    zero, neg_inf = (torch.full((), x, dtype=cdt, device=dev) for x in (0.0, NEG_INF))
    for (M, N), members in shapes.items():
        rows = torch.cat([torch.arange(q0, q0 + M, device=dev) for q0, _ in members])
        tiles = [t for _, t in members]
        span = p0s = pos = None
        firsts = [t.span[0] for t in tiles if t.span is not None]
        step = _even_step(firsts)
        if len(firsts) == len(tiles) and step is not None and (B == 1 or len(tiles) == 1):
            span = (firsts[0], step)
        elif len(firsts) == len(tiles):
            p0s = firsts
        else:
            pos = torch.cat([t.pos.reshape(-1) for t in tiles])
        bias = some = None
        allowed = [_allowed(run, idx, idx.q(q0, q0 + M, dev), t) for q0, t in members]
        for (q0, t), a in zip(members, allowed):
            order.append((q0, M, t, a))
        if any(a is not None for a in allowed):
            lead = [max(a.shape[d] for a in allowed if a is not None) for d in (0, 1)]
            every = torch.ones((), dtype=torch.bool, device=dev)
            alike = [(every if a is None else a).expand(*lead, M, N) for a in allowed]
            if all(a is allowed[0] or (a is not None and allowed[0] is not None and torch.equal(a, allowed[0]))
                   for a in allowed):   # one mask for every tile (windows): kept once, expanded
                stacked = alike[0].unsqueeze(1)
            else:
                stacked = torch.stack(alike, 1)
            elems += stacked.numel()
            if elems > _PLAN_ELEMS:
                return None
            bias = torch.where(stacked, zero, neg_inf).expand(lead[0], len(members), lead[1], M, N)
            stacked = stacked.expand(bias.shape)
            # a merged tile holds a full block: its rows all have a position
            if any(a is not None and t.part_cols is None for t, a in zip(tiles, allowed)):
                some = stacked.any(-1)
        groups.append(_Group(rows, [q0 for q0, _ in members], M, N, span, p0s, pos, bias, some))
    flat = None
    if B == 1 and not bare:
        flat = _flat(run, sorted(order, key=lambda t: t[0]), S, Hq, _PLAN_ELEMS - elems)
    return _Plan(groups, torch.cat(bare) if bare else None, flat=flat)


# a flat call: at most this many scores (Hq * L * N; about a dense call at S=1K with 8
# heads - where the cost per call, not the work, decides), its spans widened by at most
# this factor of their columns
_FLAT_SMALL, _FLAT_WIDEN = 1 << 23, 2.0
# q-tiles of a multiple of 2 * _FLAT_HALF rows are halved, again and again, while that saves a
# tenth of the scores and K/V stay a view (a window of 256: tiles of 128 rows read 383 columns
# a row, 64 rows 319, 32 rows 287; the kernel splits q into 32-row pieces on such calls
# anyway). Against 64-row tiles, 32 took 0.90-0.97x the forward's time (sliding window and
# documents at S=1K, window at 2K, float32 / bfloat16, 2 threads, AMD EPYC; fwd+bwd even).
_FLAT_HALF, _FLAT_HALF_GAIN = 32, 0.9


def _even_step(firsts: list) -> Optional[int]:
    """The common difference of `firsts` (0 for one), or None where they are not evenly spaced."""
    steps = {b - a for a, b in zip(firsts, firsts[1:])}
    return steps.pop() if len(steps) == 1 else (0 if len(firsts) == 1 else None)


def _flat_spans(order: list, M: int) -> list:
    """The plan's tiles (q0, M0, tile, allowed) as tiles of M rows (M0 a multiple of M):
    (q0, p0, p1, allowed over [p0, p1) or None: all) - each span cut to the columns its
    rows' mask keeps (a document's tile reads from its first row's start)."""
    spans = []
    for q0, M0, t, a in order:
        for r in range(0, M0, M):
            p0, p1 = t.span
            sub = None if a is None else a[..., r:r + M, :]
            if sub is not None:
                cols = sub.flatten(0, -2).any(0).nonzero().flatten().tolist() or [0]
                sub = sub[..., cols[0]:cols[-1] + 1]
                p0, p1 = p0 + cols[0], p0 + cols[-1] + 1
            spans.append((q0 + r, p0, p1, sub))
    return spans


def _flat_layout(spans: list, S: int) -> tuple:
    """(N, firsts, pad) of tiles with these spans: where every span lies at the same offset
    from its tile's first row within the widest span (windows), firsts at that offset from
    the rows, K/V padded where a tile's reach passes an end - a view of K/V at evenly
    spaced rows; elsewhere each tile's first column, its reach kept within [0, S)."""
    N = max(p1 - p0 for _, p0, p1, _ in spans)
    lo, hi = min(p0 - q0 for q0, p0, _, _ in spans), max(p1 - q0 for q0, _, p1, _ in spans)
    if hi - lo == N:
        firsts = [q0 + lo for q0, *_ in spans]
        pad = (max(0, -firsts[0]), max(0, firsts[-1] + N - S))
        return N, [f + pad[0] for f in firsts], pad
    return N, [min(p0, S - N) for _, p0, _, _ in spans], (0, 0)


def _flat(run: CpuRun, order: list, S: int, Hq: int, room: int) -> Optional[_Flat]:
    """The plan's tiles (q0, M, tile, allowed; B == 1) as one kernel call (_Flat), or None:
    where they are not all M rows and spans, where the call is not small (_FLAT_SMALL: on
    larger calls the workers' batched calls are faster) or its widening would cost more than
    _FLAT_WIDEN times the columns, or its mask would pass `room` elements."""
    M = order[0][1]
    if any(t[1] != M or t[2].span is None for t in order):
        return None
    spans = _flat_spans(order, M)
    N, firsts, pad = _flat_layout(spans, S)
    while M % (2 * _FLAT_HALF) == 0:
        halves = _flat_spans(order, M // 2)
        N2, firsts2, pad2 = _flat_layout(halves, S)
        if N2 * len(halves) * (M // 2) > _FLAT_HALF_GAIN * N * len(spans) * M or _even_step(firsts2) is None:
            break
        M, spans, N, firsts, pad = M // 2, halves, N2, firsts2, pad2
    G = len(spans)
    lead = max((a.shape[1] for *_, a in spans if a is not None), default=1)
    if (N > S or G * lead * M * N > room or Hq * G * M * N > _FLAT_SMALL
            or G * N > _FLAT_WIDEN * sum(p1 - p0 for _, p0, p1, _ in spans)):
        return None
    dev = run.kv_num.device
    allowed = torch.zeros(G, lead, M, N, dtype=torch.bool, device=dev)
    for g, ((_, p0, p1, a), f) in enumerate(zip(spans, firsts)):
        c0 = p0 + pad[0] - f
        allowed[g, :, :, c0:c0 + p1 - p0] = True if a is None else a[0]
    zero, neg_inf = (torch.full((), x, dtype=run.compute_dtype, device=dev) for x in (0.0, NEG_INF))
    some = allowed.any(-1)
    return _Flat(M, N, firsts, _even_step(firsts), pad,
                 torch.where(allowed, zero, neg_inf), None if bool(some.all()) else some)


def _flat_tiles(x: torch.Tensor, M: int) -> torch.Tensor:
    """x [1, H, L, ...] as its L / M tiles of M rows: [L / M, H, M, ...] (a view)."""
    G = x.shape[2] // M
    return x.as_strided((G, x.shape[1], M, *x.shape[3:]), (M * x.stride(2), x.stride(1), *x.stride()[2:]),
                        x.storage_offset())


def _flat_kv(x: torch.Tensor, flat: _Flat, Hq: int, dtype) -> torch.Tensor:
    """x [1, Hkv, S, D] at each tile's rows, per query head: [G, Hq, N, D] in dtype (a view
    where the tiles' rows are evenly spaced and nothing is padded, converted or repeated)."""
    G, N = len(flat.firsts), flat.N
    if flat.pad != (0, 0):   # zeros: finite scores, masked out by the bias
        x = torch.nn.functional.pad(x.to(dtype), (0, 0, *flat.pad))
    if flat.step is not None:
        y = x.as_strided((G, x.shape[1], N, x.shape[3]), (flat.step * x.stride(2), *x.stride()[1:]),
                         x.storage_offset() + flat.firsts[0] * x.stride(2))
    else:
        y = _slices(x, flat.firsts, N)
    return _per_q_head(y.to(dtype), Hq // x.shape[1])


def _flat_forward(run: CpuRun, flat: _Flat, q, k, v):
    """(out, lse) of the plan's flat call (_Flat), on the calling thread's pool."""
    Hq, L, cdt = q.shape[1], q.shape[2], run.compute_dtype
    with _serial_here():
        qt, kt, vt = _flat_tiles(q, flat.M).to(cdt), _flat_kv(k, flat, Hq, cdt), _flat_kv(v, flat, Hq, cdt)
    o, l = _FLASH(qt, kt, vt, 0.0, False, attn_mask=flat.bias, scale=run.scale)[:2]
    with _serial_here():
        if flat.some is not None:
            l = l.masked_fill(~flat.some, NEG_INF)   # the kernel's lse of a fully masked row is 0
        out = o.transpose(0, 1).reshape(1, Hq, L, o.shape[-1]).to(q.dtype)
        return out, l.to(cdt).transpose(0, 1).reshape(1, Hq, L)


def _batched_forward(run: CpuRun, plan: _Plan, q, k, v):
    """(out, lse) of the fused path by the plan: each group's tiles cut into shares
    (_shares), taken by the threads as they finish one (the largest first)."""
    B, Hq, L, _ = q.shape
    Ev, cdt, dev = v.shape[-1], run.compute_dtype, q.device
    (k, v), convert = _in_compute_dtype(cdt, k, v)   # fp16/bf16: converted once, on the workers
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, L, dtype=cdt, device=dev)
    shares = _shares(plan)

    def share(n_g, g0, g1, _acc):
        if n_g < 0:
            out.index_fill_(2, plan.bare, 0)
            lse.index_fill_(2, plan.bare, NEG_INF)
            return
        g = plan.groups[n_g]
        G, M, N = g1 - g0, g.M, g.N
        rows = g.rows[g0 * M:g1 * M]
        qt = _slices(q, g.q0s[g0:g1], M).to(cdt)
        kt, vt = (_group_kv(x, g, g0, g1, Hq) for x in (k, v))
        bias = None if g.bias is None else g.bias[:, g0:g1].expand(B, G, *g.bias.shape[2:]).flatten(0, 1)
        o_c, l_c = _FLASH(qt, kt, vt, 0.0, False, attn_mask=bias, scale=run.scale)
        l_c = l_c.to(cdt).view(B, G, Hq, M)
        if g.some is not None:
            l_c = l_c.masked_fill(~g.some[:, g0:g1], NEG_INF)   # the kernel's lse of a fully masked row is 0
        out.index_copy_(2, rows, o_c.view(B, G, Hq, M, Ev).transpose(1, 2).reshape(B, Hq, G * M, Ev).to(q.dtype))
        lse.index_copy_(2, rows, l_c.transpose(1, 2).reshape(B, Hq, G * M))

    _over_q_tiles(run, shares, share, lambda: None, dynamic=True, prologue=convert, ranked=True)
    return out, lse


def _shares(plan: _Plan) -> list:
    """(group number, first tile, end tile): each group's tiles cut into _SHARES_PER_THREAD
    shares per thread (at most one a tile), the largest first; then (-1, 0, 0) for the rows of
    tiles that meet no block."""
    n = max(1, torch.get_num_threads()) * _SHARES_PER_THREAD
    shares = [(n_g, g.G * j // m, g.G * (j + 1) // m) for n_g, g in enumerate(plan.groups)
              for m in (min(n, g.G),) for j in range(m)]
    shares.sort(key=lambda t: -(t[2] - t[1]) * plan.groups[t[0]].M * plan.groups[t[0]].N)
    if plan.bare is not None:
        shares.append((-1, 0, 0))
    return shares


def _slices(x: torch.Tensor, starts: list, n: int) -> torch.Tensor:
    """x [B, H, S, D] at rows start + [0, n) for each start: [B * len(starts), H, n, D] (a
    view for one start; a copy of the slices otherwise - cheaper than index_select)."""
    if len(starts) == 1:
        return x[:, :, starts[0]:starts[0] + n]
    return torch.stack([x[:, :, s:s + n] for s in starts], 1).flatten(0, 1)


def _stacked(x: torch.Tensor, G: int) -> torch.Tensor:
    """x [B, H, G * M, D] as [B * G, H, M, D]."""
    B, H, GM, D = x.shape
    return x.view(B, H, G, GM // G, D).transpose(1, 2).reshape(B * G, H, GM // G, D)


def _group_kv(x: torch.Tensor, g: _Group, g0: int, g1: int, Hq: int) -> torch.Tensor:
    """x [B, Hkv, S, D] at the kv rows of the group's tiles g0..g1, per query head:
    [B * (g1 - g0), Hq, N, D] (a view where the rows are spans)."""
    B, Hkv, _, D = x.shape
    G, N = g1 - g0, g.N
    if g.span is not None:
        p0 = g.span[0] + g0 * g.span[1]
        if G == 1:
            y = x[:, :, p0:p0 + N]
        else:   # B == 1
            y = x.as_strided((G, Hkv, N, D), (g.span[1] * x.stride(2), x.stride(1), x.stride(2), x.stride(3)),
                             x.storage_offset() + p0 * x.stride(2))
    elif g.p0s is not None:
        y = _slices(x, g.p0s[g0:g1], N)
    else:
        y = _stacked(x.index_select(2, g.pos[g0 * N:g1 * N]), G)
    return y.repeat_interleave(Hq // Hkv, 1) if Hq != Hkv else y


def _group_rows(g: _Group, g0: int, g1: int):
    """The kv rows the group's tiles g0..g1 read: each tile's first row where the tiles
    read spans (a range where they are evenly spaced, else a list), else every row, tile
    after tile ([(g1 - g0) * N] int64)."""
    if g.pos is not None:
        return g.pos[g0 * g.N:g1 * g.N]
    if g.p0s is not None:
        return g.p0s[g0:g1]
    p0, step = g.span
    return range(p0 + g0 * step, p0 + g1 * step, step) if step else [p0] * (g1 - g0)


def _batched_backward(run: CpuRun, plan: _Plan, q, k, v, out, lse, dout):
    """(dq, dk, dv) of the fused path by the forward's plan: per share of a group's tiles
    (dealt as in _batched_forward) one call of the kernel's backward, given the tiles' rows
    of out and lse (each tile meets its one chunk: its gradients are the rows' whole ones);
    dq written to the tiles' rows, dk / dv summed into per-thread accumulators at the kv rows
    the tiles read (windows overlap)."""
    B, Hq, L, D = q.shape
    Hkv, cdt, dev = k.shape[1], run.compute_dtype, q.device
    k_in, v_in = k, v
    kdt = _backward_dtype(q.dtype, min((g.M for g in plan.groups), default=0), cdt)
    (k, v, dout, out), convert = _in_compute_dtype(kdt, k, v, dout, out)
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    shares = _shares(plan)

    def share(n_g, g0, g1, accs):
        if n_g < 0:
            dq.index_fill_(2, plan.bare, 0)
            return
        g = plan.groups[n_g]
        G, M = g1 - g0, g.M
        qt, dot, ot = (_slices(x, g.q0s[g0:g1], M).to(kdt) for x in (q, dout, out))
        lt = _slices(lse.unsqueeze(-1), g.q0s[g0:g1], M).squeeze(-1)
        # fully masked rows (lse -inf): +inf makes the kernel's p = exp(s - lse) exactly 0
        lt = torch.where(lt == NEG_INF, float("inf"), lt).to(lse_dtype)
        kt, vt = (_group_kv(x, g, g0, g1, Hq) for x in (k, v))
        bias = None if g.bias is None else g.bias[:, g0:g1].expand(B, G, *g.bias.shape[2:]).flatten(0, 1)
        dq_c, dk_c, dv_c = _FLASH_BWD(dot, qt, kt, vt, ot, lt, 0.0, False, attn_mask=bias, scale=run.scale)
        dq.index_copy_(2, g.rows[g0 * M:g1 * M],
                       dq_c.view(B, G, Hq, M, D).transpose(1, 2).reshape(B, Hq, G * M, D).to(q.dtype))
        rows = _group_rows(g, g0, g1)
        for acc, d in zip(accs, (dk_c, dv_c)):
            _add_rows(acc, rows, d.transpose(1, 2).unflatten(0, (B, G)))

    accs = _over_q_tiles(run, shares, share, lambda: tuple(torch.zeros(B, x.shape[2], Hkv, x.shape[3], dtype=cdt,
                                                                       device=dev) for x in (k, v)),
                         dynamic=False, prologue=convert, ranked=True)
    dk, dv = _summed(run, accs)
    return dq, _rows_first(dk, k_in.dtype), _rows_first(dv, v_in.dtype)


def _add_rows(acc: torch.Tensor, rows, d: torch.Tensor) -> None:
    """acc [B, S, Hkv, D] += each tile's d [B, G, N, Hq, D] at rows rows[g] + [0, N) (rows:
    the tiles' first rows, a range where they are evenly spaced) or at `rows` ([G * N]
    int64), a kv head's query heads summed. Rows first is the kernel's own layout of its
    dk / dv, so the adds are contiguous runs (a per-head sum, a transposed copy and an
    index_add cost 2-3x as much); evenly spaced tiles take one add per `step` rows of a
    tile, every tile at once, not one per tile (each op is a time slice on a busy machine)."""
    Hkv = acc.shape[2]
    if d.shape[3] != Hkv:
        d = d.unflatten(3, (Hkv, d.shape[3] // Hkv)).sum(4)
    if torch.is_tensor(rows):
        acc.index_add_(1, rows, d.flatten(1, 2).to(acc.dtype))
        return
    G, N = d.shape[1], d.shape[2]
    if isinstance(rows, range) and G > 1 and rows.step > 0:
        for j in range(0, N, rows.step):   # rows j.. of every tile: disjoint, as step >= their count
            w = min(rows.step, N - j)
            at = acc.as_strided((acc.shape[0], G, w, *acc.shape[2:]),
                                (acc.stride(0), rows.step * acc.stride(1), *acc.stride()[1:]),
                                acc.storage_offset() + (rows.start + j) * acc.stride(1))
            at += d[:, :, j:j + w]
        return
    for g, r in enumerate(rows):
        acc[:, r:r + N] += d[:, g]


def _rows_first(acc: torch.Tensor, dtype) -> torch.Tensor:
    """A [B, S, H, D] accumulator as the gradient [B, H, S, D] in dtype, contiguous as k / v
    are: autograd then takes it as the leaf's grad instead of copying it on the caller's
    pool, a parallel region more per gradient (each costs a time slice on a busy machine)."""
    return acc.permute(0, 2, 1, 3).to(dtype, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# Dense and causal calls: whole rows per head
#
# Where a call attends exactly every position, or exactly those with kv <= q (what torch's
# fused kernel computes as is_causal, top-left), no block list or mask is needed: the
# (batch, kv head) pairs are dealt out to the threads in a few pieces and each piece is one
# call of the kernel (forward or backward) over whole rows, its causal form skipping the
# upper triangle at the kernel's own granularity. dq, dk, dv of a piece are its heads' whole
# gradients (no accumulators to sum). The plan keeps the decision (_Plan.causal).

def _whole_rows(run: CpuRun, idx: _Indices, B: int, Hkv: int, L: int, S: int) -> Optional[bool]:
    """False where the call attends every position, True where exactly those with kv <= q,
    None otherwise (and where B and Hkv are both fewer than the threads: its pieces could not
    keep them busy). Exact: the block lists must list exactly the blocks those positions
    meet, full blocks only where every position is kept, and the mask_mod on the partial
    blocks must give the form (the lists are [1, 1, ...]: _batched_plan's condition)."""
    if L == 0 or S == 0 or (torch.get_num_threads() > 1 and max(B, Hkv) < torch.get_num_threads()):
        return None
    qb, kvb, dev = run.q_block, run.kv_block, run.kv_num.device
    kv_num = run.kv_num[0, 0].tolist()
    full_num = None if run.full_num is None else run.full_num[0, 0].tolist()
    every, causal = True, True
    for i in range(-(-L // qb)):
        r0, r1 = i * qb, min(L, (i + 1) * qb)
        part = run.kv_idx[0, 0, i, :kv_num[i]].tolist()
        full = [] if full_num is None else run.full_idx[0, 0, i, :full_num[i]].tolist()
        listed = set(part) | set(full)    # (validated: no block twice in a row)
        every = every and listed == set(range(-(-S // kvb)))
        causal = (causal and listed == set(range(min(r1 - 1, S - 1) // kvb + 1))
                  and all(min((b + 1) * kvb, S) - 1 <= r0 for b in full))
        if not (every or causal):
            return None
        if part and run.mask_graph is not None:
            pos = torch.cat([torch.arange(b * kvb, min((b + 1) * kvb, S), device=dev) for b in part]).view(1, 1, -1)
            allowed = _allowed(run, idx, idx.q(r0, r1, dev), _KVTile(pos, None, True))
            every = every and bool(allowed.all())
            causal = causal and bool((allowed == (pos[..., None, :] <= idx.q(r0, r1, dev))).all())
    return None if not (every or causal) else not every


def _pieces(B: int, Hkv: int) -> list:
    """(b0, b1, h0, h1): the (batch, kv head) pairs in about 4 pieces per thread (for the
    dynamic dealing of _over_q_tiles), each a rectangle: whole batches or heads of one."""
    per = -(-B * Hkv // (4 * max(1, torch.get_num_threads())))
    if per >= Hkv:
        nb = per // Hkv
        return [(b, min(B, b + nb), 0, Hkv) for b in range(0, B, nb)]
    return [(b, b + 1, h, min(Hkv, h + per)) for b in range(B) for h in range(0, Hkv, per)]


def _per_q_head(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, 1) if group > 1 else x


def _on_caller_pool(*xs) -> bool:
    """Whether a whole-rows call runs as one kernel call on the calling thread (torch's own
    thread pool, as SDPA does) rather than in pieces on flexattn's workers: where it needs
    no GQA repeats and its tensors (xs: q and k first) are in one dtype - one kernel call and
    at most the conversions of fp16/bf16 inputs, few rendezvous per call, on a pool that is
    warm (still spinning) after the caller's previous operation, where workers would share
    the cores with that spinning - and not in a forked child (_FORKED)."""
    return not _FORKED and len({x.dtype for x in xs}) == 1 and xs[0].shape[1] == xs[1].shape[1]


def _whole_forward(run: CpuRun, causal: bool, q, k, v):
    B, Hq, L, _ = q.shape
    Hkv, Ev, cdt = k.shape[1], v.shape[-1], run.compute_dtype
    group = Hq // Hkv
    if _on_caller_pool(q, k, v):
        with _serial_here():
            qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        out, lse = _FLASH(qc, kc, vc, 0.0, causal, scale=run.scale)[:2]
        with _serial_here():
            return out.to(q.dtype), lse
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=cdt, device=q.device)

    def piece(b0, b1, h0, h1, _acc):
        heads = (slice(b0, b1), slice(h0 * group, h1 * group))
        kt, vt = (_per_q_head(x[b0:b1, h0:h1].to(cdt), group) for x in (k, v))
        o, l = _FLASH(q[heads].to(cdt), kt, vt, 0.0, causal, scale=run.scale)[:2]
        out[heads] = o
        lse[heads] = l

    _over_q_tiles(run, _pieces(B, Hkv), piece, lambda: None, dynamic=True, ranked=True)
    return out, lse


def _whole_backward(run: CpuRun, causal: bool, q, k, v, out, lse, dout):
    B, Hq, L, _ = q.shape
    Hkv, S, cdt = k.shape[1], k.shape[2], run.compute_dtype
    group = Hq // Hkv
    kdt = _backward_dtype(q.dtype, L, cdt)
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    if kdt == q.dtype and lse.dtype == lse_dtype and _on_caller_pool(q, k, v, out, dout):
        return _FLASH_BWD(dout, q, k, v, out, lse, 0.0, causal, scale=run.scale)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))

    def piece(b0, b1, h0, h1, _acc):
        heads = (slice(b0, b1), slice(h0 * group, h1 * group))
        kt, vt = (_per_q_head(x[b0:b1, h0:h1].to(kdt), group) for x in (k, v))
        dq_c, dk_c, dv_c = _FLASH_BWD(dout[heads].to(kdt), q[heads].to(kdt), kt, vt, out[heads].to(kdt),
                                      lse[heads].to(lse_dtype), 0.0, causal, scale=run.scale)
        dq[heads] = dq_c
        for acc, d in ((dk, dk_c), (dv, dv_c)):   # query heads of a kv head summed in the compute dtype
            acc[b0:b1, h0:h1] = d if group == 1 else d.to(cdt).view(b1 - b0, h1 - h0, group, S, -1).sum(2)

    _over_q_tiles(run, _pieces(B, Hkv), piece, lambda: None, dynamic=True, ranked=True)
    return dq, dk, dv


# the least q-tile height at which the fused backward gives fp16/bf16 inputs to the kernel
# as they are (torch's kernel accumulates in float32 either way, as SDPA's backward does)
_NATIVE_ROWS = 256


def _backward_dtype(dtype: torch.dtype, rows: int, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused backward's kernel runs in for inputs of `dtype` whose q-tiles are at
    least `rows` tall: fp16/bf16 as they are where the tiles are tall (_NATIVE_ROWS: the kernel's
    16-bit form took 0.7-0.8x the time of float32 copies on 256+ rows, 2.7x on 128-row tiles
    with a mask) and the CPU multiplies that dtype natively (_native_16bit); else the compute
    dtype (the inputs converted once)."""
    if dtype in (torch.float16, torch.bfloat16) and rows >= _NATIVE_ROWS and _native_16bit(dtype):
        return dtype
    return compute_dtype


@functools.lru_cache(maxsize=None)
def _native_16bit(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for products of `dtype` (AVX512-BF16 or AMX for bf16,
    AMX-FP16 for fp16). Without them torch's 16-bit attention backward emulates them: on an
    AVX2 EPYC (2 threads, S=2048, H=8, D=64) it took 1.91 s in bf16 and 2.86 s in fp16 against
    0.35 s in float32. torch.cpu's capability checks are private: absent ones count as no."""
    def has(name):
        check = getattr(torch.cpu, name, None)
        return bool(check()) if check is not None else False
    if dtype == torch.bfloat16:
        return has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")
    return has("_is_amx_fp16_supported")


def _fused_backward(run: CpuRun, idx: _Indices, q, k, v, out, lse, dout, tiles, kdt, convert):
    """(dq in q.dtype, dk, dv in the compute dtype): the kernel runs in kdt (the compute
    dtype or q's fp16/bf16); k, v, out, dout are in it (or filled by `convert`, the
    prologue of _in_compute_dtype). The chunks' dk, dv (and dq where a q-tile has several
    chunks) are summed in the compute dtype."""
    B, Hq = q.shape[:2]
    S, cdt, dev = k.shape[2], run.compute_dtype, q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32

    def q_tile(i, q0, q1, accs):
        dk, dv = accs
        row = (slice(None), slice(None), slice(q0, q1))
        qt, dot, ot, lt = q[row].to(kdt), dout[row].to(kdt), out[row].to(kdt), lse[row]
        # fully masked rows (lse -inf): +inf makes the kernel's p = exp(s - lse) exactly 0
        lt = torch.where(lt == NEG_INF, float("inf"), lt).to(lse_dtype)
        q_idx = idx.q(q0, q1, dev)
        dqt = None
        for tile in _kv_tiles(run, i, S, _chunk_cols(run, B, Hq, q1 - q0), S, _merged_cols(run, B, Hq, q1 - q0)):
            bias, _ = _bias(_allowed(run, idx, q_idx, tile), tile, cdt)
            dq_c, dk_c, dv_c = _FLASH_BWD(dot, qt, idx.gather(k, tile, kdt), idx.gather(v, tile, kdt), ot, lt,
                                          0.0, False, attn_mask=bias, scale=run.scale)
            dqt = dq_c if dqt is None else (dqt if dqt.dtype == cdt else dqt.to(cdt)).add_(dq_c)
            idx.scatter_add(dk, tile, dk_c)
            idx.scatter_add(dv, tile, dv_c)
        dq[row] = 0 if dqt is None else dqt

    accs = _over_q_tiles(run, tiles, q_tile, lambda: (torch.zeros(k.shape, dtype=cdt, device=dev),
                                                      torch.zeros(v.shape, dtype=cdt, device=dev)),
                         dynamic=False, prologue=convert)
    return (dq, *_summed(run, accs))


def _summed(run: CpuRun, accs: list) -> list:
    """The per-thread accumulators summed, field by field, into the first thread's, each
    element in thread order (the same bits on every run). The tensors' elements are cut into
    pieces that flexattn's workers take: one rendezvous for the whole sum, where on the
    caller's pool every add was one (on a busy 2-core machine the adds of S=4K's dk and dv
    took 11-15 ms that way, 1 ms quiet), and with many threads the sum stays parallel.
    Captured-tensor gradients (lists of small tensors) are summed on the calling thread."""
    total = list(accs[0])
    if len(accs) == 1:
        return total
    flat = [(x.view(-1), [more[n].view(-1) for more in accs[1:]]) for n, x in enumerate(total) if torch.is_tensor(x)]
    size = max(_SUM_PIECE, -(-sum(x.numel() for x, _ in flat) // (_SHARES_PER_THREAD * torch.get_num_threads())))
    pieces = [(f, lo, min(lo + size, x.numel())) for f, (x, _) in enumerate(flat) for lo in range(0, x.numel(), size)]

    def piece(f, lo, hi, _acc):
        into, others = flat[f]
        for x in others:
            into[lo:hi] += x[lo:hi]

    _over_q_tiles(run, pieces, piece, lambda: None, dynamic=True, ranked=True)
    for n, x in enumerate(total):
        if isinstance(x, list):
            for more in accs[1:]:
                for t, y in zip(x, more[n]):
                    t += y
    return total


# ---------------------------------------------------------------------------------------
# Backward

@torch.no_grad()
def _backward(run: CpuRun, q, k, v, out, lse, dout, dlse, buffers):
    """(dq, dk, dv, [gradient of each captured tensor in run.grad_slots]). Its arithmetic
    records no autograd graph whatever the caller's grad mode (a compiled graph's backward
    calls it with grad on and inputs that require grad): only score_mod's evaluation on a
    tile does, for torch.autograd.grad. Recorded, the threads' in-place writes into the
    shared dq raced on its autograd metadata ('a leaf Variable that requires grad is being
    used in an in-place operation', now and then)."""
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    cdt, dev = run.compute_dtype, q.device
    idx = _Indices(B, Hq, Hkv, dev)
    k_in, v_in = k, v
    if _fused(run, q, v) and (dlse is None or not bool(dlse.any())):   # (autograd passes a zero dlse when lse is unused)
        plan = _batched_plan(run, B, Hq, Hkv, L, S)
        if plan is not None and plan.causal is not None:
            return (*_whole_backward(run, plan.causal, q, k, v, out, lse, dout), [])
        if plan is not None:
            return (*_batched_backward(run, plan, q, k, v, out, lse, dout), [])
        tiles = _fused_q_tiles(run, L)
        kdt = _backward_dtype(q.dtype, min((q1 - q0 for _, q0, q1 in tiles), default=0), cdt)
        (k, v, dout, out), convert = _in_compute_dtype(kdt, k, v, dout, out)
        dq, dk, dv = _fused_backward(run, idx, q, k, v, out, lse, dout, tiles, kdt, convert)
        return dq, dk.to(k_in.dtype), dv.to(v_in.dtype), []
    # fp16/bf16: converted once, not per q-tile (on the workers: _in_compute_dtype)
    (k, v, dout, out), convert = _in_compute_dtype(cdt, k, v, dout, out)
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)   # every q-tile writes its rows
    # copies of the captured tensors that require grad: autograd.grad on each tile fills them
    grad_slots = run.grad_slots
    grad_bufs = [b.detach().requires_grad_(True) if j in grad_slots else b for j, b in enumerate(buffers)]
    drop_scale = 1.0 / (1.0 - run.dropout_p)
    cols = _chunk_cols(run, B, Hq)
    has_mod = run.score_graph is not None

    def q_tile(i, q0, q1, accs):
        dk, dv, dbufs = accs
        qs = q[:, :, q0:q1].to(cdt) * run.scale   # the scale folded into q, as in the forward
        qs2 = None if has_mod else qs * LOG2E      # scores in base 2 straight from the matmul
        dot = dout[:, :, q0:q1]
        q_idx = idx.q(q0, q1, dev)
        row = (slice(None), slice(None), slice(q0, q1))
        # rows with lse = -inf are fully masked: +inf makes every p = exp(s - lse) exactly 0
        # (in base 2: p = exp2(log2e * score - lse2))
        lse_t = torch.where(lse[row] == NEG_INF, float("inf"), lse[row]).unsqueeze(-1).to(cdt) * LOG2E
        dsub = (dot * out[row]).sum(-1, keepdim=True)   # ds = p * (dp - dsub); rowsum(dO * O) - dlse
        if dlse is not None:
            dsub -= dlse[row].to(cdt).unsqueeze(-1)
        dqt = torch.zeros_like(qs)
        for tile in _kv_tiles(run, i, S, cols):
            kt = idx.gather(k, tile, cdt)
            vt = idx.gather(v, tile, cdt)
            if not has_mod:
                s = qs2 @ kt.transpose(-1, -2)
                allowed = _allowed(run, idx, q_idx, tile)
                if allowed is not None:
                    s.masked_fill_(~allowed, NEG_INF)
                p = s.sub_(lse_t).exp2_()        # in place: s0's memory
            else:
                s0 = qs @ kt.transpose(-1, -2)
                with torch.enable_grad():
                    s0.requires_grad_(True)
                    allowed = _allowed(run, idx, q_idx, tile)
                    s = _scores(run, idx, q_idx, tile, s0, allowed, grad_bufs)
                # a new tensor: s stays as autograd saw it (the mod's backward may need it)
                p = (s.detach() * LOG2E).expand(s0.shape).contiguous()
                if allowed is not None:
                    p.masked_fill_(~allowed, NEG_INF)
                p = p.sub_(lse_t).exp2_()
            dp = dot @ vt.transpose(-1, -2)
            if run.dropout_p > 0:
                keep = _keep(run, idx, q_idx, tile).to(cdt) * drop_scale  # bool * float would be float32
                pd, dp = p * keep, dp * keep
            else:
                pd = p
            ds = dp.sub_(dsub).mul_(p)
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
            dqt += ds @ kt
            idx.scatter_add(dk, tile, ds.transpose(-1, -2) @ qs)   # qs carries the scale
            idx.scatter_add(dv, tile, pd.transpose(-1, -2) @ dot)
        dq[row] = dqt.mul_(run.scale)

    def new_accs():
        return (torch.zeros(k.shape, dtype=cdt, device=dev), torch.zeros(v.shape, dtype=cdt, device=dev),
                [torch.zeros_like(buffers[j]) for j in grad_slots])

    dk, dv, dbufs = _summed(run, _over_q_tiles(run, list(_q_tiles(run, L)), q_tile, new_accs, dynamic=False,
                                          prologue=convert))
    return dq, dk.to(k_in.dtype), dv.to(v_in.dtype), dbufs


def make_run(dtype, *, score_graph, mask_graph, block_size, kv_blocks, scale, kernel_options, dropout_p,
             dropout_seed, grad_slots=(), output_max=False, plans=None) -> CpuRun:
    """The run of one call; kv_blocks = (kv_num_blocks, kv_indices, full_kv_num_blocks or
    None, full_kv_indices or None) of the BlockMask; grad_slots, output_max, plans: see CpuRun
    (without plans - the compiled path's calls, which get the BlockMask's tensors - a plan is
    made for the run alone, so they compute as the eager calls do)."""
    q_block, kv_block = block_size
    tile_m, tile_n = _tile_sizes(kernel_options or {}, q_block, kv_block)
    kv_num, kv_idx, full_num, full_idx = kv_blocks
    return CpuRun(score_graph=score_graph, mask_graph=mask_graph, scale=float(scale),
                 q_block=q_block, kv_block=kv_block, tile_m=tile_m, tile_n=tile_n,
                 kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx,
                 dropout_p=float(dropout_p), dropout_seed=int(dropout_seed or 0),
                 compute_dtype=_compute_dtype(dtype), grad_slots=tuple(grad_slots), output_max=bool(output_max),
                 plans={} if plans is None else plans)


def flex_attention_cpu(q, k, v, *, score_graph, mask_graph, block_mask, scale, kernel_options, dropout_p,
                       dropout_seed, output_max=False):
    """Block-sparse tiled attention on CPU tensors -> (out [B,Hq,L,Ev] in q.dtype, lse [B,Hq,L]),
    and max_scores [B,Hq,L] (lse's dtype, not differentiable) too when output_max.

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
                   grad_slots=float_grad_slots(buffers), output_max=output_max, plans=_plans_of(block_mask))
    mask_bufs = list(mask_graph.buffers) if mask_graph is not None else []
    return attend(run, q, k, v, buffers, mask_bufs, needs_grad(q, k, v, buffers))


def _plans_of(block_mask) -> dict:
    """The BlockMask's cache of batched-forward plans (see _batched_plan), made on first use."""
    plans = getattr(block_mask, "_flexattn_cpu_plans", None)
    if plans is None:
        plans = block_mask._flexattn_cpu_plans = {}
    return plans


def float_grad_slots(buffers) -> tuple:
    """The CPU path's gradient slots: every captured float tensor that requires grad (read
    by score_mod or not: an unread one gets a zero gradient)."""
    return tuple(j for j, b in enumerate(buffers) if b.requires_grad and b.is_floating_point())
