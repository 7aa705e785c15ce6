"""Serving attention on one GPU: flexattn.serving (paged and contiguous caches) vs SDPA
(contiguous, padded to the longest sequence) vs torch's FlexAttention with its
PagedAttention, in one process. Needs a CUDA GPU; a peer that cannot run is skipped with
the reason printed.

    PYTHONPATH=. python3 benchmarks/bench_serving.py                 # the whole table
    PYTHONPATH=. python3 benchmarks/bench_serving.py --quick         # small sizes (smoke test)
    PYTHONPATH=. python3 benchmarks/bench_serving.py --only decode   # or prefill

Decode: B in {1, 8, 64} sequences, cached lengths drawn in 1K-32K (B=1: 32K), one query
per sequence, Hq=32, Hkv=8, D=128, bfloat16, page sizes 16 and 128 (pages of the
sequences interleaved in the pool, as continuous batching leaves them). GB/s = the K+V
bytes of the sequences' real lengths / time (every peer is charged the same bytes, so
padding shows up as a lower rate). Chunked prefill: one 2K-token chunk (causal, global
positions) at the end of a 16K-128K cache; TFLOP/s = 4 * Hq * D * attended pairs / time.
Mixed (continuous batching): 62 sequences decoding and two prefilling 1K-token chunks in one
paged cache, every query packed in one call (query_lens) vs one call per kind.
Sweep (--sweep; --only prefill for chunked prefill): flexattn alone (contiguous, pages of 16 and
128) under each decode_* kernel_options config of SWEEP_CONFIGS / PREFILL_SWEEP_CONFIGS,
CUDA-graph replays, rates as above.
Times: medians of triton.testing.do_bench, eager (host included) and replayed as a CUDA
graph (the GPU's time; the rates use it when the peer can be captured, as engines capture
their decode steps). Rows go to benchmarks/results/serving-<utc>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def bench(fn) -> float:
    """Median ms of fn (triton.testing.do_bench), after one call that compiles."""
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn):
    """Median ms of fn's launches replayed as one CUDA graph (the GPU's time without the
    host's: decode steps are that short), or None when fn cannot be captured."""
    import triton
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
    except Exception:
        torch.cuda.synchronize()
        return None
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def timed(row, fn, work, unit):
    """Eager and graph medians into row; the rate (`work` / time) from the graph's time when
    it could be captured, else from the eager time."""
    ms = bench(fn)
    msg = bench_graph(fn)
    row.update(ms=ms, ms_graph=msg)
    row[unit] = work / ((msg if msg is not None else ms) / 1e3)


def lengths(B: int, max_len: int, seed: int = 0) -> list:
    if B == 1:
        return [max_len]
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1024, max_len + 1, (B,), generator=g).tolist()
    lens[0] = max_len  # the longest sequence is always there
    return lens


