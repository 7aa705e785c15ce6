"""GPU checks of the generated kernels (marker `gpu`; skipped without CUDA): every zoo mod,
breaking shapes, GQA, bf16/fp16 at real sizes, under the numerics rule; determinism,
bad-input errors, torch.compile(fullgraph=True) and opcheck."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_golden, make_qkv
from mods_zoo import ZOO_NAMES, make_mod

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _check(name, *, B=2, Hq=4, Hkv=None, L=256, S=256, E=64, Ev=None, dtype=torch.bfloat16, bwd=True,
           block=128, opts=None, seed=0, lse_grad=False):
    import flexattn
    from flexattn.reference import reference_attention
    Hkv = Hkv or Hq
    m = make_mod(name, B=B, H=Hq, L=L, S=S, device=DEV, requires_grad=bwd, seed=seed)
    m_ref = make_mod(name, B=B, H=Hq, L=L, S=S, device=DEV, buffer_dtype=dtype, requires_grad=bwd, seed=seed)
    m64 = make_mod(name, B=B, H=Hq, L=L, S=S, device=DEV, buffer_dtype=torch.float64, requires_grad=bwd, seed=seed)
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype, device=DEV, seed=seed)
    bm = flexattn.create_block_mask(m.mask_mod, B, Hq, L, S, device=DEV, BLOCK_SIZE=block) if m.mask_mod else None
    out, lse = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                       return_lse=True, kernel_options=opts)
    qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, rl = reference_attention(qr, kr, vr, m_ref.score_mod, m_ref.mask_mod, enable_gqa=True)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    go64, gl = reference_attention(q64, k64, v64, m64.score_mod, m64.mask_mod, enable_gqa=True)
    assert_close_to_golden("out", out, ro, go64)
    assert_close_to_golden("lse", lse, rl.float(), gl, eps=1e-3 * max(1.0, gl[gl.isfinite()].abs().max().item()))
    if not bwd:
        return
    go = torch.randn_like(out)
    # with lse_grad, backpropagate through out and lse together (an empty row's -inf lse: none)
    glse = torch.randn(lse.shape, device=DEV, dtype=torch.float64).masked_fill(gl.isinf(), 0.0) if lse_grad else None

    def grads(o, l, inputs):
        if glse is None:
            return torch.autograd.grad(o, inputs, go.to(o.dtype), allow_unused=True)
        return torch.autograd.grad((o, l.masked_fill(l.isinf(), 0.0)), inputs,
                                   (go.to(o.dtype), glse.to(l.dtype)), allow_unused=True)
    got = grads(out, lse, [q, k, v] + list(m.captured.values()))
    ref = grads(ro, rl, [qr, kr, vr] + list(m_ref.captured.values()))
    gold = grads(go64, gl, [q64, k64, v64] + list(m64.captured.values()))
    for nm, a, r, g in zip(["dq", "dk", "dv"] + list(m.captured), got, ref, gold):
        assert_close_to_golden(nm, a, r, g)


# the Triton backward, the path of every GPU but sm90 and of what the Hopper backward does not take:
# on sm90 where the default is the Hopper backward, kept by asking for it
TRITON_BWD = {"bwd_HOPPER": False}


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zoo(name, dtype):
    # bf16: the default backward (on sm90 the Hopper kernel); fp16: the Triton backward
    _check(name, dtype=dtype, L=512, S=512, E=64, opts=None if dtype == torch.bfloat16 else TRITON_BWD)


@pytest.mark.parametrize("L,S,E,Ev", [(1, 1000, 64, 64), (17, 129, 80, 80), (1000, 113, 128, 64),
                                      (127, 127, 16, 32), (129, 513, 96, 96), (300, 300, 192, 128),
                                      (256, 256, 256, 256)])
def test_shapes(L, S, E, Ev):
    _check("document", B=1, Hq=2, L=L, S=S, E=E, Ev=Ev, dtype=torch.float16)


@pytest.mark.parametrize("name", ["softcap_document", "multi_read", "alibi_causal"])
@pytest.mark.parametrize("split", [True, False])
def test_wide_heads(name, split):
    """The Triton backward at head dim 256 (dk and dv in two launches by default there, or forced into
    one), a score_mod derivative and captured-tensor gradients, GQA, a length off the block."""
    _check(name, Hq=4, Hkv=2, L=300, S=333, E=256, opts={"bwd_SPLIT_DKDV": split, **TRITON_BWD})


@pytest.mark.parametrize("name", ["causal", "rel_bias", "softcap"])
def test_gqa_and_small_blocks(name):
    _check(name, Hq=8, Hkv=2, L=384, S=320, E=128, block=64)


@pytest.mark.parametrize("name", ["empty_rows", "alibi_causal"])
def test_lse_gradient(name):
    _check(name, Hq=8, Hkv=4, L=300, S=400, E=64, lse_grad=True)


def test_fp32():
    _check("alibi_causal", L=200, S=200, E=64, dtype=torch.float32)


def test_noncontiguous():
    import flexattn
    q, k, v = [torch.randn(2, 256, 4, 64, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
    out = flexattn.flex_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out.float() - ref.float()).abs().max() < 2e-2


def test_deterministic():
    import flexattn
    m = make_mod("rel_bias", B=2, H=4, L=512, S=512, device=DEV, requires_grad=True)
    q, k, v = make_qkv(B=2, Hq=4, L=512, S=512, E=64, dtype=torch.bfloat16, device=DEV)
    bm = flexattn.create_block_mask(m.mask_mod, 2, 4, 512, 512, device=DEV)
    runs = []
    for _ in range(3):
        out = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm,
                                      kernel_options={"DETERMINISTIC": True})
        runs.append(torch.autograd.grad(out, [q, k, v, m.captured["bias_table"]], torch.ones_like(out)))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def test_decode_path():
    for force in (True, False):
        _check("causal", B=2, Hq=8, Hkv=2, L=4, S=4000, E=128, bwd=False, opts={"FORCE_DECODE": force})
        _check("rel_bias", B=2, Hq=8, Hkv=2, L=1, S=3000, E=64, bwd=False, opts={"FORCE_DECODE": force})


def test_bad_inputs():
    import flexattn
    q, k, v = [torch.randn(1, 2, 64, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    with pytest.raises(ValueError, match="kernel_options"):
        flexattn.flex_attention(q, k, v, kernel_options={"BLOCK_Q": 64})
    qb = torch.randn(1, 2, 64, 512, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim"):
        flexattn.flex_attention(qb, qb, qb)
    bias = torch.randn(64, device="cpu")
    with pytest.raises(ValueError, match="captur"):
        flexattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[qi])
    bm = flexattn.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError, match="block_mask"):
        flexattn.flex_attention(q, k, v, block_mask=bm)


def test_opcheck():
    from flexattn import ops
    q, k, v = make_qkv(B=1, Hq=2, L=256, S=256, E=64, dtype=torch.bfloat16, device=DEV, requires_grad=False)
    ops.run_opcheck(q, k, v)


def test_torch_compile_fullgraph():
    import flexattn
    m = make_mod("alibi_causal", B=1, H=2, L=256, S=256, device=DEV, requires_grad=True)
    bm = flexattn.create_block_mask(m.mask_mod, 1, 2, 256, 256, device=DEV)
    q, k, v = make_qkv(B=1, Hq=2, L=256, S=256, E=64, dtype=torch.bfloat16, device=DEV)
    ins = [q, k, v] + list(m.captured.values())

    def f(q, k, v, bm):
        return flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm)
    eager = f(q, k, v, bm)
    want = torch.autograd.grad(eager.float().square().sum(), ins)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, bm)
    got = torch.autograd.grad(compiled.float().square().sum(), ins)
    assert torch.equal(eager, compiled)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    for a, b in zip(got[3:], want[3:]):  # captured-tensor gradients: atomics, any order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [1234, 1, 2 ** 32 + 1])  # a seed half of 1 must not become a constexpr
def test_dropout_same_pattern_as_cpu_and_reference(seed):
    """In-kernel dropout keeps exactly dropout_mask(seed)'s elements (the CPU path's pattern)
    and the backward replays it: out and grads under the numerics rule."""
    import flexattn
    from flexattn.dropout import dropout_mask
    from flexattn.reference import reference_attention
    B, H, L, S, E, p = 2, 4, 300, 300, 64, 0.25
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx  # noqa: E731
    q, k, v = make_qkv(B=B, Hq=H, L=L, S=S, E=E, dtype=torch.bfloat16, device=DEV, seed=5)
    bm = flexattn.create_block_mask(causal, None, None, L, S, device=DEV)
    out = flexattn.flex_attention(q, k, v, block_mask=bm, dropout_p=p, dropout_seed=seed)
    keep = dropout_mask(seed, B, H, L, S, p, device=DEV)
    qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, _ = reference_attention(qr, kr, vr, None, causal, dropout_keep=keep, dropout_p=p)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    go64, _ = reference_attention(q64, k64, v64, None, causal, dropout_keep=keep, dropout_p=p)
    assert_close_to_golden("out", out, ro, go64)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], go)
    ref = torch.autograd.grad(ro, [qr, kr, vr], go)
    gold = torch.autograd.grad(go64, [q64, k64, v64], go.double())
    for nm, a, r, g in zip(["dq", "dk", "dv"], got, ref, gold):
        assert_close_to_golden(nm, a, r, g)
    # the CPU path draws the same pattern for the same seed
    cpu = flexattn.flex_attention(q.detach().float().cpu(), k.detach().float().cpu(), v.detach().float().cpu(),
                                  block_mask=flexattn.create_block_mask(causal, None, None, L, S, device="cpu"),
                                  dropout_p=p, dropout_seed=seed)
    assert (out.detach().float().cpu() - cpu).abs().max() < 0.05  # bf16 inputs vs fp32: same pattern, not a near-miss


def test_cached_launch_matches_jit():
    """Launches through the compiled kernels' own launcher (kernels.launcher) give the JIT
    path's results bit for bit, across shape classes that share a kernel (hits and misses
    interleaved: an int stride becoming 1 or a multiple of 16, an unaligned pointer)."""
    import flexattn
    from flexattn.kernels import launcher
    m = make_mod("rel_bias", B=2, H=4, L=300, S=300, device=DEV, requires_grad=True)

    def run(L, offset):
        q, k, v = make_qkv(B=2, Hq=4, L=L, S=L, E=64, dtype=torch.float16, device=DEV, seed=L)
        if offset:  # same values, a storage that starts 2 elements in: not 16-byte aligned
            q = torch.empty(q.numel() + offset, dtype=q.dtype, device=DEV)[offset:].view(q.shape).copy_(q) \
                .detach().requires_grad_()
        bm = flexattn.create_block_mask(m.mask_mod, None, None, L, L, device=DEV)
        # DETERMINISTIC: the bias table's gradient is atomics otherwise (any order); TIERED
        # off: a new mask's first calls would otherwise run the tile-table kernels
        out = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm,
                                      kernel_options={"DETERMINISTIC": True, "TIERED": False})
        return [out] + list(torch.autograd.grad(out, [q, k, v, m.captured["bias_table"]], torch.ones_like(out)))

    cases = [(256, 0), (17, 0), (256, 2), (256, 0), (300, 0), (17, 0)]
    launcher._CACHE.enabled = False
    try:
        want = [run(*c) for c in cases]
    finally:
        launcher._CACHE.enabled = True
    for _ in range(2):  # the first pass fills the cache, the second launches from it
        for c, w in zip(cases, want):
            for a, b in zip(run(*c), w):
                assert torch.equal(a, b), c
    assert launcher._CACHE.entries


def test_replayed_calls_match_the_normal_path():
    """A call like one before replays its recorded launches (kernels.replay), straight
    through the compiled kernels' launchers: the normal path's bits, forward, backward and
    decode; inputs of another alignment take the normal path again."""
    import flexattn
    from flexattn.kernels import replay
    # (E=128 on sm90: the Hopper forward, its persistent walk for causal)
    for name, L, S, grad, E in (("causal", 512, 512, True, 64), ("alibi_causal", 384, 384, True, 64),
                                ("document", 256, 640, True, 64), ("causal", 1, 2048, False, 64),
                                ("causal", 512, 512, True, 128)):
        m = make_mod(name, B=2, H=4, L=L, S=S, device=DEV)
        q, k, v = make_qkv(B=2, Hq=4, Hkv=2, L=L, S=S, E=E, dtype=torch.bfloat16, device=DEV, seed=L,
                           requires_grad=grad)
        go = torch.randn(q.shape, dtype=q.dtype, device=DEV)
        bm = flexattn.create_block_mask(m.mask_mod, None, None, L, S, device=DEV)

        def run(q):
            out = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, enable_gqa=True,
                                          kernel_options={"TIERED": False})
            return [out, *torch.autograd.grad(out, [q, k, v], go)] if grad else [out]

        first, second, third = run(q), run(q), run(q)
        (call,) = replay.calls_of(bm).values()
        steps = [s for r in call.replays.values() for s in r.steps]
        assert steps and all(s.compiled is not None for s in steps), name  # direct launches
        atomic_dq = _dq_by_float_atomics(q, E)
        for i, (a, b, c) in enumerate(zip(first, second, third)):
            _assert_same(a, b, atomic_dq and i == 1, name)
            _assert_same(a, c, atomic_dq and i == 1, name)
        # a storage 2 elements in: not 16-byte aligned; a replay here would launch a kernel
        # specialised for aligned pointers. Compared with the first call of a fresh cache
        off = torch.empty(q.numel() + 2, dtype=q.dtype, device=DEV)[2:].view(q.shape).copy_(q.detach())
        off.requires_grad_(grad)
        got = run(off)
        replay.calls_of(bm).clear()
        for i, (a, b) in enumerate(zip(got, run(off))):
            _assert_same(a, b, atomic_dq and i == 1, name)


def _dq_by_float_atomics(q, E):
    """Whether a default backward adds dq up by float atomics (the Hopper backward kernel)."""
    from flexattn.kernels import config
    return q.requires_grad and config.device_key(q.device) == "sm90" and config.hopper_backward(E, E)


def _assert_same(a, b, atomic_dq, what):
    """Bitwise equal; dq summed by float atomics, whose order varies run to run, to a rounding of its dtype."""
    if atomic_dq:
        assert torch.allclose(a, b, rtol=2 ** -7, atol=1e-5 * a.abs().max().item()), what
    else:
        assert torch.equal(a, b), what


def _strided(d):  # a mask whose partial blocks keep several runs of columns a row: the tile form
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx) % d != d - 1)


def _window_docs(w):  # one run a row: the interval form (a new structure for each w)
    if w % 2:
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx // w == kv_idx // w)


def _reference_and_golden(q, k, v, mask, go):
    """[out, dq, dk, dv] of the reference in the inputs' dtype and in float64 (the numerics rule's pair)."""
    from flexattn.reference import reference_attention
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, _ = reference_attention(*ref_in, None, mask)
    gold_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64, _ = reference_attention(*gold_in, None, mask)
    return ([ro, *torch.autograd.grad(ro, ref_in, go)],
            [g64, *torch.autograd.grad(g64, gold_in, go.double())])


@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("masks", [(_strided(97), _strided(89)), (_window_docs(97), _window_docs(90))],
                         ids=["tile_form", "interval_form"])
def test_tiered_new_mask_structure(E, masks):
    """A new mask structure's first call runs through the tile-table kernels (compiled in
    the background after an earlier new mask of the same form), its own kernels compile in
    the background, and the calls after that run them; both under the numerics rule (the two
    kernels may round differently: kernels.tiered). E=128 on sm90: both forms run the Hopper
    forward (kernels.tiered.route)."""
    import flexattn
    from flexattn.kernels import tiered

    warm, new = masks  # an earlier run of the other E in this process compiled their kernels at that E only
    q, k, v = make_qkv(B=2, Hq=4, L=384, S=384, E=E, dtype=torch.bfloat16, device=DEV, seed=3)
    go = torch.randn_like(q)

    def run(mask):
        out = flexattn.flex_attention(q, k, v, block_mask=flexattn.create_block_mask(mask, None, None, 384, 384,
                                                                                       device=DEV))
        return [out, *torch.autograd.grad(out, [q, k, v], go)]
    run(warm)  # compiles its own kernels now (or ran before), the tile form's in the background
    tiered.wait()
    submitted = len(tiered._submitted)
    first = run(new)
    # the new mask's forward (Triton or Hopper), dq and dk/dv kernels (on sm90 the Hopper backward's kernel,
    # which runs after the dq kernel) sent to compile in the background
    sent = 3
    assert len(tiered._submitted) == submitted + sent
    tiered.wait()
    again = run(new)
    assert len(tiered._submitted) == submitted + sent  # its own kernels ran: nothing more to compile
    ref, gold = _reference_and_golden(q, k, v, new, go)
    for name, a, b, r, g in zip(["out", "dq", "dk", "dv"], first, again, ref, gold):
        assert_close_to_golden(name + " (tile form)", a, r, g)
        assert_close_to_golden(name + " (own kernels)", b, r, g)


def test_tiered_new_mask_at_another_head_dim():
    """Masks that ran at head dim 64 are not compiled at 128 (a kernel's binary depends on its head
    dim): after another mask warmed the tile form at 128, a mask's first call at 128 runs through
    the tile form and sends its own kernels to compile (kernels.tiered.shape_class), under the
    numerics rule."""
    import flexattn
    from flexattn.kernels import tiered

    warm, new = _strided(83), _strided(79)  # structures no other test runs

    def run(mask, q, k, v, go):
        out = flexattn.flex_attention(q, k, v, block_mask=flexattn.create_block_mask(mask, None, None, 384, 384,
                                                                                       device=DEV))
        return [out, *torch.autograd.grad(out, [q, k, v], go)]

    for E in (64, 128):
        q, k, v = make_qkv(B=2, Hq=4, L=384, S=384, E=E, dtype=torch.bfloat16, device=DEV, seed=5)
        go = torch.randn_like(q)
        run(warm, q, k, v, go)  # its own kernels now, the tile form's at this head dim in the background
        tiered.wait()
        submitted = len(tiered._submitted)
        first = run(new, q, k, v, go)
        assert len(tiered._submitted) == submitted + 3, E  # the tile form ran; the forward, dq and dk/dv sent
        tiered.wait()
    ref, gold = _reference_and_golden(q, k, v, new, go)
    for name, a, r, g in zip(["out", "dq", "dk", "dv"], first, ref, gold):
        assert_close_to_golden(name + " (tile form, head dim 128)", a, r, g)


# ---- the Hopper (Gluon) forward: sm90 only --------------------------------------------

HOPPER = {"BACKEND": "hopper"}


def _needs_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper forward runs on sm90 only")


# the Hopper forward's forms: the consumer warpgroups in one partition, as two taking turns (fwd_PINGPONG), and
# those two in one program an SM walking row blocks (fwd_PERSISTENT)
FORMS = {"one": dict(fwd_PINGPONG=False), "pingpong": dict(fwd_PINGPONG=True, fwd_PERSISTENT=False),
         "persistent": dict(fwd_PINGPONG=True, fwd_PERSISTENT=True)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_hopper_zoo(name, form):
    # forward on the Hopper kernel, backward on the Triton kernels (from its out and lse)
    _needs_sm90()
    _check(name, L=512, S=512, E=128, opts=dict(HOPPER, **FORMS[form]))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("L,S,E,Ev,dtype", [(17, 129, 96, 96, torch.float16), (1000, 113, 128, 64, torch.bfloat16),
                                            (129, 513, 80, 80, torch.bfloat16), (300, 300, 64, 128, torch.float16),
                                            (255, 1000, 128, 128, torch.float16), (300, 333, 256, 256, torch.bfloat16),
                                            (129, 257, 192, 192, torch.float16), (200, 300, 256, 128, torch.bfloat16)])
def test_hopper_shapes(L, S, E, Ev, dtype, form):
    _needs_sm90()
    _check("document", B=1, Hq=2, L=L, S=S, E=E, Ev=Ev, dtype=dtype, opts=dict(HOPPER, **FORMS[form]))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", ["causal", "rel_bias", "softcap", "empty_rows"])
def test_hopper_gqa(name, form):
    _needs_sm90()
    _check(name, Hq=8, Hkv=2, L=384, S=320, E=128, opts=dict(HOPPER, **FORMS[form]),
           lse_grad=name == "empty_rows")


@pytest.mark.parametrize("form", list(FORMS))
def test_hopper_lagging_max(form):
    # the forward lets a row's running max lag its true max by up to 8 (log2) and skips rescaling O
    # where no row's max moved: a ramp along kv (one slope a head) makes the row maxima grow per
    # 128-wide kv tile by 0, 2.9, 7.2 and 17.3 in log2 units - under and over that slack - under a
    # causal mask (partial and full tiles); out and lse against the float64 reference
    _needs_sm90()
    import flexattn
    from flexattn.reference import reference_attention
    H, S = 4, 1024
    slopes = torch.tensor([0.0, 2.0, 5.0, 12.0], device=DEV) / 128

    def ramp(slope):
        return lambda score, b, h, q_idx, kv_idx: score + slope[h] * kv_idx

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = make_qkv(B=1, Hq=H, Hkv=H, L=S, S=S, E=128, dtype=torch.bfloat16, device=DEV, seed=0)
    bm = flexattn.create_block_mask(causal, None, None, S, S, device=DEV)
    out, lse = flexattn.flex_attention(q, k, v, score_mod=ramp(slopes), block_mask=bm, return_lse=True,
                                       kernel_options=dict(HOPPER, **FORMS[form]))
    ro, rl = reference_attention(q, k, v, ramp(slopes.to(q.dtype)), causal)
    go, gl = reference_attention(q.double(), k.double(), v.double(), ramp(slopes.double()), causal)
    assert_close_to_golden("out", out, ro, go)
    assert_close_to_golden("lse", lse, rl.float(), gl, eps=1e-3 * gl.abs().max().item())


@pytest.mark.parametrize("E", [128, 256])
def test_hopper_persistent_walk_bitwise(E):
    # fwd_PERSISTENT: one program an SM takes row blocks from a counter, its K / V ring, turns and Q
    # buffers running on from one block to the next. Many more row blocks than SMs, rows of every
    # length (causal within documents, rows that see nothing, a ragged last block), GQA: out and
    # lse bit for bit those of the ping-pong form, which runs each row block the same way in a
    # program of its own
    _needs_sm90()
    import flexattn
    L = S = 4000
    doc = torch.div(torch.arange(L, device=DEV), 700, rounding_mode="floor")

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & ((q_idx < 1300) | (q_idx >= 1600) | (h == 0))

    def bias(score, b, h, q_idx, kv_idx):
        return score + 0.01 * (h + 1) * (kv_idx - q_idx)

    q, k, v = make_qkv(B=2, Hq=8, Hkv=2, L=L, S=S, E=E, dtype=torch.bfloat16, device=DEV, seed=1)
    bm = flexattn.create_block_mask(mask, 2, 8, L, S, device=DEV)
    got = [flexattn.flex_attention(q, k, v, score_mod=bias, block_mask=bm, return_lse=True, enable_gqa=True,
                                   kernel_options=dict(HOPPER, TIERED=False, **FORMS[form]))
           for form in ("pingpong", "persistent")]
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert (got[1][1][:, 1:, 1300:1600] == float("-inf")).all() and (got[1][0][:, 1:, 1300:1600] == 0).all()


def test_hopper_auto_dispatch_and_refusals():
    import flexattn
    _needs_sm90()
    q, k, v = make_qkv(B=1, Hq=2, L=256, S=256, E=128, dtype=torch.bfloat16, device=DEV, requires_grad=False)
    forced = flexattn.flex_attention(q, k, v, kernel_options=HOPPER)
    auto = flexattn.flex_attention(q, k, v)
    triton_ = flexattn.flex_attention(q, k, v, kernel_options={"BACKEND": "triton"})
    assert torch.equal(forced, auto)  # auto takes the Hopper forward at head dim 128
    assert (forced.float() - triton_.float()).abs().max() < 2e-2
    q64 = q[..., :64].contiguous()  # and at 64 (its persistent form)
    assert torch.equal(flexattn.flex_attention(q64, q64, q64), flexattn.flex_attention(q64, q64, q64,
                                                                                          kernel_options=HOPPER))
    with pytest.raises(ValueError, match="dropout"):
        flexattn.flex_attention(q, k, v, kernel_options=HOPPER, dropout_p=0.1)
    with pytest.raises(ValueError, match="head dims"):
        q2 = torch.randn(1, 2, 256, 264, device=DEV, dtype=torch.bfloat16)
        flexattn.flex_attention(q2, q2, q2, kernel_options=HOPPER)


HOPPER_BWD = {"BACKEND": "hopper", "bwd_HOPPER": True}
TMA_BWD = {"bwd_TMA": True, **TRITON_BWD}  # the Triton backward's TMA loads


@pytest.mark.parametrize("opts", [{"BACKEND": "triton"}, HOPPER, HOPPER_BWD], ids=["triton", "hopper", "hopper_bwd"])
def test_full_blocks_skip_the_mask_mod(opts):
    # a block listed as full skips mask_mod even where mask_mod is false in it (torch's
    # semantics): in rows with partial blocks and in a row whose blocks are all full (the
    # Hopper forward's first tile is peeled from either list)
    import flexattn
    from flexattn.reference import reference_attention
    if opts.get("BACKEND") == "hopper":
        _needs_sm90()
    i32 = dict(dtype=torch.int32, device=DEV)
    kv_num, kv_idx = torch.tensor([[[1, 0, 1]]], **i32), torch.tensor([[[[0, 0, 0], [0, 0, 0], [2, 0, 0]]]], **i32)
    f_num, f_idx = torch.tensor([[[1, 3, 1]]], **i32), torch.tensor([[[[1, 0, 0], [0, 1, 2], [0, 0, 0]]]], **i32)
    bm = flexattn.BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=128,
                                           mask_mod=lambda b, h, q, kv: q >= kv)
    keep = torch.zeros(384, 384, dtype=torch.bool, device=DEV)
    keep[:128, 128:256] = keep[128:256] = keep[256:, :128] = True
    keep[:128, :128] = keep[256:, 256:] = torch.ones(128, 128, device=DEV).tril().bool()
    q, k, v = make_qkv(B=1, Hq=2, L=384, S=384, E=128, dtype=torch.bfloat16, device=DEV)
    out = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options=opts)
    qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, _ = reference_attention(qr, kr, vr, None, lambda b, h, qi, ki: keep[qi, ki])
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64, _ = reference_attention(q64, k64, v64, None, lambda b, h, qi, ki: keep[qi, ki])
    go = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, [q, k, v], go)]
    ref = [ro, *torch.autograd.grad(ro, [qr, kr, vr], go)]
    gold = [g64, *torch.autograd.grad(g64, [q64, k64, v64], go.double())]
    for name, a, r, g in zip(["out", "dq", "dk", "dv"], got, ref, gold):
        assert_close_to_golden(name, a, r, g)


@pytest.mark.parametrize("opts,E", [(HOPPER_BWD, 128), (HOPPER_BWD, 64), (HOPPER_BWD, 256), (TMA_BWD, 128)],
                         ids=["hopper", "hopper_d64", "hopper_d256", "tma"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_sm90_backward_zoo(name, opts, E):
    # forward and backward on an sm90 backward form: the Hopper backward kernel (dq and captured-tensor
    # gradients by atomics) in each of its forms (q rows on M at 64, kv rows on M at 128, 64 kv rows with
    # the head dim split at 256), or the Triton backward reading K / V (dq) and Q / dO (dk/dv) by TMA
    _needs_sm90()
    _check(name, L=512, S=512, E=E, opts=opts)


@pytest.mark.parametrize("L,S,E,Ev,dtype", [(17, 129, 96, 96, torch.float16), (1000, 113, 128, 64, torch.bfloat16),
                                            (129, 513, 80, 80, torch.bfloat16), (300, 300, 64, 128, torch.float16),
                                            (300, 333, 256, 256, torch.bfloat16), (129, 257, 192, 192, torch.float16),
                                            (200, 130, 256, 128, torch.bfloat16)])
def test_hopper_backward_shapes(L, S, E, Ev, dtype):
    _needs_sm90()
    _check("document", B=1, Hq=2, L=L, S=S, E=E, Ev=Ev, dtype=dtype, opts=HOPPER_BWD)


@pytest.mark.parametrize("opts,E", [(HOPPER_BWD, 128), (HOPPER_BWD, 256), (TMA_BWD, 128)],
                         ids=["hopper", "hopper_d256", "tma"])
@pytest.mark.parametrize("name", ["causal", "rel_bias", "softcap", "empty_rows"])
def test_sm90_backward_gqa(name, opts, E):
    _needs_sm90()
    _check(name, Hq=8, Hkv=2, L=384, S=320, E=E, opts=opts, lse_grad=name == "empty_rows")



@pytest.mark.parametrize("L,S,E,Ev,dtype", [(17, 129, 96, 96, torch.float16), (1000, 113, 128, 64, torch.bfloat16),
                                            (129, 513, 80, 80, torch.bfloat16), (300, 300, 64, 128, torch.float16),
                                            (300, 333, 256, 256, torch.bfloat16)])
def test_tma_backward_shapes(L, S, E, Ev, dtype):
    # lengths off the tile (rows past the end read as zeros), padded head dims, Ev != E, D=256 (split, atomic dq)
    _needs_sm90()
    _check("document", B=1, Hq=2, L=L, S=S, E=E, Ev=Ev, dtype=dtype, opts=TMA_BWD)

