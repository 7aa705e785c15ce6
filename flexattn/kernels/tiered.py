"""Tiered compilation: a new mask structure's first calls run at once, through the mask's
tile-table form (flexattn.mask_tiles), while the mask's own kernels compile in the
background (a worker process, flexattn.kernels.compile_worker, driven from a thread); once
those are compiled the calls switch to them.

A mask_mod is compiled into the kernels. New numbers in a mask (a window width) and new
values in its captured tensors (a document layout) are kernel arguments and never
recompile, but a new mask *expression* costs a Triton compile before its first output
(1.2-1.7 s on the lent H200's host). The tile-table form reads the mask from a table built
by evaluating mask_mod once on every partial block (each row's run of kept columns where
every row has one, else the tiles' bytes: flexattn.mask_tiles); its kernels depend only on
that form, the block sizes and which of b, h the mask reads, so they are compiled once per
form and serve every mask of that form.
Both forms place -inf at exactly the same positions and run the same kernel template: on
the CPU path and in the interpreter the results are the same bits; compiled for a GPU the
two kernels may round differently (the compiler fuses multiply-adds around different mask
code), both within the numerics rule (tests/test_tiered.py, tests/test_gpu.py). So the
first calls of a new mask can differ in the last bits from its later ones: DETERMINISTIC
turns tiering off.

Per call (`route`), for the kernels the call needs (forward or decode; backward too when
it needs gradients):
* the mask's own kernels compiled (launched before, or compiled in the background): use them;
* else, if the tile-table kernels are compiled and the table fits: use the tile-table form,
  and after the launch compile the mask's own kernels in the background (`after_launch`);
* else: the mask's own kernels, compiled now (as without tiering), and after the launch the
  tile-table kernels (of the mask's form) are compiled in the background, so that the next
  new mask of that form is instant.

GPU only (the interpreter compiles nothing); off with kernel_options={"TIERED": False},
under DETERMINISTIC (same bits call to call) and under AUTOTUNE (which times the mask's
own kernels). The tile form runs the call's own forward, the Hopper forward included. The
background compile runs in a worker process, which leaves Python's lock to the caller (a
compile in a thread held it long enough to idle the GPU: compile_worker); the thread then
loads the kernel from Triton's on-disk cache, and compiles it itself where the worker cannot
run. The tile form's kernels are warmed with and without full blocks, since a new mask
structure often differs from the first in that.
To know what to compile, the other form's launches are captured by running its launch
path with launches recorded (kernels.launcher.recording): that allocates its outputs once,
freed at once. "Compiled" is tracked per kernel and shape class (`shape_class`: what besides
the kernel picks its binary - head dims, dtypes, the lengths' divisibility...), so a mask
that ran at one head dim is not taken as compiled at another: there the tile form runs,
warmed at that head dim by the first mask that ran there.
`wait()` blocks until the background compiles are done. A background compile that fails
marks its kernels ready, so the next call compiles them in the foreground and raises the
error where it belongs.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import torch

from .. import codegen
from ..mask_tiles import tile_table_form
from . import compile_worker, launcher
from .source import step_kernels

# (id, shape class) -> JIT kernel (holding it keeps the id unique)
_lock = threading.Lock()
_compiled: dict = {}   # launched in the foreground, or compiled in the background (or failed there: see _compile)
_submitted: dict = {}  # sent to a background compile
_futures: list[Future] = []
_pool: ThreadPoolExecutor | None = None


def shape_class(plan, q, k, v) -> tuple:
    """What picks the binary of a kernel of `plan` for this call besides the kernel itself (whose
    module the mods pick): the plan's sparse blocks and options, the scale's sign, dropout,
    max_scores; the head dims, GQA group and the lengths' divisibility by the blocks (constexprs);
    what Triton specialises the shapes, strides and tensors on (launcher.spec_features). It may
    tell apart calls that share a binary (a form then counts as not compiled: the call compiles or
    warms it again, a hit in Triton's cache), never the reverse but for what only the kernels' other
    arguments show (full blocks or none, a captured tensor's layout, dout's): such a call compiles
    in the foreground, as without tiering."""
    L, S = q.shape[2], k.shape[2]
    block_m, block_n = plan.blocks.block
    return (q.device.index, plan.blocks.block, repr(sorted(plan.opts.items())), plan.scale > 0,
            bool(plan.dropout_p), plan.output_max, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1],
            L % block_m == 0, S % block_n == 0, math.gcd(L, 128), math.gcd(S, 128),
            launcher.spec_features((*q.shape, *k.shape, *q.stride(), *k.stride(), *v.stride(), q, k, v)))


def mark_compiled(kernels, cls) -> None:
    """Count `kernels` as compiled for calls of shape class `cls`."""
    with _lock:
        _compiled.update(((id(k), cls), k) for k in kernels)


def _kernels(kind, plan):
    return [getattr(plan.module(module), name) for module, name in step_kernels(kind)]


def _ready(kind, plan, cls) -> bool:
    return all((id(k), cls) in _compiled for k in _kernels(kind, plan))


def route(plan, kinds, block_mask, q, k, v):
    """The plan the call on q, k, v runs: `plan` itself, or its tile-table form with
    `plan.tiering` saying what to compile in the background after the launch."""
    o = plan.opts
    if (plan.mask_graph is None or block_mask is None or q.device.type != "cuda" or not o.get("TIERED", True)
            or o.get("AUTOTUNE") or o.get("DETERMINISTIC")
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):  # the table syncs
        return plan
    cls = shape_class(plan, q, k, v)
    if all(_ready(kind, plan, cls) for kind in kinds):
        return plan
    form = tile_table_form(block_mask)
    if form is None:
        return plan
    # a mask that reads b (or h) through a BlockMask broadcast over b (or h) is evaluated
    # per row by the kernels, but tabulated once: the table would not cover the other rows
    slots = form.mask_graph.buffers[0]
    if (plan.mask_graph.uses("b") and slots.shape[0] != q.shape[0]) or \
            (plan.mask_graph.uses("h") and slots.shape[1] != q.shape[1]):
        return plan
    graph = codegen.kernel_graph(form.mask_graph)
    # the tile form takes the call's own forward, the Hopper forward too (H200, D=128: 0.98-1.00x
    # the own kernels' forward through it, 0.75-0.80x through the Triton forward)
    tiled = replace(plan, mask_graph=graph, mask_bufs=list(graph.buffers), tiering=None, modules={})
    if all(_ready(kind, tiled, cls) for kind in kinds):
        return replace(tiled, tiering=("own", plan, cls))    # run the tile form; compile the mask's own
    return replace(plan, tiering=("tile_form", tiled, cls))  # run the mask's own; warm the tile form


def after_launch(plan, kind_of, capture_launches) -> None:
    """After `plan` launched its kernels of one step (forward or backward): count them compiled,
    and compile the other form's kernels of that step in the background. `kind_of(a_plan)` is
    the kind a plan launches for that step (the forwards of the two forms may differ: the Hopper
    forward takes some mods and not others); `capture_launches(other_plan, kind)` runs its
    launch path with launches recorded instead of run, and returns them."""
    if plan.tiering is None:
        return
    _, other, cls = plan.tiering
    mark_compiled(_kernels(kind_of(plan), plan), cls)
    kind = kind_of(other)
    todo = [k for k in _kernels(kind, other) if (id(k), cls) not in _compiled and (id(k), cls) not in _submitted]
    if not todo:
        return
    # the job keeps stand-ins, not the tensors: the capture's own outputs are freed now
    launches = [(kernel, grid, [compile_worker.stand_in(a) for a in args], kwargs)
                for kernel, grid, args, kwargs in capture_launches(other, kind) if kernel in todo]
    if plan.tiering[0] == "tile_form":
        # the tile form serves masks to come: warm it with and without full blocks too (a new
        # mask structure often has none, or the first one had none)
        launches += [(kernel, grid, args, dict(kwargs, HAS_FULL=not kwargs["HAS_FULL"]))
                     for kernel, grid, args, kwargs in launches if "HAS_FULL" in kwargs]
    with _lock:
        _submitted.update(((id(k), cls), k) for k in todo)
    device = torch.cuda.current_device()
    _futures[:] = [f for f in _futures if not f.done()]
    _futures.append(_executor().submit(_compile, device, launches, todo, cls))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexattn-compile")
    return _pool


def _compile(device, launches, kernels, cls) -> None:
    try:
        with torch.cuda.device(device):
            from triton.runtime.driver import driver
            max_shared = driver.active.utils.get_device_properties(device)["max_shared_mem"]
            target = driver.active.get_current_target()
            for kernel, grid, stubs, kwargs in launches:
                # compiled in the worker, then a hit in Triton's on-disk cache here
                compile_worker.compile_in_worker(kernel, grid, stubs, kwargs, device, target, max_shared)
                compile_worker.compile_variants(kernel, grid, stubs, kwargs, max_shared)
    finally:
        # failed or not, the kernels count as compiled: a failure then recurs in the
        # foreground, at the call that needs them, with its error
        mark_compiled(kernels, cls)


def wait() -> None:
    """Block until every background compile has finished."""
    while _futures:
        _futures.pop(0).exception()  # waits; a failure resurfaces in the foreground (_compile)
