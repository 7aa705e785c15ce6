"""The CPU path's dense and causal calls as whole rows per head (flexattn.cpu: one call of the
fused kernel per piece of (batch, kv head) pairs, its own causal form), against the float64
golden, and the exactness of choosing that form."""
from __future__ import annotations

import pytest
import torch

import flexattn.cpu as cpu
from conftest import make_qkv
from flexattn import create_block_mask, flex_attention
from test_attention_cpu import check_case
from test_cpu_batched import torch_threads


@pytest.fixture
def whole_calls(monkeypatch):
    calls = []
    for name in ("_whole_forward", "_whole_backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda run, causal, *args, _n=name, _r=real:
                            calls.append((_n, causal)) or _r(run, causal, *args))
    return calls


@pytest.mark.parametrize("case", [
    dict(name="none", B=1, Hq=2, L=97, S=130),
    dict(name="causal", B=1, Hq=2, L=97, S=130),                        # top-left, L < S
    dict(name="causal", B=2, Hq=4, Hkv=2, L=130, S=97, block=16),       # L > S, GQA, B > 1
    dict(name="causal", B=2, Hq=2, Hkv=1, L=129, S=129, dtype=torch.float64),   # pieces by batch
    dict(name="causal", B=1, Hq=4, L=300, S=300, dtype=torch.bfloat16, block=128),   # bf16 kernel on tall rows
    dict(name="none", B=1, Hq=2, L=64, S=64, dtype=torch.float16, make_noncontiguous=True),
])
def test_whole_rows_match_golden(case, whole_calls):
    with torch_threads(2):
        check_case(**case, lse_in_loss=False)
    causal = case["name"] == "causal"
    assert whole_calls == [("_whole_forward", causal), ("_whole_backward", causal)]


def _route(mask, L, S, B=1, H=2, block=16):
    q, k, v = make_qkv(B, H, H, L, S, 16, requires_grad=False)
    bm = create_block_mask(mask, None, None, L, S, BLOCK_SIZE=block)
    with torch_threads(2):
        out = flex_attention(q, k, v, block_mask=bm)
    plan = list(bm._flexattn_cpu_plans.values())[0][2]
    dense = torch.ones(L, S, dtype=torch.bool)
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(S).view(1, -1)
    dense = mask(0, 0, qi, ki) & dense
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~dense, float("-inf"))
    want = torch.softmax(s, -1).nan_to_num(0) @ v
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    return None if plan is None else plan.causal


@pytest.mark.parametrize("mask,L,S,want", [
    (lambda b, h, q, k: q >= k, 100, 100, True),
    (lambda b, h, q, k: q - k < 1000, 100, 100, False),            # every position, written as a window
    (lambda b, h, q, k: (q >= k) & (q - k < 1000), 100, 100, True),  # causal, written as a window
    (lambda b, h, q, k: q > k, 100, 100, None),                      # strict: the diagonal left out
    (lambda b, h, q, k: (q >= k) & (k != 5), 100, 100, None),       # a hole inside a full-looking block
    (lambda b, h, q, k: (q >= k) & (k != 90), 100, 100, None),      # a hole in a diagonal block
    (lambda b, h, q, k: q + 30 >= k, 70, 100, None),                 # bottom-right causal (L < S)
    (lambda b, h, q, k: q >= k, 100, 70, True),                      # rows past S attend every column
    (lambda b, h, q, k: (q >= k) & (q < 99), 100, 100, None),       # one fully masked row
])
def test_whole_rows_chosen_exactly(mask, L, S, want):
    assert _route(mask, L, S) == want


def test_whole_rows_need_pieces_for_every_thread():
    # one batch and one kv head cannot keep two threads busy: the batched forward instead
    assert _route(lambda b, h, q, k: q >= k, 100, 100, B=1, H=1) is None


def test_whole_rows_on_the_workers_in_a_forked_child(monkeypatch, whole_calls):
    # in a forked child the caller's OpenMP team may be a broken copy: the pieces go to the workers
    pieces = []
    real = cpu._over_q_tiles
    monkeypatch.setattr(cpu, "_over_q_tiles", lambda run, tiles, *a, **kw: pieces.append(len(tiles)) or
                        real(run, tiles, *a, **kw))
    monkeypatch.setattr(cpu, "_FORKED", True)
    with torch_threads(2):
        check_case("causal", B=1, Hq=4, L=129, S=129, lse_in_loss=False)
    assert len(pieces) == 2 and min(pieces) > 1
