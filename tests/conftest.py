"""Shared test helpers: the numerics rule, input builders, the `gpu` marker, and a
temporary kernel cache for the whole session (FLEXATTN_CACHE_DIR).

Import helpers in a test file with `from conftest import assert_close_to_golden, make_qkv`
(pytest puts tests/ on sys.path), and the mods with `from mods_zoo import make_mod`.

The numerics rule (FlashAttention's; DESIGN.md "Testing"):
    golden = reference in float64 (float64 inputs and float64 captured tensors)
    ref    = the same reference in the test dtype
    assert max|got - golden| <= 2 * max|ref - golden| + eps
`eps` covers the cases where ref happens to be (nearly) exact, e.g. float64 runs where
ref == golden bit for bit while a tiled computation legitimately rounds differently:
    eps = EPS[dtype] * max(1, max|golden|)
with EPS = {float64: 1e-12, float32: 1e-6, float16: 1e-4, bfloat16: 1e-3}, i.e. a few
units of the dtype's rounding at the golden's scale - far below any real bug.
Infinite golden entries (lse of fully masked rows, -inf) must be matched exactly; NaN in
`got` always fails.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so test files can import mods_zoo / conftest

EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close_to_golden(name: str, got: torch.Tensor, ref: torch.Tensor, golden: torch.Tensor,
                           eps: float | None = None) -> None:
    """Assert the numerics rule for one tensor (see the module docstring).

    `name` labels the failure message (e.g. "out", "dq", "grad bias_table"); `ref` is the
    reference computed in the test dtype; `golden` the float64 reference. The eps dtype is
    `ref`'s dtype unless `eps` is given.
    """
    assert got is not None, f"{name}: got None (no gradient computed?)"
    assert got.shape == golden.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(golden.shape)}"
    g64, r64, x64 = golden.detach().double(), ref.detach().double(), got.detach().double().cpu()
    g64, r64 = g64.cpu(), r64.cpu()
    assert not torch.isnan(x64).any(), f"{name}: {int(torch.isnan(x64).sum())} NaN entries"
    # a NaN golden compares false with everything, so every bound below would pass
    assert not torch.isnan(g64).any(), f"{name}: the float64 golden has {int(torch.isnan(g64).sum())} NaN " \
                                       "entries: the test's inputs or its reference are broken"
    inf = torch.isinf(g64)
    if inf.any():
        bad = (x64[inf] != g64[inf]).sum()
        assert bad == 0, f"{name}: {int(bad)} entries should be {g64[inf].unique().tolist()} (golden) but are not"
    assert not torch.isinf(x64[~inf]).any(), f"{name}: infinite entries where the golden is finite"
    finite = ~inf
    err = (x64[finite] - g64[finite]).abs().max().item() if finite.any() else 0.0
    ref_err = (r64[finite] - g64[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, g64[finite].abs().max().item() if finite.any() else 1.0)
    eps = EPS[ref.dtype] * scale if eps is None else eps
    bound = 2 * ref_err + eps
    if err > bound:
        diff = (x64 - g64).abs().masked_fill(inf, 0)
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max|got - golden| = {err:.3e} > 2 * max|ref - golden| + eps = "
            f"2 * {ref_err:.3e} + {eps:.1e} = {bound:.3e} (ref dtype {ref.dtype}); worst at index {where}: "
            f"got {x64[where].item():.6g}, golden {g64[where].item():.6g}, ref {r64[where].item():.6g}")


def make_qkv(B=2, Hq=4, Hkv=None, L=64, S=None, E=32, Ev=None, dtype=torch.float32, device="cpu",
             requires_grad=True, seed=0, scale=1.0):
    """Random q [B,Hq,L,E], k [B,Hkv,S,E], v [B,Hkv,S,Ev] (drawn in float64, then cast, so the
    float64 golden's inputs are exactly `t.double()` of these)."""
    Hkv, S, Ev = Hkv or Hq, S or L, Ev or E
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)]:
        t = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
        out.append(t.requires_grad_(requires_grad))
    return tuple(out)


def grads_of(outputs, inputs, grad_outputs):
    """torch.autograd.grad that tolerates inputs that do not get a gradient (returns zeros)."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.fixture(scope="session", autouse=True)
def temporary_kernel_cache(tmp_path_factory):
    """Generated kernels and autotune results go to a session tmp directory (inherited by
    the subprocesses tests start), never into the user's cache."""
    d = tmp_path_factory.mktemp("flexattn_cache")
    previous = os.environ.get("FLEXATTN_CACHE_DIR")
    os.environ["FLEXATTN_CACHE_DIR"] = str(d)
    yield d
    if previous is None:
        os.environ.pop("FLEXATTN_CACHE_DIR", None)
    else:
        os.environ["FLEXATTN_CACHE_DIR"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker); none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
