"""Launching compiled Triton kernels without the JIT's per-call work.

`jit_fn[grid](*args, **constexprs)` binds every argument by name, specialises each one,
builds and hashes a cache key from all of them, checks the kernel's globals and builds
launch metadata - on every call. Our kernels take 46-60 arguments (the strides of every
tensor), more with captured tensors (their pointers, strides and sizes): 40-55 us per
launch on the H200's host, and a short fwd+bwd (four launches) was bound by the host.

`launch_cached` keeps, per (kernel, device, constexprs and options, the specialisation
features of the arguments), the CompiledKernel the JIT returned the first time, and
afterwards calls its launcher directly. The features are exactly what Triton specialises
a launch on (`native_specialize_impl`; see `spec_features`), so two calls with equal
features get the same binary from the JIT too: the key refines Triton's own, never
coarsens it. A miss (a new shape class, a new kernel) goes through `jit_fn[grid]`, which
compiles if it has to. Launch hooks (profilers), the interpreter and Triton releases
before 3.4 (no `triton.knobs`; the launcher's calling convention was checked on 3.6) take
the JIT's path.
"""
from __future__ import annotations

import functools

import torch
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

_I32_LO, _I32_HI = -2 ** 31, 2 ** 31 - 1
_I64_LO, _I64_HI = -2 ** 63, 2 ** 63 - 1
_MAX_ENTRIES = 4096  # distinct (kernel, shape-class) keys kept; cleared when full


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:  # asked on every call: the property query is not free
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """The number of SMs of a CUDA device (4 for other devices: the interpreter's grids)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain Python (the same reason as next_pow2)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 in plain Python: Triton's is a constexpr_function, whose call
    costs ~5 us on the GPU host - and the launch path asks it a dozen times per call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def spec_features(args) -> tuple:
    """What Triton's launch specialisation depends on, per argument: a tensor's dtype and
    16-byte alignment; an int's being 1 (it becomes a constexpr), its divisibility by 16
    and its width (i32 / i64 / u64); for anything else (float, bool, None) its type.
    One comprehension with no Python function call per argument: it runs on every launch."""
    return tuple([
        (-1 if a == 1 else (a % 16 == 0) + (0 if _I32_LO <= a <= _I32_HI else 2 if _I64_LO <= a <= _I64_HI else 4))
        if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else type(a)
        for a in args])


class _Cache:
    def __init__(self):
        self.entries: dict = {}
        try:
            from triton import knobs
            self._runtime = knobs.runtime
        except ImportError:  # Triton < 3.4
            self._runtime = None
        self.enabled = self._runtime is not None  # benchmarks/profile_host.py turns it off to compare
        self._get_stream = None

    def hooks_set(self) -> bool:
        """True when a launch hook (a profiler such as proton) is registered."""
        rt = self._runtime
        return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))

    def stream(self, device: int):
        """The device's current raw stream, as the JIT takes it (the driver is looked up on
        first use: importing flexattn must not initialise CUDA)."""
        if self._get_stream is None:
            from triton.runtime.driver import driver
            self._get_stream = driver.active.get_current_stream
        return self._get_stream(device)


_CACHE = _Cache()

# `recording()` pushes a list here: launches are then recorded in it (kernel, grid, args,
# kwargs) instead of run
CAPTURE: list = []
# id -> JIT kernel, for every kernel launched through the JIT in this process: holding the
# kernel keeps its id in _CACHE's keys unique.
LAUNCHED: dict = {}


class recording:
    """Context: launches through `launch_cached` are recorded (into the list it yields), not
    run. kernels.tiered learns what to compile in the background from it; kernels.replay
    what to replay."""

    def __enter__(self) -> list:
        self.launches: list = []
        CAPTURE.append(self.launches)
        return self.launches

    def __exit__(self, *exc):
        CAPTURE.pop()
        return False


# Compile options every flexattn launch states rather than leaves to Triton's defaults: the
# kernels were tuned and checked with floating-point contraction (fused multiply-adds), which
# Triton 3.9 warns it will stop doing by default from 3.10 on.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _with_options(kwargs: dict) -> dict:
    return {**COMPILE_OPTIONS, **kwargs}   # a caller's own choice wins


def launch_cached(kernel, grid, args, kwargs):
    """`kernel[grid](*args, **kwargs)` (with COMPILE_OPTIONS), through the compiled kernel's
    own launcher when this (kernel, device, kwargs, argument features) was launched before.
    Returns what the JIT returned (a CompiledKernel; None under the interpreter)."""
    kwargs = _with_options(kwargs)
    if CAPTURE:
        CAPTURE[-1].append((kernel, grid, args, kwargs))
        return None
    if not _CACHE.enabled or isinstance(kernel, InterpretedFunction) or _CACHE.hooks_set():
        return kernel[grid](*args, **kwargs)
    device = torch.cuda.current_device()
    key = _entry_key(kernel, device, args, kwargs)
    hit = _CACHE.entries.get(key)
    if hit is not None:
        run_compiled(hit, grid3(grid), _CACHE.stream(device), args)
        return hit[0]
    ck = kernel[grid](*args, **kwargs)
    LAUNCHED.setdefault(id(kernel), kernel)
    if ck is not None and hasattr(ck, "packed_metadata") and getattr(ck, "function", None) is not None:
        # the launcher takes every parameter in signature order (constexprs too, ignored):
        # the ones after the positionals come from kwargs or their defaults
        tail = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params[len(args):])
        if len(_CACHE.entries) >= _MAX_ENTRIES:
            _CACHE.entries.clear()
        _CACHE.entries[key] = (ck, tail)  # the id in the key stays unique: LAUNCHED holds the kernel
    return ck


def grid3(grid) -> tuple:
    """A 1-3 d grid as the 3-d one a compiled kernel's launcher takes."""
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def run_compiled(entry, grid, stream, args) -> None:
    """Launch a cache entry (CompiledKernel, trailing parameters) on a 3-d `grid3`."""
    ck, tail = entry
    ck.run(grid[0], grid[1], grid[2], stream, ck.function, ck.packed_metadata, None, None, None, *args, *tail)


