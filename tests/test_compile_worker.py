"""The background compiles' worker process (flexattn.kernels.compile_worker), without a GPU:
it compiles a generated kernel for sm_90 into Triton's on-disk cache under the key the
caller's own compile then finds, and a worker that cannot run leaves the compile to the
caller."""
from __future__ import annotations

import os
import time

import pytest
import torch

import flexattn
from flexattn.kernels import compile_worker, config, launcher, make_plan
from flexattn.kernels.forward import flex_forward

MAX_SHARED = 232448  # an H100 / H200's


@pytest.fixture
def fresh_worker(monkeypatch, tmp_path):
    """An empty Triton cache, and a worker started for it (the old one, if any, left alone)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_worker, "_proc", None)
    monkeypatch.setattr(compile_worker, "_broken", False)
    yield tmp_path
    if compile_worker._proc is not None and compile_worker._proc.poll() is None:
        compile_worker._proc.stdin.close()
        compile_worker._proc.wait(timeout=60)


def _forward_launch(monkeypatch):
    """The forward launch of a mask of its own, captured as the sm90 path would make it."""
    S = 256
    q, k, v = (torch.empty(1, 2, S, 64, dtype=torch.bfloat16) for _ in range(3))
    bm = flexattn.create_block_mask(lambda b, h, qi, ki: (qi >= ki) & ((qi - ki) % 13 != 4), None, None, S, S,
                                   device="cpu")
    plan = make_plan(q, k, v, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                     kernel_options={"BACKEND": "triton"})
    launches = []
    monkeypatch.setattr(launcher, "launch", lambda kernel, grid, args, kwargs, key, **_:
                        launches.append((kernel, grid, [compile_worker.stand_in(a) for a in args], kwargs)))
    monkeypatch.setattr(config, "device_key", lambda d: "sm90")
    flex_forward(plan, q, k, v)
    (launch,) = launches
    return launch


def _entries(cache_dir) -> set:
    return {os.path.join(d, f) for d, _, files in os.walk(cache_dir) for f in files}


@pytest.mark.slow
def test_worker_compiles_into_the_callers_cache_key(monkeypatch, fresh_worker):
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    kernel, grid, args, kwargs = _forward_launch(monkeypatch)
    target = GPUTarget("cuda", 90, 32)
    assert compile_worker.compile_in_worker(kernel, grid, args, kwargs, 0, target, MAX_SHARED)
    after_worker = _entries(fresh_worker)
    assert any(f.endswith(".cubin") for f in after_worker)
    # the caller's own compile of the same launch finds it: nothing new in the cache
    old = driver._active
    driver.set_active(compile_worker._TargetOnly(0, target))
    try:
        done = compile_worker.compile_variants(kernel, grid, args, kwargs, MAX_SHARED)
    finally:
        driver._active = old
    assert done == [dict(kwargs)] and _entries(fresh_worker) == after_worker


def test_unavailable_worker_leaves_the_compile_to_the_caller(monkeypatch, fresh_worker):
    from triton.backends.compiler import GPUTarget
    kernel, grid, args, kwargs = _forward_launch(monkeypatch)
    monkeypatch.setattr(compile_worker.sys, "executable", os.path.join(str(fresh_worker), "no-such-python"))
    assert not compile_worker.compile_in_worker(kernel, grid, args, kwargs, 0, GPUTarget("cuda", 90, 32),
                                                MAX_SHARED)
    assert compile_worker._broken   # not tried again in this process
    assert not _entries(fresh_worker)


def test_silent_worker_times_out(monkeypatch, fresh_worker):
    # an executable that starts but never answers (not a Python that runs the worker): the
    # caller stops waiting, kills it and compiles itself from then on
    from triton.backends.compiler import GPUTarget
    kernel, grid, args, kwargs = _forward_launch(monkeypatch)
    silent = fresh_worker / "silent"
    silent.write_text("#!/bin/sh\nsleep 60\n")
    silent.chmod(0o755)
    monkeypatch.setattr(compile_worker.sys, "executable", str(silent))
    monkeypatch.setattr(compile_worker, "READY_S", 1.0)
    t = time.perf_counter()
    assert not compile_worker.compile_in_worker(kernel, grid, args, kwargs, 0, GPUTarget("cuda", 90, 32),
                                                MAX_SHARED)
    assert time.perf_counter() - t < 30 and compile_worker._broken
    compile_worker._proc.wait(timeout=10)   # killed


def test_stand_ins_keep_no_tensor():
    from flexattn.kernels.hopper_forward import descriptor
    t = torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16)
    stub = compile_worker.stand_in(t)
    assert stub.dtype == torch.bfloat16 and stub.data_ptr() == t.data_ptr() % 16
    desc = descriptor(t, 64)
    desc_stub = compile_worker.stand_in(desc)
    assert isinstance(desc_stub.base, compile_worker.ArgStub) and desc_stub.block_shape == desc.block_shape
    assert desc_stub.layout == desc.layout and list(desc_stub.strides) == list(desc.strides)
    assert compile_worker.stand_in(7) == 7


def test_variants_follow_the_launchers_stage_fallback():
    # where a config passes the shared memory, the configs with fewer stages launcher.launch falls back
    # to are compiled too: num_stages for the Triton kernels, STAGES for the Gluon ones
    from types import SimpleNamespace

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            stages = kwargs.get("STAGES", kwargs.get("num_stages"))
            return SimpleNamespace(metadata=SimpleNamespace(shared=100_000 * stages))
    got = compile_worker.compile_variants(Kernel(), (1,), (), {"STAGES": 3, "num_warps": 8}, MAX_SHARED)
    assert got == [{"STAGES": 3, "num_warps": 8}, {"STAGES": 2, "num_warps": 8}]
    got = compile_worker.compile_variants(Kernel(), (1,), (), {"num_stages": 2}, MAX_SHARED)
    assert got == [{"num_stages": 2}]
