"""A worker process for the background compiles of tiered compilation (flexattn.kernels.tiered).

A compile in a thread of the caller's process shares Python's lock with the caller: Triton's
front end and the garbage collections over the caller's large heap hold it for milliseconds to
tens of milliseconds at a time, and a caller launching kernels meanwhile leaves the GPU idle
(H200, D=128, S=8K: a causal mask's tile form measured 362 TFLOP/s right after its first call
while its own kernels compiled in a thread, 573 in another run of the same). The worker compiles
the same kernel, from the same generated module file, into Triton's on-disk cache; the caller's
thread then loads it from there (no front end, no compiler passes: a cache hit).

The worker is `python -m flexattn.kernels.compile_worker`, started at the first background
compile of a process and kept; it ends when the caller's end of its pipe closes. Requests and
answers are pickled, length-prefixed, over its stdin / stdout; it first answers "ready". Tensors
never cross: the launch arguments are stand-ins (`stand_in`). A worker that cannot start, does
not answer in time (READY_S, ANSWER_S: an interpreter that is not a plain Python, say) or fails
a compile leaves the compile to the caller's thread, as without it (POSIX only: elsewhere the
thread compiles).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
import select
import struct
import subprocess
import sys
import threading

import torch

from .launcher import stage_kwarg


class ArgStub:
    """Stands in for a tensor argument at compile time: what the JIT specialises on (dtype,
    16-byte alignment), without keeping the tensor alive."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = t.data_ptr() % 16

    def data_ptr(self) -> int:
        return self._ptr


def stand_in(arg):
    """A launch argument as the compile needs it: a tensor's ArgStub, a TMA descriptor (a
    dataclass over a tensor) over an ArgStub; other arguments as they are."""
    if isinstance(arg, torch.Tensor):
        return ArgStub(arg)
    if dataclasses.is_dataclass(arg) and isinstance(getattr(arg, "base", None), torch.Tensor):
        return dataclasses.replace(arg, base=ArgStub(arg.base))
    return arg


def compile_variants(kernel, grid, args, kwargs, max_shared: int) -> list[dict]:
    """Compile `kernel` for this launch, and, where its config needs more shared memory than
    the GPU has, the configs with fewer stages that launcher.launch falls back to (the
    kwarg launcher.stage_kwarg names); returns the kwargs of every config compiled."""
    kwargs = dict(kwargs)
    stages = stage_kwarg(kwargs)
    done = []
    while True:
        shared = kernel.warmup(*args, grid=grid, **kwargs).metadata.shared
        done.append(dict(kwargs))
        if shared <= max_shared or kwargs.get(stages, 1) <= 1:
            return done
        kwargs[stages] -= 1


# ---- the caller's side ----------------------------------------------------------------

_lock = threading.Lock()
_proc: subprocess.Popen | None = None
_broken = os.name != "posix"   # the pipes are waited on with select
READY_S = 120.0    # to start (import torch and Triton) and say so
ANSWER_S = 900.0   # to compile one launch's configs


def compile_in_worker(kernel, grid, args, kwargs, device: int, target, max_shared: int) -> bool:
    """Compile as compile_variants would, in the worker process, for Triton's `target` (the
    GPU's: driver.active.get_current_target()), into Triton's on-disk cache; whether it did
    (False: the worker is not available or failed, and the caller compiles itself)."""
    global _broken
    module = sys.modules.get(kernel.fn.__module__)
    path = getattr(module, "__file__", None)
    if _broken or path is None:
        return False
    request = (path, module.__name__, kernel.fn.__name__, device, target, grid, args, kwargs, max_shared)
    with _lock:
        try:
            proc = _worker()
            _send(proc.stdin, request)
            status, _ = _receive(proc.stdout, ANSWER_S)
        except (OSError, EOFError, TimeoutError, pickle.PickleError, struct.error):
            # it could not start, died or hangs: compiles stay in the caller's threads
            _broken = True
            if _proc is not None and _proc.poll() is None:
                _proc.kill()
            return False
    return status == "ok"


def _worker() -> subprocess.Popen:
    global _proc
    if _proc is None or _proc.poll() is not None:
        from triton import knobs
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # the caller's cache directory, also where it was set in code rather than the environment
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]),
                   TRITON_CACHE_DIR=knobs.cache.dir)
        _proc = subprocess.Popen([sys.executable, "-m", "flexattn.kernels.compile_worker"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if _receive(_proc.stdout, READY_S)[0] != "ready":
            raise EOFError("compile worker did not start")
    return _proc


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream, timeout_s: float | None = None):
    # select sees the pipe, not the reader's buffer: safe because each side waits for the
    # other's one message before it writes (nothing is ever read ahead)
    if timeout_s is not None and not select.select([stream], [], [], timeout_s)[0]:
        raise TimeoutError(f"compile worker: no answer in {timeout_s:.0f} s")
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("compile worker closed its pipe")
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("compile worker closed its pipe")
    return pickle.loads(data)


# ---- the worker's side ------------------------------------------------------------------

def _load(path: str, name: str):
    """The generated module at `path` under the caller's module name (so that its kernels'
    cache keys are the caller's)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class _TargetOnly:
    """What JITFunction.warmup asks of Triton's driver, answered with the caller's device and
    target: the worker compiles without a GPU (no CUDA context, no GPU memory)."""

    def __init__(self, device: int, target):
        self.device, self.target = device, target

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def main() -> None:
    from triton.runtime.driver import driver
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # the pipe carries answers only
    _send(answers, ("ready", None))
    while True:
        try:
            path, name, kernel_name, device, target, grid, args, kwargs, max_shared = _receive(requests)
        except EOFError:
            return
        try:
            driver.set_active(_TargetOnly(device, target))
            kernel = getattr(_load(path, name), kernel_name)
            answer = ("ok", compile_variants(kernel, grid, args, kwargs, max_shared))
        except Exception as e:  # noqa: BLE001 - reported to the caller, which compiles itself
            answer = ("error", f"{type(e).__name__}: {e}")
        _send(answers, answer)


if __name__ == "__main__":
    main()
