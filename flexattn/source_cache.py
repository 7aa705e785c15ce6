"""The on-disk cache of generated kernel source, and where it lives.

`load_module(source)` writes generated source to `cache_dir()`, keyed by the hash of the
source itself, and imports it (once per process: later calls hit an in-memory table). The
source depends only on the graphs' `structure_key()`, dtypes, head dims and options -
never on captured values - so new values in a captured tensor never recompile.

`cache_dir()` is `$FLEXATTN_CACHE_DIR` when set, else `flexattn` under the XDG cache
directory: `$XDG_CACHE_HOME` when it is set to an absolute path, else `~/.cache` (the XDG
Base Directory rule). The autotuner keeps its results in the same directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

def cache_dir() -> str:
    """The directory generated kernels and autotune results are kept in (created if absent)."""
    d = os.environ.get("FLEXATTN_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME")
        if not base or not os.path.isabs(base):  # unset, empty or relative: the spec's default
            base = os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "flexattn")
    os.makedirs(d, exist_ok=True)
    return d


_MODULES: dict[str, object] = {}


def source_key(source: str) -> str:
    """The name part that identifies `source` in the cache."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def load_module(source: str, stem: str = "kernel"):
    """Import generated `source` (cached in memory and on disk by its hash)."""
    key = source_key(source)
    if key in _MODULES:
        return _MODULES[key]
    path = os.path.join(cache_dir(), f"{stem}_{key}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    name = f"flexattn_generated_{stem}_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod
