"""Autotuning of the forward and backward tile configs: kernel_options={"AUTOTUNE": True}.

On the first forward (and, separately, the first backward) for a tuning key, every config
of a small candidate set runs once (that is the compile), is then timed, and the fastest is
kept: in memory (a later call costs one dict lookup) and in `autotune.json` in
`flexattn.source_cache.cache_dir()` (a later process reads it and times nothing).

The tuning key: kernel (fwd/bwd), device name and capability, dtype, head dims E and Ev, the
score/mask graphs' structure keys, BlockMask block size, whether it has full blocks, GQA
group, L and S rounded up to a power of two (one choice per length bucket), plus what else
changes the compiled kernel (dropout on/off, tf32, the backward's gradient slots and
DETERMINISTIC, the Triton version, the kernel template) and the keys the caller fixed.

Invariants:
* Every candidate goes through `forward.fwd_config` / `backward.bwd_config(..., base=candidate)`:
  the keys given in kernel_options override the candidate's values and the tiles are fitted
  to the BlockMask.
  So each candidate is valid and agrees with the fixed keys; duplicates are dropped after
  that. The default config is always candidate 0: tuning never keeps a config that measured
  slower than the default.
* Candidates run with an explicit `cfg`, which never re-enters the tuner, and their outputs
  are thrown away: the call's results come from a normal run with the chosen config.
* A config read from the file is validated and re-fitted before use: a stale or edited file
  can cost speed, never correctness. An unreadable file is ignored with a warning.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

import torch
import triton

from .. import source_cache
from . import backward, forward, launcher
from .config import config_class, default_bwd_config, default_fwd_config, device_key
from .launcher import next_pow2
from .source import TEMPLATES

CACHE_FILE = "autotune.json"
QUIET_ENV = "FLEXATTN_AUTOTUNE_QUIET"

# kernel_options keys that fix a value of the forward / backward config (see fwd_config, bwd_config)
FWD_FIXED_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BWD_FIXED_KEYS = ("bwd_BLOCK_M", "bwd_BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
                  "bwd_num_warps", "bwd_num_stages")

# ---- candidate sets -------------------------------------------------------------------
# Tried besides the default config (default_fwd_config / default_bwd_config, always first),
# per GPU class and padded head dim (64: up to 64, 128, 256). "sm90" is Hopper and newer
# (the class the defaults were measured on, H100), "sm80" everything older; float32 has its
# own small tiles (it needs twice the shared memory per element). Configs that do not fit a
# given GPU are skipped when they fail to compile or launch.

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_CANDIDATES = {
    ("sm90", 64): [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)],
    ("sm90", 128): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("sm90", 256): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)],
    ("sm80", 64): [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4)],
    ("sm80", 128): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 32, 4, 4)],
    ("sm80", 256): [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 1)],
    ("fp32", 128): [(64, 32, 4, 3), (32, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 8, 3)],
    ("fp32", 256): [(32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 1)],
    ("interp", 0): [(32, 32, 4, 1), (16, 16, 2, 1)],  # TRITON_INTERPRET=1: two, so tests stay fast
}
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): dk/dv kernel tiles, dq kernel tiles
BWD_CANDIDATES = {
    ("sm90", 64): [(64, 64, 64, 64, 4, 3), (64, 128, 128, 64, 8, 3), (128, 128, 128, 64, 8, 3),
                   (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 2)],
    ("sm90", 128): [(64, 128, 128, 64, 8, 3), (64, 128, 64, 128, 8, 3), (64, 64, 64, 64, 4, 3),
                    (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 2)],
    ("sm90", 256): [(32, 128, 64, 64, 8, 2), (64, 128, 64, 64, 8, 2), (64, 64, 128, 32, 8, 2),
                    (32, 64, 32, 64, 4, 2), (64, 64, 64, 64, 8, 2)],
    ("sm80", 64): [(64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 2), (64, 128, 128, 64, 8, 2),
                   (32, 32, 32, 32, 4, 2), (64, 64, 64, 64, 8, 2)],
    ("sm80", 128): [(64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 2), (64, 128, 128, 64, 8, 2),
                    (32, 32, 32, 32, 4, 2), (64, 64, 64, 64, 8, 2)],
    ("sm80", 256): [(32, 32, 32, 32, 4, 1), (16, 32, 32, 16, 4, 1), (32, 32, 32, 32, 4, 2),
                    (16, 16, 16, 16, 4, 1)],
    ("fp32", 128): [(32, 32, 32, 32, 4, 1), (32, 64, 64, 32, 4, 1), (16, 32, 32, 16, 4, 1),
                    (32, 32, 32, 32, 4, 2), (32, 32, 32, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 16, 16, 4, 1), (16, 32, 32, 16, 4, 1), (32, 16, 16, 32, 4, 1),
                    (16, 16, 16, 16, 2, 1)],
    ("interp", 0): [(32, 32, 32, 32, 4, 1), (16, 16, 16, 16, 2, 1)],
}


def fwd_candidates(device, dtype, d: int, dv: int) -> list[tuple]:
    """The forward configs tried (before fixed keys and fitting): the default first."""
    return [default_fwd_config(device, dtype, d, dv), *FWD_CANDIDATES[config_class(device, dtype, d, dv)]]


def bwd_candidates(device, dtype, d: int, dv: int) -> list[tuple]:
    """The backward configs tried (before fixed keys and fitting): the default first."""
    return [default_bwd_config(device, dtype, d, dv), *BWD_CANDIDATES[config_class(device, dtype, d, dv)]]


def _unique(configs) -> list[tuple]:
    seen, out = set(), []
    for c in configs:
        c = tuple(c)
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# ---- timing ---------------------------------------------------------------------------

CUDA_SAMPLES = 7        # timed samples per candidate on a GPU (median kept)
CUDA_SAMPLE_MS = 5.0    # each GPU sample repeats the run until it lasts about this long
CPU_SAMPLES = 3         # under the interpreter: single runs


def measure_ms(run, device) -> float:
    """Milliseconds per `run()`: one warm-up run (the compile), then the median of a few timed
    samples; on CUDA timed with events, each sample averaging back-to-back runs."""
    if device.type != "cuda":
        run()
        samples = []
        for _ in range(CPU_SAMPLES):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    with torch.cuda.device(device):
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        reps = max(1, min(100, round(CUDA_SAMPLE_MS / max(start.elapsed_time(end), 1e-3))))
        samples = []
        for _ in range(CUDA_SAMPLES):
            start.record()
            for _ in range(reps):
                run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / reps)
    return statistics.median(samples)


# ---- progress bar ---------------------------------------------------------------------

def describe(cfg) -> str:
    """A config as the bar and the cache file's readers see it: `128x64 w8 s3` (forward
    BLOCK_M x BLOCK_N, warps, stages) or `dkdv 64x128 dq 128x64 w8 s3` (backward)."""
    if len(cfg) == 4:
        return f"{cfg[0]}x{cfg[1]} w{cfg[2]} s{cfg[3]}"
    return f"dkdv {cfg[0]}x{cfg[1]} dq {cfg[2]}x{cfg[3]} w{cfg[4]} s{cfg[5]}"


class ProgressBar:
    """One plain-text line on stderr per tuning session: rewritten in place (\\r) on a
    terminal, otherwise one line per candidate and a final line. FLEXATTN_AUTOTUNE_QUIET=1
    silences it. Never raises (a closed stderr must not break attention)."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.width = title, total, 0
        self.stream = sys.stderr
        self.quiet = os.environ.get(QUIET_ENV, "") not in ("", "0")
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            self.tty = False

    def _write(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        line = f"{self.title}: {text}"
        try:
            if self.tty:
                if not final:  # a wrapped line could not be rewritten in place
                    line = line[:max(20, shutil.get_terminal_size().columns - 1)]
                self.stream.write("\r" + line + " " * max(0, self.width - len(line)) + ("\n" if final else ""))
                self.width = len(line)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (AttributeError, ValueError, OSError):
            pass

    def _best(self, best) -> str:
        return f" | best {describe(best[0])} {best[1]:.3f} ms" if best else ""

    def start(self, i: int, cfg, best) -> None:
        if self.tty:  # a pipe gets the line once the candidate is timed
            self._write(f"{i}/{self.total} {describe(cfg)} ...{self._best(best)}")

    def timed(self, i: int, cfg, ms: float, best) -> None:
        self._write(f"{i}/{self.total} {describe(cfg)} {ms:.3f} ms{self._best(best)}")

    def failed(self, i: int, cfg, error: str, best) -> None:
        self._write(f"{i}/{self.total} {describe(cfg)} failed ({error}){self._best(best)}")

    def finish(self, text: str) -> None:
        self._write(text, final=True)


# ---- disk cache -----------------------------------------------------------------------

_WARNED: set = set()


def cache_path() -> str:
    return os.path.join(source_cache.cache_dir(), CACHE_FILE)


def _warn_once(tag, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def read_cache(path: str) -> dict:
    """The entries of the cache file ({} if it is missing; {} and a warning if unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        _warn_once(("unreadable", path), f"flexattn autotune: ignoring the unreadable cache file {path} "
                                         f"({type(e).__name__}: {e}); it will be rewritten")
        return {}
    if not isinstance(data, dict):
        _warn_once(("unreadable", path), f"flexattn autotune: ignoring the cache file {path}: expected a JSON "
                                         f"object, found {type(data).__name__}; it will be rewritten")
        return {}
    return data


@contextlib.contextmanager
def _file_lock(path: str):
    """An advisory lock around read-merge-replace, where the platform has fcntl (without it
    a write can still lose another process's entry written at the same instant: it is only
    re-tuned later)."""
    try:
        import fcntl
        f = open(path + ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()  # closing releases the lock


def write_cache_entry(path: str, key: str, entry: dict) -> None:
    """Add `entry` under `key`, keeping entries another process wrote meanwhile; the file is
    replaced atomically, so a reader never sees half of it."""
    try:
        with _file_lock(path):
            entries = read_cache(path)
            entries[key] = entry
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:  # one entry per line
                    f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(entries[k], sort_keys=True)}"
                                               for k in sorted(entries)) + "\n}\n")
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        _warn_once(("unwritable", path), f"flexattn autotune: could not write {path} ({e}); the tuned "
                                         f"configs are kept for this process only")


def _valid_config(entry, n: int):
    """The config tuple stored in a cache entry, or None if it is not a sane config of n values."""
    cfg = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(cfg, list) or len(cfg) != n or not all(type(x) is int for x in cfg):
        return None
    *tiles, warps, stages = cfg
    if any(t < 16 or t & (t - 1) for t in tiles) or warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 6:
        return None
    return tuple(cfg)


# ---- keys -----------------------------------------------------------------------------

def _bucket(n: int) -> int:
    return next_pow2(n)


def _memo_key(kind: str, plan: "Plan", q, v) -> tuple:
    """In-memory key: cheap to build from what the call already has (no hashing of text)."""
    o = plan.opts
    sg, mg = plan.score_graph, plan.mask_graph
    fixed = tuple((k, o[k]) for k in (FWD_FIXED_KEYS if kind == "fwd" else BWD_FIXED_KEYS) if k in o)
    extra = (tuple(plan.grad_slots), bool(o.get("DETERMINISTIC", False))) if kind == "bwd" else ()
    return (kind, q.device, q.dtype, q.shape[-1], v.shape[-1], _bucket(q.shape[2]), _bucket(v.shape[2]),
            tuple(plan.blocks.block), plan.blocks.has_full, q.shape[1] // v.shape[1],
            sg.structure_key() if sg is not None else None, mg.structure_key() if mg is not None else None,
            plan.dropout_p > 0, q.dtype == torch.float32 and bool(o.get("ALLOW_TF32", False)), fixed, extra)


def _digest(text) -> str:
    return "none" if text is None else hashlib.sha256(str(text).encode()).hexdigest()[:12]


def _device_name(device) -> str:
    if device.type != "cuda":
        return "interp"
    return f"{torch.cuda.get_device_name(device)} {device_key(device)}"


def disk_key(memo_key: tuple) -> str:
    """The cache file's key for a memo key: readable fields, graph structures as digests."""
    (kind, device, dtype, e, ev, l2, s2, block, has_full, gqa, sk, mk, dropout, tf32, fixed, extra) = memo_key
    parts = [kind, f"device={_device_name(device)}", f"dtype={str(dtype).replace('torch.', '')}",
             f"E={e}", f"Ev={ev}", f"L={l2}", f"S={s2}", f"block={block[0]}x{block[1]}", f"full={int(has_full)}",
             f"gqa={gqa}", f"score={_digest(sk)}", f"mask={_digest(mk)}", f"dropout={int(dropout)}",
             f"tf32={int(tf32)}"]
    if kind == "bwd":
        parts += [f"grads={','.join(map(str, extra[0]))}", f"deterministic={int(extra[1])}"]
    parts += ["fixed=" + ",".join(f"{k}={val}" for k, val in fixed), f"triton={triton.__version__}",
              f"kernel={_digest(TEMPLATES[kind])}"]
    return "|".join(parts)


# ---- the tuner ------------------------------------------------------------------------

_MEMORY: dict = {}           # memo key -> chosen config (this process)
_LOCK = threading.RLock()    # one tuning session at a time: concurrent timings would disturb each other


def clear_memory() -> None:
    """Forget this process's choices (the next call reads the cache file again)."""
    _MEMORY.clear()


def _shrunk(launch_keys) -> bool:
    """True if `launch` had to shrink one of these launches (it retries a config that lacks
    shared memory with fewer stages / smaller tiles and records that in `launcher.SHRUNK`, keyed
    (kernel, id(module), dtype, E, Ev, tile_m, tile_n, warps, stages)): such a candidate did
    not fit as given, so it is skipped rather than timed as a smaller config."""
    return any(k in launcher.SHRUNK for k in launch_keys)


def _choose(memo_key, candidates, run, launch_keys, fit, device, title) -> tuple:
    """The config for `memo_key`: from memory, else from the cache file, else timed now."""
    if len(candidates) == 1:  # the fixed keys leave nothing to choose
        _MEMORY[memo_key] = candidates[0]
        return candidates[0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return candidates[0]  # no timing inside CUDA-graph capture: the default, not remembered
    with _LOCK:
        hit = _MEMORY.get(memo_key)
        if hit is not None:
            return hit
        key, path = disk_key(memo_key), cache_path()
        entry = read_cache(path).get(key)
        cached = _valid_config(entry, len(candidates[0])) if entry is not None else None
        if cached is not None:
            _MEMORY[memo_key] = fit(cached)
            return _MEMORY[memo_key]
        if entry is not None:
            _warn_once(("entry", path, key), f"flexattn autotune: ignoring a malformed entry in {path} "
                                             f"({str(entry)[:80]}); tuning again")
        chosen, record = _time_candidates(candidates, run, launch_keys, device, title)
        if record is None:  # every candidate failed: the default (its own run will raise the real error)
            return chosen
        _MEMORY[memo_key] = chosen
        write_cache_entry(path, key, record)
        return chosen


def _time_candidates(candidates, run, launch_keys, device, title):
    """(fastest config, its cache entry), or (candidates[0], None) if none ran."""
    bar = ProgressBar(title, len(candidates))
    t0 = time.perf_counter()
    best, timed, skipped = None, [], []
    for i, cfg in enumerate(candidates, 1):
        bar.start(i, cfg, best)
        try:
            ms = measure_ms(lambda: run(cfg), device)
            error = "OutOfResources: shared memory (the launch had to shrink it)" \
                if _shrunk(launch_keys(cfg)) else None
        except Exception as e:  # noqa: BLE001 - OutOfResources, compile errors: skip the candidate
            text = str(e).strip()
            error = f"{type(e).__name__}: {text.splitlines()[0][:80]}" if text else type(e).__name__
        if error is not None:
            skipped.append([list(cfg), error])
            bar.failed(i, cfg, error, best)
            continue
        timed.append([list(cfg), round(ms, 4)])
        if best is None or ms < best[1]:
            best = (cfg, ms)
        bar.timed(i, cfg, ms, best)
    secs = time.perf_counter() - t0
    notes = f"; skipped {len(skipped)}: " + ", ".join(f"{describe(c)} ({err})" for c, err in skipped) \
        if skipped else ""
    if best is None:
        bar.finish(f"all {len(candidates)} candidates failed, using the default {describe(candidates[0])}{notes}")
        return candidates[0], None
    default_ms = next((ms for c, ms in timed if tuple(c) == candidates[0]), None)
    if best[0] == candidates[0]:
        vs = " (the default)"
    elif default_ms is not None:
        vs = f" (default {describe(candidates[0])} {default_ms:.3f} ms)"
    else:
        vs = ""
    bar.finish(f"{len(candidates)}/{len(candidates)} done in {secs:.1f} s, chose {describe(best[0])} "
               f"{best[1]:.3f} ms{vs}{notes}")
    record = {"config": list(best[0]), "ms": round(best[1], 4), "default_config": list(candidates[0]),
              "default_ms": default_ms, "timed": timed, "skipped": skipped,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return best[0], record


def _title(kind, q, v) -> str:
    d = str(q.shape[-1]) if q.shape[-1] == v.shape[-1] else f"{q.shape[-1]}/{v.shape[-1]}"
    return (f"flexattn autotune {kind} {str(q.dtype).replace('torch.', '')} D={d} "
            f"L={q.shape[2]} S={v.shape[2]}")


def tuned_fwd_config(plan: "Plan", q, k, v) -> tuple:
    """The forward config for this call under AUTOTUNE (fitted as forward.fwd_config)."""
    return _tuned("fwd", plan, q, k, v, lambda cfg: forward.flex_forward(plan, q, k, v, cfg=cfg))


def tuned_bwd_config(plan: "Plan", q, k, v, out, lse, dout, dlse, score_bufs) -> tuple:
    """The backward config for this call under AUTOTUNE (fitted as backward.bwd_config); candidates
    are timed on the call's own out, lse and gradients."""
    return _tuned("bwd", plan, q, k, v,
                  lambda cfg: backward.flex_backward(plan, q, k, v, out, lse, dout, dlse, score_bufs, cfg=cfg))


_KINDS = {  # kind -> (its candidates, its fitting, its launch keys)
    "fwd": (fwd_candidates, forward.fwd_config, lambda mod, q, v, cfg: [forward.fwd_launch_key(mod, q, v, cfg)]),
    "bwd": (bwd_candidates, backward.bwd_config, backward.bwd_launch_keys),
}


def _tuned(kind, plan: "Plan", q, k, v, run) -> tuple:
    """The config of `kind` for this call: remembered, read from the cache file, or timed
    now by `run(candidate)`."""
    memo_key = _memo_key(kind, plan, q, v)
    hit = _MEMORY.get(memo_key)
    if hit is not None:
        return hit
    candidates_of, config_of, keys_of = _KINDS[kind]

    def fit(cfg):
        return config_of(plan, q, k, v, base=cfg)

    candidates = _unique(fit(c) for c in candidates_of(q.device, q.dtype, q.shape[-1], v.shape[-1]))
    return _choose(memo_key, candidates, run, lambda cfg: keys_of(plan.module(kind), q, v, cfg), fit, q.device,
                   _title(kind, q, v))
