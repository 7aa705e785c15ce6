"""A mask's tile-table form against its own kernels (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/bench_tile_form.py --cases sliding_window,document,prefix_lm,causal
        [--dims 64] [--tile-options '{"num_warps": 8}']   (kernel_options for the tile form only)
        [--form tiles]   (the tiles' bytes even where the interval form applies)
        [--forward-slot per-tile]   (the Triton forward's lookup reads its slot once per tile)

A new mask's first calls run through its tile-table form (flexattn.mask_tiles) while its own
kernels compile (flexattn.kernels.tiered); a user who benchmarks right after the first call
measures the tile form. Here both forms of each mask run on the same inputs, forward and
forward+backward, through the kernels directly (no tiering, so each is what it is): TFLOP/s as
PEERS.md counts them (B=4, H=16, bf16) and the ratio tile form / own kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import block_density, mods  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="sliding_window,document,prefix_lm,causal")
    p.add_argument("--seqs", default="8192")
    p.add_argument("--dims", default="128")
    p.add_argument("--form", choices=("intervals", "tiles"), default="intervals",
                   help="intervals: the interval form where every partial block's rows allow it (the default); "
                        "tiles: the tiles' bytes always")
    p.add_argument("--tile-options", default=None,
                   help='kernel_options for the tile form only, as JSON, e.g. \'{"num_warps": 8}\'')
    p.add_argument("--forward-slot", choices=("per-row", "per-tile"), default=None,
                   help="how the Triton forward's lookup reads its slot (default: as the kernels do, "
                        "flexattn.kernels.source.SLOT_PER_ROW_KINDS)")
    a = p.parse_args()
    tile_options = json.loads(a.tile_options) if a.tile_options else {}
    import flexattn
    from flexattn import codegen
    from flexattn.kernels import flex_attention_triton, source
    if a.forward_slot is not None:
        source.SLOT_PER_ROW_KINDS = ("fwd",) if a.forward_slot == "per-row" else ()
    from flexattn.mask_tiles import tile_table_form
    B, H = 4, 16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for D in map(int, a.dims.split(",")):
        for S in map(int, a.seqs.split(",")):
            for case in a.cases.split(","):
                _, mask_mod = mods(case, S, H, "cuda")
                torch.manual_seed(0)
                q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3)]
                go = torch.randn_like(q)
                own = flexattn.create_block_mask(mask_mod, None, None, S, S, device="cuda")
                intervals = a.form == "intervals"
                tile = tile_table_form(own, intervals=intervals)
                dens = block_density(own)
                flops = 4 * B * H * S * S * D * dens
                res = {}
                outs = {}
                lookup = codegen.tile_table_lookup
                # a BlockMask object of its own: cached calls (kernels.replay) are per BlockMask
                generic = tile_table_form(flexattn.create_block_mask(mask_mod, None, None, S, S, device="cuda"),
                                          intervals=intervals)
                for name, bm in (("own", own), ("tile", tile), ("generic", generic)):
                    # "generic": the tile form printed like any mask (no per-row slot lookup)
                    codegen.tile_table_lookup = (lambda g: None) if name == "generic" else lookup
                    source._MODULES.clear()  # keyed by the mask's structure, not by how it prints

                    options = {"TIERED": False, **(tile_options if name != "own" else {})}

                    def fwd(bm=bm, options=options):
                        return flex_attention_triton(q, k, v, score_graph=None, mask_graph=bm.mask_graph,
                                                     block_mask=bm, kernel_options=options)[0]

                    def step(fwd=fwd):
                        q.grad = k.grad = v.grad = None
                        fwd().backward(go)
                    with torch.no_grad():
                        outs[name] = fwd().float()
                        res[f"{name}_f"] = flops / triton.testing.do_bench(fwd, warmup=25, rep=200) * 1e-9
                    res[f"{name}_fb"] = 3.5 * flops / triton.testing.do_bench(step, warmup=25, rep=200) * 1e-9
                codegen.tile_table_lookup = lookup
                source._MODULES.clear()
                same = torch.equal(outs["own"], outs["tile"])
                err = ((outs["own"] - outs["tile"]).norm() / outs["own"].norm()).item()
                form = "intervals" if len(tile.mask_graph.buffers) == 3 else "tiles"
                print(f"{case:>15} D={D} S={S} density {dens:.3f} {form} | own {res['own_f']:.0f} / {res['own_fb']:.0f}"
                      f" | tile form {res['tile_f']:.0f} / {res['tile_fb']:.0f} TFLOP/s (fwd / fwd+bwd)"
                      f" | tile / own {res['tile_f'] / res['own_f']:.2f} / {res['tile_fb'] / res['own_fb']:.2f}"
                      f" | generic print {res['generic_f']:.0f} / {res['generic_fb']:.0f}"
                      f" | out {'bit-equal' if same else f'rel. diff {err:.1e}'}", flush=True)


if __name__ == "__main__":
    main()
