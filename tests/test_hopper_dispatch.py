"""Which forward kernel a call gets (kernels.hopper_forward.use_hopper), decided from the
device's compute capability (as kernels.config.device_key names it) and the call alone:
testable without a GPU."""
from __future__ import annotations

import itertools

import pytest
import torch

hf = pytest.importorskip("flexattn.kernels.hopper_forward")

SM90, SM80, SM100 = "sm90", "sm80", "sm100"
BLOCK = (128, 128)


def qkv(E=128, Ev=None, dtype=torch.bfloat16, L=256, S=256):
    q = torch.zeros(1, 2, L, E, dtype=dtype)
    k = torch.zeros(1, 2, S, E, dtype=dtype)
    v = torch.zeros(1, 2, S, Ev or E, dtype=dtype)
    return q, k, v


def _row_dot_graph():  # a score_mod that reduces rows of captured tensors (MLA's RoPE term)
    from flexattn.trace import trace_score
    q_rope, k_rope = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    return trace_score(lambda s, b, h, qi, kv: s + torch.dot(q_rope[b, h, qi], k_rope[b, h, kv]))


def test_auto_takes_hopper_on_sm90_only():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv()
    assert hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM80, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM100, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "triton")


def test_auto_takes_hopper_where_it_measured_faster():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv(E=48)
    assert not hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto")
    assert hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "hopper")  # forced: the kernel takes it
    for E in (64, 96, 128, 192, 256):  # 129-256: 64-column kv tiles
        assert hf.use_hopper(SM90, *qkv(E=E), BLOCK, 0.0, "auto")
    assert hf.hopper_fwd_config(256, 256)[1] == 64 and hf.hopper_fwd_config(128, 128)[1] == 128


@pytest.mark.parametrize("why,args", [
    ("compute capability", dict(cap=SM80)),
    ("dtype", dict(dtype=torch.float32)),
    ("dropout", dict(dropout=0.1)),
    ("head dims", dict(E=264)),
    ("head dims", dict(E=100)),
    ("BLOCK_SIZE", dict(block=(64, 128))),
    ("strides", dict(transpose=True)),
])
def test_forced_hopper_names_why_it_cannot(why, args):
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv(E=args.get("E", 128), dtype=args.get("dtype", torch.bfloat16))
    if args.get("transpose"):  # last dim not contiguous
        q = torch.zeros(1, 2, 128, 256, dtype=torch.bfloat16).transpose(2, 3)
    with pytest.raises(ValueError, match=why):
        hf.use_hopper(args.get("cap", SM90), q, k, v, args.get("block", BLOCK), args.get("dropout", 0.0), "hopper")
    assert not hf.use_hopper(args.get("cap", SM90), q, k, v, args.get("block", BLOCK), args.get("dropout", 0.0),
                             "auto")


def test_row_reducing_mods_keep_triton():
    """A mod that reduces rows of a captured tensor (MLA's RoPE term) has no Gluon form of its
    row dot: "auto" takes the Triton forward, "hopper" names why."""
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv()
    graph = _row_dot_graph()
    assert hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto", (None, None))
    assert not hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto", (graph, None))
    with pytest.raises(ValueError, match="reduces rows of a captured tensor"):
        hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "hopper", (graph, None))


