"""flexattn.serving through the Triton kernels: under TRITON_INTERPRET=1 on CPU tensors here
(each group in a fresh subprocess, as test_kernels_interpret does: the variable must be set
before Triton builds a kernel), and on the GPU in test_serving_gpu.py (the same checks).

Checks: a paged cache (random page permutations, page sizes 16/64/128/256) gives the
contiguous cache's result bit for bit (same kernel, same tiles in the same order: only the
rows' addresses differ); both meet the numerics rule against the float64 reference for
variable cache_seqlens, GQA, decode / verification / chunked prefill and the zoo mods;
appends interleaved with reads; tree verification masks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from serving_cases import check_numerics, make_case, paged_copy, zoo_mods  # noqa: E402

ZOO = ("none", "causal", "sliding_window", "prefix_lm", "document", "dilated_sliding_window",
       "natten_2d", "alibi_causal", "softcap", "rel_bias", "per_head_scale", "multi_read",
       "empty_rows", "and_or", "softcap_document", "padding_bias")


def check_paged_equals_contiguous(device, dtype, page_sizes=(16, 64, 128, 256), shapes=None, opts=None):
    """Paged (random page permutation) == contiguous, bitwise; both vs the golden."""
    from flexattn.masks import causal
    from flexattn.serving import paged_attention
    fails = []
    shapes = shapes or [dict(B=3, Hq=4, Hkv=2, E=32, lens=[260, 77, 129], L=1),       # decode, GQA
                        dict(B=2, Hq=2, Hkv=2, E=16, lens=[200, 97], L=5),            # verification
                        dict(B=2, Hq=2, Hkv=1, E=16, lens=[200, 90], L=80, mask=True)]  # chunked prefill
    opts = dict(opts or {}, BACKEND="triton")
    for sh in shapes:
        q, k, v, lens = make_case(sh["B"], sh["Hq"], sh["Hkv"], sh["E"], sh["lens"], sh["L"], dtype, device)
        mm = causal() if sh.get("mask") else None
        out_c, lse_c = paged_attention(q, k, v, lens, mask_mod=mm, return_lse=True, kernel_options=opts)
        for ps in page_sizes:
            pk, pv, table = paged_copy(k, v, lens, ps, seed=ps)
            out_p, lse_p = paged_attention(q, pk, pv, lens, table, page_size=ps, mask_mod=mm, return_lse=True,
                                           kernel_options=opts)
            if not (torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)):
                fails.append(f"{sh} page {ps}: paged != contiguous (max diff "
                             f"{(out_p.float() - out_c.float()).abs().max().item():.3e})")
        fails += check_numerics(f"{sh}", out_c, lse_c, q, k, v, lens, None, mm)
    return fails


def check_splits_and_tiles(device, dtype):
    """Several kv splits and several q tiles agree with the golden (the merge, the q tiles'
    block rows, the packed GQA rows)."""
    from flexattn.masks import sliding_window
    from flexattn.serving import paged_attention
    fails = []
    q, k, v, lens = make_case(2, 4, 2, 16, [300, 150], 40, dtype, device)
    mm = sliding_window(100)
    pk, pv, table = paged_copy(k, v, lens, 64, seed=1)
    for opts in ({"decode_SPLITS": 3}, {"decode_SPLITS": 1, "decode_BLOCK_N": 16}):
        out, lse = paged_attention(q, pk, pv, lens, table, page_size=64, mask_mod=mm, return_lse=True,
                                   kernel_options=dict(opts, BACKEND="triton"))
        fails += check_numerics(f"splits {opts}", out, lse, q, k, v, lens, None, mm)
    return fails


def check_zoo(device, dtype, names=ZOO):
    """Every zoo mod (global positions) through a paged cache against the golden."""
    from flexattn.serving import paged_attention
    fails = []
    lens, L = [150, 70], 3
    q, k, v, lens = make_case(2, 4, 2, 16, lens, L, dtype, device)
    pk, pv, table = paged_copy(k, v, lens, 16, seed=3)
    for name in names:
        try:
            m, m64 = zoo_mods(name, B=2, H=4, S=max(lens), device=device)
            out, lse = paged_attention(q, pk, pv, lens, table, page_size=16, score_mod=m.score_mod,
                                       mask_mod=m.mask_mod, return_lse=True, kernel_options={"BACKEND": "triton"})
            fails += check_numerics(name, out, lse, q, k, v, lens, m64.score_mod, m64.mask_mod,
                                    ref_mods=(m.score_mod, m.mask_mod))
        except Exception:
            fails.append(f"{name}: {traceback.format_exc()[-600:]}")
    return fails


def check_tree(device, dtype):
    """Tree verification: the mask_mod and BlockMask of tree_mask, through the kernels, vs
    the dense reference built from the ancestor matrix."""
    from flexattn.serving import paged_attention, tree_ancestors, tree_mask
    fails = []
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, -1, 6, 3], [-1, -1, 1, 0, 3, 4, 5, 6, 2]])
    n = parents.shape[1]
    q, k, v, lens = make_case(2, 4, 2, 32, [180, 141], n, dtype, device)
    anc = tree_ancestors(parents).to(device)
    start = torch.tensor(lens, device=device) - n

    def dense(b, h, q_idx, kv_idx):  # the reference's own reading of the tree (no clamping needed)
        node = (q_idx - start[b]).clamp(0, n - 1)
        other = kv_idx - start[b]
        return (other < 0) | anc[b, node, other.clamp(0, n - 1)]
    mm, bm = tree_mask(parents, lens, device=device)
    pk, pv, table = paged_copy(k, v, lens, 16, seed=5)
    out, lse = paged_attention(q, pk, pv, lens, table, page_size=16, mask_mod=mm, block_mask=bm, return_lse=True,
                               kernel_options={"BACKEND": "triton"})
    fails += check_numerics("tree", out, lse, q, k, v, lens, None, dense)
    return fails


def check_cache_interleaved(device, dtype, backends=("triton",)):
    """Appends (variable lengths, several sequences at once) interleaved with reads: every
    read equals the golden of what was appended so far."""
    from flexattn.serving import PagedKVCache
    fails = []
    g = torch.Generator().manual_seed(7)
    Hq, Hkv, E = 4, 2, 16
    cache = PagedKVCache(40, 16, Hkv, E, dtype, device, max_seqs=4)
    seqs = [2, 0, 3]
    hist_k = {s: torch.zeros(1, Hkv, 0, E, dtype=dtype, device=device) for s in seqs}
    hist_v = dict(hist_k)
    for step, T in enumerate((37, 1, 5, 1)):
        lens = [int(x) for x in torch.randint(1, T + 1, (3,), generator=g)] if T > 1 else [1, 1, 1]
        lens[step % 3] = T
        k = torch.randn(3, Hkv, T, E, generator=g).to(dtype).to(device)
        v = torch.randn(3, Hkv, T, E, generator=g).to(dtype).to(device)
        for s, n in zip(seqs, lens):
            cache.reserve(s, n)
        cache.append(seqs, k, v, lengths=lens)
        for i, (s, n) in enumerate(zip(seqs, lens)):
            hist_k[s] = torch.cat([hist_k[s], k[i:i + 1, :, :n]], 2)
            hist_v[s] = torch.cat([hist_v[s], v[i:i + 1, :, :n]], 2)
        L = 1
        q = torch.randn(3, Hq, L, E, generator=g).to(dtype).to(device)
        total = [hist_k[s].shape[2] for s in seqs]
        S = max(total)
        kc = torch.zeros(3, Hkv, S, E, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        for i, s in enumerate(seqs):
            kc[i, :, :total[i]] = hist_k[s][0]
            vc[i, :, :total[i]] = hist_v[s][0]
        for backend in backends:
            out, lse = cache.attention(q, seqs, return_lse=True, kernel_options={"BACKEND": backend})
            fails += check_numerics(f"step {step} {backend}", out, lse, q, kc, vc, total, None, None)
    cache.free(0)
    if cache.seqlen(0) != 0 or cache.num_free_pages <= 0:
        fails.append("free: the sequence kept its length or no page came back")
    return fails


def check_packed_queries(device, dtype, backends=("triton",), Hq=4, Hkv=2, E=32, lens=(260, 77, 129, 40, 9),
                         query_lens=(1, 5, 0, 40, 9), page_size=16):
    """Queries of several lengths in one call (decode, a draft, a sequence with none, a
    prefill chunk, a whole short prompt), packed along q's rows: each sequence's rows meet
    the numerics rule against its own float64 reference (mods in global positions and
    sequence index b); the paged cache gives the contiguous result bit for bit; the packed
    rows equal a call of their sequence alone where that is also a packed call."""
    from flexattn.masks import causal, sliding_window
    from flexattn.serving import paged_attention
    lens, qls = list(lens), list(query_lens)
    B = len(lens)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, Hq, sum(qls), E, generator=g, dtype=torch.float64).to(dtype).to(device)
    _, k, v, _ = make_case(B, Hq, Hkv, E, lens, 1, dtype, device, seed=4)
    pk, pv, table = paged_copy(k, v, lens, page_size, seed=5)
    starts = [sum(qls[:b]) for b in range(B)]

    def bias(score, b, h, q_idx, kv_idx):
        return score + 0.25 * b - 0.01 * (q_idx - kv_idx) + 0.1 * h

    fails = []
    for name, sm, mm in (("causal", None, causal()), ("sliding+bias", bias, sliding_window(48)),
                         ("no mask", bias, None)):
        for backend in backends:
            opts = {"BACKEND": backend}
            out, lse = paged_attention(q, k, v, lens, mask_mod=mm, score_mod=sm, return_lse=True,
                                       kernel_options=opts, query_lens=qls)
            out_p, lse_p = paged_attention(q, pk, pv, torch.tensor(lens), table, page_size=page_size, mask_mod=mm,
                                           score_mod=sm, return_lse=True, kernel_options=opts,
                                           query_lens=torch.tensor(qls))
            if not (torch.equal(out_p, out) and torch.equal(lse_p, lse)):
                fails.append(f"{name} {backend}: packed paged != packed contiguous")
            if out.shape != (1, Hq, sum(qls), E) or lse.shape != (1, Hq, sum(qls)):
                fails.append(f"{name} {backend}: out {tuple(out.shape)} / lse {tuple(lse.shape)} not packed like q")
                continue
            for b in range(B):
                if not qls[b]:
                    continue
                rows = slice(starts[b], starts[b] + qls[b])

                def sm_b(s, bb, h, qi, kv, b=b):
                    return sm(s, bb + b, h, qi, kv)

                def mm_b(bb, h, qi, kv, b=b):
                    return mm(bb + b, h, qi, kv)
                fails += check_numerics(f"{name} {backend} sequence {b}", out[:, :, rows], lse[:, :, rows],
                                        q[:, :, rows], k[b:b + 1], v[b:b + 1], [lens[b]],
                                        sm_b if sm else None, mm_b if mm else None)
                if b == 0:  # sequence 0 alone, as a packed call of one sequence: the same tiles
                    alone, lse_a = paged_attention(q[:, :, rows], k[:1], v[:1], lens[:1], mask_mod=mm, score_mod=sm,
                                                   return_lse=True, kernel_options=opts, query_lens=qls[:1])
                    if backend == "cpu" and not (torch.equal(alone, out[:, :, rows]) and
                                                 torch.equal(lse_a, lse[:, :, rows])):
                        fails.append(f"{name} {backend}: sequence 0 alone != its packed rows")
    return fails


GROUPS = {
    "paged_fp32": lambda: check_paged_equals_contiguous("cpu", torch.float32),
    "paged_fp16": lambda: check_paged_equals_contiguous("cpu", torch.float16, page_sizes=(16, 128),
                                                        shapes=[dict(B=3, Hq=4, Hkv=2, E=32, lens=[200, 77, 129], L=2)]),
    "splits": lambda: check_splits_and_tiles("cpu", torch.float32),
    "zoo": lambda: check_zoo("cpu", torch.float32),
    "tree_cache": lambda: check_tree("cpu", torch.float32) + check_cache_interleaved("cpu", torch.float32, ("triton", "cpu")),
    "packed": lambda: check_packed_queries("cpu", torch.float32),
}


@pytest.mark.parametrize("lengths, q_len", [([32768] + [1024] * 63, 1), ([32768] * 8, 1), ([300, 32768], 4),
                                           ([32768], 2048)])
def test_serving_splits(lengths, q_len):
    """serving_config's kv splits: a decode's longest sequence is cut into slices of at most
    DECODE_SLICE positions even where the batch's work alone would give each program more
    (which left the longest sequences as the tail of a mixed-length batch); a prefill chunk
    is not cut that way (its partials would be chunk-sized)."""
    from types import SimpleNamespace
    from flexattn.kernels.decode import KVLayout
    from flexattn.kernels.paged import DECODE_SLICE, MAX_SPLITS, serving_config
    Hq, Hkv, D = 32, 8, 128
    q = torch.empty(len(lengths), Hq, q_len, D)
    v = torch.empty(1, Hkv, 1, D)
    blocks = SimpleNamespace(block=(128, 128), kv_num=torch.zeros(1, 1, 1).expand(len(lengths), Hq, 1))
    plan = SimpleNamespace(opts={}, blocks=blocks)
    cfg = serving_config(plan, q, v, KVLayout(dense=True), lengths, q_len)
    longest = -(-max(lengths) // cfg.block_n)
    slice_positions = -(-longest // cfg.splits) * cfg.block_n
    if q_len * Hq // Hkv <= 64:  # decode / verification
        assert slice_positions <= DECODE_SLICE or cfg.splits == MAX_SPLITS, (cfg, slice_positions)
    else:
        assert cfg.splits == 1, cfg


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_serving_kernels_interpreted(group):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), group], env=env, capture_output=True, text=True,
                       timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"subprocess failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    fails = json.loads(lines[-1])["fails"]
    assert not fails, "\n".join(fails)


if __name__ == "__main__":
    try:
        result = GROUPS[sys.argv[1]]()
    except Exception:
        result = [traceback.format_exc()]
    print(json.dumps({"fails": result}))
