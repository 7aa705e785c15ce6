"""What every launcher shares: the device class, the tile rules, and the launch arguments
common to the kernels.

The tile / warp / stage rules are written once, as tables keyed by `config_class` (the
device class and the padded head dim's bucket): the defaults here, the autotuner's other
candidates in `autotune.py`. The interpreter (TRITON_INTERPRET=1) is its own class with
small tiles, so the CPU tests stay fast.
"""
from __future__ import annotations

import functools

import torch

from ..dropout import dropout_threshold, signed32, split_seed
from .launcher import next_pow2

LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in the exp2 domain

# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, per config_class.
# sm90 measured on H100 (S=8K): D<=64 128x128/4/3 1.05x torch (8 warps 0.85x); D=128
# 128x128/8/3 492 TFLOP/s dense vs 457-463 for 128x64/8/3, 128x128/8/2, 128x64/8/4.
# 3 stages: with 2 the pipeliner issues the next K/V copy at the end of an iteration and
# waits on it at the start of the next (no overlap); 128x128x3 stages needs 224 KB of
# shared memory (the launch falls back if it lacks it: launcher.launch). D=256 measured on
# an H200 (S=8K, B=4, H=16, benchmarks/sweep_configs.py): 128x64/8/2 causal 513, dense 492,
# softcap 424 TFLOP/s against 382 / 380 / 317 for 64x64/4/2
DEFAULT_FWD = {
    ("interp", 0): (32, 32, 4, 1),
    ("fp32", 128): (64, 32, 4, 3), ("fp32", 256): (32, 32, 4, 2),
    ("sm90", 64): (128, 128, 4, 3), ("sm90", 128): (128, 128, 8, 3), ("sm90", 256): (128, 64, 8, 2),
    ("sm80", 64): (128, 64, 4, 3), ("sm80", 128): (128, 64, 8, 3), ("sm80", 256): (64, 32, 4, 2),
}
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) of the backward: tiles of
# the dk/dv kernel (q tile walked, kv tile owned) and of the dq kernel (q tile owned, kv tile
# walked). sm90 measured on H100 (S=8K, benchmarks/sweep_configs.py): D=128 best with the dq
# kernel owning 128 q rows and walking 64-wide kv tiles (64x128 for dq: 0.83x of it); D=64
# best with 64-square tiles and 4 warps (1.05-1.09x the 128-row dq config). D=256 measured on
# an H200 (S=8K, dk and dv in two launches, split_dkdv): fwd+bwd with 64x128 dk/dv tiles 263 /
# 253 / 218 TFLOP/s causal / dense / softcap, against 125 / 124 / 118 for 32x64 / 32x64 / 4
# warps in one launch (whose dk/dv kernel spills). 64x128 dk tiles need more shared memory
# than the GPU has at 2 stages (the launch fell back to 1 stage, which spills 176 B); 32x128
# fits both launches at 2 stages without spills (sm_90 ptxas: 242 / 223 registers); measured
# on the H200 it gives 268 / 232 TFLOP/s causal / softcap (64x128: 277 / 231), and 290 / 256
# with dq by atomics from the dk launch (atomic_dq, its default there). With those atomics the
# dk launch needs 278,784 B of shared memory at 2 stages (sm_90 ptxas, Triton 3.6), more than
# an H100 / H200 block may have (232,448): it runs at the 1 stage launcher.launch falls back to
# (no async copies, 112 B spilled). 32x64 tiles at 3 stages fit both launches pipelined without
# spills (214,016 / 132,096 B; 255 / 160 registers) but measured far slower on the H200 (causal /
# dense fwd+bwd 191 / 189 TFLOP/s against 296 / 270; 2 stages 170 / 158): 64-row kv tiles double
# the programs that walk each q tile, so the dq atomics and the q / dO reads double too. D=128
# tiles that fit two programs an SM (64x64, 4 warps, 2 stages: 99,328 B of shared memory) measured
# 0.96-1.00x the default on the H200 (causal / dense / document fwd+bwd 431 / 435 / 365 TFLOP/s
# against 438 / 450 / 365; logs/h200_2026-12-02_sweep_d128_bwd_two_programs.log)
DEFAULT_BWD = {
    ("interp", 0): (32, 32, 32, 32, 4, 1),
    ("fp32", 128): (32, 32, 32, 32, 4, 1), ("fp32", 256): (16, 16, 16, 16, 4, 1),
    ("sm90", 64): (64, 64, 64, 64, 4, 3), ("sm90", 128): (64, 128, 128, 64, 8, 3),
    ("sm90", 256): (32, 128, 64, 64, 8, 2),
    ("sm80", 64): (64, 64, 64, 64, 4, 2), ("sm80", 128): (64, 64, 64, 64, 4, 2),
    ("sm80", 256): (32, 32, 32, 32, 4, 1),
}


