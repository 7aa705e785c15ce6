"""The Hopper forward's persistent walk (fwd_PERSISTENT) against its one-program-a-row-block
ping-pong form, in one process (needs an sm90 GPU):

    PYTHONPATH=. python3 benchmarks/ab_persistent.py --dims 128,256 --seqs 8192,16384
    PYTHONPATH=. python3 benchmarks/ab_persistent.py --dims 64 --triton   # and the Triton forward

For each case of bench_attention.CASES, bf16, B=4, H=16: forward TFLOP/s of the two forms
(BACKEND="hopper", TIERED off), alternating for --rounds rounds, each figure the median of
bench_peers.STEADY_REPEATS do_bench medians; the two outputs are checked equal bit for bit.
Raw rows to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import CASES, block_density, mods  # noqa: E402
from bench_peers import STEADY_REPEATS, ms_of  # noqa: E402

FORMS = {"pingpong": {"fwd_PERSISTENT": False}, "persistent": {"fwd_PERSISTENT": True}}
TRITON = {"triton": {"BACKEND": "triton"}}  # --triton: the Triton forward beside them (what "auto" runs at D=64)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="128,256")
    p.add_argument("--seqs", default="8192")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--triton", action="store_true", help="the Triton forward as a third form (its own ratio too)")
    p.add_argument("--section-mib", type=int, default=None,
                   help="the persistent walk's L2 section in MiB (hopper_forward.L2_SECTION_BYTES)")
    a = p.parse_args()
    import flexattn
    from flexattn.kernels import hopper_forward
    if a.section_mib:
        hopper_forward.L2_SECTION_BYTES = a.section_mib << 20
    B, H = 4, 16
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows = []
    for S in map(int, a.seqs.split(",")):
        for D in map(int, a.dims.split(",")):
            torch.manual_seed(0)
            q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            for case in a.cases.split(","):
                sm, mm = mods(case, S, H, "cuda")
                bm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
                flops = 4 * B * H * S * S * block_density(bm) * D
                forms = {**FORMS, **(TRITON if a.triton else {})}
                outs, figs = {}, {f: [] for f in forms}
                for _ in range(a.rounds):
                    for form, opts in forms.items():
                        kw = dict(score_mod=sm, block_mask=bm,
                                  kernel_options={"BACKEND": "hopper", "TIERED": False, **opts})
                        outs[form] = flexattn.flex_attention(q, k, v, **kw)
                        ms = ms_of(lambda: flexattn.flex_attention(q, k, v, **kw), STEADY_REPEATS)
                        figs[form].append(flops / ms * 1e-9)
                same = torch.equal(outs["pingpong"], outs["persistent"])
                row = dict(case=case, D=D, S=S, same=same, **figs)
                rows.append(row)
                mean = {f: sum(figs[f]) / len(figs[f]) for f in forms}
                triton = (f", Triton {' / '.join(f'{x:.0f}' for x in figs['triton'])} (persistent / Triton "
                          f"{mean['persistent'] / mean['triton']:.3f}x)") if a.triton else ""
                print(f"{case:>15} D={D} S={S}: ping-pong {' / '.join(f'{x:.0f}' for x in figs['pingpong'])}, "
                      f"persistent {' / '.join(f'{x:.0f}' for x in figs['persistent'])} TFLOP/s "
                      f"({mean['persistent'] / mean['pingpong']:.3f}x){triton}, outputs equal: {same}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