def _compile_sm90(score_mod, mask_mod, E=128, output_max=False, pingpong=False, persistent=False):
    """The Hopper forward compiled for sm_90a with Triton's bundled ptxas (no GPU needed):
    the generated Gluon source must build, whatever the mods (pingpong: fwd_PINGPONG's form,
    64-row q / o boxes and one warpgroup a partition; persistent: fwd_PERSISTENT's walk)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    import triton
    from flexattn import codegen
    from flexattn.kernels.source import source
    from flexattn.codegen import load_module
    from flexattn.trace import trace_mask, trace_score
    sg = codegen.kernel_graph(trace_score(score_mod)) if score_mod else None
    mg = codegen.kernel_graph(trace_mask(mask_mod)) if mask_mod else None
    fn = load_module(source("fwd_hopper", sg, mg, None, True), "flex_fwd_hopper").flex_fwd_hopper
    layout = gl.NVMMASharedLayout(128, 16, rank=4)
    desc = lambda rows: f"tensordesc<bf16[1, 1, {rows}, {E}],{layout!r}>"  # noqa: E731
    rows, warps = (64, 4) if pingpong else (128, 8)
    bn = hf.hopper_fwd_config(E, E)[1]
    types = dict(q_desc=desc(rows), k_desc=desc(bn), v_desc=desc(bn), o_desc=desc(rows), LSE="*fp32", MAX="*fp32",
                 KV_NUM="*i32", KV_IDX="*i32", FULL_KV_NUM="*i32", FULL_KV_IDX="*i32", TILES="*i32", SCALE="fp32",
                 SCALE_LOG2="fp32")
    consts = dict(GQA_GROUP=1, HAS_FULL=True, HAS_SCORE_MOD=sg is not None, BLOCK_M=128, BLOCK_N=bn,
                  SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, KV_DIVISIBLE=False, SCALE_POSITIVE=True, STAGES=2,
                  LAST_ROWS_FIRST=True, QK_HEAD_PAD=E, V_HEAD_PAD=E, FP16=False, OUTPUT_MAX=output_max,
                  PINGPONG=pingpong, PERSISTENT=persistent, num_warps=warps)
    sig, cst = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cst[(i,)] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name.startswith("sb") else "*i64"
        else:
            sig[name] = types.get(name, "fp32" if name[1:].startswith("bp") else "i32")
    return triton.compile(GluonASTSource(fn, sig, cst, {}), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


@pytest.mark.slow
def test_hopper_source_compiles_for_sm90():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    doc = torch.arange(1000) // 300

    def document(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    def softcap(score, b, h, q, kv):
        return 30.0 * torch.tanh(score / 30.0)

    import flexattn
    from flexattn.mask_tiles import tile_table_form
    tile_form = tile_table_form(flexattn.create_block_mask(document, None, None, 1000, 1000))
    # the tile form's lookup prints its own way (codegen.tile_table_lookup): a reduction over kv
    for score_mod, mask_mod in ((softcap, lambda b, h, q, kv: q >= kv), (None, document),
                                (None, tile_form.mask_mod)):
        kernel = _compile_sm90(score_mod, mask_mod)
        assert "wgmma.mma_async" in kernel.asm["ptx"] and "cp.async.bulk.tensor" in kernel.asm["ptx"]
    # return_aux=AuxRequest(max_scores=True): the rows' maxima stored as well
    kernel = _compile_sm90(softcap, document, output_max=True)
    assert "wgmma.mma_async" in kernel.asm["ptx"]
    # fwd_PINGPONG: two consumer partitions of one warpgroup each and the producer warp
    kernel = _compile_sm90(softcap, document, output_max=True, pingpong=True)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx and ".reqntid 384" in ptx
    # fwd_PERSISTENT: the ping-pong form walking row blocks taken from a counter
    for E in (128, 256):
        ptx = _compile_sm90(softcap, document, E=E, output_max=True, pingpong=True, persistent=True).asm["ptx"]
        assert "wgmma.mma_async" in ptx and "atom.global" in ptx and ".reqntid 384" in ptx
    # head dim 256: 64-column kv tiles, both forms
    for pingpong in (False, True):
        assert "wgmma.mma_async" in _compile_sm90(softcap, document, E=256, pingpong=pingpong).asm["ptx"]


def test_persistent_walk_default():
    # fwd_PERSISTENT left out: persistent up to head dim 128 unless the score_mod reads a captured tensor
    # (ALiBi's slopes measured 0.89-0.93x persistent on the H200; benchmarks/RESULTS.md)
    assert hf.persistent_default(64, []) and hf.persistent_default(128, [])
    assert not hf.persistent_default(128, [torch.ones(4)])
    assert not hf.persistent_default(256, []) and not hf.persistent_default(192, [])


def test_persistent_walk_is_replayable(monkeypatch):
    # a replayed call (kernels.replay) allocates with torch.empty and repeats the recorded launches: the
    # persistent walk's counter is zeroed by a launch of its own, recorded before the forward's
    import flexattn
    from flexattn.kernels import launcher, make_plan, replay
    monkeypatch.setattr(launcher, "sm_count", lambda device: 132)
    q, k, v = [torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16) for _ in range(3)]
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 1024, 1024)
    plan = make_plan(q, k, v, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                     kernel_options={"fwd_PERSISTENT": True})
    rep = replay.Replay.record(lambda: hf.hopper_forward(plan, q, k, v), (), (q, k, v), lambda r: list(r))
    assert rep is not None
    zero, fwd = rep.steps
    assert zero.kernel is hf._zero_counter and fwd.kwargs["PERSISTENT"] and fwd.grid == (64, )
    (counter_slot, ) = [i for _, i in zero.slots]
    assert counter_slot in [i for _, i in fwd.slots]  # the forward reads the counter the launch before zeroed


def test_hopper_backend_refuses_cpu_tensors():
    import flexattn
    q = torch.randn(1, 2, 64, 64)
    with pytest.raises(ValueError, match="'hopper' needs CUDA tensors"):
        flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": "hopper"})


# ---- the Hopper dk/dv backward (kernels.hopper_backward): asked for by bwd_HOPPER ----------

def _plan(opts=None, block=BLOCK, dropout=0.0, score_graph=None):
    from types import SimpleNamespace
    return SimpleNamespace(opts={"bwd_HOPPER": True, **(opts or {})}, blocks=SimpleNamespace(block=block),
                           dropout_p=dropout, score_graph=score_graph, mask_graph=None)


@pytest.mark.parametrize("why,plan_args,cap", [
    ("compute capability", {}, SM80),
    ("head dims", dict(E=320), SM90),
    ("DETERMINISTIC", dict(opts={"DETERMINISTIC": True}), SM90),
    ("BLOCK_SIZE", dict(block=(128, 64)), SM90),
    ("dropout", dict(dropout=0.1), SM90),
    ("reduces rows of a captured tensor", dict(score_graph="row dot"), SM90),
])
def test_hopper_backward_names_why_it_cannot(why, plan_args, cap, monkeypatch):
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    from flexattn.kernels import config, hopper_backward as hb
    monkeypatch.setattr(config, "device_key", lambda device: cap)
    q, k, v = qkv(E=plan_args.pop("E", 128))
    if plan_args.get("score_graph"):
        plan_args["score_graph"] = _row_dot_graph()
    with pytest.raises(ValueError, match=f"bwd_HOPPER.*{why}.*drop bwd_HOPPER"):
        hb.use_hopper_backward(_plan(**plan_args), q, k, v, torch.zeros_like(q))
    assert not hb.use_hopper_backward(_plan(opts={"bwd_HOPPER": False}), q, k, v, torch.zeros_like(q))


def test_hopper_backward_taken_when_asked_on_sm90(monkeypatch):
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    from flexattn.kernels import config, hopper_backward as hb
    monkeypatch.setattr(config, "device_key", lambda device: SM90)
    q, k, v = qkv()
    assert hb.use_hopper_backward(_plan(), q, k, v, torch.zeros_like(q))
    with pytest.raises(ValueError, match="grad_out strides"):  # dO is read by TMA too
        hb.use_hopper_backward(_plan(), q, k, v, torch.zeros(1, 2, 128, 256, dtype=torch.bfloat16).transpose(2, 3))


def _compile_bwd_sm90(score_mod, mask_mod, E=128):
    """The Hopper dk/dv kernel compiled for sm_90a (no GPU needed), gradients into the
    score_mod's captured float tensors included."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    import triton
    from flexattn import codegen
    from flexattn.autodiff import grad_slots
    from flexattn.codegen import load_module
    from flexattn.kernels import hopper_backward as hb
    from flexattn.kernels.source import source
    from flexattn.trace import trace_mask, trace_score
    sg = codegen.kernel_graph(trace_score(score_mod)) if score_mod else None
    mg = codegen.kernel_graph(trace_mask(mask_mod)) if mask_mod else None
    slots = list(grad_slots(sg)) if sg is not None else []
    fn = load_module(source("bwd_hopper", sg, mg, slots, True), "flex_bwd_hopper").flex_bwd_dkdv_hopper
    bm, bn, stages, warps, kv_rows_on_m = hb.hopper_bwd_config(E, E)
    layout = gl.NVMMASharedLayout(128, 16, rank=4)
    desc = lambda rows: f"tensordesc<bf16[1, 1, {rows}, {E}],{layout!r}>"  # noqa: E731
    types = dict(q_desc=desc(bm), k_desc=desc(bn), v_desc=desc(bn), do_desc=desc(bm), DK="*bf16", DV="*bf16",
                 LSE2="*fp32", DELTA="*fp32", DQ_ACC="*fp32", Q_NUM="*i32", Q_IDX="*i32", FULL_Q_NUM="*i32",
                 FULL_Q_IDX="*i32", SCALE="fp32", SCALE_LOG2="fp32")
    consts = dict(GQA_GROUP=2, HAS_FULL=True, HAS_SCORE_MOD=sg is not None, BLOCK_M=bm, BLOCK_N=bn,
                  SPARSE_Q_BLOCK=128, SPARSE_KV_BLOCK=128, Q_DIVISIBLE=False, KV_DIVISIBLE=False, STAGES=stages,
                  QK_HEAD=E, V_HEAD=E, QK_HEAD_PAD=E, V_HEAD_PAD=E, FP16=False, KV_ROWS_ON_M=kv_rows_on_m,
                  num_warps=warps)
    sig, cst = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cst[(i,)] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name.startswith(("sb", "gsb")) else "*i64"
        else:
            sig[name] = types.get(name, "fp32" if name[1:].startswith("bp") else "i32")
    return triton.compile(GluonASTSource(fn, sig, cst, {}), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


@pytest.mark.slow
def test_hopper_backward_source_compiles_for_sm90():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    doc = torch.arange(1000) // 300
    bias = torch.randn(16)

    def document(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    def softcap(score, b, h, q, kv):
        return 30.0 * torch.tanh(score / 30.0)

    def head_bias(score, b, h, q, kv):  # a captured float tensor: its gradient by atomics
        return score + bias[h]
    for (score_mod, mask_mod), E in itertools.product(
            ((None, document), (softcap, lambda b, h, q, kv: q >= kv), (head_bias, None)), (128, 256)):
        ptx = _compile_bwd_sm90(score_mod, mask_mod, E).asm["ptx"]
        # dq's float32 adds: atom.global (Triton 3.6-3.8) or red.global (3.9: the result unused)
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
        assert "atom.global" in ptx or "red.global" in ptx


def test_hopper_backward_default_up_to_head_dim_256(monkeypatch):
    # the rule where it is on: head dims up to 256 (each of its three forms), a call that cannot take
    # it falls back to the Triton kernels silently, an explicit False wins
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    from flexattn.kernels import config, hopper_backward as hb
    monkeypatch.setattr(config, "device_key", lambda device: SM90)
    default = _plan()
    default.opts = {}
    q, k, v = qkv(E=64)
    monkeypatch.setattr(config, "HOPPER_BWD_DEFAULT", True)
    assert hb.use_hopper_backward(default, q, k, v, torch.zeros_like(q))
    for E, taken in ((128, True), (192, True), (256, True), (320, False)):
        qe, ke, ve = qkv(E=E)
        assert hb.use_hopper_backward(default, qe, ke, ve, torch.zeros_like(qe)) == taken, E
    assert not hb.use_hopper_backward(_plan(opts={"bwd_HOPPER": False}), q, k, v, torch.zeros_like(q))
    for plan in (_plan(opts={"DETERMINISTIC": True}), _plan(block=(128, 64)), _plan(dropout=0.1),
                 _plan(score_graph=_row_dot_graph())):
        plan.opts.pop("bwd_HOPPER")
        assert not hb.use_hopper_backward(plan, q, k, v, torch.zeros_like(q))
    monkeypatch.setattr(config, "device_key", lambda device: SM80)
    assert not hb.use_hopper_backward(default, q, k, v, torch.zeros_like(q))


def test_torch_deterministic_algorithms_keep_the_triton_backward(monkeypatch):
    # torch.use_deterministic_algorithms(True) reads as DETERMINISTIC=True (kernels.plan.build_plan): dq
    # is not summed by float atomics; kernel_options that say otherwise win; a call recorded for replay
    # without it is not found with it
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    from flexattn.kernels import config, hopper_backward as hb, make_plan, replay
    monkeypatch.setattr(config, "device_key", lambda device: SM90)
    monkeypatch.setattr(config, "HOPPER_BWD_DEFAULT", True)
    q, k, v = qkv(E=64)
    dout = torch.zeros_like(q)

    def plan(opts=None):
        return make_plan(q, k, v, score_graph=None, mask_graph=None, block_mask=None, scale=None,
                         kernel_options=opts)

    def key():
        return replay.call_key(q, k, v, None, None, None, None, None, True)
    assert hb.use_hopper_backward(plan(), q, k, v, dout) and "DETERMINISTIC" not in plan().opts
    before = key()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert plan().opts["DETERMINISTIC"] and key() != before
        assert not hb.use_hopper_backward(plan(), q, k, v, dout)
        assert hb.use_hopper_backward(plan({"DETERMINISTIC": False}), q, k, v, dout)
        with pytest.raises(ValueError, match=r"bwd_HOPPER.*use_deterministic_algorithms\(True\)"):
            hb.use_hopper_backward(plan({"bwd_HOPPER": True}), q, k, v, dout)
    finally:
        torch.use_deterministic_algorithms(was)


# ---- the Triton backward's TMA loads (kernels.backward.use_tma_loads) -------------------

def _tma_plan(opts=None):
    from types import SimpleNamespace
    return SimpleNamespace(opts=dict(opts or {}))


def test_tma_loads_default_on_sm90_up_to_head_dim_128(monkeypatch):
    from flexattn.kernels import backward as bw, config
    monkeypatch.setattr(config, "device_key", lambda device: SM90)
    q, k, v = qkv()
    assert bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros_like(q)) == config.TMA_LOADS_DEFAULT
    monkeypatch.setattr(config, "TMA_LOADS_DEFAULT", True)  # the rule where the default is on
    for E in (64, 96, 128):
        q, k, v = qkv(E=E)
        assert bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros_like(q))
    q, k, v = qkv(E=256)  # measured slower there (dq by atomics)
    assert not bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros_like(q))
    q, k, v = qkv(dtype=torch.float32)
    assert not bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros_like(q))
    q, k, v = qkv()
    assert not bw.use_tma_loads(_tma_plan({"bwd_TMA": False}), q, k, v, torch.zeros_like(q))
    # a dO TMA cannot address (last dim not contiguous): per-thread copies, silently
    assert not bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros(1, 2, 128, 256, dtype=torch.bfloat16).transpose(2, 3))
    monkeypatch.setattr(config, "device_key", lambda device: SM80)
    assert not bw.use_tma_loads(_tma_plan(), q, k, v, torch.zeros_like(q))


