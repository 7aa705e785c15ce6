"""flexattn as torch.library custom ops (fake implementations + autograd), so a compiled
graph can hold it and `torch.library.opcheck` can check it.

    flexattn::fwd(q, k, v, blocks, score_bufs, mask_bufs, spec_key, scale, dropout_p, dropout_seed,
                  output_max)
        -> (out, lse, max_scores)   (max_scores: [B, Hq, L] when output_max, else empty; not
                                     differentiable)
    flexattn::bwd(q, k, v, out, lse, dout, dlse, blocks, score_bufs, mask_bufs, spec_key, ...)
        -> (dq, dk, dv, buffer grads)

Both run the backend's run (flexattn.call: the CPU path's CpuRun, the kernels' PlannedRun),
and bwd spreads its gradients with flexattn.call.scatter_buffer_grads, as eager calls do.

Ops take only tensors and plain values. What is not a tensor - the backend, the traced
graphs (as templates: their captured tensors come in `score_bufs` / `mask_bufs`), the
BlockMask block size, kernel options - is an `OpSpec` in `_SPECS` under `spec_key`, a hash
of their structure and number constants (never of captured tensor values), so one
compiled graph serves new values in the captured tensors. `blocks` holds the BlockMask's
kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices (the full ones are empty
tensors when the mask has none), then its q_* and full_q_* transposes.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import cpu
from .autodiff import grad_slots
from .build_mask import create_block_mask
from .call import scatter_buffer_grads
from .checks import check_kernel_inputs
from .codegen import kernel_graph
from .ir import Graph
from .trace import trace_score


@dataclass(frozen=True)
class OpSpec:
    backend: str                  # "triton" (the generated kernels) or "cpu" (flexattn.cpu)
    score_graph: Optional[Graph]  # templates: buffers are bound per call from the op's inputs
    mask_graph: Optional[Graph]
    block_size: tuple
    has_full: bool
    opts: tuple                   # sorted kernel_options items
    grad_slots: tuple             # score buffers the backward returns gradients for


_SPECS: dict[str, OpSpec] = {}


def _graph_key(g: Optional[Graph]) -> str:
    return "" if g is None else g.structure_key() + repr(g.params)


def register(spec: OpSpec) -> str:
    """The key under which the ops find `spec` (the same for specs that compute the same)."""
    text = repr((spec.backend, _graph_key(spec.score_graph), _graph_key(spec.mask_graph), spec.block_size,
                 spec.has_full, spec.opts, spec.grad_slots))
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    if key not in _SPECS:
        strip = lambda g: None if g is None else g._with_buffers([])  # noqa: E731
        _SPECS[key] = OpSpec(spec.backend, strip(spec.score_graph), strip(spec.mask_graph), tuple(spec.block_size),
                             bool(spec.has_full), tuple(spec.opts), tuple(spec.grad_slots))
    return key


def blocks_list(bm) -> list[Tensor]:
    """The 8 BlockMask tensors in the ops' order (missing full ones as empty tensors)."""
    def t(x, like):
        return x if x is not None else like.new_empty((0,))
    return [bm.kv_num_blocks, bm.kv_indices, t(bm.full_kv_num_blocks, bm.kv_num_blocks),
            t(bm.full_kv_indices, bm.kv_indices), bm.q_num_blocks, bm.q_indices,
            t(bm.full_q_num_blocks, bm.q_num_blocks), t(bm.full_q_indices, bm.q_indices)]


def _bind(g: Optional[Graph], bufs) -> Optional[Graph]:
    return None if g is None else g._with_buffers(list(bufs))


def _run_of(p: OpSpec, q, k, v, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed, output_max=False):
    """The backend's run (flexattn.call) for spec `p` bound to this call's tensors."""
    full = p.has_full
    sg, mg = _bind(p.score_graph, score_bufs), _bind(p.mask_graph, mask_bufs)
    if p.backend == "cpu":
        return cpu.make_run(q.dtype, score_graph=sg, mask_graph=mg, block_size=p.block_size,
                            kv_blocks=(blocks[0], blocks[1], blocks[2] if full else None, blocks[3] if full else None),
                            scale=scale, kernel_options=dict(p.opts), dropout_p=dropout_p, dropout_seed=dropout_seed,
                            grad_slots=p.grad_slots, output_max=output_max)
    from . import kernels as K  # the Triton backend: loaded by the first call that uses it
    check_kernel_inputs(q, k, v, sg, mg, None)  # head dims, dtypes, devices: raised before any launch
    b = K.expand_blocks(K.KernelBlocks.from_list(blocks, p.block_size, full), q.shape[0], q.shape[1])
    return K.PlannedRun(K.build_plan(q, k, sg, mg, b, scale, dict(p.opts), dropout_p, dropout_seed, p.grad_slots,
                                     output_max))


