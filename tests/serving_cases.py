"""Shared pieces of the serving tests (test_serving*.py): cases, a paged copy of a
contiguous cache, the per-sequence float64 reference and the numerics rule."""
from __future__ import annotations

import torch

from conftest import assert_close_to_golden
from flexattn.reference import reference_attention


def make_case(B, Hq, Hkv, E, lens, L, dtype, device, seed=0):
    """q [B, Hq, L, E] and contiguous caches k, v [B, Hkv, max(lens), E] (drawn in float64,
    then cast), and lens."""
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
               for shape in ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, E)))
    return q, k, v, list(lens)


def paged_copy(k, v, lens, page_size, seed=0, spare=3):
    """The contiguous caches k, v as a page pool with each sequence's pages at random places
    (and `spare` unused pages): (pool_k, pool_v, page_table int32 [B, pages])."""
    B, Hkv, S, E = k.shape
    per = -(-S // page_size)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B * per + spare, generator=g)
    table = perm[:B * per].view(B, per).to(torch.int32)
    pool_k = torch.zeros(1, Hkv, (B * per + spare) * page_size, E, dtype=k.dtype, device=k.device)
    pool_v = torch.zeros(1, Hkv, (B * per + spare) * page_size, v.shape[3], dtype=v.dtype, device=v.device)
    for b in range(B):
        for j in range(-(-lens[b] // page_size)):
            p = int(table[b, j])
            n = min(page_size, S - j * page_size)
            pool_k[0, :, p * page_size:p * page_size + n] = k[b, :, j * page_size:j * page_size + n]
            pool_v[0, :, p * page_size:p * page_size + n] = v[b, :, j * page_size:j * page_size + n]
    return pool_k, pool_v, table.to(k.device)


def reference(q, k, v, lens, score_mod, mask_mod):
    """Dense reference per sequence in q's dtype (mods in global positions)."""
    B, Hq, L, _ = q.shape
    outs, lses = [], []
    for b, n in enumerate(lens):
        off = n - L

        def sm(s, bb, h, qi, kv, b=b, off=off):
            return score_mod(s, bb + b, h, qi + off, kv)

        def mm(bb, h, qi, kv, b=b, off=off):
            return mask_mod(bb + b, h, qi + off, kv)
        o, lse = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                     score_mod=sm if score_mod else None, mask_mod=mm if mask_mod else None,
                                     enable_gqa=True)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def check_numerics(name, out, lse, q, k, v, lens, score_mod, mask_mod, ref_mods=None):
    """The numerics rule for out and lse: golden = float64 reference (mods score_mod /
    mask_mod, float64 captured tensors), ref = reference in q's dtype (ref_mods: the mods
    with the test dtype's captured tensors; default the same mods). Returns failures."""
    gold = reference(q.double(), k.double(), v.double(), lens, score_mod, mask_mod)
    rs, rm = ref_mods if ref_mods is not None else (score_mod, mask_mod)
    ref = reference(q, k, v, lens, rs, rm)
    fails = []
    for what, got, r, g in (("out", out, ref[0], gold[0]), ("lse", lse, ref[1], gold[1])):
        try:
            assert_close_to_golden(f"{name} {what}", got.cpu(), r.cpu(), g.cpu())
        except AssertionError as e:
            fails.append(str(e))
    return fails


def zoo_mods(name, B, H, S, device):
    """The zoo entry `name` for global positions < S: (mods with float32 buffers, the same
    with float64 buffers for the golden)."""
    from mods_zoo import make_mod
    return (make_mod(name, B=B, H=H, L=S, S=S, device=device),
            make_mod(name, B=B, H=H, L=S, S=S, device=device, buffer_dtype=torch.float64))
