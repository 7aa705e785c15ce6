"""Replayed calls (flexattn.kernels.replay): a call like one before re-runs its recorded
launches with only its own tensors swapped in.

A replay must give the bits of the normal path - forward, decode, backward - and notice
what changes the launches: new captured values (read through the pointer: same launches),
a rebound capture, new shapes or options, inputs of another alignment, dropout. The cache
must hold no captured tensor. The kernels run under TRITON_INTERPRET=1 in a subprocess
(as in test_kernels_interpret.py); the recording's own rules are checked in-process.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from flexattn.kernels import launcher, replay

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_recording_gives_up_on_tensors_not_made_by_empty():
    x = torch.randn(4, 4)

    def allocates(x):
        launcher.launch_cached("kernel", (1,), (x, torch.empty(3), x.contiguous()), {})
        return [torch.empty_like(x)]

    rep = replay.Replay.record(allocates, (x,), (x,), lambda r: r)
    assert rep is not None
    (step,) = rep.steps
    assert step.slots == ((0, 0), (1, 1), (2, 0))  # x is the input; the empty tensor is fresh
    assert [f[0] for f in rep.fresh] == [(3,), (4, 4)] and rep.results == [2]

    def zeros(x):
        launcher.launch_cached("kernel", (1,), (x, torch.zeros(3)), {})
        return []

    def copies(x):
        launcher.launch_cached("kernel", (1,), (x.t().contiguous(),), {})
        return []

    assert replay.Replay.record(zeros, (x,), (x,), lambda r: r) is None
    assert replay.Replay.record(copies, (x,), (x,), lambda r: r) is None


def test_rebinding_a_descriptor_changes_only_its_base():
    # a replay swaps the call's tensor (shaped and strided as the recorded one) into each recorded
    # TMA descriptor, Triton's host-side ones and Gluon's: every other field as recorded, and the
    # recorded descriptor left as it was
    tools = pytest.importorskip("triton.tools.tensor_descriptor")
    gluon = pytest.importorskip("triton.experimental.gluon")
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    x, y = torch.zeros(2, 3, 64, 32, dtype=torch.float16), torch.ones(2, 3, 64, 32, dtype=torch.float16)
    layout = gluon.language.NVMMASharedLayout.get_default_for([16, 32], gluon.language.float16)
    for recorded in (tools.TensorDescriptor.from_tensor(x, [1, 1, 16, 32]),
                     hopper.TensorDescriptor.from_tensor(x, [1, 1, 16, 32], layout)):
        rebound = replay.rebind(recorded, y)
        assert type(rebound) is type(recorded) and rebound.base is y and recorded.base is x
        for field in dataclasses.fields(recorded):
            if field.name != "base":
                assert getattr(rebound, field.name) == getattr(recorded, field.name), field.name
        assert replay.is_descriptor(rebound)


def test_a_replay_holds_no_input_its_descriptors_were_built_over():
    # the first call's q, k, v (activations) must not live as long as the BlockMask's cache
    import gc
    import weakref
    tools = pytest.importorskip("triton.tools.tensor_descriptor")
    x = torch.zeros(2, 64, 32, dtype=torch.float16)

    def path(t):
        launcher.launch_cached("kernel", (1,), (tools.TensorDescriptor.from_tensor(t, [1, 16, 32]), t), {})
        return []
    rep = replay.Replay.record(path, (x,), (x,), lambda r: r)
    assert rep is not None and rep.steps[0].descriptor_slots[0][2].block_shape == [1, 16, 32]
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None


def test_kept_descriptor_expansions_launch_what_tritons_launcher_would(monkeypatch):
    # A replayed step whose kernel takes TMA descriptors launches the compiled kernel's own
    # launch function with each descriptor expanded, the expansion kept per base pointer. The
    # kernel must get exactly the arguments Triton's launcher (`inner`, which expands every
    # descriptor on every call) would give it, for a base seen before and for a new one.
    nvidia = pytest.importorskip("triton.backends.nvidia.driver")
    tools = pytest.importorskip("triton.tools.tensor_descriptor")
    if getattr(nvidia, "_BASE_ARGS_FORMAT", None) != launcher._LAUNCHER_FIXED_ARGS:
        pytest.skip("Triton's launcher is not of the form descriptor expansions are kept for (3.6)")
    fills = []

    def fill(desc, meta):  # the driver's fill, as a value naming what it was filled from
        fills.append(desc.base.data_ptr())
        return [("map", desc.base.data_ptr(), tuple(meta["block_size"])), *desc.shape, *desc.strides]
    monkeypatch.setattr(nvidia, "make_tensordesc_arg", fill)
    launched = []
    signature = {0: "tensordesc<fp16[16, 32]>", 1: "*fp16", 2: "i32", 3: "tensordesc<fp16[16, 32]>", 4: "constexpr"}
    metas = [{"block_size": [16, 32]}, {"block_size": [16, 32]}]

    try:
        inner = nvidia.wrap_handle_tensordesc(lambda *a: launched.append(a), signature, metas)
    except (AttributeError, TypeError):
        pytest.skip("Triton's launcher is not of the form descriptor expansions are kept for (3.6)")

    class Run:  # a CudaLauncher's attributes as Triton 3.6 has them
        launch = staticmethod(inner)
        launch_cooperative_grid, launch_pdl, global_scratch_size, profile_scratch_size = False, False, 0, 0

    class Compiled:
        run, function, packed_metadata = Run(), 7, "packed"
    entry = (Compiled(), (64,))  # the trailing constexpr
    x, y, o = (torch.zeros(2, 64, 32, dtype=torch.float16) for _ in range(3))

    def path(t):
        launcher.launch_cached("kernel", (3,), (tools.TensorDescriptor.from_tensor(t, [1, 16, 32]), t, 5,
                                               tools.TensorDescriptor.from_tensor(o, [1, 16, 32])), {})
        return []
    monkeypatch.setattr(launcher, "compiled_entry", lambda kernel, args, kwargs: entry)
    monkeypatch.setattr(launcher, "direct_launch_ok", lambda: True)
    monkeypatch.setattr(launcher, "current_stream", lambda: 11)
    rep = replay.Replay.record(path, (x,), (x, o), lambda r: r)
    (step,) = rep.steps
    assert step.kept is not None
    for t in (x, y, x, y):
        rep((t, o))
        Compiled.run.launch(3, 1, 1, 11, 7, False, False, None, None, "packed", None, None, None,
                            tools.TensorDescriptor.from_tensor(t, [1, 16, 32]), t, 5,
                            tools.TensorDescriptor.from_tensor(o, [1, 16, 32]), 64)
        kept, triton_s = launched[-2:]
        assert kept == triton_s
    # the kept path filled each base once (x, o, then y); Triton's filled every descriptor every time
    assert fills.count(y.data_ptr()) == 1 + 2 and fills.count(x.data_ptr()) == 1 + 2


def test_unhashable_options_are_not_cached():
    calls: dict = {}
    key = replay.call_key(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), None, None,
                          None, None, {"BLOCK_M": [16]}, False)
    assert replay.lookup(calls, key) is None
    replay.store(calls, key, object())
    assert calls == {}


def test_inputs_of_another_alignment_are_another_call():
    # a cached call keeps the forward kind it was planned with (the Hopper forward needs 16-byte
    # aligned bases for its TMA descriptors): a view 2 elements into its storage must not find it
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    off = torch.zeros(q.numel() + 2, dtype=q.dtype)[2:].view(q.shape)
    assert q.stride() == off.stride() and off.data_ptr() % 16
    keys = [replay.call_key(x, q, q, None, None, None, None, None, False) for x in (q, off)]
    assert keys[0] != keys[1]
    assert keys[0] == replay.call_key(q.clone(), q, q, None, None, None, None, None, False)


_INTERPRET_CHECKS = r'''
import gc, json, weakref
import torch, flexattn
from flexattn.kernels import calls, replay
from mods_zoo import make_mod

failures = []
OPTS = {"BACKEND": "triton"}


def check(cond, what):
    if not cond:
        failures.append(what)


class Count:
    """Counts the normal launch paths run (plans made, forward / decode / backward)."""
    def __init__(self):
        self.n = {}
        for name, label in (("make_plan", "make_plan"), ("flex_forward", "forward"), ("flex_backward", "backward"),
                            ("decode_forward", "decode_forward")):
            setattr(calls, name, self._counted(label, getattr(calls, name)))

    def _counted(self, name, fn):
        def counted(*a, **kw):
            self.n[name] = self.n.get(name, 0) + 1
            return fn(*a, **kw)
        return counted

    def take(self):
        n, self.n = self.n, {}
        return n


count = Count()


def qkv(B, Hq, Hkv, L, S, E, dtype, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, E, generator=g).to(dtype).requires_grad_(grad)
    return mk(Hq, L), mk(Hkv, S), mk(Hkv, S)


def run(q, k, v, m, bm, grad, opts=OPTS):
    out, lse = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1],
                                       return_lse=True, kernel_options=opts)
    if not grad:
        return [out, lse]
    ins = [q, k, v] + [t for t in m.captured.values() if t.requires_grad]
    return [out, lse, *torch.autograd.grad(out, ins, torch.cos(out))]


# 1. the replay gives the normal path's bits, and skips it
cases = [dict(name="causal"), dict(name="document", dtype=torch.float16, Hq=4, Hkv=2),
         dict(name="alibi_causal"), dict(name="softcap", L=40, S=72),
         dict(name="rel_bias", buf_grad=True), dict(name="document", L=72, S=64, opts={"bwd_ATOMIC_DQ": True}),
         dict(name="causal", L=3, S=200, decode=True),
         dict(name="document", L=2, S=130, decode=True, Hq=4, Hkv=2)]
for c in cases:
    name, L, S = c["name"], c.get("L", 64), c.get("S", 64)
    Hq, Hkv, dtype = c.get("Hq", 2), c.get("Hkv", 2), c.get("dtype", torch.float32)
    grad = not c.get("decode")
    m = make_mod(name, B=1, H=Hq, L=L, S=S, requires_grad=c.get("buf_grad", False))
    bm = flexattn.create_block_mask(m.mask_mod, 1, Hq, L, S, BLOCK_SIZE=32) if m.mask_mod else None
    opts = dict(OPTS, FORCE_DECODE=True) if c.get("decode") else dict(OPTS, **c.get("opts", {}))
    q, k, v = qkv(1, Hq, Hkv, L, S, 32, dtype, grad)
    count.take()
    first = run(q, k, v, m, bm, grad, opts)
    n1 = count.take()
    second = run(q, k, v, m, bm, grad, opts)
    n2 = count.take()
    tag = f"{name}{' decode' if c.get('decode') else ''}{' ' + str(c['opts']) if 'opts' in c else ''}"
    check(all(torch.equal(a, b) for a, b in zip(first, second)), f"{tag}: replay differs from the normal path")
    fwd = "decode_forward" if c.get("decode") else "forward"
    check(n1.get("make_plan") == 1 and n1.get(fwd) == 2, f"{tag}: first call {n1}")  # run, then record
    # captured tensors with gradients: the backward starts them as zeros, so it is not replayed
    expect = {"backward": 1} if c.get("buf_grad") else {}
    check(n2 == expect, f"{tag}: second call ran {n2}, expected {expect}")

# 2. new values in a captured tensor are read (same launches); a rebound capture re-plans
#    and the cache keeps no captured tensor alive
L = S = 64
bias = torch.randn(L, S)
holder = {"bias": bias}
score = lambda s, b, h, qi, kvi: s + holder["bias"][qi, kvi]
causal = lambda b, h, qi, kvi: qi >= kvi
bm = flexattn.create_block_mask(causal, None, None, L, S, BLOCK_SIZE=32)
q, k, v = qkv(1, 2, 2, L, S, 32, torch.float32, False)
with torch.no_grad():
    flexattn.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=OPTS)
    bias.mul_(-2.0)
    count.take()
    got = flexattn.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=OPTS)
    check(count.take() == {}, "in-place values: not replayed")
    replay.calls_of(bm).clear()
    want = flexattn.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=OPTS)
    check(torch.equal(got, want), "in-place values: the replay read stale values")
    old = weakref.ref(holder["bias"])
    del bias
    holder["bias"] = torch.randn(L, S)
    count.take()
    got = flexattn.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=OPTS)
    check(count.take().get("make_plan") == 1, "rebound capture: not re-planned")
    gc.collect()
    check(old() is None, "the cache keeps a captured tensor alive")
    replay.calls_of(bm).clear()
    check(torch.equal(got, flexattn.flex_attention(q, k, v, score_mod=score, block_mask=bm, kernel_options=OPTS)),
          "rebound capture: wrong result")

    # 3. other shapes, other options: their own entries; dropout: never cached
    calls = replay.calls_of(bm)
    n = len(calls)
    flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options=dict(OPTS, BLOCK_M=16))
    flexattn.flex_attention(q[:, :1], k[:, :1], v[:, :1], block_mask=bm, kernel_options=OPTS)
    check(len(calls) == n + 2, f"shapes / options: {len(calls) - n} new entries, expected 2")
    flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS, dropout_p=0.3)
    check(len(calls) == n + 2, "dropout: cached")

    # 4. inputs of another 16-byte alignment are another call (its kernels are specialised for
    # them, and its forward's kind may differ): planned once, then replayed like the first
    base = torch.randn(1 * 2 * L * 32 + 1)
    q_off = base[1:].view(1, 2, L, 32)  # 4 bytes off
    q_al = base[:-1].view(1, 2, L, 32).clone()
    q_off.copy_(q_al)
    flexattn.flex_attention(q_al, k, v, block_mask=bm, kernel_options=OPTS)
    count.take()
    a = flexattn.flex_attention(q_off, k, v, block_mask=bm, kernel_options=OPTS)
    n_off = count.take()
    a2 = flexattn.flex_attention(q_off, k, v, block_mask=bm, kernel_options=OPTS)
    n_off2 = count.take()
    b = flexattn.flex_attention(q_al, k, v, block_mask=bm, kernel_options=OPTS)
    n_al = count.take()
    check(n_off.get("make_plan") == 1 and n_off2 == {} and n_al == {}, f"alignment: {n_off}, {n_off2}, {n_al}")
    check(torch.equal(a, b) and torch.equal(a, a2), "alignment: results differ")
print(json.dumps(failures))
'''


def test_replays_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_CHECKS], env=env, capture_output=True, text=True,
                          timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "[]", proc.stdout[-3000:] + proc.stderr[-5000:]


def test_copies_of_a_block_mask_leave_the_kernel_caches_behind():
    """A BlockMask that served kernel calls (caches of compiled kernels on it) still deep-copies
    and pickles: the caches are derived state and stay behind."""
    import copy
    import io
    import flexattn
    bm = flexattn.create_block_mask(_causal, None, None, 64, 64, BLOCK_SIZE=32)
    bm.__dict__["_flexattn_calls"] = {"key": torch.nn}  # a module object, as a cached call holds: not picklable
    for dup in (copy.deepcopy(bm), copy.copy(bm)):
        assert "_flexattn_calls" not in dup.__dict__
        assert torch.equal(dup.to_dense(), bm.to_dense())
    torch.save(bm, io.BytesIO())


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
