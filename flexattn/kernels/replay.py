"""Replaying a call seen before: the same launches, with only the call's own tensors swapped in.

Two calls of `flex_attention_triton` with the same signature (`call_key`: the shapes,
strides, dtypes and devices of q, k, v; the same traced mods - structure and constants -
whose captured tensors have the same dtypes, devices, shapes and strides; the same
BlockMask, scale and options; whether gradients are needed) make the same launches with
the same arguments, except for tensors: the call's inputs (q, k, v, the captured tensors;
out, lse, dout for the backward) and what it allocates (out, lse, gradients, scratch).
The host work in between - checks, the plan, configs, argument assembly, the launcher's
specialisation key - is the same every time, and at 2K tokens it took longer than the GPU.

So the first call of a signature runs the normal path (which compiles). Then its launch
path runs once more with launches recorded (`launcher.recording`) under a torch function
mode that notes every tensor it creates, and becomes a `Replay`: per launch the compiled
kernel, the grid and an argument template with slots for the per-call tensors; per
allocation its shape, strides and dtype. Later calls allocate those and call each
kernel's launcher directly.

Invariants:
* A replayed path creates tensors only with torch.empty / empty_like / empty_strided /
  new_empty (contents written by its launches). A path that makes a tensor any other way
  (zeros, a contiguous copy, a cast) is not replayed: the recording sees it and gives up.
* Any other tensor argument (the BlockMask's lists as the kernels read them) is held by the
  cached plan, so the template holds the tensor the normal path would pass.
* The cache holds no captured tensor of the mods: they are per-call inputs, and the cached
  plan keeps buffer-less graphs (rebound per call where the normal path runs).
* A host-side TMA descriptor argument (the Hopper kernels') is rebuilt per call over the
  call's tensor, with the recorded box and layout (the recording keeps the descriptor without
  its tensor); one over any other tensor is not replayed.
  Where the launcher's form allows (`launcher.descriptor_launch`), the descriptor's expansion
  (its filled CUtensorMap) is kept per base pointer instead, and used again when a call's
  tensor has a base seen before (a training loop's activations come back to the same
  addresses from the caching allocator).
* A compiled kernel is specialised on its tensors' 16-byte alignment: q, k and v of another
  alignment are another call (call_key), and one whose captured tensors differ in it from
  the recording's takes the normal path.
Calls with dropout (a new seed each call) and calls while tiered compilation has not
settled on the mask's own kernels are not cached (`kernels.flex_attention_triton`).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from . import launcher

MAX_CALLS = 16  # signatures kept per BlockMask (the oldest is dropped first)
MAX_KEPT_EXPANSIONS = 32  # expanded TMA descriptors kept per step and descriptor (then cleared)
KEEP_EXPANSIONS = True  # benchmarks/short_sequences.py turns it off to compare
ENABLED = True  # benchmarks/profile_host.py turns it off to compare
_NO_MASK_CALLS: dict = {}  # calls made without a BlockMask


def _graph_key(g):
    """A traced graph's identity for the cache: its memo (shared by the trace cache's copies
    of one trace; kept alive by the cached call, so the id stays unique), its node stamp,
    its params, and its captured tensors' metadata - never the tensors themselves."""
    if g is None:
        return None
    return (id(g._memo), g._stamp(), tuple(g.params),
            tuple([(t.dtype, t.device, t.shape, t.stride()) for t in g.buffers]))


def call_key(q, k, v, score_graph, mask_graph, block_mask, scale, kernel_options, needs_grad, output_max=False):
    """The signature of a call: equal keys make the same launches but for their tensors. The
    inputs' 16-byte alignment is part of it: it decides which forward a call takes (the Hopper
    forward's TMA descriptors need aligned bases), and a CachedRun keeps its forward's kind; so is
    torch.are_deterministic_algorithms_enabled() (kernels.plan.build_plan: the backward's kernels)."""
    return (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device, _alignment((q, k, v)),
            _graph_key(score_graph), _graph_key(mask_graph),
            scale, tuple(kernel_options.items()) if kernel_options else (), needs_grad, output_max,
            torch.are_deterministic_algorithms_enabled(),
            # as kernels._blocks_of: the BlockMask's lists by their storage
            None if block_mask is None else (block_mask.kv_num_blocks.data_ptr(), block_mask.kv_indices.data_ptr()))


