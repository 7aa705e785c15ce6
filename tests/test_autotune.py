"""kernel_options={"AUTOTUNE": True} (flexattn/kernels/autotune.py) under TRITON_INTERPRET=1.

Like test_kernels_interpret.py, each scenario runs in a fresh subprocess
(`python tests/test_autotune.py SCENARIO`) that prints one `RESULT {json}` line; the pytest
test asserts on it and on the subprocess's stderr (the progress bar; not a TTY there, so one
line per candidate). Every subprocess gets its own cache dir (FLEXATTN_CACHE_DIR = tmp_path),
so the user's cache is never touched. Candidate runs are counted by wrapping
`autotune.measure_ms`; under the interpreter there are 2 forward and 2 backward candidates.
Shapes: B=1, H=2, L=S=64, D=16, float32, causal BlockMask with 32-blocks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FWD_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BWD_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "bwd_num_warps", "bwd_num_stages")


# ---- subprocess side ------------------------------------------------------------------

CALLS = []  # one entry per measure_ms call (= per candidate timed)


def _count_measurements():
    from flexattn.kernels import autotune
    original = autotune.measure_ms

    def counting(run, device):
        CALLS.append(1)
        return original(run, device)
    autotune.measure_ms = counting


def _attend(opts, L=64, grad=True):
    """out, lse and (with grad) dq, dk, dv of one call, as a list of tensors."""
    import torch
    import flexattn
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, L, 16, generator=g).requires_grad_(grad) for _ in range(3)]
    bm = flexattn.create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, 2, L, L, BLOCK_SIZE=32)
    out, lse = flexattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s - 0.1 * (qi - kv),
                                       block_mask=bm, return_lse=True, kernel_options=dict(opts, BACKEND="triton"))
    if not grad:
        return [out, lse]
    go = torch.randn(out.shape, generator=g)
    return [out, lse, *torch.autograd.grad(out, (q, k, v), go)]


def _same(a, b) -> bool:
    import torch
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _entries():
    from flexattn.kernels import autotune
    with open(autotune.cache_path()) as f:
        return json.load(f)


def _pick(entries, kind, L=64):
    return [e for key, e in entries.items() if key.startswith(kind + "|") and f"|L={L}|" in key]


def _explicit(entries):
    """kernel_options fixing the cached forward and backward configs of L=64."""
    return {**dict(zip(FWD_KEYS, _pick(entries, "fwd")[0]["config"])),
            **dict(zip(BWD_KEYS, _pick(entries, "bwd")[0]["config"]))}


def scenario_tune():
    from flexattn.kernels import autotune
    _count_measurements()
    counting = autotune.measure_ms

    def first_writes_foreign(run, device):  # another process writes its entry mid-tuning
        if not CALLS:
            with open(autotune.cache_path(), "w") as f:
                json.dump({"foreign|key": {"config": [64, 64, 4, 1]}}, f)
        return counting(run, device)
    autotune.measure_ms = first_writes_foreign
    tuned = _attend({"AUTOTUNE": True})
    n_first = len(CALLS)
    entries = _entries()
    explicit = _attend(_explicit(entries))
    reads = []
    read_cache = autotune.read_cache
    autotune.read_cache = lambda path: reads.append(path) or read_cache(path)
    again = _attend({"AUTOTUNE": True})  # served from memory: no timing, no file read
    n_again, n_reads = len(CALLS), len(reads)
    _attend({"AUTOTUNE": True}, L=60)  # same power-of-two bucket: no tuning
    n_bucket = len(CALLS)
    _attend({"AUTOTUNE": True}, L=128, grad=False)  # new bucket: the forward is tuned
    n_new = len(CALLS)
    return dict(n_first=n_first, n_again=n_again, n_reads=n_reads, n_bucket=n_bucket, n_new=n_new,
                same_as_explicit=_same(tuned, explicit), same_again=_same(tuned, again),
                entries=_entries())


def scenario_again():
    """A fresh process with the cache dir of scenario_tune: nothing timed, same results."""
    _count_measurements()
    tuned = _attend({"AUTOTUNE": True})
    explicit = _attend(_explicit(_entries()))
    return dict(n=len(CALLS), same_as_explicit=_same(tuned, explicit))


def scenario_restrict():
    _count_measurements()
    tuned = _attend({"AUTOTUNE": True, "BLOCK_N": 16, "bwd_num_warps": 2})
    n_restricted = len(CALLS)
    entries = _entries()
    fixed_all = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}
    one = _attend({"AUTOTUNE": True, **fixed_all}, grad=False)  # one candidate left: nothing to time
    explicit = _attend(fixed_all, grad=False)
    return dict(n_restricted=n_restricted, n_fixed=len(CALLS) - n_restricted, entries=entries,
                same_fixed=_same(one, explicit), tuned_ok=len(tuned) == 5)


def scenario_failing():
    """Candidates that fail: raising OutOfResources, or making launch() shrink them."""
    import triton
    from flexattn.kernels import forward, launcher
    _count_measurements()
    original = forward.flex_forward
    mode = {}

    def flaky(plan, q, k, v, cfg=None):
        if cfg is not None and (mode["fail"] == "all" or cfg[0] == 16):
            if mode["fail"] == "shrink":  # what launch() records when a config lacks shared memory
                mod = plan.module("fwd")
                launcher.SHRUNK[("fwd", id(mod), q.dtype, q.shape[-1], v.shape[-1], *cfg)] = {"num_stages": 1}
            else:
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return original(plan, q, k, v, cfg=cfg)
    forward.flex_forward = flaky
    res = {}
    for fail, L in (("raise", 64), ("shrink", 128), ("all", 256)):
        mode["fail"] = fail
        out = _attend({"AUTOTUNE": True}, L=L, grad=False)
        res[fail] = dict(finite=bool(out[0].isfinite().all()), entries=_pick(_entries(), "fwd", L))
    return res


def scenario_corrupt():
    import warnings
    from flexattn.kernels import autotune
    _count_measurements()
    path = autotune.cache_path()
    with open(path, "w") as f:
        f.write("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _attend({"AUTOTUNE": True}, grad=False)
        n_corrupt = len(CALLS)
        entries = _entries()  # rewritten: valid JSON again
        # a malformed entry (48 is no power of two) is ignored and tuned again
        key = next(k for k in entries if k.startswith("fwd|"))
        entries[key]["config"] = [48, 32, 4, 1]
        with open(path, "w") as f:
            json.dump(entries, f)
        autotune.clear_memory()
        _attend({"AUTOTUNE": True}, grad=False)
        n_malformed = len(CALLS)
        # a valid entry is used as it is, whatever it says
        entries = _entries()
        entries[key]["config"] = [16, 16, 2, 1]
        with open(path, "w") as f:
            json.dump(entries, f)
        autotune.clear_memory()
        edited = _attend({"AUTOTUNE": True}, grad=False)
    explicit = _attend({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}, grad=False)
    return dict(n_corrupt=n_corrupt, n_malformed=n_malformed, n_edited=len(CALLS),
                warnings=[str(w.message) for w in caught], same_edited=_same(edited, explicit))


def _main(name: str) -> None:
    sys.path[:0] = [ROOT, HERE]
    print("RESULT " + json.dumps(globals()["scenario_" + name]()))


# ---- pytest side ----------------------------------------------------------------------

def _run(name, cache_dir, quiet=False):
    env = dict(os.environ, TRITON_INTERPRET="1", FLEXATTN_CACHE_DIR=str(cache_dir),
               PYTHONPATH=ROOT + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FLEXATTN_AUTOTUNE_QUIET", None)
    if quiet:
        env["FLEXATTN_AUTOTUNE_QUIET"] = "1"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), name], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"scenario {name} crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][7:]), proc.stderr


def _bar_lines(stderr, kind, L=64):
    return [ln for ln in stderr.splitlines() if ln.startswith(f"flexattn autotune {kind} float32 D=16 L={L} S={L}:")]


def test_tune_then_cached_in_memory_and_on_disk(tmp_path):
    r, err = _run("tune", tmp_path)
    assert r["n_first"] == 4, r          # 2 forward + 2 backward candidates timed
    assert r["same_as_explicit"]         # tuned results == a run with the chosen configs given explicitly
    assert r["n_again"] == r["n_first"] and r["n_reads"] == 0 and r["same_again"]  # 2nd call: a dict lookup
    assert r["n_bucket"] == r["n_first"]                      # L=60 shares the L=64 bucket
    assert r["n_new"] == r["n_first"] + 2                     # L=128: a new forward key
    entries = r["entries"]
    assert "foreign|key" in entries      # merged with what another process wrote meanwhile
    for kind, n in (("fwd", 4), ("bwd", 6)):
        (e,) = [e for k, e in entries.items() if k.startswith(kind + "|") and "|L=64|S=64|" in k]
        assert len(e["config"]) == n and e["ms"] > 0 and e["date"] and len(e["timed"]) == 2
        assert min(ms for _, ms in e["timed"]) == e["ms"]
    assert any(k.startswith("fwd|") and "|L=128|" in k for k in entries)
    # the bar: one line per candidate and a final line, per session, naming what is tuned
    fwd, bwd = _bar_lines(err, "fwd"), _bar_lines(err, "bwd")
    assert len(fwd) == 3 and len(bwd) == 3, err
    assert fwd[0].split(": ", 1)[1].startswith("1/2 ") and " ms | best " in fwd[0], fwd
    assert "2/2 done" in fwd[-1] and "chose" in fwd[-1], fwd
    assert "dkdv" in bwd[0] and "dq" in bwd[0], bwd
    assert not _bar_lines(err, "bwd", 128)          # no backward at L=128

    r2, err2 = _run("again", tmp_path)              # a fresh process reads the cache file
    assert r2["n"] == 0 and r2["same_as_explicit"], r2
    assert "flexattn autotune" not in err2, err2


def test_explicit_keys_restrict_candidates_and_quiet(tmp_path):
    r, err = _run("restrict", tmp_path, quiet=True)
    assert r["tuned_ok"]
    assert r["n_restricted"] == 4, r
    entries = r["entries"]
    (fwd,) = [e for k, e in entries.items() if k.startswith("fwd|")]
    (bwd,) = [e for k, e in entries.items() if k.startswith("bwd|")]
    assert [c[1] for c, _ in fwd["timed"]] == [16, 16] and fwd["config"][1] == 16, fwd
    assert {c[0] for c, _ in fwd["timed"]} == {32, 16}   # the free BLOCK_M still varies
    assert [c[4] for c, _ in bwd["timed"]] == [2, 2] and bwd["config"][4] == 2, bwd
    assert all("fixed=BLOCK_N=16" in k or "fixed=bwd_num_warps=2" in k for k in entries)
    assert r["n_fixed"] == 0 and r["same_fixed"], r      # every value fixed: nothing to time
    assert "flexattn autotune" not in err, err           # FLEXATTN_AUTOTUNE_QUIET=1


def test_failing_candidates_are_skipped_and_reported(tmp_path):
    r, err = _run("failing", tmp_path)
    for fail, L in (("raise", 64), ("shrink", 128)):
        (e,) = r[fail]["entries"]
        assert r[fail]["finite"]
        assert e["config"] == [32, 32, 4, 1] and [c for c, _ in e["timed"]] == [[32, 32, 4, 1]], e
        assert e["skipped"][0][0] == [16, 16, 2, 1] and "OutOfResources" in e["skipped"][0][1], e
        final = _bar_lines(err, "fwd", L)[-1]
        assert "skipped 1: 16x16 w2 s1 (OutOfResources" in final, final
    assert r["all"]["finite"] and r["all"]["entries"] == [], r   # all failed: default used, nothing cached
    assert "all 2 candidates failed" in _bar_lines(err, "fwd", 256)[-1], err


def test_corrupt_cache_file_is_ignored(tmp_path):
    r, err = _run("corrupt", tmp_path)
    assert r["n_corrupt"] == 2, r                        # tuned despite the garbage file
    assert any("unreadable cache file" in w and "autotune.json" in w for w in r["warnings"]), r
    assert r["n_malformed"] == 4, r                      # a malformed entry is tuned again
    assert any("malformed entry" in w for w in r["warnings"]), r
    assert r["n_edited"] == 4 and r["same_edited"], r    # a valid entry is used, nothing timed
    assert json.loads((tmp_path / "autotune.json").read_text())


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_autotune_value_raises(value, monkeypatch):
    import torch
    from flexattn import flex_attention
    from flexattn.kernels import check_kernel_options
    with pytest.raises(ValueError, match=r"kernel_options\['AUTOTUNE'\] must be True or False"):
        check_kernel_options({"AUTOTUNE": value})
    q = torch.randn(1, 1, 16, 16)
    # CPU tensors reach the kernels (and their option checks) only under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"kernel_options\['AUTOTUNE'\]"):
        flex_attention(q, q, q, kernel_options={"BACKEND": "triton", "AUTOTUNE": value})
    assert check_kernel_options({"AUTOTUNE": False}) == {"AUTOTUNE": False}


if __name__ == "__main__":
    _main(sys.argv[1])
