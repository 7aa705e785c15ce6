"""The CPU path needs no Triton: with `import triton` made to fail, `import flexattn`,
create_block_mask and flex_attention (forward and backward, with dropout) on CPU tensors
work, and no triton module is ever loaded by flexattn. (torch is imported first: a CUDA
build of torch may import Triton itself when it starts; its triton modules are then dropped
from sys.modules, so that an import of triton by flexattn meets the block.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent('''
    import importlib.abc
    import sys


    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"blocked: {name}")
            return None


    import torch
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, NoTriton())
    import flexattn
    from flexattn import create_block_mask, flex_attention
    from flexattn.reference import reference_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    slopes = torch.linspace(0.1, 1.0, 2, dtype=torch.float64).requires_grad_()

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = create_block_mask(causal, None, None, 40, 40, BLOCK_SIZE=16)
    out = flex_attention(q, k, v, score_mod=alibi, block_mask=bm)
    out.sum().backward()
    ref = reference_attention(q.detach(), k.detach(), v.detach(), alibi, causal)[0]
    assert torch.allclose(out, ref, atol=1e-10), (out - ref).abs().max()
    assert q.grad is not None and k.grad is not None and v.grad is not None and slopes.grad is not None
    flex_attention(q.float(), k.float(), v.float(), dropout_p=0.5, dropout_seed=3).sum().backward()
    loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
    assert not loaded, loaded
    print("OK")
''')


def test_cpu_path_runs_without_triton():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FLEXATTN_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