@pytest.mark.parametrize("why,cap,kw", [("compute capability", SM80, {}), ("dtype", SM90, dict(dtype=torch.float32)),
                                        ("grad_out strides", SM90, dict(transposed_dout=True))])
def test_forced_tma_loads_name_why_they_cannot(why, cap, kw, monkeypatch):
    from flexattn.kernels import backward as bw, config
    monkeypatch.setattr(config, "device_key", lambda device: cap)
    q, k, v = qkv(dtype=kw.get("dtype", torch.bfloat16))
    dout = torch.zeros(1, 2, 128, 256, dtype=q.dtype).transpose(2, 3) if kw.get("transposed_dout") else q
    with pytest.raises(ValueError, match=f"bwd_TMA.*{why}.*drop bwd_TMA"):
        bw.use_tma_loads(_tma_plan({"bwd_TMA": True}), q, k, v, dout)


def test_a_call_plans_the_backward_it_will_run(monkeypatch):
    # the forward names the backward step (calls.bwd_path) for tiering and replay: the Hopper backward on
    # sm90 where it is the default, the Triton kernels elsewhere, where it is turned off, and where a
    # bwd_HOPPER=True the call cannot take is left for the backward to raise
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    from flexattn.kernels import config
    from flexattn.kernels.calls import bwd_path
    q, k, v = qkv(E=128)
    monkeypatch.setattr(config, "device_key", lambda device: SM90)
    assert bwd_path(_plan(opts={"bwd_HOPPER": None}), q, k, v) == "bwd_hopper"
    assert bwd_path(_plan(opts={"bwd_HOPPER": False}), q, k, v) == "bwd"
    assert bwd_path(_plan(dropout=0.1), q, k, v) == "bwd"
    strided = torch.zeros(1, 2, 128, 256, dtype=torch.bfloat16).transpose(2, 3)
    assert bwd_path(_plan(opts={"bwd_HOPPER": None}), q, k, v, strided) == "bwd"
    monkeypatch.setattr(config, "device_key", lambda device: SM80)
    assert bwd_path(_plan(opts={"bwd_HOPPER": None}), q, k, v) == "bwd"
