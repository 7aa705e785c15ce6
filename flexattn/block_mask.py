"""BlockMask: the block-sparse (BCSR) description of a mask. Its docstring is the
specification of the format.

Built by `flexattn.build_mask.create_block_mask` (re-exported as
`flexattn.create_block_mask`) or from block indices with `BlockMask.from_kv_blocks`.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Optional

import torch

from .block_states import EMPTY, FULL, PARTIAL, cdiv, evaluate_blocks
from .ir import Graph
from .mask_registry import register_mask_template
from .masks import noop_mask
from .trace import trace_mask

_DEFAULT_BLOCK = 128
# Rows of the [rows, nKV] state matrix processed at once when deriving indices.
_ROW_CHUNK_ELEMS = 1 << 17  # small enough to stay in cache


# ---------------------------------------------------------------------------------------
# Validation helpers

def _block_size(BLOCK_SIZE) -> tuple[int, int]:
    bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) and not isinstance(BLOCK_SIZE, bool) \
        else BLOCK_SIZE
    if not (isinstance(bs, (tuple, list)) and len(bs) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs)):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a pair (Q_BLOCK, KV_BLOCK) of positive ints, "
                         f"got {BLOCK_SIZE!r}; e.g. BLOCK_SIZE=128 or BLOCK_SIZE=(128, 64)")
    return int(bs[0]), int(bs[1])


def _positive(name, value, allow_none=False) -> int:
    if value is None and allow_none:
        return 1
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        extra = " or None (broadcast)" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# State matrix <-> ordered indices

def _ordered_from_codes(state: torch.Tensor, codes, transpose: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(num [.., R], indices [.., R, C]) int32 of the bool matrix `state == code` [.., R, C],
    for each code (of state.transpose(-2, -1) when `transpose`).

    Row r lists its selected columns ascending in indices[..., r, :num[r]]; the rest of the
    row holds the unselected columns, ascending, so every row is a permutation of 0..C-1
    (torch's convention: stray reads past num stay in bounds). Reads `state` once, in row
    chunks small enough to stay in cache (cumsum + scatter: O(R*C), no sort); the
    transposed chunks are cut from column slabs, so no transposed copy is ever built."""
    *lead, R, C = state.shape
    if transpose:
        R, C = C, R
    planes = state.reshape(-1, *state.shape[-2:])
    dev = state.device
    outs = [(torch.empty(planes.shape[0], R, dtype=torch.int32, device=dev),
             torch.empty(planes.shape[0], R, C, dtype=torch.int32, device=dev)) for _ in codes]
    # CPU: chunks that stay in cache; GPU: large chunks (few launches)
    chunk = max(1, (_ROW_CHUNK_ELEMS if dev.type == "cpu" else 1 << 24) // max(C, 1))
    cols = torch.arange(C, dtype=torch.int32, device=dev)
    for p in range(planes.shape[0]):
        for r0 in range(0, R, chunk):
            block = planes[p, :, r0:r0 + chunk].t().contiguous() if transpose else planes[p, r0:r0 + chunk]
            for code, (num, idx) in zip(codes, outs):
                s = block if block.dtype == torch.bool and code is True else block == code
                csum = torch.cumsum(s, dim=-1, dtype=torch.int32)
                n = csum[:, -1:] if C else torch.zeros(s.shape[0], 1, dtype=torch.int32, device=dev)
                # selected column j goes to csum[j]-1; unselected to n + (j - csum[j]) (its rank among unselected)
                pos = torch.where(s, csum - 1, n + (cols - csum))
                idx[p, r0:r0 + chunk].scatter_(1, pos.long(), cols.expand_as(pos))
                num[p, r0:r0 + chunk] = n[:, 0]
    return [(num.reshape(*lead, R), idx.reshape(*lead, R, C)) for num, idx in outs]


def _state_from_ordered(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """Bool matrix [.., R, ncols]: True at the first num[r] entries of idx[r]."""
    *lead, R, C = idx.shape
    out = torch.zeros(*lead, R, ncols + 1, dtype=torch.bool, device=idx.device)
    if C == 0:
        return out[..., :ncols]
    valid = torch.arange(C, device=idx.device) < num.unsqueeze(-1)
    # invalid entries write into the spare last column, which is dropped
    target = torch.where(valid, idx.long().clamp(0, ncols), ncols)
    out.scatter_(-1, target, True)
    return out[..., :ncols]


def _state_from_blockmask(bm: "BlockMask") -> torch.Tensor:
    """int8 [B, H, nQ, nKV]: EMPTY / PARTIAL / FULL."""
    ncols = bm.kv_indices.shape[-1]
    state = _state_from_ordered(bm.kv_num_blocks, bm.kv_indices, ncols).to(torch.int8)
    if bm.full_kv_num_blocks is not None:
        full = _state_from_ordered(bm.full_kv_num_blocks, bm.full_kv_indices, ncols)
        state = torch.where(full, torch.tensor(FULL, dtype=torch.int8, device=state.device), state)
    return state


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    """The index of the first True of `bad` (row-major), as a tuple of ints."""
    return tuple(int(x) for x in torch.nonzero(bad.reshape(bad.shape))[0])


def _checked_state(num_name: str, idx_name: str, num: torch.Tensor, idx: torch.Tensor, n_blocks: int,
                   where: str) -> torch.Tensor:
    """Bool [.., R, n_blocks]: the blocks row r lists in idx[r, :num[r]], after checking that
    every count is in [0, n_blocks] and every listed index in [0, n_blocks) and listed once.
    ValueError naming the field, the row and the fix otherwise. Vectorised: O(R * C)."""
    for name, t in ((num_name, num), (idx_name, idx)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{where}: {name} must be an integer tensor (int32), got dtype {t.dtype}")
    C = idx.shape[-1]
    num = num.to(torch.int64)
    bad = (num < 0) | (num > min(C, n_blocks))
    if bool(bad.any()):
        row = _first(bad)
        n = int(num[row])
        why = "is negative" if n < 0 else (f"is larger than the {n_blocks} kv block(s) of the mask" if n > n_blocks
                                           else f"is larger than {idx_name}'s row length {C}")
        raise ValueError(f"{where}: {num_name}{list(row)} = {n} {why}; a count must be in [0, {min(C, n_blocks)}]: "
                         f"fix the count of row {row} (blocks per row never exceed ceil(KV_LEN / KV_BLOCK))")
    listed = torch.arange(C, device=idx.device) < num.unsqueeze(-1)
    idx64 = idx.to(torch.int64)
    bad = listed & ((idx64 < 0) | (idx64 >= n_blocks))
    if bool(bad.any()):
        pos = _first(bad)
        raise ValueError(f"{where}: {idx_name}{list(pos)} = {int(idx64[pos])} is outside the {n_blocks} kv block(s) "
                         f"[0, {n_blocks}) of the mask (KV_LEN / KV_BLOCK): it is listed in row {pos[:-1]} "
                         f"(within its first {int(num[pos[:-1]])} entries); fix the index, or pass seq_lengths that "
                         f"cover it")
    counts = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(-1, torch.where(listed, idx64, n_blocks), torch.ones_like(idx, dtype=torch.int32))
    counts = counts[..., :n_blocks]
    bad = counts > 1
    if bool(bad.any()):
        pos = _first(bad)
        raise ValueError(f"{where}: kv block {pos[-1]} is listed {int(counts[pos])} times in row {pos[:-1]} of "
                         f"{idx_name} (within its first {int(num[pos[:-1]])} entries); each block may be listed "
                         f"once per row: remove the repeat")
    return counts > 0


def _validate_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, n_blocks: int,
                        where: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(partial state, full state or None) [.., nQ, n_blocks] of checked kv block lists (see
    _checked_state); also no block may be both partial and full in a row."""
    partial = _checked_state("kv_num_blocks", "kv_indices", kv_num_blocks, kv_indices, n_blocks, where)
    full = None
    if full_kv_num_blocks is not None:
        if full_kv_num_blocks.shape != kv_num_blocks.shape or full_kv_indices.shape[:-1] != kv_indices.shape[:-1]:
            raise ValueError(f"{where}: full_kv_num_blocks {tuple(full_kv_num_blocks.shape)} and full_kv_indices "
                             f"{tuple(full_kv_indices.shape)} must have the leading shape of kv_num_blocks "
                             f"{tuple(kv_num_blocks.shape)}: one row per (batch, head, q block)")
        full = _checked_state("full_kv_num_blocks", "full_kv_indices", full_kv_num_blocks, full_kv_indices,
                              n_blocks, where)
        both = partial & full
        if bool(both.any()):
            pos = _first(both)
            raise ValueError(f"{where}: kv block {pos[-1]} of row {pos[:-1]} is listed both in kv_indices "
                             f"(partial) and in full_kv_indices (full); a block is one or the other: list a block "
                             f"whose mask is true everywhere as full only, any other non-empty block as partial only")
    return partial, full


def _n_kv_blocks(kv_indices: torch.Tensor, seq_lengths, kv_block: int) -> int:
    """How many kv blocks an index may name: those covering KV_LEN (and present in the rows)."""
    return min(kv_indices.shape[-1], cdiv(int(seq_lengths[1]), kv_block))


# ---------------------------------------------------------------------------------------
# BlockMask

class BlockMask:
    """Block-sparse mask in torch.nn.attention.flex_attention's BCSR format.

    The (Q_LEN, KV_LEN) mask is cut into blocks of BLOCK_SIZE = (Q_BLOCK, KV_BLOCK); block
    (i, j) covers q in [i*Q_BLOCK, (i+1)*Q_BLOCK) and kv in [j*KV_BLOCK, (j+1)*KV_BLOCK).
    Positions at or past Q_LEN / KV_LEN count as masked out, so an edge block that holds
    padding is never full. Each block is one of

    * full    - mask_mod is true at every position: kernels skip evaluating the mask;
    * partial - some but not all positions are true: kernels apply mask_mod;
    * empty   - no position is true: kernels never visit it.

    Tensors (int32; B, H may be 1 to broadcast over batch / query heads; nQ = ceil(Q_LEN /
    Q_BLOCK), nKV = ceil(KV_LEN / KV_BLOCK)):

    * kv_num_blocks [B, H, nQ], kv_indices [B, H, nQ, nKV]: row (b, h, i) lists its partial
      kv blocks, ascending, in kv_indices[b, h, i, :kv_num_blocks[b, h, i]];
    * full_kv_num_blocks, full_kv_indices: the same for full blocks (None: no full blocks
      are distinguished, every non-empty block is in kv_*);
    * q_num_blocks [B, H, nKV], q_indices [B, H, nKV, nQ], full_q_*: the transpose (for each
      kv block, the q blocks that see it), used by the backward pass.

    Entries past num_blocks in a row hold the row's remaining block indices in ascending
    order (each row is a permutation of 0..n-1, as in torch), so a stray read stays in bounds.

    The dense [B, H, Q_LEN, KV_LEN] mask is rebuilt from the indices by (dense all False;
    rows(i) = q positions of block i, cols(j) = kv positions of block j, both cut at the length):

        for b, h, i in itertools.product(range(B), range(H), range(nQ)):
            q = rows(i)[:, None]
            for j in kv_indices[b, h, i, :kv_num_blocks[b, h, i]]:           # partial: evaluate
                dense[b, h, q, cols(j)] = mask_mod(b, h, q, cols(j))
            dense[b, h, q, [c for j in full_kv_indices[b, h, i, :full_kv_num_blocks[b, h, i]] for c in cols(j)]] = True

    Other fields: BLOCK_SIZE (Q_BLOCK, KV_BLOCK), seq_lengths (Q_LEN, KV_LEN), mask_mod (the
    callable) and mask_graph (its traced IR Graph, or None for a mask built from blocks only).
    """

    _TENSOR_ATTRS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                 BLOCK_SIZE, mask_mod, seq_lengths, mask_graph: Optional[Graph] = None):
        if kv_indices.dim() < 2:
            raise ValueError(f"kv_indices must have shape [..., nQ, nKV], got {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must both be given or both be None")
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = _block_size(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.mask_graph = mask_graph
        # the key the torch.compile path finds the mask graph by (flexattn.mask_registry)
        self.mask_key = register_mask_template(mask_graph)

    def __getstate__(self) -> dict:
        # copies and pickles leave out what the kernels cache on a mask (`_flexattn_*`: its
        # kernels' view of the block lists, the tile-table form, replayed calls holding
        # compiled kernels): derived state, rebuilt on first use
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_flexattn_")}

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=_DEFAULT_BLOCK, mask_mod=None, seq_lengths=None,
                       compute_q_blocks: bool = True, mask_graph: Optional[Graph] = None) -> "BlockMask":
        """Build from the kv-side indices; the q-side ones are derived by transposing.

        Without seq_lengths the lengths are nQ*Q_BLOCK x nKV*KV_BLOCK. Without mask_mod the
        mask is noop (attend everywhere inside partial blocks) and mask_graph is None;
        with a mask_mod its traced graph is attached (traced here unless mask_graph is given).
        """
        if kv_indices.dim() < 2 or kv_num_blocks.shape != kv_indices.shape[:-1]:
            raise ValueError(f"kv_num_blocks must have shape kv_indices.shape[:-1]; got kv_num_blocks "
                             f"{tuple(kv_num_blocks.shape)} and kv_indices {tuple(kv_indices.shape)}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must both be given or both be None")
        qb, kvb = _block_size(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * qb, kv_indices.shape[-1] * kvb)
        if mask_mod is not None and mask_graph is None:
            mask_graph = trace_mask(mask_mod)
        ncols = kv_indices.shape[-1]
        partial, full = _validate_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                            _n_kv_blocks(kv_indices, seq_lengths, kvb), "BlockMask.from_kv_blocks")
        q_num = q_idx = fq_num = fq_idx = None
        if compute_q_blocks:
            pad = ncols - partial.shape[-1]  # columns no index may name (past KV_LEN)
            ((q_num, q_idx),) = _ordered_from_codes(torch.nn.functional.pad(partial, (0, pad)), (True,),
                                                    transpose=True)
            if full is not None:
                ((fq_num, fq_idx),) = _ordered_from_codes(torch.nn.functional.pad(full, (0, pad)), (True,),
                                                          transpose=True)
        bm = cls(kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32),
                 None if full_kv_num_blocks is None else full_kv_num_blocks.to(torch.int32),
                 None if full_kv_indices is None else full_kv_indices.to(torch.int32),
                 q_num, q_idx, fq_num, fq_idx, (qb, kvb), mask_mod, seq_lengths, mask_graph)
        bm._flexattn_checked = True
        return bm

    @classmethod
    def from_torch(cls, torch_block_mask) -> "BlockMask":
        """A `torch.nn.attention.flex_attention.BlockMask` as flexattn's: the same index
        tensors (shared, not copied), BLOCK_SIZE and seq_lengths, and its mask_mod traced
        (torch's noop_mask, or None, means attend everywhere inside partial blocks).

        flex_attention takes a torch BlockMask directly and converts it with this; the result
        is cached per torch mask (by identity, while it lives and keeps its kv_indices), so
        what the kernels cache on a mask is kept across calls too."""
        hit = _FROM_TORCH.get(torch_block_mask)
        if hit is not None and hit.kv_indices is torch_block_mask.kv_indices:
            return hit
        src = torch_block_mask
        mask_mod = src.mask_mod
        if mask_mod is None or mask_mod is _torch_noop_mask():
            mask_mod, graph = None, None
        else:
            graph = trace_mask(mask_mod, "block_mask.mask_mod")
        if src.q_indices is None:  # built with compute_q_blocks=False: derive the transpose
            bm = cls.from_kv_blocks(src.kv_num_blocks, src.kv_indices, src.full_kv_num_blocks, src.full_kv_indices,
                                    BLOCK_SIZE=src.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=src.seq_lengths,
                                    mask_graph=graph)
        else:
            bm = cls(*(getattr(src, a) for a in cls._TENSOR_ATTRS), BLOCK_SIZE=src.BLOCK_SIZE, mask_mod=mask_mod,
                     seq_lengths=src.seq_lengths, mask_graph=graph)
        _FROM_TORCH[src] = bm
        return bm

    @classmethod
    def _from_state(cls, state: torch.Tensor, BLOCK_SIZE, mask_mod, seq_lengths, mask_graph) -> "BlockMask":
        """From an int8 state matrix [B, H, nQ, nKV] of EMPTY / PARTIAL / FULL."""
        (kv_num, kv_idx), (fkv_num, fkv_idx) = _ordered_from_codes(state, (PARTIAL, FULL))
        (q_num, q_idx), (fq_num, fq_idx) = _ordered_from_codes(state, (PARTIAL, FULL), transpose=True)
        bm = cls(kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx,
                 BLOCK_SIZE, mask_mod, seq_lengths, mask_graph)
        bm._flexattn_checked = True  # built from a state matrix: valid by construction
        return bm

    def validate(self) -> "BlockMask":
        """Check the kv block lists (counts and indices in range, no block listed twice in a
        row, none both partial and full) once; ValueError naming the field, the row and the
        fix. Masks from create_block_mask / from_kv_blocks are checked when built; one built
        with the constructor is checked on its first use. Returns self."""
        if not getattr(self, "_flexattn_checked", False):
            _validate_kv_blocks(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
                                _n_kv_blocks(self.kv_indices, self.seq_lengths, self.BLOCK_SIZE[1]), "BlockMask")
            self._flexattn_checked = True
        return self

    # ---- reading -------------------------------------------------------------------
    def as_tuple(self, flatten: bool = True):
        """(Q_LEN, KV_LEN, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, Q_BLOCK, KV_BLOCK, mask_mod)
        as torch's BlockMask.as_tuple; flatten=False keeps BLOCK_SIZE as one tuple."""
        tensors = tuple(getattr(self, a) for a in self._TENSOR_ATTRS)
        bs = self.BLOCK_SIZE if not flatten else tuple(self.BLOCK_SIZE)
        if flatten:
            return (*self.seq_lengths, *tensors, *bs, self.mask_mod)
        return (self.seq_lengths, *tensors, bs, self.mask_mod)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kv_indices.shape[:-2]) + self.seq_lengths

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """Percentage of the B*H*Q_LEN*KV_LEN elements whose blocks are skipped (empty).

        Each visited block counts only its in-range area, so edge blocks of lengths that
        are not multiples of the block never push the figure below 0."""
        total = self.numel()
        if not total:
            return 0.0
        (q_len, kv_len), (qb, kb) = self.seq_lengths, self.BLOCK_SIZE
        dense = self.to_dense().to(torch.float64)  # [B, H, nQ, nKV], 1 = visited
        rows = (q_len - torch.arange(dense.shape[-2], dtype=torch.float64) * qb).clamp(0, qb)
        cols = (kv_len - torch.arange(dense.shape[-1], dtype=torch.float64) * kb).clamp(0, kb)
        visited = (dense.cpu() * rows[:, None] * cols[None, :]).sum().item()
        B, H = dense.shape[:2]
        return 100.0 * (1 - visited / (B * H * q_len * kv_len))

    def to_dense(self) -> torch.Tensor:
        """int32 [B, H, nQ, nKV]: 1 where the block is partial or full (as torch)."""
        ncols = self.kv_indices.shape[-1]
        dense = _state_from_ordered(self.kv_num_blocks, self.kv_indices, ncols)
        if self.full_kv_num_blocks is not None:
            dense = dense | _state_from_ordered(self.full_kv_num_blocks, self.full_kv_indices, ncols)
        return dense.to(torch.int32)

    def block_states(self) -> torch.Tensor:
        """int8 [B, H, nQ, nKV]: 0 empty, 1 partial, 2 full."""
        return _state_from_blockmask(self)

    def to_string(self, grid_size=(20, 20), limit: int = 4) -> str:
        """ASCII picture per (b, h): '█' full, '░' partial, ' ' empty (two characters per
        cell). Grids larger than grid_size are sub-sampled: a cell summarising several blocks
        shows '█' if all are full, ' ' if all are empty, '░' otherwise. grid_size=-1: no
        sub-sampling."""
        state = self.block_states()
        *lead, nr, nc = state.shape
        if grid_size == -1:
            max_r, max_c = nr, nc
        elif isinstance(grid_size, int):
            max_r = max_c = grid_size
        else:
            max_r, max_c = grid_size
        rs, cs = max(1, cdiv(nr, max_r)), max(1, cdiv(nc, max_c))
        out = []
        for k, bidx in enumerate(itertools.product(*[range(n) for n in lead])):
            if k == limit:
                out.append("...\nTo print more, use to_string(limit=N), or index the mask: block_mask[b, h]")
                break
            s = state[bidx]
            lines = [f"{bidx}"]
            for r in range(0, nr, rs):
                row = ""
                for c in range(0, nc, cs):
                    cell = s[r:r + rs, c:c + cs]
                    if bool((cell == FULL).all()):
                        ch = "█"
                    elif bool((cell == EMPTY).all()):
                        ch = " "
                    else:
                        ch = "░"
                    row += ch * 2
                lines.append(row)
            out.append("\n".join(lines))
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%,\n{self.to_string().rstrip()}\n)"

    def __repr__(self) -> str:
        def sh(x):
            return None if x is None else tuple(x.shape)
        fields = ",\n".join(f"    {a}={sh(getattr(self, a))}" for a in self._TENSOR_ATTRS)
        name = getattr(self.mask_mod, "__name__", repr(self.mask_mod))
        return (f"BlockMask(\n{fields},\n    BLOCK_SIZE={self.BLOCK_SIZE},\n    shape={self.shape},\n"
                f"    sparsity={self.sparsity():.2f}%,\n    mask_mod={name}\n)")

    # ---- transforming --------------------------------------------------------------
    def to(self, device) -> "BlockMask":
        t = {a: (None if getattr(self, a) is None else getattr(self, a).to(device)) for a in self._TENSOR_ATTRS}
        return BlockMask(**t, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                         seq_lengths=self.seq_lengths, mask_graph=self.mask_graph)

    def __getitem__(self, index) -> "BlockMask":
        """Index batch, head and q-block dims like a tensor: bm[b], bm[:, h], bm[b, h, i:j].

        Integer indices keep the dim (size 1). The mask_mod is kept only where its meaning
        is unchanged (the indexed b / h dims are not used by the mask and no q-blocks were
        dropped); otherwise partial blocks would be evaluated at shifted indices, so the
        result carries a mask_mod that raises if called (as torch does)."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(f"a BlockMask is indexed by at most (batch, head, q_block), got {len(index)} indices")
        sizes = self.kv_num_blocks.shape[:3]
        norm = []
        for i, n in zip((*index, slice(None), slice(None), slice(None))[:3], sizes):
            if isinstance(i, int) and not isinstance(i, bool):
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of range for a dimension of size {n}")
                i = i + n if i < 0 else i
                i = slice(i, i + 1)
            norm.append(i)
        norm = tuple(norm)

        def take(x):
            return None if x is None else x[norm]

        untouched_q = norm[2] == slice(None)
        keep = untouched_q and self.mask_graph is not None and all(
            (norm[d] == slice(None) or sizes[d] == 1 or not self.mask_graph.uses(name))
            for d, name in ((0, "b"), (1, "h")))
        bm = BlockMask.from_kv_blocks(take(self.kv_num_blocks), take(self.kv_indices),
                                      take(self.full_kv_num_blocks), take(self.full_kv_indices),
                                      BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths,
                                      compute_q_blocks=self.q_indices is not None,
                                      mask_mod=self.mask_mod if keep else None,
                                      mask_graph=self.mask_graph if keep else None)
        if not keep:
            bm.mask_mod = _sliced_mask_mod_error
        return bm

    def crop(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """The mask restricted to q < new_q_len, kv < new_kv_len (lengths at most the current
        ones). Blocks are reused; only partial blocks in the new last block row / column
        are re-evaluated (a crop can empty them), so the result stays exact. A full block
        cut by the new edge becomes partial (padding is masked). Without a mask_graph the
        edge partial blocks stay partial (conservative)."""
        Q, KV = self.seq_lengths
        new_q_len = _positive("new_q_len", new_q_len)
        new_kv_len = _positive("new_kv_len", new_kv_len)
        if new_q_len > Q or new_kv_len > KV:
            raise ValueError(f"crop can only shorten: the mask has lengths (Q_LEN={Q}, KV_LEN={KV}), asked for "
                             f"({new_q_len}, {new_kv_len}); build a new mask with create_block_mask for longer ones")
        qb, kvb = self.BLOCK_SIZE
        nq, nkv = cdiv(new_q_len, qb), cdiv(new_kv_len, kvb)
        state = self.block_states()[..., :nq, :nkv].clone()
        B, H = state.shape[:2]
        # Only the new edge row / column changes: it may now contain padding.
        edges = []
        if new_q_len % qb and new_q_len < Q:
            edges.append((slice(nq - 1, nq), slice(None)))
        if new_kv_len % kvb and new_kv_len < KV:
            edges.append((slice(None), slice(nkv - 1, nkv)))
        for rs, cs in edges:
            sub = state[:, :, rs, cs]
            sub[sub == FULL] = PARTIAL
            state[:, :, rs, cs] = sub
        if edges and self.mask_graph is not None:
            for rs, cs in edges:
                for b, h in itertools.product(range(B), range(H)):
                    sub = state[b, h, rs, cs]
                    qi, kj = torch.nonzero(sub == PARTIAL, as_tuple=True)
                    if qi.numel() == 0:
                        continue
                    qi = qi + (rs.start or 0)
                    kj = kj + (cs.start or 0)
                    res = evaluate_blocks(self.mask_graph, b, h, qi.to(self.device), kj.to(self.device),
                                           (qb, kvb), new_q_len, new_kv_len, self.device)
                    state[b, h, qi, kj] = res
        return BlockMask._from_state(state, self.BLOCK_SIZE, self.mask_mod, (new_q_len, new_kv_len),
                                     self.mask_graph)

    _adjust = crop  # torch's name


def _sliced_mask_mod_error(b, h, q_idx, kv_idx):
    raise RuntimeError("this BlockMask was sliced, so its mask_mod no longer applies at the sliced indices; "
                       "build the mask for the sliced shape with create_block_mask instead")


# torch BlockMask -> its flexattn conversion (BlockMask.from_torch); weak: dies with the torch mask
_FROM_TORCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _torch_block_mask_class():
    try:
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
    except ImportError:  # torch without FlexAttention
        return None
    return TorchBlockMask


def _torch_noop_mask():
    from torch.nn.attention.flex_attention import noop_mask as torch_noop
    return torch_noop


def as_block_mask(block_mask):
    """flexattn's BlockMask for `block_mask`: itself, or a torch BlockMask converted once
    (BlockMask.from_torch); anything else is returned as it is (the checks refuse it)."""
    if block_mask is None or isinstance(block_mask, BlockMask):
        return block_mask
    torch_cls = _torch_block_mask_class()
    if torch_cls is not None and isinstance(block_mask, torch_cls):
        return BlockMask.from_torch(block_mask)
    return block_mask
