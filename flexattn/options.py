"""kernel_options: the keys every backend accepts, the values the Triton kernels take, and
the backend choice - in a module with no heavy imports (no Triton).

`flex_attention` (eager and compiled) checks the keys before dispatching (so a typo raises
on the CPU path too, which uses few of them) and picks the backend (`choose_backend`); the
Triton backend checks their values (`check_kernel_options`).
"""
from __future__ import annotations

import os

import torch

# kernel_options keys: ours, plus torch FlexAttention's names (mapped or accepted).
VALID_OPTIONS = {
    "BLOCK_M": "forward q tile (divides the BlockMask q block)",
    "BLOCK_N": "forward kv tile (divides the BlockMask kv block)",
    "num_warps": "forward warps per program", "num_stages": "forward pipeline depth",
    "bwd_BLOCK_M": "backward q tile", "bwd_BLOCK_N": "backward kv tile",
    "bwd_num_warps": "backward warps", "bwd_num_stages": "backward pipeline depth",
    "bwd_SPLIT_DKDV": "True/False: the backward computes dk and dv in two launches, one accumulator "
                      "each (default: True on the GPU for head dims over 128)",
    "bwd_HOPPER": "True/False: the backward's dk, dv and dq (by float32 atomics) run the Hopper (Gluon) "
                  "kernel, sm90 (an error naming why if the call cannot take it; default: see "
                  "flexattn.kernels.config.HOPPER_BWD_DEFAULT)",
    "fwd_PINGPONG": "True: the Hopper forward runs its two consumer warpgroups as two partitions that take "
                    "turns on the tensor cores (default: True; False: the two in one partition, see "
                    "flexattn.kernels.hopper_forward.PINGPONG_DEFAULT)",
    "fwd_PERSISTENT": "True: the Hopper forward's ping-pong form runs one program an SM, taking row blocks from "
                      "a counter (default: flexattn.kernels.hopper_forward.persistent_default)",
    "bwd_ATOMIC_DQ": "True/False: the dk/dv kernel also computes dq, adding each tile's share by float32 "
                     "atomics, instead of a dq kernel recomputing every tile (default: see "
                     "flexattn.kernels.config.atomic_dq; never with DETERMINISTIC)",
    "bwd_TMA": "True/False: the backward kernels read the tiles they walk (dq: K, V; dk/dv: Q, dO) by TMA "
               "on sm90 (an error naming why if the call cannot take it; default: see "
               "flexattn.kernels.config.TMA_LOADS_DEFAULT)",
    "BLOCK_M1": "torch name: dk/dv kernel q tile", "BLOCK_N1": "torch name: dk/dv kernel kv tile",
    "BLOCK_M2": "torch name: dq kernel q tile", "BLOCK_N2": "torch name: dq kernel kv tile",
    "decode_BLOCK_N": "decode kv tile", "decode_num_warps": "decode warps",
    "decode_num_stages": "decode pipeline depth", "decode_SPLITS": "decode kv splits per (b, h)",
    "FORCE_DECODE": "True/False: force the split-KV decode kernel on/off (default: automatic)",
    "FORCE_USE_FLEX_ATTENTION": "torch name: True disables the decode kernel",
    "DETERMINISTIC": "True: bitwise-identical gradients run to run (default: "
                     "torch.are_deterministic_algorithms_enabled())",
    "TIERED": "True (default): a new mask structure's first calls run through its tile-table form while its own "
              "kernels compile in the background",
    "ALLOW_TF32": "True: float32 inputs use tf32 matmuls on the GPU (default False: exact)",
    "BACKEND": "'auto', 'cpu', 'triton' (the Triton kernels only) or 'hopper' (the Hopper forward, "
               "sm90: an error naming why if the call cannot take it); torch's 'AUTO', 'TRITON', 'FLASH' "
               "('auto') and 'TRITON_DECODE' ('triton' with FORCE_DECODE) too",
    "AUTOTUNE": "True: time a few tile configs on the first call per shape bucket, keep the fastest (cached on disk)",
    "PRESCALE_QK": "accepted for torch compatibility (no effect)",
    "ROWS_GUARANTEED_SAFE": "accepted for torch compatibility (no effect)",
    "BLOCKS_ARE_CONTIGUOUS": "accepted for torch compatibility (no effect)",
    "OUTPUT_LOGSUMEXP": "accepted for torch compatibility (no effect)",
    "WRITE_DQ": "accepted for torch compatibility (no effect)",
    "USE_TMA": "accepted for torch compatibility (no effect: the Hopper forward uses TMA where it runs)",
    "kpack": "accepted for torch compatibility (AMD only: no effect)",
    "matrix_instr_nonkdim": "accepted for torch compatibility (AMD only: no effect)",
    "waves_per_eu": "accepted for torch compatibility (AMD only: no effect)",
}