def calls_of(block_mask) -> dict:
    """The cached calls of `block_mask` (kept on it: they live and die with it)."""
    if block_mask is None:
        return _NO_MASK_CALLS
    calls = block_mask.__dict__.get("_flexattn_calls")
    if calls is None:
        calls = block_mask.__dict__["_flexattn_calls"] = {}
    return calls


def lookup(calls: dict, key):
    """The cached call under `key`; None if there is none or the key is not hashable (an
    option value such as a list: such calls are not cached)."""
    try:
        return calls.get(key)
    except TypeError:
        return None


def store(calls: dict, key, call) -> None:
    """Keep `call` under `key` (not if the key is not hashable), dropping the oldest entry
    when full."""
    try:
        hash(key)
    except TypeError:
        return
    if len(calls) >= MAX_CALLS:
        calls.pop(next(iter(calls)))
    calls[key] = call


_ALLOCATORS = frozenset({torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty})


class _Creations(TorchFunctionMode):
    """While a path is recorded: makes its allocations on the meta device (a recording
    costs no device memory: its launches are not run), notes them, and notes the first torch
    function that made a tensor some other way (then the path is not replayable) or an
    allocation on a device other than `device`."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.made: dict = {}  # id -> meta tensor (held: ids stay unique while recording)
        self.other = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATORS:
            asked = kwargs.get("device")
            if asked is None and args and isinstance(args[0], torch.Tensor) and func is not torch.empty_strided:
                asked = args[0].device  # empty_like / new_empty: the source's device
            asked = torch.device(asked) if asked is not None else torch.device("cpu")
            if asked.type != "meta" and asked != self.device and self.other is None:
                self.other = func
            out = func(*args, **dict(kwargs, device="meta"))
            self.made[id(out)] = out
            return out
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if self.other is None and not any(out is a for a in args):  # x.contiguous() -> x is fine
                self.other = func
        elif isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in out) and self.other is None:
            self.other = func
        return out


class _Step:
    __slots__ = ("kernel", "grid", "grid3", "template", "slots", "descriptor_slots", "kwargs", "compiled", "kept")

    def __init__(self, kernel, grid, template, slots, descriptor_slots, kwargs, compiled):
        self.kernel, self.grid, self.kwargs, self.compiled = kernel, grid, kwargs, compiled
        self.grid3 = launcher.grid3(grid)
        self.template, self.slots = template, slots
        # (position, tensor slot, the recorded descriptor without its tensor)
        self.descriptor_slots = descriptor_slots
        # a direct launch with the descriptors' expansions kept (None: none to keep, or not possible)
        found = descriptor_slots and compiled is not None and \
            launcher.descriptor_launch(compiled, [pos for pos, _, _ in descriptor_slots])
        self.kept = _KeptDescriptors(*found, descriptor_slots) if found else None


class _KeptDescriptors:
    """A step's launch with its TMA descriptors expanded by `launcher.expand_descriptor` (which
    fills the descriptor's CUtensorMap: a driver call, 1.5-12 µs a descriptor on the H200's
    host, benchmarks/RESULTS.md) once per base pointer, the expansions kept. An expansion
    depends on the base pointer and on what is fixed per step: the tensor's shape and strides
    (as recorded: see rebind), the box, layout and padding."""
    __slots__ = ("launch", "slots")

    def __init__(self, launch, metas, descriptor_slots):
        self.launch = launch
        # (position, tensor slot, the recorded descriptor, its metadata, base pointer -> expansion)
        self.slots = [(pos, i, recorded, meta, {}) for (pos, i, recorded), meta in zip(descriptor_slots, metas)]

    def __call__(self, grid3, stream, args, tensors):
        """Launch on `args` (the positional arguments; the descriptors' positions are ignored),
        each descriptor over tensors[its slot]."""
        expanded, start = [], 0
        for pos, i, recorded, meta, kept in self.slots:
            t = tensors[i]
            base = t.data_ptr()
            expansion = kept.get(base)
            if expansion is None:
                if len(kept) >= MAX_KEPT_EXPANSIONS:
                    kept.clear()
                expansion = kept[base] = launcher.expand_descriptor(rebind(recorded, t), meta)
            expanded += args[start:pos]
            expanded += expansion
            start = pos + 1
        expanded += args[start:]
        self.launch(grid3, stream, expanded)


class Replay:
    """The launches of one recorded call, to run again on new per-call tensors."""

    def __init__(self, steps, fresh, results, align):
        self.steps = steps      # [_Step]
        self.fresh = fresh      # [(shape, stride, dtype, device)]: allocated per call
        self.results = results  # slots of the tensors the call returns
        self.align = align      # the inputs' 16-byte alignment when recorded

    @classmethod
    def record(cls, fn, args, inputs, results_of):
        """The replay of `fn(*args)`, or None if it is not replayable. `inputs`: the per-call
        tensors among the arguments, by identity; `results_of(value)`: the tensors of fn's
        return value that a replay returns."""
        device = inputs[0].device
        mode = _Creations(device)
        with launcher.recording() as launches, mode:
            value = fn(*args)
        if mode.other is not None:
            return None
        slot_of = {id(t): i for i, t in enumerate(inputs)}
        fresh: list = []

        def slot(t):
            i = slot_of.get(id(t))
            if i is None and id(t) in mode.made:
                i = slot_of[id(t)] = len(inputs) + len(fresh)
                fresh.append((tuple(t.shape), t.stride(), t.dtype, device))
            return i

        def lookup_stand_in(a):  # what the launch cache sees of a fresh tensor: its dtype, aligned
            return torch.empty(0, dtype=a.dtype, device=device) if id(a) in mode.made else a

        steps = []
        for kernel, grid, largs, kwargs in launches:
            template, slots, descriptor_slots = list(largs), [], []
            for pos, a in enumerate(largs):
                if isinstance(a, torch.Tensor):
                    i = slot(a)
                    if i is not None:
                        template[pos] = None
                        slots.append((pos, i))
                elif is_descriptor(a):  # a TMA descriptor (the Hopper forward) over a per-call tensor
                    i = slot(a.base)
                    if i is None:
                        return None
                    template[pos] = None
                    descriptor_slots.append((pos, i, rebind(a, None)))  # the call's tensor is not held
            entry = launcher.compiled_entry(kernel, [lookup_stand_in(a) for a in largs], kwargs)
            steps.append(_Step(kernel, tuple(grid), template, tuple(slots), tuple(descriptor_slots), kwargs, entry))
        results = [slot(t) for t in results_of(value)]
        if any(i is None for i in results):
            return None
        return cls(steps, fresh, results, _alignment(inputs))

    def __call__(self, inputs):
        """The call's result tensors; None when its inputs' alignment differs from the
        recording's (then the caller takes the normal path)."""
        if _alignment(inputs) != self.align:
            return None
        tensors = list(inputs)
        for shape, stride, dtype, device in self.fresh:
            tensors.append(torch.empty_strided(shape, stride, dtype=dtype, device=device))
        stream = None
        direct = launcher.direct_launch_ok()
        for step in self.steps:
            args = step.template.copy()
            for pos, i in step.slots:
                args[pos] = tensors[i]
            if direct and step.kept is not None and KEEP_EXPANSIONS:
                if stream is None:
                    stream = launcher.current_stream()
                step.kept(step.grid3, stream, args, tensors)
                continue
            for pos, i, recorded in step.descriptor_slots:
                args[pos] = rebind(recorded, tensors[i])
            if direct and step.compiled is not None:
                if stream is None:
                    stream = launcher.current_stream()
                launcher.run_compiled(step.compiled, step.grid3, stream, args)
            else:  # the interpreter, a profiler's launch hooks, a kernel not in the launch cache
                launcher.launch_cached(step.kernel, step.grid, args, step.kwargs)
        return [tensors[i] for i in self.results]


def is_descriptor(a) -> bool:
    """Whether a launch argument is a host-side TMA descriptor (it holds its tensor)."""
    return type(a).__name__ == "TensorDescriptor" and hasattr(a, "base")


def rebind(desc, t):
    """`desc` (a TMA descriptor recorded over a tensor like `t`) over `t`. `t` has the recorded
    tensor's shape and strides (the call key fixes the inputs'; a fresh tensor is allocated as
    recorded), so this is a copy with another base, without the descriptor's checks
    (`dataclasses.replace` ran them again: 3 µs a descriptor, ten descriptors a fwd+bwd step)."""
    new = object.__new__(type(desc))
    new.__dict__.update(desc.__dict__)
    new.base = t
    return new


def _alignment(tensors) -> tuple:
    return tuple([t.data_ptr() % 16 == 0 for t in tensors])
