"""The kernel_options keys every backend accepts, in a module with no heavy imports.

`flex_attention` checks the keys before dispatching (so a typo raises on the CPU path too,
which uses few of them), and the Triton backend checks their values.
"""
from __future__ import annotations

# kernel_options keys: ours, plus torch FlexAttention's names (mapped or accepted).
VALID_OPTIONS = {
    "BLOCK_M": "forward q tile (divides the BlockMask q block)",
    "BLOCK_N": "forward kv tile (divides the BlockMask kv block)",
    "num_warps": "forward warps per program", "num_stages": "forward pipeline depth",
    "bwd_BLOCK_M": "backward q tile", "bwd_BLOCK_N": "backward kv tile",
    "bwd_num_warps": "backward warps", "bwd_num_stages": "backward pipeline depth",
    "BLOCK_M1": "torch name: dk/dv kernel q tile", "BLOCK_N1": "torch name: dk/dv kernel kv tile",
    "BLOCK_M2": "torch name: dq kernel q tile", "BLOCK_N2": "torch name: dq kernel kv tile",
    "decode_BLOCK_N": "decode kv tile", "decode_num_warps": "decode warps",
    "decode_num_stages": "decode pipeline depth", "decode_SPLITS": "decode kv splits per (b, h)",
    "FORCE_DECODE": "True/False: force the split-KV decode kernel on/off (default: automatic)",
    "FORCE_USE_FLEX_ATTENTION": "torch name: True disables the decode kernel",
    "DETERMINISTIC": "True: bitwise-identical gradients run to run",
    "TIERED": "True (default): a new mask structure's first calls run through its tile-table form while its own kernels compile in the background",
    "ALLOW_TF32": "True: float32 inputs use tf32 matmuls on the GPU (default False: exact)",
    "BACKEND": "'triton' or 'cpu' (read by flex_attention's dispatch)",
    "AUTOTUNE": "True: time a few tile configs on the first call per shape bucket, keep the fastest (cached on disk)",
    "PRESCALE_QK": "accepted for torch compatibility (no effect)",
    "ROWS_GUARANTEED_SAFE": "accepted for torch compatibility (no effect)",
    "BLOCKS_ARE_CONTIGUOUS": "accepted for torch compatibility (no effect)",
    "OUTPUT_LOGSUMEXP": "accepted for torch compatibility (no effect)",
    "WRITE_DQ": "accepted for torch compatibility (no effect)",
}


def check_option_keys(kernel_options: dict) -> dict:
    """A copy of `kernel_options`; ValueError naming any key not in VALID_OPTIONS."""
    unknown = sorted(set(kernel_options) - set(VALID_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"kernel_options: unknown key(s) {unknown}; valid keys are "
                         f"{sorted(VALID_OPTIONS)}: check the spelling")
    return dict(kernel_options)
