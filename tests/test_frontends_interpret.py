"""The front ends through the generated Triton kernels (TRITON_INTERPRET=1, CPU tensors).

The front-end test files check each API's semantics against dense references on the CPU
path; this file checks that the same calls give the same answers through the kernels. Each
case runs three times: in float16 through the interpreted kernels ("got"), in float16 on the
CPU path ("ref") and in float32 on the CPU path ("golden"), and the numerics rule of DESIGN.md
applies to the output and every gradient: max|got - golden| <= 2 max|ref - golden| + eps.
(float64 is not a golden here: MindSpore's API takes no float64.) The run happens in a
subprocess because TRITON_INTERPRET must be set before Triton builds a kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _xformers_block_diagonal_causal(dtype):
    import torch
    from flexattn.frontends import xformers as xf
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 120, 2, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    bias = xf.BlockDiagonalCausalMask.from_seqlens([37, 60, 23])
    return xf.memory_efficient_attention(q, k, v, attn_bias=bias), [q, k, v]


def _xformers_tensor_bias(dtype):
    import torch
    from flexattn.frontends import xformers as xf
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 70, 2, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    tb = (0.5 * torch.randn(2, 2, 70, 70, generator=g)).to(dtype).requires_grad_()
    out = xf.memory_efficient_attention(q, k, v, attn_bias=xf.LowerTriangularMaskWithTensorBias(tb))
    return out, [q, k, v, tb]


def _mindspore_band_mask_shift(dtype):
    import torch
    from flexattn.frontends.mindspore import flash_attention_score
    g = torch.Generator().manual_seed(2)
    B, N, S, D = 2, 2, 90, 16
    q, k, v = (torch.randn(B, S, N * D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    discard = torch.rand(B, 1, S, S, generator=g) > 0.8
    shift = (0.3 * torch.randn(B, N, S, S, generator=g)).to(dtype).requires_grad_()
    out = flash_attention_score(q, k, v, N, real_shift=shift, attn_mask=discard, scalar_value=D ** -0.5,
                                pre_tokens=40, next_tokens=5, input_layout="BSH", sparse_mode=0)
    return out, [q, k, v, shift]


def _mindspore_tnd_causal(dtype):
    import torch
    from flexattn.frontends.mindspore import flash_attention_score
    g = torch.Generator().manual_seed(3)
    T, N, D = 100, 2, 16
    q, k, v = (torch.randn(T, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = flash_attention_score(q, k, v, N, actual_seq_qlen=[30, 75, 100], actual_seq_kvlen=[30, 75, 100],
                                scalar_value=D ** -0.5, input_layout="TND", sparse_mode=3)
    return out, [q, k, v]


def _nn_module_padding_and_bias(dtype):
    import torch
    from flexattn.nn import FlashAttention
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 80, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    keep = torch.rand(2, 80, generator=g) > 0.3
    keep[:, 0] = True
    bias = (0.5 * torch.randn(1, 2, 80, 80, generator=g)).to(dtype)
    out = FlashAttention(causal=True).eval()(q, k, v, mask=keep, attn_bias=bias)
    return out, [q, k, v]


CASES = {
    "xformers_block_diagonal_causal": _xformers_block_diagonal_causal,
    "xformers_tensor_bias": _xformers_tensor_bias,
    "mindspore_band_mask_shift": _mindspore_band_mask_shift,
    "mindspore_tnd_causal": _mindspore_tnd_causal,
    "nn_module_padding_and_bias": _nn_module_padding_and_bias,
}


def _run_case(name: str) -> None:
    import torch
    import flexattn.kernels as kernels
    from conftest import assert_close_to_golden

    launches = []
    original = kernels.flex_attention_triton

    def counted(*args, **kwargs):
        launches.append(1)
        return original(*args, **kwargs)
    kernels.flex_attention_triton = counted

    def run(dtype, backend):
        os.environ["FLEXATTN_BACKEND"] = backend
        out, inputs = CASES[name](dtype)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
        grads = torch.autograd.grad(out, inputs, go)
        return [out] + list(grads)

    got = run(torch.float16, "triton")
    assert launches, f"{name}: the front end never reached the Triton kernels"
    n_triton = len(launches)
    ref = run(torch.float16, "cpu")
    golden = run(torch.float32, "cpu")
    assert len(launches) == n_triton, f"{name}: the CPU runs went through the Triton kernels"
    labels = ["out"] + [f"grad{i}" for i in range(len(got) - 1)]
    for label, a, r, g in zip(labels, got, ref, golden):
        assert_close_to_golden(f"{name}: {label}", a, r, g)


def _main() -> None:
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    failures = []
    for name in CASES:
        try:
            _run_case(name)
        except Exception:  # report every case, not just the first failure
            failures.append(f"{name}:\n{traceback.format_exc()}")
    print(json.dumps(failures))


def test_front_ends_through_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    _main()
