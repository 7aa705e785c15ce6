"""Two sets of flexattn kernel_options against each other in one process (needs a CUDA GPU):
fwd+bwd TFLOP/s of PEERS.md's cases, the two forms measured in turn, ROUNDS times each, and
the largest norm-relative difference of their gradients (they compute the same function).

    PYTHONPATH=. python3 benchmarks/ab_options.py --a '{}' --b '{"bwd_TMA": true}' --dims 128,64

bf16, B=4, H=16, S=8192; a figure is one do_bench median (bench_peers.measure, repeats=1), so
ROUNDS alternations show the spread in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import block_density, mods  # noqa: E402
from bench_peers import measure  # noqa: E402

ROUNDS = 3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--a", default="{}", help="kernel_options of form a (JSON)")
    p.add_argument("--b", required=True, help="kernel_options of form b (JSON)")
    p.add_argument("--dims", default="128")
    p.add_argument("--cases", default="causal,dense,document,softcap")
    p.add_argument("--S", type=int, default=8192)
    p.add_argument("--json", default=None, help="rows to this file (default: $OUT/ab_options.json)")
    a = p.parse_args()
    import flexattn
    from flexattn.kernels import tiered
    forms = {"a": json.loads(a.a), "b": json.loads(a.b)}
    B, H, S = 4, 16, a.S
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; a = {forms['a']}, b = {forms['b']}", flush=True)
    rows = []
    for D in map(int, a.dims.split(",")):
        for case in a.cases.split(","):
            sm, mm = mods(case, S, H, "cuda")
            bm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
            torch.manual_seed(0)
            q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3)]
            go = torch.randn_like(q)
            flops = 4 * B * H * S * S * D * block_density(bm)
            fns, grads = {}, {}
            for name, opts in forms.items():
                fns[name] = (lambda o: lambda: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm,
                                                                       kernel_options=o))(opts)
                fns[name]()
                tiered.wait()
                grads[name] = torch.autograd.grad(fns[name](), (q, k, v), go)
            diff = max(((x.float() - y.float()).norm() / y.float().norm()).item()
                       for x, y in zip(grads["b"], grads["a"]))
            figs = {"a": [], "b": []}
            for _ in range(ROUNDS):
                for name in forms:
                    figs[name].append(measure(fns[name], (q, k, v), flops, first=False, repeats=1)[2])
            row = {"case": case, "D": D, "S": S, "a_fb": figs["a"], "b_fb": figs["b"], "grad_diff": diff}
            rows.append(row)
            ma, mb = (sum(f) / len(f) for f in (figs["a"], figs["b"]))
            print(f"D={D:3d} {case:9s} fwd+bwd a {' '.join(f'{x:.0f}' for x in figs['a'])} | "
                  f"b {' '.join(f'{x:.0f}' for x in figs['b'])} | b/a {mb / ma:.3f} | grad diff {diff:.1e}",
                  flush=True)
            del q, k, v, grads
            torch.cuda.empty_cache()
    path = a.json or os.path.join(os.environ.get("OUT", "."), "ab_options.json")
    with open(path, "w") as f:
        json.dump({"a": forms["a"], "b": forms["b"], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
