"""create_block_mask and create_mask: a mask_mod, traced, as a BlockMask or a dense mask.

    mask_mod --trace--> IR graph --exact_block_states--> int8 block states --> BlockMask
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .block_mask import _DEFAULT_BLOCK, BlockMask, _block_size, _positive
from .block_states import FULL, PARTIAL, exact_block_states
from .evaluate import evaluate
from .trace import check_arity, check_buffers_device, trace_mask


def _check_device(device) -> torch.device:
    if device is None:  # torch's default: the current accelerator, else the CPU
        # (a CUDA build of torch names cuda as its accelerator on a machine without a GPU too)
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        available = accelerator is not None and accelerator.is_available()
        device = accelerator.current_accelerator() if available else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch build sees no CUDA device; "
                         f"pass device='cpu' (or the device of your query tensor)")
    return device


def _checked_mask_args(mask_mod, B, H, Q_LEN, KV_LEN, device):
    """Validate the arguments shared by create_block_mask and create_mask and trace the mod:
    (graph, B, H, Q_LEN, KV_LEN, device) with B / H None made 1."""
    check_arity(mask_mod, "mask", "mask_mod")
    B = _positive("B", B, allow_none=True)
    H = _positive("H", H, allow_none=True)
    Q_LEN = _positive("Q_LEN", Q_LEN)
    KV_LEN = _positive("KV_LEN", KV_LEN)
    device = _check_device(device)
    graph = trace_mask(mask_mod)
    check_buffers_device(graph, device, "mask_mod")
    return graph, B, H, Q_LEN, KV_LEN, device


def create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE=_DEFAULT_BLOCK, _compile: bool = False,
                      separate_full_blocks: bool = True, compute_dq_write_order: bool = False,
                      dq_kv_order: bool = True) -> BlockMask:
    """Exact BlockMask of `mask_mod` for a [B, H, Q_LEN, KV_LEN] attention.

    torch's signature and defaults. B / H None mean 1 (the mask broadcasts over batch /
    heads); a mask that does not read b (or h) is analysed once and broadcast to B (or H).
    device=None is torch's default: the current accelerator, else the CPU.
    separate_full_blocks=False stores every visited block as partial (the mask runs on all
    of them), as torch does. Accepted with no effect: `_compile` (nothing here needs
    compiling), `compute_dq_write_order` / `dq_kv_order` (torch's metadata for its FLASH
    backend's deterministic backward, which flexattn's kernels do not read).

    Inside torch.compile (fullgraph=True included) a mask_mod that captures no tensor is
    built while dynamo traces, and the mask_mod is guarded by what it reads (see
    flexattn.compiled.create_block_mask_compiled). One that captures tensors is built
    outside the graph (a graph break; the BlockMask's tensors then enter the graph as
    inputs); with fullgraph=True that break is an error
    (torch._dynamo.exc.Unsupported) whose reason says the fix: build the mask outside the
    compiled function and pass it in."""
    if torch.compiler.is_compiling():
        from .compiled import create_block_mask_compiled  # (torch.compile only: not loaded before)
        return create_block_mask_compiled(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks)
    return _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks)


def _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks) -> BlockMask:
    graph, B, H, Q_LEN, KV_LEN, device = _checked_mask_args(mask_mod, B, H, Q_LEN, KV_LEN, device)
    block = _block_size(BLOCK_SIZE)
    Bm = B if graph.uses("b") else 1
    Hm = H if graph.uses("h") else 1
    state = exact_block_states(graph, Bm, Hm, Q_LEN, KV_LEN, block, device)
    if not separate_full_blocks:
        state = torch.where(state == FULL, torch.full_like(state, PARTIAL), state)
    state = state.expand(B, H, *state.shape[2:])
    if Bm != B or Hm != H:
        # derive indices once for the distinct masks, then broadcast (copy) them
        bm = BlockMask._from_state(state[:Bm, :Hm], block, mask_mod, (Q_LEN, KV_LEN), graph)
        t = {a: getattr(bm, a).expand(B, H, *getattr(bm, a).shape[2:]).contiguous() for a in BlockMask._TENSOR_ATTRS}
        return BlockMask(**t, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Q_LEN, KV_LEN), mask_graph=graph)
    return BlockMask._from_state(state, block, mask_mod, (Q_LEN, KV_LEN), graph)


# the reason is part of dynamo's error under fullgraph=True
OUTSIDE_GRAPH_REASON = ("flexattn.create_block_mask cannot build this mask inside a torch.compile graph: its "
                        "mask_mod captures tensors, whose values decide the mask; with fullgraph=True, build the "
                        "BlockMask outside the compiled function and pass it in (with fullgraph=False it is built "
                        "outside the graph)")


_create_block_mask_outside_graph = torch.compiler.disable(_create_block_mask, reason=OUTSIDE_GRAPH_REASON)


def create_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                device="cpu") -> torch.Tensor:
    """Dense bool mask [B, H, Q_LEN, KV_LEN] (B / H None mean 1). O(B*H*Q*KV) memory:
    for inspection and tests; attention uses create_block_mask."""
    graph, B, H, Q_LEN, KV_LEN, device = _checked_mask_args(mask_mod, B, H, Q_LEN, KV_LEN, device)
    i32 = dict(dtype=torch.int32, device=device)
    return evaluate(graph, b=torch.arange(B, **i32)[:, None, None, None], h=torch.arange(H, **i32)[None, :, None, None],
                    q_idx=torch.arange(Q_LEN, **i32)[None, None, :, None],
                    kv_idx=torch.arange(KV_LEN, **i32)[None, None, None, :]).contiguous()
