"""flex_attention inside torch.compile (fullgraph=True included).

Dynamo cannot, and should not, run flexattn's tracer, analysis or code generator: they are
Python over Python objects. Under compilation `flex_attention` comes here and splits in two:

* `_prepare`, marked `torch.compiler.assume_constant_result`, runs once while dynamo traces
  the call, on plain Python values: it traces score_mod, takes the mask's template from the
  BlockMask's `mask_key` (flexattn.block_mask), registers an `ops.OpSpec` and returns its
  key - a str constant in the graph;
* the traced part runs flex_attention's front half (flexattn.front.check_arguments: the
  same checks, scale and backend choice as an eager call) and calls the custom op `flexattn::fwd` with the
  BlockMask's tensors, the captured tensors and that key. The graph holds the one op;
  autograd differentiates it with `flexattn::bwd` (flexattn.ops).

Guards (when a compiled graph is reused): the BlockMask's tensors are graph inputs and its
`mask_key` is guarded by value, so a new BlockMask of the same mask structure (a new
document layout, say) reuses the graph.

score_mod is guarded by its code and what its closure holds, not by identity, when it is a
plain function (no defaults) whose closure cells hold only tensors and Python scalars /
strings / None, and whose captured tensors are all closure cells: the cells are read in
the traced code, so the tensors are graph inputs (guarded by dtype and shape, as any
input) and every other cell is compared with the value the trace saw (a guard on its
value). A fresh closure of the same code per call - as Hugging Face transformers builds
one per layer call - then reuses one graph and reads its own tensors. Any other score_mod
(defaults, a bound method, a module, tensors reached through globals or containers) is
guarded by identity: a new one retraces, and its captured tensors are read when it is
traced (update them in place; a tensor rebound inside the same closure is not seen), as
with any captured global.
"""
from __future__ import annotations

import hashlib
import types
from collections import OrderedDict

import torch

from . import ops
from .attention import check_aux, finish
from .autodiff import grad_slots as buffer_grad_slots
from .block_mask import BlockMask
from .build_mask import _create_block_mask, _create_block_mask_outside_graph
from .masks import noop_mask
from .checks import check_block_mask
from .codegen import kernel_graph
from .front import check_arguments, trace_score_mod
from .full_mask import full_block_mask
from .mask_registry import _MASK_TEMPLATES
from .options import check_kernel_options
from .trace import trace_mask

# spec key -> the score_mod's captured tensors (graph inputs of the compiled graph)
_SCORE_BUFFERS: dict[str, tuple] = {}
# spec key -> the all-attending BlockMask built for block_mask=None
_FULL_MASKS: dict[str, BlockMask] = {}
# spec key -> (cell index of each captured tensor, ((cell index, value) of each other cell)), or None
_CELL_PLANS: dict[str, object] = {}


def _plain_closure(score_mod) -> bool:
    """Whether score_mod can be guarded by code and closure contents (see the module doc)."""
    return type(score_mod) is types.FunctionType and not score_mod.__defaults__ and not score_mod.__kwdefaults__


def _plan_cells(score_mod, score_bufs):
    """(slots, values): each captured tensor's closure cell, and the value of every other
    cell; None when score_mod is not a plain closure over tensors and scalars."""
    if score_mod is None or not _plain_closure(score_mod):
        return None
    contents = [c.cell_contents for c in (score_mod.__closure__ or ())]  # (an empty cell raises: traced it would too)
    if not all(isinstance(x, torch.Tensor) or type(x) in _SCALARS for x in contents):
        return None
    slots = []
    for t in score_bufs:
        found = [i for i, x in enumerate(contents) if x is t]
        if not found:
            return None  # a tensor reached another way (a global, a container): guarded by identity
        slots.append(found[0])
    return tuple(slots), tuple((i, x) for i, x in enumerate(contents) if not isinstance(x, torch.Tensor))


@torch.compiler.assume_constant_result
def _cell_plan(spec_key: str, plain: bool):
    """The cell plan of `spec_key`'s score_mod as a constant of the graph (None: by identity)."""
    return _CELL_PLANS.get(spec_key) if plain else None


def _score_buffers(score_mod, spec_key: str) -> list:
    """The score_mod's captured tensors for the op (traced by dynamo): read from the closure
    cells when the plan allows it (guards on code and contents), else the ones the trace
    saw, with score_mod guarded by identity."""
    plan = _cell_plan(spec_key, score_mod is not None and _plain_closure(score_mod))
    if plan is None:
        if score_mod is not None:
            id(score_mod)  # (makes dynamo guard score_mod by identity)
        return list(_SCORE_BUFFERS[spec_key])
    slots, values = plan
    cells = score_mod.__closure__
    for i, value in values:
        if cells[i].cell_contents != value:  # (folded at trace time: dynamo guards the cell's value)
            raise AssertionError("unreachable: a guarded closure cell changed")
    bufs = [cells[i].cell_contents for i in slots]
    for t in bufs:
        torch._dynamo.mark_static(t)  # the trace depends on their shapes
    return bufs


_SCALARS = (type(None), bool, int, float, str)


