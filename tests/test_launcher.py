"""The cached launcher's key (flexattn.kernels.launcher.spec_features) refines Triton's own
launch specialisation: two argument lists with equal features must get equal Triton
specialisations, or a cached binary could be launched for arguments it was not built for."""
from __future__ import annotations

import itertools

import pytest
import torch

from flexattn.kernels import launcher
from flexattn.kernels.launcher import spec_features, triton_features


def _values():
    base = torch.empty(64, dtype=torch.float32)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, -2 ** 31,
            -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 16, -2 ** 63, 2 ** 64 - 1]
    tensors = [base, base[1:], base[4:], base.to(torch.bfloat16), base.to(torch.bfloat16)[8:],
               base.to(torch.bfloat16)[1:], torch.empty(8, dtype=torch.int32), torch.empty(8, dtype=torch.int64)[1:]]
    return ints + [0.0, 1.0, 2.5, -3.0, True, False, None] + tensors


def test_equal_features_mean_equal_triton_specialisation():
    values = _values()
    for a, b in itertools.product(values, repeat=2):
        if spec_features((a,)) == spec_features((b,)):
            assert triton_features((a,)) == triton_features((b,)), (a, b)


def test_features_separate_what_triton_separates():
    # the refinement is not vacuous: distinct Triton classes get distinct features
    values = _values()
    classes = {}
    for a in values:
        classes.setdefault(repr(triton_features((a,))), set()).add(spec_features((a,)))
    seen = set()
    for feats in classes.values():
        assert not (feats & seen)
        seen |= feats
    assert len(classes) >= 10


def test_launches_state_fp_fusion():
    # every launch (and so every background compile of a recorded one) asks for fused
    # multiply-adds itself: Triton 3.10 turns them off by default; a caller's choice stays
    with launcher.recording() as rec:
        launcher.launch_cached("kernel", (1,), (), {"BLOCK": 16})
        launcher.launch_cached("kernel", (1,), (), {"BLOCK": 16, "enable_fp_fusion": False})
    assert [kw for *_, kw in rec] == [{"BLOCK": 16, "enable_fp_fusion": True},
                                               {"BLOCK": 16, "enable_fp_fusion": False}]



def test_a_shrunk_launch_remakes_its_tile_dependent_arguments(monkeypatch):
    # arguments given as a function of the kwargs (TMA descriptors, whose boxes are the tiles)
    # are made again for the fewer stages, then the smaller tile, a launch falls back to
    from triton.runtime.errors import OutOfResources
    tried = []

    def launch_cached(kernel, grid, args, kwargs):
        tried.append(args)
        if kwargs["BLOCK_M"] > 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
    monkeypatch.setattr(launcher, "launch_cached", launch_cached)
    monkeypatch.setattr(launcher, "SHRUNK", {})
    launcher.launch("kernel", (1,), lambda kw: ("box", kw["BLOCK_M"], kw["num_stages"]),
                    {"BLOCK_M": 64, "num_stages": 2}, key="k", shrink="BLOCK_M")
    assert tried == [("box", 64, 2), ("box", 64, 1), ("box", 32, 1)]
    assert launcher.SHRUNK["k"] == {"num_stages": 1, "BLOCK_M": 32}


def test_a_launch_with_stages_only_gives_up_at_one_stage(monkeypatch):
    # a kernel with no tile to shrink (shrink=None) and its own name for the stage count (the Hopper
    # backward's STAGES): one stage fewer, then the error itself
    from triton.runtime.errors import OutOfResources
    tried = []

    def launch_cached(kernel, grid, args, kwargs):
        tried.append(kwargs["STAGES"])
        if kwargs["STAGES"] > 1 or kwargs.get("need") == "more":
            raise OutOfResources(300_000, 232_448, "shared memory")
    monkeypatch.setattr(launcher, "launch_cached", launch_cached)
    monkeypatch.setattr(launcher, "SHRUNK", {})
    launcher.launch("kernel", (1,), (), {"BLOCK_N": 64, "STAGES": 2}, key="k", shrink=None)
    assert tried == [2, 1] and launcher.SHRUNK["k"] == {"STAGES": 1}
    launcher.launch("kernel", (1,), (), {"BLOCK_N": 64, "STAGES": 2}, key="k", shrink=None)
    assert tried == [2, 1, 1]  # remembered: the next launch starts at one stage
    with pytest.raises(OutOfResources):
        launcher.launch("kernel", (1,), (), {"BLOCK_N": 64, "STAGES": 2, "need": "more"}, key="k2", shrink=None)