# torch FlexAttention's names (FlexKernelOptions) for flexattn's, rewritten by from_torch_names.
# BACKEND: "FLASH" (torch's FlashAttention-4 kernels) is flexattn's fastest choice, "auto";
# "TRITON_DECODE" is the Triton kernels with the decode kernel forced for short queries.
TORCH_BACKENDS = {"AUTO": "auto", "TRITON": "triton", "FLASH": "auto", "TRITON_DECODE": "triton"}
# torch's fwd_ / bwd_ prefixed keys: the forward's tiles are flexattn's unprefixed ones, the
# backward's BLOCK_M1/N1/M2/N2 too
TORCH_PREFIXED = {"fwd_num_warps": "num_warps", "fwd_num_stages": "num_stages", "fwd_BLOCK_M": "BLOCK_M",
                  "fwd_BLOCK_N": "BLOCK_N", "bwd_BLOCK_M1": "BLOCK_M1", "bwd_BLOCK_N1": "BLOCK_N1",
                  "bwd_BLOCK_M2": "BLOCK_M2", "bwd_BLOCK_N2": "BLOCK_N2"}


def from_torch_names(kernel_options: dict) -> dict:
    """A copy of `kernel_options` with torch FlexAttention's key names and BACKEND values
    rewritten to flexattn's (TORCH_PREFIXED, TORCH_BACKENDS); ValueError when a prefixed key
    and flexattn's own name for it disagree."""
    opts = dict(kernel_options)
    for theirs, ours in TORCH_PREFIXED.items():
        if theirs in opts:
            value = opts.pop(theirs)
            if ours in opts and opts[ours] != value:
                raise ValueError(f"kernel_options[{theirs!r}] = {value!r} and kernel_options[{ours!r}] = "
                                 f"{opts[ours]!r} name the same setting; give one of them")
            opts[ours] = value
    backend = opts.get("BACKEND")
    if isinstance(backend, str) and backend in TORCH_BACKENDS:
        opts["BACKEND"] = TORCH_BACKENDS[backend]
        if backend == "TRITON_DECODE":
            opts.setdefault("FORCE_DECODE", True)
    return opts


def check_option_keys(kernel_options: dict) -> dict:
    """A copy of `kernel_options` in flexattn's names (from_torch_names); ValueError naming any
    key not in VALID_OPTIONS."""
    opts = from_torch_names(kernel_options)
    unknown = sorted(set(opts) - set(VALID_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"kernel_options: unknown key(s) {unknown}; valid keys are "
                         f"{sorted(VALID_OPTIONS)} and torch's {sorted(TORCH_PREFIXED)}: check the spelling")
    return opts


BACKENDS = ("auto", "cpu", "triton", "hopper")

_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "bwd_BLOCK_M", "bwd_BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
              "decode_BLOCK_N")
_WARP_KEYS = ("num_warps", "bwd_num_warps", "decode_num_warps")
_STAGE_KEYS = ("num_stages", "bwd_num_stages", "decode_num_stages")
_FLAG_KEYS = ("AUTOTUNE", "TIERED", "bwd_SPLIT_DKDV", "bwd_ATOMIC_DQ", "bwd_HOPPER", "bwd_TMA", "fwd_PINGPONG",
              "fwd_PERSISTENT")


def check_kernel_options(kernel_options) -> dict:
    """A copy of `kernel_options` whose keys are known and whose values the Triton kernels take."""
    opts = check_option_keys(kernel_options or {})
    for key in _TILE_KEYS:
        if key in opts:
            v = opts[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
                raise ValueError(f"kernel_options[{key!r}] must be a power of two >= 16, got {v!r}")
    for key in _WARP_KEYS:
        if key in opts and opts[key] not in (1, 2, 4, 8, 16):
            raise ValueError(f"kernel_options[{key!r}] must be one of 1, 2, 4, 8, 16, got {opts[key]!r}")
    for key in _STAGE_KEYS:
        if key in opts and (not isinstance(opts[key], int) or not 1 <= opts[key] <= 6):
            raise ValueError(f"kernel_options[{key!r}] must be an int in 1..6, got {opts[key]!r}")
    for key in _FLAG_KEYS:
        if key in opts and not isinstance(opts[key], bool):
            raise ValueError(f"kernel_options[{key!r}] must be True or False, got {opts[key]!r}")
    return opts


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"cpu" or "triton" (the GPU kernels) for kernel_options["BACKEND"] (already checked to be
    in BACKENDS). "auto" picks the GPU kernels for CUDA tensors; for others the environment
    variable FLEXATTN_BACKEND ("cpu" by default; "triton" sends CPU tensors through the
    kernels under TRITON_INTERPRET=1, as the front ends' tests do), except float64, which only
    the CPU path takes. "triton" and "hopper" are the GPU kernels; which forward kernel runs
    there is the kernels' choice (flexattn.kernels.hopper_forward.use_hopper)."""
    if backend == "hopper":
        if device.type != "cuda":
            raise ValueError(f"kernel_options['BACKEND'] = 'hopper' needs CUDA tensors on an sm90 GPU, but query is "
                             f"on {device}; use BACKEND='auto'")
        return "triton"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"kernel_options['BACKEND'] = 'triton' runs the GPU kernels, which need CUDA tensors, but "
                         f"query is on {device}; use BACKEND='cpu' or 'auto' for {device} tensors (or set "
                         f"TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter)")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    env = os.environ.get("FLEXATTN_BACKEND", "cpu")
    if env not in ("cpu", "triton"):
        raise ValueError(f"environment variable FLEXATTN_BACKEND must be 'cpu' or 'triton', got {env!r}")
    return "cpu" if dtype == torch.float64 else env
