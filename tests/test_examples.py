"""Every file in examples/ runs and checks itself: it prints what it compared, the largest
difference and the bound, ends with "ok", and exits 1 with a message saying what failed."""
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
    name = os.path.basename(path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "max |difference|" in out and "bound" in out, f"{name} does not say what it checked:\n{out[-2000:]}"
    assert out.rstrip().endswith("ok"), f"{name} does not end with 'ok':\n{out[-2000:]}"


def test_a_failing_example_says_what_failed(tmp_path):
    """An example whose check fails exits 1 with a message naming what failed (not a bare status)."""
    src = open(os.path.join(ROOT, "examples", "prefix_lm.py")).read()
    assert "BOUND = 1e-4" in src
    broken = tmp_path / "prefix_lm.py"
    broken.write_text(src.replace("BOUND = 1e-4", "BOUND = 0.0", 1))
    env = dict(os.environ, PYTHONPATH=ROOT, FLEXATTN_BACKEND="cpu")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(broken)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "dense reference" in proc.stderr, proc.stderr[-2000:]
