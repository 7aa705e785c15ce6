"""flexattn.serving's kernels on a CUDA GPU (marker gpu): the checks of
test_serving_kernels.py on CUDA tensors, in float16 / bfloat16 and at larger sizes."""
from __future__ import annotations

import pytest
import torch

from test_serving_kernels import (ZOO, check_cache_interleaved, check_packed_queries, check_paged_equals_contiguous,
                                  check_splits_and_tiles, check_tree, check_zoo)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_paged_equals_contiguous_gpu(dtype):
    shapes = [dict(B=5, Hq=32, Hkv=8, E=128, lens=[4100, 1, 1000, 2049, 333], L=1),
              dict(B=3, Hq=8, Hkv=2, E=64, lens=[3000, 700, 1025], L=7),
              dict(B=2, Hq=16, Hkv=4, E=128, lens=[5000, 2100], L=2048, mask=True)]
    assert not check_paged_equals_contiguous("cuda", dtype, shapes=shapes)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_splits_and_tiles_gpu(dtype):
    assert not check_splits_and_tiles("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
def test_zoo_gpu(dtype):
    assert not check_zoo("cuda", dtype, ZOO)


def test_tree_gpu():
    assert not check_tree("cuda", torch.float16)


def test_cache_interleaved_gpu():
    assert not check_cache_interleaved("cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_packed_queries_gpu(dtype):
    assert not check_packed_queries("cuda", dtype, Hq=32, Hkv=8, E=128, lens=(4100, 1, 1000, 2049, 333),
                                    query_lens=(1, 1, 7, 2049, 300), page_size=128)