# The launcher's fixed arguments in Triton 3.6 (grid, stream, function, cooperative, PDL, two
# scratch buffers, packed metadata, launch metadata, two hooks): descriptor_launch passes them
_LAUNCHER_FIXED_ARGS = "iiiKKppOOOOOO"


def descriptor_launch(entry, positions):
    """(launch, metas) for a cache entry whose kernel takes host-side TMA descriptors at the
    sorted `positions` of its arguments: launch(grid3, stream, args) runs it on arguments
    whose descriptors are already expanded as Triton's launcher expands them on every call
    (`expand_descriptor(descriptor, metas[j])` for the j-th; a driver call fills its
    CUtensorMap), so that kernels.replay can keep an expansion and use it again. None when
    the entry's launcher is not of the form this was written against (Triton 3.6: the
    module's launch wrapped in `inner`, which expands the descriptors, and no scratch memory
    to allocate) or a descriptor has no metadata (its expansion would hold the tensor)."""
    from triton.backends.nvidia import driver as nvidia_driver
    if getattr(nvidia_driver, "_BASE_ARGS_FORMAT", None) != _LAUNCHER_FIXED_ARGS:
        return None
    ck, tail = entry
    run = ck.run
    inner = getattr(run, "launch", None)
    code = getattr(inner, "__code__", None)
    if code is None or code.co_name != "inner" or not inner.__closure__:
        return None
    cells = dict(zip(code.co_freevars, inner.__closure__))
    try:
        raw = cells["launcher"].cell_contents
        indices = cells["tensordesc_indices"].cell_contents
        metas = list(cells["tensordesc_meta"].cell_contents)
    except (KeyError, ValueError, TypeError):
        return None
    if not callable(raw) or sorted(indices) != list(positions) or not all(isinstance(m, dict) for m in metas) \
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    function, packed = ck.function, ck.packed_metadata

    def launch(grid, stream, args):  # the launcher's fixed arguments, as CudaLauncher.__call__ passes them
        raw(grid[0], grid[1], grid[2], stream, function, coop, pdl, None, None, packed, None, None, None,
            *args, *tail)
    return launch, metas


def expand_descriptor(descriptor, meta) -> list:
    """A TMA descriptor argument as Triton's launcher passes it to the kernel: its filled
    CUtensorMap, then its shape and strides (no reference to its tensor)."""
    from triton.backends.nvidia import driver as nvidia_driver
    return nvidia_driver.make_tensordesc_arg(descriptor, meta)


def compiled_entry(kernel, args, kwargs):
    """The cache entry a launch of these arguments would take (None: it would go through
    the JIT - interpreter, no entry yet). kernels.replay keeps it to launch directly."""
    if not _CACHE.enabled or isinstance(kernel, InterpretedFunction) or not torch.cuda.is_available():
        return None
    return _CACHE.entries.get(_entry_key(kernel, torch.cuda.current_device(), args, _with_options(kwargs)))


def _entry_key(kernel, device, args, kwargs) -> tuple:
    return (id(kernel), device, tuple(kwargs.items()), spec_features(args))


def direct_launch_ok() -> bool:
    """Whether a kept entry may be launched directly now (no recording, no launch hooks)."""
    return not CAPTURE and _CACHE.enabled and not _CACHE.hooks_set()


def current_stream():
    return _CACHE.stream(torch.cuda.current_device())


def triton_features(args) -> tuple:
    """Triton's own specialisation of `args` (for tests: spec_features must refine it)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args)


# launch key -> the kwargs `launch` fell back to (fewer stages, a smaller loop tile)
SHRUNK: dict = {}


def stage_kwarg(kwargs: dict) -> str:
    """The kwarg that holds a launch's pipeline depth: the Gluon kernels' STAGES, else Triton's
    num_stages."""
    return "STAGES" if "STAGES" in kwargs else "num_stages"


def launch(kernel, grid, args, kwargs, key, shrink="BLOCK_N"):
    """`launch_cached`; if the config needs more shared memory than the GPU has (a
    captured-tensor gather or gradient can add scratch), retry with fewer stages
    (`stage_kwarg`), then a smaller inner-loop tile (`shrink`: the tile the loop walks, never
    the one the grid is made of; None: none to shrink); remember that under `key` (kernel kind,
    id(module), dtype, E, Ev, tiles, warps, stages). `args` may be a function of the launch's
    kwargs (arguments made for its tiles: TMA descriptors, whose boxes are the tiles)."""
    kwargs = dict(kwargs, **SHRUNK.get(key, {}))
    stages = stage_kwarg(kwargs)
    while True:
        try:
            return launch_cached(kernel, grid, args(kwargs) if callable(args) else args, kwargs)
        except OutOfResources:
            if kwargs[stages] > 1:
                kwargs[stages] -= 1
            elif shrink is not None and kwargs[shrink] > 16:
                kwargs[shrink] //= 2
            else:
                raise
            SHRUNK[key] = {k: kwargs[k] for k in (stages, shrink) if k is not None}
