"""The CPU path with inputs a new user might get wrong: hand-built BlockMasks (validated
when built, each violation a ValueError naming the field, the row and the fix), a BACKEND
that cannot run on the inputs' device, score_mods whose captured-tensor reads are out of
range only where the mask removes, and index arithmetic with constants past int32."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import create_mask as torch_create_mask

from conftest import assert_close_to_golden, make_qkv
from flexattn import create_block_mask, create_mask, flex_attention
from flexattn.block_mask import BlockMask
from flexattn.reference import reference_attention


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _lists(rows):
    """(num [1, 1, nQ], idx [1, 1, nQ, n]) int32 from a list of per-row block lists (n = len(rows))."""
    n = len(rows)
    num = torch.tensor([len(r) for r in rows], dtype=torch.int32).view(1, 1, n)
    idx = torch.tensor([list(r) + [0] * (n - len(r)) for r in rows], dtype=torch.int32).view(1, 1, n, n)
    return num, idx


# ---- BlockMask.from_kv_blocks validation ----------------------------------------------------

def test_from_kv_blocks_valid_mask_round_trips():
    bm = create_block_mask(causal, 2, 1, 100, 100, BLOCK_SIZE=16)
    bm2 = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                   BLOCK_SIZE=16, seq_lengths=(100, 100), mask_mod=causal)
    for a in BlockMask._TENSOR_ATTRS:
        assert torch.equal(getattr(bm, a), getattr(bm2, a)), a


def test_from_kv_blocks_index_past_last_block():
    num, idx = _lists([[0], [0, 1], [1, 2]])
    idx[0, 0, 2, 1] = 3  # 3 blocks: 3 is past the last
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 2, 1\] = 3 is outside the 3 kv block\(s\).*row \(0, 0, 2\)"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)
    # the same index is fine where it lies past the row's count (unused entries)
    num[0, 0, 2] = 1
    BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)
    # seq_lengths shorter than the rows: an index past ceil(KV_LEN / KV_BLOCK) is past the last block
    num, idx = _lists([[0], [0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 2, 1\] = 2 is outside the 2 kv block"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16, seq_lengths=(48, 20))


def test_from_kv_blocks_negative_index():
    num, idx = _lists([[0], [-1, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"kv_indices\[0, 0, 1, 0\] = -1 is outside"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)


def test_from_kv_blocks_count_too_large():
    num, idx = _lists([[0], [0, 1], [1, 2]])
    num[0, 0, 1] = 4
    with pytest.raises(ValueError, match=r"kv_num_blocks\[0, 0, 1\] = 4 is larger than the 3 kv block.*row \(0, 0, 1\)"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)


def test_from_kv_blocks_negative_count():
    num, idx = _lists([[0], [0, 1], [1, 2]])
    num[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"kv_num_blocks\[0, 0, 0\] = -1 is negative"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)
    f_num, f_idx = _lists([[], [], [0]])
    f_num[0, 0, 1] = -2
    num, idx = _lists([[0], [0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"full_kv_num_blocks\[0, 0, 1\] = -2 is negative"):
        BlockMask.from_kv_blocks(num, idx, f_num, f_idx, BLOCK_SIZE=16)


def test_from_kv_blocks_block_listed_twice():
    num, idx = _lists([[0], [1, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"kv block 1 is listed 2 times in row \(0, 0, 1\) of kv_indices.*remove the repeat"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16)
    num, idx = _lists([[0], [0, 1], [1, 2]])
    f_num, f_idx = _lists([[], [0], [0]])
    with pytest.raises(ValueError, match=r"kv block 0 of row \(0, 0, 1\) is listed both in kv_indices.*full_kv_indices"):
        BlockMask.from_kv_blocks(num, idx, f_num, f_idx, BLOCK_SIZE=16)


def test_constructed_mask_validated_on_first_cpu_use():
    num, idx = _lists([[0], [0, 1], [1, 5]])
    bm = BlockMask(num, idx, None, None, None, None, None, None, 16, None, (48, 48))
    q, k, v = make_qkv(1, 1, 1, 48, 48, 16, requires_grad=False)
    with pytest.raises(ValueError, match=r"BlockMask: kv_indices\[0, 0, 2, 1\] = 5 is outside"):
        flex_attention(q, k, v, block_mask=bm)


def test_from_kv_blocks_validation_is_vectorised():
    # a large mask (B*H*nQ = 16384 rows) builds without a Python loop per row
    import time
    bm = create_block_mask(causal, 4, 16, 32768, 32768, BLOCK_SIZE=128)
    t = time.perf_counter()
    BlockMask.from_kv_blocks(bm.kv_num_blocks.expand(4, 16, -1), bm.kv_indices.expand(4, 16, -1, -1),
                             bm.full_kv_num_blocks.expand(4, 16, -1), bm.full_kv_indices.expand(4, 16, -1, -1),
                             BLOCK_SIZE=128, compute_q_blocks=False)
    assert time.perf_counter() - t < 20  # generous: a per-row loop would take minutes on a busy machine


# ---- BACKEND on the wrong device ------------------------------------------------------------

def test_backend_triton_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 1, 1, 32, 32, 16, requires_grad=False)
    with pytest.raises(ValueError, match=r"BACKEND'\] = 'triton'.*CUDA tensors.*BACKEND='cpu' or 'auto'.*TRITON_INTERPRET=1"):
        flex_attention(q, k, v, kernel_options={"BACKEND": "triton"})


def test_backend_choice_under_interpreter(monkeypatch):
    from flexattn.options import choose_backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    monkeypatch.setenv("FLEXATTN_BACKEND", "triton")
    assert choose_backend("auto", torch.device("cpu"), torch.float32) == "triton"


# ---- captured-tensor reads at masked positions --------------------------------------------------

L = 100


def _relative_bias_mods(kind, device="cpu"):
    """bias (float64, on the CPU), a score_mod adding bias[q_idx - kv_idx], and a mask_mod of `kind`
    whose captured tensors (the document ids) live on `device`."""
    bias = torch.randn(L, dtype=torch.float64)  # bias[d] for d = q - kv >= 0 only

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx]

    if kind == "causal":
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    elif kind == "sliding":
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 24)
    else:
        doc = torch.tensor([0] * 30 + [1] * 45 + [2] * 25, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    return bias, score_mod, mask_mod


@pytest.mark.parametrize("kind", ["causal", "sliding", "document"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_captured_read_out_of_range_only_where_masked(kind, dtype):
    bias64, score_mod64, mask_mod = _relative_bias_mods(kind)
    bias = bias64.to(torch.float32).requires_grad_()
    bias64.requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx]

    bm = create_block_mask(mask_mod, None, None, L, L, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, 2, L, L, 16, dtype=dtype)
    out, lse = flex_attention(q, k, v, score_mod if dtype != torch.float64 else score_mod64, bm, return_lse=True)
    # the reference evaluates everywhere: give it a table that covers negative offsets too
    full64 = torch.cat([bias64, torch.zeros(L, dtype=torch.float64)])   # index -d wraps to the zeros
    full = full64.float()

    def ref_mod(score, b, h, q_idx, kv_idx):
        return score + full[(q_idx - kv_idx) % (2 * L)]

    def gold_mod(score, b, h, q_idx, kv_idx):
        return score + full64[(q_idx - kv_idx) % (2 * L)]

    ref_out, ref_lse = reference_attention(q, k, v, ref_mod, mask_mod)
    q64, k64, v64 = [x.detach().double() for x in (q, k, v)]
    gold_out, gold_lse = reference_attention(q64, k64, v64, gold_mod, mask_mod)
    assert_close_to_golden("out", out, ref_out, gold_out)
    assert_close_to_golden("lse", lse, ref_lse, gold_lse)
    # the backward reads the same way and gives the bias its gradient
    out.sum().backward()
    assert (bias if dtype != torch.float64 else bias64).grad is not None


def test_captured_read_out_of_range_where_kept_is_an_error():
    bias = torch.randn(L)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx]   # kv > q is kept without a mask: index < 0

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < 8

    q, k, v = make_qkv(1, 1, 1, L, L, 16, requires_grad=False)
    bm = create_block_mask(sliding, None, None, L, L, BLOCK_SIZE=32)
    with pytest.raises(IndexError, match=r"score_mod 'score_mod' reads buf0 .* at index -7 in dimension 0"):
        flex_attention(q, k, v, score_mod, bm)


# ---- index arithmetic past int32 ------------------------------------------------------------

BIG = [
    lambda b, h, q_idx, kv_idx: q_idx < 2 ** 40,
    lambda b, h, q_idx, kv_idx: q_idx + 2 ** 31 > kv_idx,
    lambda b, h, q_idx, kv_idx: (q_idx - 2 ** 33) >= (kv_idx - 2 ** 33),
    lambda b, h, q_idx, kv_idx: q_idx * 2 ** 32 >= kv_idx * 2 ** 32,
    lambda b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, 2 ** 40, q_idx) > kv_idx + 3,
    lambda b, h, q_idx, kv_idx: (kv_idx + 3_000_000_000) % 7 != 2,
]


@pytest.mark.parametrize("n", range(len(BIG)))
def test_int32_overflow_constants_match_torch(n):
    mod = BIG[n]
    Lq, Lk = 113, 97
    got = create_block_mask(mod, 1, 1, Lq, Lk, BLOCK_SIZE=16)
    want = torch_create_block_mask(mod, 1, 1, Lq, Lk, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(got.to_dense(), want.to_dense())
    dense = create_mask(mod, 1, 1, Lq, Lk)
    assert torch.equal(dense, torch_create_mask(mod, 1, 1, Lq, Lk, device="cpu"))
    assert dense.any()
    q, k, v = make_qkv(1, 2, 2, Lq, Lk, 16, requires_grad=False)
    out = flex_attention(q, k, v, block_mask=got)
    ref = reference_attention(q, k, v, mask_mod=lambda b, h, qi, ki: dense[0, 0, qi, ki])[0]
    gold = reference_attention(q.double(), k.double(), v.double(), mask_mod=lambda b, h, qi, ki: dense[0, 0, qi, ki])[0]
    assert_close_to_golden("out", out, ref, gold)


# ---- the same two programs in the Triton kernels (interpreted; on the GPU with the gpu marker) ----

_KERNEL_CHECK = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from test_cpu_strict import BIG, L, _relative_bias_mods
from flexattn import create_block_mask, flex_attention
dev = sys.argv[1]
report = {}
g = torch.Generator().manual_seed(0)
q, k, v = [torch.randn(1, 2, n, 16, generator=g) for n in (48, 40, 40)]
for n in (0, 1, 3, 5):   # constants past int32 in the mask: the kernels against the CPU path
    bm = create_block_mask(BIG[n], 1, 1, 48, 40, device="cpu", BLOCK_SIZE=16)
    want = flex_attention(q, k, v, block_mask=bm)
    got = flex_attention(q.to(dev), k.to(dev), v.to(dev), block_mask=bm.to(dev), kernel_options={"BACKEND": "triton"})
    report[f"big{n}"] = (got.cpu() - want).abs().max().item()
q, k, v = [torch.randn(1, 2, L, 16, generator=g) for _ in range(3)]
for kind in ("causal", "sliding", "document"):   # bias[q_idx - kv_idx]: out of range only where masked
    bias = _relative_bias_mods(kind)[0]
    res = []
    for d in ("cpu", dev):
        mask_mod = _relative_bias_mods(kind, d)[2]   # its document ids on the attention's device
        bm = create_block_mask(mask_mod, None, None, L, L, device=d, BLOCK_SIZE=32)
        tab = bias.float().to(d).requires_grad_()
        qq, kk, vv = [x.detach().to(d).requires_grad_() for x in (q, k, v)]  # new leaves on each device
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + tab[q_idx - kv_idx]
        opts = None if d == "cpu" else {"BACKEND": "triton"}
        out = flex_attention(qq, kk, vv, score_mod, bm, kernel_options=opts)
        out.square().sum().backward()
        res.append([t.detach().cpu() for t in (out, qq.grad, kk.grad, vv.grad, tab.grad)])
    report[kind] = max((a - b).abs().max().item() for a, b in zip(*res))
print(json.dumps(report))
'''


def _run_kernel_check(device, env_extra, tol):
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _KERNEL_CHECK, device, here], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {k: e for k, e in report.items() if not e <= tol}   # a wrong mask or read is O(1) off
    assert not bad, report


def test_big_constants_and_masked_reads_in_interpreted_kernels():
    _run_kernel_check("cpu", {"TRITON_INTERPRET": "1"}, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_big_constants_and_masked_reads_in_gpu_kernels():
    _run_kernel_check("cuda", {}, 2e-2)   # the GPU's dots are tf32
