"""Counter-based dropout RNG: a hash of (seed, b, hq, q_idx, kv_idx), never a stored mask.

Every attention probability P[b, hq, q, kv] is kept or dropped by a pure function of its
coordinates, so the forward, the backward (which replays it) and the CPU and Triton paths
all see the same pattern without storing it. The hash is implemented twice, bit for bit:

* `dropout_hash` - torch, vectorised, int64 tensors holding values in [0, 2**32);
  products are split into 16-bit halves so nothing ever overflows int64;
* `dropout_hash_triton` - a `@triton.jit` function in uint32 arithmetic (wrapping), for
  the kernels to call on their tiles (flexattn.dropout_triton, loaded on first access).

The hash (all arithmetic mod 2**32; `mix` is a 32-bit avalanche finaliser, bijective):

    x = mix(seed_hi ^ 0x9E3779B9)
    x = mix(x ^ seed_lo); x = mix(x ^ b); x = mix(x ^ hq); x = mix(x ^ q_idx)   # per row
    hash = mix(x ^ (kv_idx * 0x9E3779B9))                                         # per element

The rule: with `threshold = floor(p * 2**32)` (`dropout_threshold(p)`), an element is
**kept iff hash >= threshold**, so it is dropped with probability threshold / 2**32 ~ p;
kept probabilities are multiplied by 1 / (1 - p). p == 0 keeps everything.
`seed` is a Python int; its low 64 bits are used (seed_lo = bits 0-31, seed_hi = 32-63).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def split_seed(seed: int) -> tuple[int, int]:
    """(seed_lo, seed_hi), each in [0, 2**32), from the low 64 bits of `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed must be a Python int, got {type(seed).__name__}; "
                        f"pass e.g. dropout_seed=1234, or leave it None to draw one from the generator")
    seed &= (1 << 64) - 1
    return seed & MASK32, seed >> 32


def signed32(x: int) -> int:
    """A value in [0, 2**32) as the int32 with the same bits (to pass as a kernel argument)."""
    return x - (1 << 32) if x >= (1 << 31) else x


def dropout_threshold(p: float) -> int:
    """floor(p * 2**32): elements whose hash is below it are dropped. Exact in float64."""
    return int(float(p) * 4294967296.0)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """The seed flex_attention draws when dropout_seed is None: from `generator`, or torch's
    default CPU generator, so torch.manual_seed(...) makes runs reproducible. Call it after
    the same torch.manual_seed to learn the seed a run used."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


# ---- torch -----------------------------------------------------------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) (int64), without int64 overflow."""
    lo = (x & 0xFFFF) * c                      # < 2**48
    hi = (((x >> 16) * c) & 0xFFFF) << 16      # only the low 16 bits of the high product survive
    return (lo + hi) & MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def dropout_hash(seed: int, b, hq, q_idx, kv_idx) -> torch.Tensor:
    """The 32-bit hash (as int64 in [0, 2**32)) for broadcastable integer tensors."""
    lo, hi = split_seed(seed)
    t = lambda v: torch.as_tensor(v).to(torch.int64) & MASK32  # noqa: E731  (two's complement bits)
    dev = next((v.device for v in (b, hq, q_idx, kv_idx) if isinstance(v, torch.Tensor)), None)
    x = _mix(torch.tensor(hi ^ GOLDEN, dtype=torch.int64, device=dev))
    x = _mix(x ^ lo)
    x = _mix(x ^ t(b))
    x = _mix(x ^ t(hq))
    x = _mix(x ^ t(q_idx))
    return _mix(x ^ _mul32(t(kv_idx), GOLDEN))


def dropout_keep(seed: int, p: float, b, hq, q_idx, kv_idx) -> torch.Tensor:
    """Bool keep pattern for broadcastable index tensors (True = kept)."""
    if p == 0.0:
        shape = torch.broadcast_shapes(*[torch.as_tensor(v).shape for v in (b, hq, q_idx, kv_idx)])
        return torch.ones(shape, dtype=torch.bool, device=torch.as_tensor(q_idx).device)
    return dropout_hash(seed, b, hq, q_idx, kv_idx) >= dropout_threshold(p)


def dropout_mask(seed: int, B: int, H: int, L: int, S: int, p: float, device="cpu") -> torch.Tensor:
    """The keep pattern (bool [B, H, L, S], True = kept) that flex_attention(..., dropout_p=p,
    dropout_seed=seed) used, H counting query heads. Pass it to the reference as dropout_keep."""
    ar = lambda n: torch.arange(n, dtype=torch.int32, device=device)  # noqa: E731
    return dropout_keep(seed, p, ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1),
                        ar(L).view(1, 1, L, 1), ar(S).view(1, 1, 1, S))


# ---- Triton ----------------------------------------------------------------------------
# The @triton.jit twins (dropout_hash_triton, dropout_keep_triton) live in
# flexattn.dropout_triton and are read from here by the kernels (`from flexattn.dropout
# import dropout_keep_triton`); loaded on first access, so the CPU path never imports Triton.

_TRITON_NAMES = ("dropout_hash_triton", "dropout_keep_triton")


def __getattr__(name):
    if name in _TRITON_NAMES:
        from . import dropout_triton
        return getattr(dropout_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
