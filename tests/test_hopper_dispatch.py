"""Which forward kernel a call gets (kernels.hopper_forward.use_hopper), decided from the
device's compute capability (as kernels.config.device_key names it) and the call alone:
testable without a GPU."""
from __future__ import annotations

import pytest
import torch

hf = pytest.importorskip("flexattn.kernels.hopper_forward")

SM90, SM80, SM100 = "sm90", "sm80", "sm100"
BLOCK = (128, 128)


def qkv(E=128, Ev=None, dtype=torch.bfloat16, L=256, S=256):
    q = torch.zeros(1, 2, L, E, dtype=dtype)
    k = torch.zeros(1, 2, S, E, dtype=dtype)
    v = torch.zeros(1, 2, S, Ev or E, dtype=dtype)
    return q, k, v


def test_auto_takes_hopper_on_sm90_only():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv()
    assert hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM80, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM100, q, k, v, BLOCK, 0.0, "auto")
    assert not hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "triton")


def test_auto_keeps_triton_where_it_measured_faster():
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv(E=64)
    assert not hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "auto")
    assert hf.use_hopper(SM90, q, k, v, BLOCK, 0.0, "hopper")  # forced: the kernel takes it


@pytest.mark.parametrize("why,args", [
    ("compute capability", dict(cap=SM80)),
    ("dtype", dict(dtype=torch.float32)),
    ("dropout", dict(dropout=0.1)),
    ("head dims", dict(E=256)),
    ("head dims", dict(E=100)),
    ("BLOCK_SIZE", dict(block=(64, 128))),
    ("strides", dict(transpose=True)),
])
def test_forced_hopper_names_why_it_cannot(why, args):
    if hf.gluon_missing():
        pytest.skip(hf.gluon_missing())
    q, k, v = qkv(E=args.get("E", 128), dtype=args.get("dtype", torch.bfloat16))
    if args.get("transpose"):  # last dim not contiguous
        q = torch.zeros(1, 2, 128, 256, dtype=torch.bfloat16).transpose(2, 3)
    with pytest.raises(ValueError, match=why):
        hf.use_hopper(args.get("cap", SM90), q, k, v, args.get("block", BLOCK), args.get("dropout", 0.0), "hopper")
    assert not hf.use_hopper(args.get("cap", SM90), q, k, v, args.get("block", BLOCK), args.get("dropout", 0.0),
                             "auto")
