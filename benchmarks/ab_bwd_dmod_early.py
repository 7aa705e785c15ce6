"""The dk/dv kernel taking the score_mod's derivative into P^T before the dP^T wgmma (the
default) against after it (the form before: dS^T = P^T (dP^T - delta), then the derivative), one
form per process (needs a CUDA GPU); run the two alternately, e.g.

    for f in after early after early; do PYTHONPATH=. python3 benchmarks/ab_bwd_dmod_early.py $f; done

bf16, B=4, H=16, S=8192, fwd+bwd TFLOP/s (median of bench_peers.STEADY_REPEATS do_bench medians)
of PEERS.md's cases with a score_mod (softcap, ALiBi) and causal (no score_mod: the same kernel
either way, a control), at each head dim.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import block_density, mods  # noqa: E402
from bench_peers import measure  # noqa: E402

# the dk/dv loop's lines in their earlier order (kernels.backward's template, "after" form)
AFTER = '''        if WANT_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                dpT = tl.where(keepT, dpT * DROP_SCALE, 0.0)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SCORE_MOD:
                dsT = score_mod_bwd(sT, dsT, valid, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}{GRAD_BUF_ARGS},
                                    Q_AXIS=1, ACCUM=ATOMIC_DQ, FIXED_POINT=DETERMINISTIC)
            dsT = dsT.to(q.dtype)'''


def use_after_form():
    """Swap the template's dk/dv lines for the AFTER form (before any module is generated)."""
    from flexattn.kernels import source
    t = source.TEMPLATES["bwd"]
    start = t.index("        if WANT_DK:\n            if HAS_SCORE_MOD and not ATOMIC_DQ:")
    end = t.index("            dsT = dsT.to(q.dtype)", start) + len("            dsT = dsT.to(q.dtype)")
    source.TEMPLATES["bwd"] = t[:start] + AFTER + t[end:]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("form", choices=("after", "early"))
    p.add_argument("--dims", default="128,64")
    p.add_argument("--cases", default="softcap,alibi,causal")
    a = p.parse_args()
    import flexattn
    if a.form == "after":
        use_after_form()
    B, H, S = 4, 16, 8192
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} form {a.form}", flush=True)
    for D in map(int, a.dims.split(",")):
        for case in a.cases.split(","):
            sm, mm = mods(case, S, H, "cuda")
            bm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda")
            torch.manual_seed(0)
            q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3)]
            fn = lambda: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm)  # noqa: E731
            _, f, fb = measure(fn, (q, k, v), 4 * B * H * S * S * D * block_density(bm), first=False)
            print(f"D={D} {case:8s} {a.form}: fwd {f:.0f} TFLOP/s, fwd+bwd {fb:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