@torch.library.custom_op("flexattn::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, blocks: list[Tensor], score_bufs: list[Tensor], mask_bufs: list[Tensor],
        spec_key: str, scale: float, dropout_p: float, dropout_seed: int,
        output_max: bool) -> tuple[Tensor, Tensor, Tensor]:
    run = _run_of(_SPECS[spec_key], q, k, v, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed,
                  output_max)
    out, lse, *mx = run.forward(q, k, v, score_bufs, mask_bufs)
    mx = mx[0] if output_max else lse.new_empty((0,))
    # the strides _fwd_fake promises, whatever the inputs' strides
    return out.contiguous(), lse.contiguous(), mx.contiguous()


def _lse_dtype(q) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@fwd.register_fake
def _fwd_fake(q, k, v, blocks, score_bufs, mask_bufs, spec_key, scale, dropout_p, dropout_seed, output_max):
    B, Hq, L, _ = q.shape
    lse = q.new_empty(B, Hq, L, dtype=_lse_dtype(q))
    return q.new_empty(B, Hq, L, v.shape[-1]), lse, lse.new_empty((B, Hq, L) if output_max else (0,))


class _autograd_enabled:
    """Re-admit the autograd dispatch keys that a custom op's implementation runs without
    (restored on exit): the CPU backward calls torch.autograd.grad on score_mod's tiles,
    turning grad mode on around their evaluation only."""
    _KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)

    def __enter__(self):
        self.saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in self._KEYS]
        for k in self._KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)

    def __exit__(self, *exc):
        for k, was in zip(self._KEYS, self.saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, was)


@torch.library.custom_op("flexattn::bwd", mutates_args=())
def bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor,
        blocks: list[Tensor], score_bufs: list[Tensor], mask_bufs: list[Tensor], spec_key: str, scale: float,
        dropout_p: float, dropout_seed: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    p = _SPECS[spec_key]
    run = _run_of(p, q, k, v, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed)
    # the CPU backward differentiates score_mod with torch.autograd
    with _autograd_enabled() if p.backend == "cpu" else contextlib.nullcontext():
        dq, dk, dv, buf_grads = run.backward(q, k, v, out, lse, dout, dlse, list(score_bufs), mask_bufs)
    zeros = lambda t: t.new_zeros(t.shape) if t.dtype.is_floating_point else t.new_zeros(())  # noqa: E731
    grads = scatter_buffer_grads(score_bufs, p.grad_slots, buf_grads, zeros)
    # contiguous, as _bwd_fake promises: a backend may return gradients in the inputs' strides or not
    # (transposed q/k/v from view(...).transpose(1, 2) are common), and a compiled graph checks them
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), [g.contiguous() for g in grads]


@bwd.register_fake
def _bwd_fake(q, k, v, out, lse, dout, dlse, blocks, score_bufs, mask_bufs, spec_key, scale, dropout_p,
              dropout_seed):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            [t.new_empty(t.shape) if t.dtype.is_floating_point else t.new_empty(()) for t in score_bufs])


def _setup(ctx, inputs, output):
    q, k, v, blocks, score_bufs, mask_bufs, spec_key, scale, dropout_p, dropout_seed, _output_max = inputs
    out, lse, max_scores = output
    ctx.mark_non_differentiable(max_scores)
    ctx.save_for_backward(q, k, v, out, lse, *blocks, *score_bufs, *mask_bufs)
    ctx.n = (len(blocks), len(score_bufs))
    ctx.args = (spec_key, scale, dropout_p, dropout_seed)


def _backward(ctx, dout, dlse, _dmax):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    nb, ns = ctx.n
    blocks, score_bufs, mask_bufs = list(saved[5:5 + nb]), list(saved[5 + nb:5 + nb + ns]), list(saved[5 + nb + ns:])
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, grads = bwd(q, k, v, out, lse, dout.contiguous(), dlse, blocks, score_bufs, mask_bufs, *ctx.args)
    grads = [g if t.requires_grad else None for g, t in zip(grads, score_bufs)]
    return dq, dk, dv, [None] * nb, grads, [None] * len(mask_bufs), None, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup)


def run_opcheck(q, k, v, score_mod=None, mask_mod=None, output_max=False):
    """torch.library.opcheck over flexattn::fwd for these inputs (an ALiBi-style score_mod with
    a captured per-head tensor and a causal mask by default; max_scores too with output_max);
    CUDA inputs run the kernels, CPU inputs the CPU path."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    slopes = torch.linspace(0.1, 1.0, H, device=q.device).requires_grad_()
    score_mod = score_mod or (lambda s, b, h, qi, kv: s - slopes[h] * (qi - kv).abs())
    mask_mod = mask_mod or (lambda b, h, qi, kv: qi >= kv)
    bm = create_block_mask(mask_mod, None, None, L, S, device=q.device)
    sg = trace_score(score_mod)
    backend = "triton" if q.device.type == "cuda" else "cpu"
    if backend == "triton":
        sg, mg = kernel_graph(sg), kernel_graph(bm.mask_graph)
    else:
        mg = bm.mask_graph
    key = register(OpSpec(backend, sg, mg, bm.BLOCK_SIZE, bm.full_kv_num_blocks is not None, (), grad_slots(sg)))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), blocks_list(bm),
            list(sg.buffers), list(mg.buffers), key, 1.0 / q.shape[-1] ** 0.5, 0.0, 0, output_max)
    torch.library.opcheck(fwd, args)
