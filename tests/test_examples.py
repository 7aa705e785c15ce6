"""Every file in examples/ runs and checks itself (each exits non-zero on a mismatch)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


def test_examples_exist():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_runs_and_checks_itself(path):
    env = dict(os.environ, PYTHONPATH=ROOT, FLEXATTN_BACKEND="cpu")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{os.path.basename(path)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