def pad_dim(n: int) -> int:
    """A head dim (or row count) padded to the power of two >= 16 the kernels' tiles take."""
    return max(16, next_pow2(n))


def device_key(device: torch.device) -> str:
    """"interp" off CUDA (the interpreter), else the GPU's "sm<major><minor>"."""
    if device.type != "cuda":
        return "interp"
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_key(index: int) -> str:  # asked on every call: the capability query is not free
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def config_class(device, dtype, d: int, dv: int) -> tuple[str, int]:
    """The key of the config tables: ("interp", 0), ("fp32", 128 | 256), or ("sm90" | "sm80",
    64 | 128 | 256) by the padded head dims. "sm90" is Hopper and newer (the class the
    defaults were measured on), "sm80" everything older; float32 has its own small tiles
    (twice the shared memory per element)."""
    dk = device_key(device)
    if dk == "interp":
        return "interp", 0
    dmax = max(pad_dim(d), pad_dim(dv))
    if dtype == torch.float32:
        return "fp32", 128 if dmax <= 128 else 256
    arch = "sm90" if dk.startswith("sm9") or dk.startswith("sm1") else "sm80"
    return arch, 64 if dmax <= 64 else 128 if dmax <= 128 else 256


def default_fwd_config(device, dtype, d: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward."""
    return DEFAULT_FWD[config_class(device, dtype, d, dv)]


def default_bwd_config(device, dtype, d: int, dv: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) for the backward."""
    return DEFAULT_BWD[config_class(device, dtype, d, dv)]


def split_dkdv(device, d: int, dv: int) -> bool:
    """Whether the backward's dk/dv kernel runs as two launches, dk then dv, each program
    holding one accumulator (it recomputes P = softmax(QK^T) in both): on the GPU for head
    dims over 128, where one program holding both spills (D=256, 64 kv rows x 8 warps: 255
    registers and ~500 B spilled per thread, sm_90 ptxas)."""
    return device_key(device) != "interp" and max(pad_dim(d), pad_dim(dv)) > 128


def atomic_dq(device, d: int, dv: int) -> bool:
    """Whether the backward takes dq from the dk/dv kernel by float32 atomics (see
    backward.use_atomic_dq) by default: on the GPU for head dims over 128, where dk and dv
    are split (each tile's P was computed three times, now twice). Measured on an H200
    (B=4, H=16, S=8K, bf16, fwd+bwd TFLOP/s, benchmarks/sweep_configs.py): D=256 causal 290
    vs 268, softcap 256 vs 232; D=128 no gain (causal 419 vs 425, softcap 319 vs 317, dense
    419 vs 434: the atomics cost what the dq kernel's recompute did); D=64 causal 323 vs 366
    but softcap 264 vs 228."""
    return device_key(device) != "interp" and max(pad_dim(d), pad_dim(dv)) > 128


def take_option(opts: dict, key: str, default: bool, why_not, cannot: str, strict: bool = True) -> bool:
    """Whether a call takes the kernel form that the flag kernel_options[key] names: False where the
    flag is False, or left out while `default` is False; otherwise where why_not() (the reason the
    call cannot take it, or None) is None. A flag set True where the call cannot is a ValueError
    naming the reason (strict=False: False, for a caller that only plans ahead); the default falls
    back silently. `cannot`: what the call cannot do, for the error."""
    asked = opts.get(key)
    if asked is False or (asked is None and not default):
        return False
    why = why_not()
    if why and asked and strict:
        raise ValueError(f"kernel_options['{key}'] = True: this backward cannot {cannot}: {why}; drop {key}")
    return why is None


# Whether the backward kernels read the tiles they walk by TMA where kernel_options leave "bwd_TMA"
# out (where tma_loads allows it). Measured on an H200 (B=4, H=16, S=8K, bf16, fwd+bwd, the two forms
# alternating in one process, benchmarks/ab_options.py; results bitwise equal): D=128 1.00-1.03x (causal
# +2.7%, prefix-LM +2.6%, document, dense, sliding window, ALiBi within +-1%), D=64 1.01-1.05x, D=256
# 0.97x. The whole GPU suite ran with it on (and HOPPER_BWD_DEFAULT): no failure of its own.
TMA_LOADS_DEFAULT = True


def tma_loads(d: int, dv: int) -> bool:
    """Whether the backward reads its walked tiles by TMA where the call allows it (backward.use_tma_loads)
    and kernel_options leave "bwd_TMA" out: TMA_LOADS_DEFAULT, at head dims up to 128 (at 256, where dq
    comes by atomics, it measured slower)."""
    return TMA_LOADS_DEFAULT and max(pad_dim(d), pad_dim(dv)) <= 128


# Whether the backward runs the Hopper kernel (kernels.hopper_backward: dk, dv and dq in one
# warp-specialised program) where kernel_options leave "bwd_HOPPER" out and the call allows it (head dims
# up to 256). Measured on an H200 against the Triton kernels on the seven PEERS cases (B=4, H=16, S=8K,
# bf16, fwd+bwd, the two alternating in one process, benchmarks/ab_options.py): D=64 1.02-1.14x (ALiBi
# 0.99), D=128 0.99-1.10x (ALiBi 0.99), D=256 1.16-1.41x. Its dq is summed by float atomics: not bitwise
# reproducible run to run (DETERMINISTIC keeps the Triton kernels).
HOPPER_BWD_DEFAULT = True


def hopper_backward(d: int, dv: int) -> bool:
    """Whether the backward runs the Hopper kernel where the call allows it
    (hopper_backward.use_hopper_backward) and kernel_options leave "bwd_HOPPER" out:
    HOPPER_BWD_DEFAULT, at every head dim the kernel takes (up to 256)."""
    return HOPPER_BWD_DEFAULT and max(pad_dim(d), pad_dim(dv)) <= 256


def fit_tile(tile: int, block: int, length: int) -> int:
    """Largest power-of-two tile <= the requested one (and the padded length) that divides
    the BlockMask block."""
    tile = min(tile, block, max(16, next_pow2(length)))
    while block % tile:
        tile //= 2
    return max(tile, 16)


def dot_precision(dtype, opts) -> str:
    """"ieee" for float32 unless kernel_options ALLOW_TF32, else "tf32"."""
    if dtype == torch.float32 and not opts.get("ALLOW_TF32", False):
        return "ieee"
    return "tf32"


def needs_i64(*ts) -> bool:
    """True when an offset inside one (batch, head) slice of a [B, H, S, D] tensor can pass
    2^31 elements (then the kernels do their in-head address math in int64)."""
    for t in ts:
        if sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:])) >= 2 ** 31 - 1:
            return True
    return False


def dropout_args(plan) -> tuple:
    """(1 / (1 - p), seed_lo, seed_hi, threshold) as the kernels take them (see flexattn.dropout)."""
    if plan.dropout_p <= 0.0:
        return 1.0, 0, 0, 0
    lo, hi = split_seed(plan.dropout_seed)
    return 1.0 / (1.0 - plan.dropout_p), signed32(lo), signed32(hi), signed32(dropout_threshold(plan.dropout_p))