def fill_paged(lens, k, v, page_size):
    """A PagedKVCache holding K/V rows k[b, :, :lens[b]]; pages reserved round-robin (one
    page per sequence in turn), so every sequence's pages are scattered over the pool."""
    from flexattn.serving import PagedKVCache
    B = len(lens)
    pages = sum(-(-n // page_size) for n in lens)
    cache = PagedKVCache(pages, page_size, HKV, D, DTYPE, "cuda", max_seqs=B, max_pages_per_seq=pages)
    left = list(lens)
    while any(left):
        for b in range(B):
            if left[b]:
                step = min(page_size, left[b])
                cache.reserve(b, cache.capacity(b) - cache.seqlen(b) + step)
                left[b] -= step
    for b, n in enumerate(lens):
        cache.append([b], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
    return cache


def torch_paged(lens, k, v, page_size, q):
    """torch's PagedAttention + torch.compile(flex_attention): (callable, note)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B = len(lens)
    max_len = max(lens)
    pages = sum(-(-n // page_size) for n in lens)
    pa = PagedAttention(pages, page_size, B, device="cuda")
    kc = torch.zeros(1, HKV, pages * page_size, D, dtype=DTYPE, device="cuda")
    vc = torch.zeros_like(kc)
    for b, n in enumerate(lens):
        bi = torch.tensor([b], device="cuda")
        pa.reserve(bi, torch.tensor([n], device="cuda"))
        pa.assign(bi, torch.arange(n, device="cuda")[None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], kc, vc)
    lens_t = torch.tensor(lens, device="cuda")

    def live(b, h, q_idx, kv_idx):
        return kv_idx < lens_t[b]

    L = q.shape[2]
    bm = create_block_mask(live, B, None, L, max_len, device="cuda", BLOCK_SIZE=(128, page_size))
    pbm = pa.convert_logical_block_mask(bm, kv_len=lens_t)
    flex = torch.compile(flex_attention)
    try:
        flex(q, kc, vc, block_mask=pbm, enable_gqa=True)
        return lambda: flex(q, kc, vc, block_mask=pbm, enable_gqa=True), ""
    except Exception:  # torch's kernels may need a kv tile that divides the page
        opts = {"BLOCK_N": page_size}
        flex(q, kc, vc, block_mask=pbm, enable_gqa=True, kernel_options=opts)
        return lambda: flex(q, kc, vc, block_mask=pbm, enable_gqa=True, kernel_options=opts), f"{opts}"


def decode_rows(args):
    from flexattn.serving import paged_attention
    from flexattn.serving.checks import CacheLengths
    rows = []
    for B in args.batches:
        lens = lengths(B, args.max_len)
        S = max(lens)
        torch.manual_seed(0)
        k = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
        v = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
        q = torch.randn(B, HQ, 1, D, dtype=DTYPE, device="cuda")
        gbytes = sum(lens) * HKV * D * 2 * k.element_size() / 1e9
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        # both copies of the lengths, as PagedKVCache passes them (a list alone costs a host-to-device
        # copy per call, which a CUDA graph cannot capture)
        both = CacheLengths(lens_t, lens)
        peers = {"flexattn contiguous": lambda: (lambda: paged_attention(q, k, v, both), "")}
        pad = (torch.arange(S, device="cuda")[None, :] < lens_t[:, None]).view(B, 1, 1, S)
        qg = q.view(B, HKV, HQ // HKV, D)  # one query per sequence: the GQA group as query rows

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=pad)
        peers["sdpa padded"] = lambda: (sdpa, "GQA group as query rows, bool padding mask")
        for ps in args.page_sizes:
            def mk(ps=ps):
                cache = fill_paged(lens, k, v, ps)
                seqs = list(range(B))
                return (lambda: cache.attention(q, seqs)), ""
            peers[f"flexattn paged {ps}"] = mk
            peers[f"torch flex paged {ps}"] = lambda ps=ps: torch_paged(lens, k, v, ps, q)
        base = dict(kind="decode", B=B, max_len=S, mean_len=sum(lens) // B, Hq=HQ, Hkv=HKV, D=D)
        rows += run_peers(peers, base, lambda out: out.view(B, HQ, 1, D).float(), gbytes, "GBps", args.verbose)
        del k, v
        torch.cuda.empty_cache()
    return rows


def prefill_rows(args):
    from flexattn.masks import causal
    from flexattn.serving import create_cache_block_mask, paged_attention
    from flexattn.serving.checks import CacheLengths
    rows = []
    L = args.chunk
    for S in args.caches:
        torch.manual_seed(0)
        k = torch.randn(1, HKV, S, D, dtype=DTYPE, device="cuda")
        v = torch.randn(1, HKV, S, D, dtype=DTYPE, device="cuda")
        q = torch.randn(1, HQ, L, D, dtype=DTYPE, device="cuda")
        pairs = L * (S - L) + L * (L + 1) // 2
        flops = 4 * HQ * D * pairs
        mm = causal()
        bm = create_cache_block_mask(mm, [S], L, device="cuda")
        both = CacheLengths(torch.tensor([S], dtype=torch.int32, device="cuda"), [S])
        peers = {"flexattn contiguous": lambda: (lambda: paged_attention(q, k, v, both, mask_mod=mm, block_mask=bm),
                                                 "")}
        for ps in args.page_sizes:
            def mk(ps=ps):
                cache = fill_paged([S], k, v, ps)
                return (lambda: cache.attention(q, [0], mask_mod=mm, block_mask=bm)), ""
            peers[f"flexattn paged {ps}"] = mk

        def sdpa_make():
            qi = torch.arange(S - L, S, device="cuda")[:, None]
            mask = (torch.arange(S, device="cuda")[None, :] <= qi).view(1, 1, L, S)
            return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                             enable_gqa=True)), "bool causal mask"
        peers["sdpa"] = sdpa_make

        def torch_flex_make():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            off = S - L

            def tc(b, h, q_idx, kv_idx):
                return q_idx + off >= kv_idx
            tbm = create_block_mask(tc, None, None, L, S, device="cuda")
            flex = torch.compile(flex_attention)
            return (lambda: flex(q, k, v, block_mask=tbm, enable_gqa=True)), "contiguous cache"
        peers["torch flex"] = torch_flex_make
        base = dict(kind="prefill", chunk=L, cache=S, Hq=HQ, Hkv=HKV, D=D)
        rows += run_peers(peers, base, lambda out: out.float(), flops / 1e12, "TFLOPs", args.verbose)
        del k, v
        torch.cuda.empty_cache()
    return rows


def mixed_rows(args):
    """A continuous-batching step in one paged cache (pages of 16): `args.mixed_decodes`
    sequences decode one token while two others prefill a chunk of args.chunk // 2 tokens.
    flexattn with every query packed in one call (query_lens) vs one call per kind (the
    decodes as a batch, then the chunks as a batch), causal in global positions; BlockMasks
    built beforehand for both. TFLOP/s over the step's attended pairs."""
    from flexattn.masks import causal
    from flexattn.serving import create_cache_block_mask
    n_dec, chunk = args.mixed_decodes, args.chunk // 2
    lens = lengths(n_dec, args.max_len) + [args.max_len // 2, args.max_len]
    qls = [1] * n_dec + [chunk, chunk]
    B, S, T = len(lens), max(lens), sum(qls)
    torch.manual_seed(0)
    k = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
    v = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
    q = torch.randn(1, HQ, T, D, dtype=DTYPE, device="cuda")
    pairs = sum(lens[:n_dec]) + sum(chunk * (n - chunk) + chunk * (chunk + 1) // 2 for n in lens[n_dec:])
    flops = 4 * HQ * D * pairs
    mm = causal()
    cache = fill_paged(lens, k, v, 16)
    seqs = list(range(B))
    q_dec = q[0, :, :n_dec].transpose(0, 1).unsqueeze(2).contiguous()  # [n_dec, Hq, 1, D]
    q_pre = q[0, :, n_dec:].view(HQ, 2, chunk, D).transpose(0, 1).contiguous()  # [2, Hq, chunk, D]
    bm_all = create_cache_block_mask(mm, lens, qls, device="cuda")
    bm_dec = create_cache_block_mask(mm, lens[:n_dec], 1, device="cuda")
    bm_pre = create_cache_block_mask(mm, lens[n_dec:], chunk, device="cuda")

    def packed():
        return cache.attention(q, seqs, mask_mod=mm, block_mask=bm_all, query_lens=qls)

    def per_kind():
        return (cache.attention(q_dec, seqs[:n_dec], mask_mod=mm, block_mask=bm_dec),
                cache.attention(q_pre, seqs[n_dec:], mask_mod=mm, block_mask=bm_pre))

    def as_packed(out):  # both peers' outputs as q's packed rows
        if isinstance(out, tuple):
            dec, pre = out
            out = torch.cat([dec.squeeze(2).transpose(0, 1), pre.transpose(0, 1).reshape(HQ, 2 * chunk, D)], 1)
        return out.reshape(HQ, T, D).float()
    peers = {"flexattn packed": lambda: (packed, "one call, query_lens"),
             "flexattn per kind": lambda: (per_kind, "decodes, then chunks")}
    base = dict(kind="mixed", decodes=n_dec, chunk=chunk, max_len=S, Hq=HQ, Hkv=HKV, D=D)
    rows = run_peers(peers, base, as_packed, flops / 1e12, "TFLOPs", args.verbose)
    del k, v, cache
    torch.cuda.empty_cache()
    return rows


# decode_* kernel_options tried by --sweep (None: serving_config's choice); the kv tile, the
# pipeline depth and the split count bound a decode that reads K/V once
SWEEP_CONFIGS = [None] + [dict(decode_BLOCK_N=bn, decode_num_stages=st, decode_num_warps=w)
                          for bn in (64, 128) for st in (2, 3, 4) for w in (4, 8)] \
    + [dict(decode_SPLITS=sp, decode_BLOCK_N=bn) for sp in (16, 48, 64, 96, 128) for bn in (64, 128)]
# a prefill chunk's programs run tensor-core tiles: the kv tile, stages and warps
PREFILL_SWEEP_CONFIGS = [None] + [dict(decode_BLOCK_N=bn, decode_num_stages=st, decode_num_warps=w)
                                  for bn in (32, 64, 128) for st in (2, 3) for w in (4, 8)]


def sweep_layouts(lens, k, v, q, page_sizes, opts_call):
    """name -> call(kernel_options) for the contiguous cache and a paged copy per page size."""
    from flexattn.serving import paged_attention
    from flexattn.serving.checks import CacheLengths
    both = CacheLengths(torch.tensor(lens, dtype=torch.int32, device="cuda"), lens)
    layouts = {"contiguous": lambda opts: paged_attention(q, k, v, both, kernel_options=opts, **opts_call)}
    for ps in page_sizes:
        cache = fill_paged(lens, k, v, ps)
        layouts[f"paged {ps}"] = lambda opts, cache=cache: cache.attention(q, list(range(len(lens))),
                                                                          kernel_options=opts, **opts_call)
    return layouts


def sweep_one(head, layouts, configs, work, unit):
    """One row per (layout, config): CUDA-graph time, rate, difference from the contiguous default."""
    rows = []
    ref = layouts["contiguous"](None).float()
    for name, call in layouts.items():
        for opts in configs:
            row = dict(head, layout=name, options=opts)
            try:
                row["max_diff"] = float((call(opts).float() - ref).abs().max())
                ms = bench_graph(lambda: call(opts))
                row.update(ms_graph=ms)
                row[unit] = work / (ms / 1e3)
                print(f"sweep {head} {name:<11} {str(opts):<80} {ms:8.4f} ms {row[unit]:7.0f} {unit} "
                      f"diff {row['max_diff']:.1e}", flush=True)
            except Exception as e:
                row["skipped"] = _reason(e)
                print(f"sweep {head} {name:<11} {str(opts):<80} skipped ({row['skipped']})", flush=True)
            rows.append(row)
    return rows


def sweep_rows(args):
    """Decode GB/s (B in args.batches) or chunked-prefill TFLOP/s (caches 32K and 128K) of
    flexattn (contiguous, paged 16 / 128) under each config of SWEEP_CONFIGS /
    PREFILL_SWEEP_CONFIGS."""
    from flexattn.masks import causal
    from flexattn.serving import create_cache_block_mask
    rows = []
    prefill = args.only == "prefill"
    for n in ([c for c in args.caches if c in (32768, 131072)] or args.caches[:1]) if prefill else args.batches:
        lens = [n] if prefill else lengths(n, args.max_len)
        B, S, L = len(lens), max(lens), args.chunk if prefill else 1
        torch.manual_seed(0)
        k = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
        v = torch.randn(B, HKV, S, D, dtype=DTYPE, device="cuda")
        q = torch.randn(B, HQ, L, D, dtype=DTYPE, device="cuda")
        if prefill:
            mm = causal()
            call = dict(mask_mod=mm, block_mask=create_cache_block_mask(mm, lens, L, device="cuda"))
            work, unit = 4 * HQ * D * (L * (S - L) + L * (L + 1) // 2) / 1e12, "TFLOPs"
            head = dict(kind="prefill sweep", chunk=L, cache=S)
        else:
            call = {}
            work, unit = sum(lens) * HKV * D * 2 * k.element_size() / 1e9, "GBps"
            head = dict(kind="decode sweep", B=B, max_len=S)
        rows += sweep_one(head, sweep_layouts(lens, k, v, q, args.page_sizes, call),
                          PREFILL_SWEEP_CONFIGS if prefill else SWEEP_CONFIGS, work, unit)
        del k, v
        torch.cuda.empty_cache()
    return rows


def _reason(e: Exception) -> str:
    """Why a measurement was skipped: the exception's type and first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def run_peers(peers, base, as_float, work, unit, verbose) -> list:
    """One row per peer (name -> make() -> (fn, note)): its output's largest difference from
    the first peer's, its times and rate; a peer that cannot run is skipped, its reason kept."""
    rows, ref = [], None
    for name, make in peers.items():
        row = dict(base, peer=name)
        try:
            fn, note = make()
            out = as_float(fn())
            ref = out if ref is None else ref
            row["max_diff_vs_first"] = float((out - ref).abs().max())
            timed(row, fn, work, unit)
            row["note"] = note
        except Exception as e:
            row.update(skipped=_reason(e))
            if verbose:
                traceback.print_exc()
        rows.append(row)
        print_row(row)
    return rows


def print_row(r):
    if r["kind"] == "decode":
        head = f"decode B={r['B']:<3} max={r['max_len']:<6} mean={r['mean_len']:<6}"
        rate = f"{r['GBps']:8.0f} GB/s" if "GBps" in r else ""
    elif r["kind"] == "mixed":
        head = f"mixed {r['decodes']} decodes + 2 chunks of {r['chunk']} (max {r['max_len']})"
        rate = f"{r['TFLOPs']:7.1f} TFLOP/s" if "TFLOPs" in r else ""
    else:
        head = f"prefill chunk={r['chunk']} cache={r['cache']:<7}"
        rate = f"{r['TFLOPs']:7.1f} TFLOP/s" if "TFLOPs" in r else ""
    if "skipped" in r:
        print(f"{head} {r['peer']:<22} skipped ({r['skipped']})", flush=True)
    else:
        graph = f"{r['ms_graph']:9.4f}" if r.get("ms_graph") is not None else "        -"
        print(f"{head} {r['peer']:<22} {r['ms']:9.4f} ms eager {graph} ms graph {rate}  "
              f"diff {r['max_diff_vs_first']:.2e} {r['note']}", flush=True)


def ratios(rows):
    """The targets, printed from the rows: paged / contiguous, contiguous / SDPA,
    paged / torch flex paged (decode, GB/s)."""
    print("\nratios (decode, GB/s):")
    by = {}
    for r in rows:
        if r["kind"] == "decode" and "GBps" in r:
            by[(r["B"], r["peer"])] = r["GBps"]
    for B in sorted({k[0] for k in by}):
        parts = []
        c = by.get((B, "flexattn contiguous"))
        s = by.get((B, "sdpa padded"))
        if c and s:
            parts.append(f"contiguous/sdpa {c / s:.2f}")
        for (b, peer), g in sorted(by.items()):
            if b == B and peer.startswith("flexattn paged"):
                ps = peer.split()[-1]
                if c:
                    parts.append(f"paged{ps}/contiguous {g / c:.2f}")
                t = by.get((B, f"torch flex paged {ps}"))
                if t:
                    parts.append(f"paged{ps}/torch-paged {g / t:.2f}")
        print(f"  B={B}: " + ", ".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--only", choices=("decode", "prefill", "mixed"))
    ap.add_argument("--sweep", action="store_true",
                    help="flexattn's decode (with --only prefill: prefill) under each config of SWEEP_CONFIGS "
                         "(PREFILL_SWEEP_CONFIGS) instead of the peers")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a skipped peer")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serving-<utc>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_serving needs a CUDA GPU")
    args.batches = [1, 8] if args.quick else [1, 8, 64]
    args.max_len = 4096 if args.quick else 32768
    args.page_sizes = [16, 128]
    args.chunk = 512 if args.quick else 2048
    args.caches = [4096] if args.quick else [16384, 32768, 65536, 131072]
    args.mixed_decodes = 6 if args.quick else 62
    import triton
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                dtype=str(DTYPE))
    print(meta, flush=True)
    if args.sweep:
        rows = sweep_rows(args)
    else:
        rows = [r for kind, fn in (("decode", decode_rows), ("prefill", prefill_rows), ("mixed", mixed_rows))
                if args.only in (None, kind) for r in fn(args)]
    ratios(rows)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"serving-{meta['date'].replace(':', '')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"rows written to {out}")


if __name__ == "__main__":
    main()
