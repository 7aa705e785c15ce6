"""flexattn.distributed on GPUs over NCCL (marker `gpu`; skipped without CUDA): one spawned
world of min(4, GPU count) ranks, one GPU each, runs the generated kernels on the local
calls; out, lse, dq, dk, dv and captured gradients against the float64 reference under the
numerics rule (bfloat16 inputs), in each overlap mode ("ring": one step per source rank, which
needs 3 or more GPUs to take more than one step; "own_first"; "off").

    python -m pytest -q tests/test_distributed_gpu.py        # on a machine with 1 or more GPUs
"""
from __future__ import annotations

import datetime
import json
import os
import traceback

import pytest
import torch

from test_distributed import DEADLINE_S, Case, _attention_check, run_world

pytestmark = pytest.mark.gpu

CASES = [Case("causal", "head_tail", "alibi", N=1000, device="cuda", dtype="bfloat16"),
         Case("document", "mask", "softcap", N=600, device="cuda", dtype="bfloat16"),
         Case("sliding", "contiguous", Hq=4, Hkv=1, N=777, device="cuda", dtype="bfloat16"),
         Case("prefix_lm", "head_tail", N=513, device="cuda", dtype="float16"),
         Case("causal", "head_tail", "alibi", N=1000, device="cuda", dtype="bfloat16", overlap="own_first"),
         Case("causal", "head_tail", "alibi", N=1000, device="cuda", dtype="bfloat16", overlap="off"),
         Case("document", "mask", "softcap", N=600, device="cuda", dtype="bfloat16", overlap="off")]


def _world_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=DEADLINE_S // 2), device_id=torch.device("cuda", rank))
    report = {}
    for case in CASES:
        try:
            _attention_check(case, None)
            report[case.name] = "ok"
        except Exception:  # noqa: BLE001 - reported per check
            report[case.name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    world = min(4, torch.cuda.device_count())
    return run_world(_world_main, world, tmp_path_factory.mktemp("nccl"), "NCCL")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_nccl_matches_single_process(reports, case):
    failures = [f"rank {r}:\n{rep[case.name]}" for r, rep in enumerate(reports) if rep[case.name] != "ok"]
    assert not failures, "\n".join(failures)