@torch.compiler.assume_constant_result
def _prepare(score_mod, mask_key: str, block_size: tuple, has_full: bool, backend: str,
             options: tuple, device: str, full_lengths: tuple) -> str:
    """Trace score_mod and register the op spec; returns the spec key (runs at trace time).
    full_lengths = (L, S) when no block_mask was given (then an all-attending one is built).
    `_cell_plan(key)` then says how the traced caller finds the captured tensors."""
    dev = torch.device(device)
    score_graph = trace_score_mod(score_mod, dev)
    full_mask = None
    if full_lengths:
        full_mask = full_block_mask(*full_lengths, dev)
        mask_key, block_size, has_full = full_mask.mask_key, full_mask.BLOCK_SIZE, True
    mask_graph = _MASK_TEMPLATES.get(mask_key) if mask_key else None
    if mask_key and mask_graph is None:
        raise RuntimeError("block_mask's traced mask is no longer registered (more than 1024 mask structures "
                           "were created since); rebuild it with create_block_mask")
    score_bufs = tuple(score_graph.buffers) if score_graph is not None else ()
    grad_slots = buffer_grad_slots(score_graph)
    if backend == "triton":
        check_kernel_options(dict(options))
        score_graph, mask_graph = kernel_graph(score_graph), kernel_graph(mask_graph)
    key = ops.register(ops.OpSpec(backend, score_graph, mask_graph, tuple(block_size), has_full, options,
                                  grad_slots))
    _SCORE_BUFFERS[key] = score_bufs
    _CELL_PLANS[key] = _plan_cells(score_mod, score_bufs)
    if full_mask is not None:
        _FULL_MASKS[key] = full_mask
    return key


def flex_attention_compiled(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                            kernel_options, dropout_p, dropout_seed, generator, return_aux=None):
    """flex_attention's semantics (flexattn.attention), traced by dynamo into one custom op."""
    args = check_arguments(query, key, value, scale, enable_gqa, kernel_options, dropout_p, dropout_seed, generator)
    output_max = check_aux(return_lse, return_aux)
    if args.dropout_p > 0 and dropout_seed is None:
        raise ValueError("dropout_p > 0 inside torch.compile needs an explicit dropout_seed (an int): a seed "
                         "drawn from a generator would be frozen into the compiled graph")
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    opts = tuple(sorted(args.options.items()))
    if block_mask is None:
        spec_key = _prepare(score_mod, "", (), False, args.backend, opts, str(query.device), (L, S))
        block_mask = _FULL_MASKS[spec_key]
    else:
        check_block_mask(block_mask, B, Hq, L, S, query.device)
        if block_mask.mask_graph is None and block_mask.mask_mod is not noop_mask:
            raise ValueError("block_mask has a mask_mod but no traced mask (a sliced BlockMask): inside "
                             "torch.compile pass a BlockMask from create_block_mask")
        spec_key = _prepare(score_mod, block_mask.mask_key, tuple(block_mask.BLOCK_SIZE),
                            block_mask.full_kv_num_blocks is not None, args.backend, opts, str(query.device), ())
    mask_bufs = list(block_mask.mask_graph.buffers) if block_mask.mask_graph is not None else []
    out, lse, max_scores = ops.fwd(query, key, value, ops.blocks_list(block_mask), _score_buffers(score_mod, spec_key),
                                   mask_bufs, spec_key, args.scale, args.dropout_p, int(dropout_seed or 0), output_max)
    return finish(out, lse, return_lse, return_aux, max_scores)


# key -> a BlockMask built while dynamo traced a create_block_mask call (the newest kept)
_BUILT_MASKS: "OrderedDict[str, BlockMask]" = OrderedDict()
_BUILT_MASKS_MAX = 64


@torch.compiler.assume_constant_result
def _prepare_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, block_size, separate_full_blocks: bool) -> str:
    """Build the BlockMask of a mask_mod that captures no tensor (runs at trace time); returns
    its key in _BUILT_MASKS, or "" when the mask captures tensors (their values, which dynamo
    does not guard, decide the mask: it is then built outside the graph)."""
    graph = trace_mask(mask_mod)
    if graph.buffers:
        return ""
    text = repr((graph.structure_key(), graph.params, B, H, Q_LEN, KV_LEN, str(device), block_size,
                 separate_full_blocks))
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    if key not in _BUILT_MASKS:
        if len(_BUILT_MASKS) >= _BUILT_MASKS_MAX:
            _BUILT_MASKS.popitem(last=False)
        _BUILT_MASKS[key] = _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, block_size,
                                               separate_full_blocks)
    return key


def create_block_mask_compiled(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, separate_full_blocks):
    """create_block_mask inside torch.compile (fullgraph=True included), traced by dynamo.

    A mask_mod that captures no tensor is a function of the indices and of Python values
    alone: its BlockMask is built once while dynamo traces (`_prepare_mask`) and the graph
    reads it as a constant. The mask_mod is also called here on scalar indices, so dynamo
    traces it and guards everything it reads (closure values, globals, the functions it
    calls): a different mask recompiles, the same code with the same values - a closure
    made afresh in every forward - reuses the graph. A mask_mod that captures tensors is
    built outside the graph (a graph break; with fullgraph=True dynamo's error says to build
    it outside the compiled function). The sizes must be constants of the graph (as for
    flex_attention's own sizes here: dynamic shapes are not supported)."""
    key = _prepare_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, bool(separate_full_blocks))
    if not key:
        return _create_block_mask_outside_graph(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE,
                                                separate_full_blocks)
    i = torch.zeros((), dtype=torch.int32)
    mask_mod(i, i, i, i)  # (for dynamo's guards; the value is unused)
    return _BUILT_MASKS[key]
