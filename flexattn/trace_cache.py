"""The trace cache: a mod traced again with the same code and captured state gets a copy
of the earlier graph in a few microseconds instead of a re-trace.

A trace is a function of the mod's code and of what the code can read while it runs on
proxies: closure cells, defaults, the globals it names (and, through them, attributes of
modules and objects it names), recursively through the functions it calls. A fingerprint
walks exactly that: Python numbers/strings by value, tensors by identity plus dtype and
shape (never values), functions by code object plus their own state, containers by
content, objects by identity plus the attributes the code names. Two calls with equal
fingerprints trace to the same graph, so the second one copies the first's graph with
the (identical) captured tensors in the buffer slots. The key uses the *code* object, not
the function object: a mod defined afresh in every forward() with the same captures hits.

A trace is stored only when it provably does not depend on tensor values: every buffer
is a tensor the fingerprint reached (not one computed while tracing, like `(t * 2)[q]`),
and no torch function ran on a real tensor without a proxy (`t.max().item()`, `if t[0]:`)
- both would freeze values into the graph. Anything the walk does not understand makes
the call uncacheable (traced every time, as without a cache). The cache holds tensors and
objects only weakly, so it never keeps a captured tensor alive.

`flexattn.trace.trace` is the only caller: `fingerprint` (key + the objects it names),
`lookup`, and `store` (given a `ValueReadDetector` saw no value read while tracing).
"""
from __future__ import annotations

import enum
import functools
import os
import sys
import types
import weakref
from collections import OrderedDict

import torch
from torch.overrides import TorchFunctionMode

from .ir import Graph


class _Uncacheable(Exception):
    pass


class _Strong:
    """A strong reference with weakref.ref's interface, for objects that take no weakref."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


_TRACE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()  # (kind, key) -> (refs, buffer pins, template)
_TRACE_CACHE_MAX = 256
_MAX_ATOMS = 1024
_cache_enabled = True
_VALUE_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                          torch.layout, torch.memory_format, type(Ellipsis), type(NotImplemented)})
_IMMORTAL_TYPES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                   types.GetSetDescriptorType, types.MemberDescriptorType, types.ClassMethodDescriptorType)
_LIBRARY_PREFIXES = ("torch", "triton", "numpy", "math", "builtins", "functools", "typing", "operator")
_ABSENT, _EMPTY_CELL = ("<absent>",), ("<empty cell>",)
_CODE_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _code_names(code) -> tuple:
    """The global and attribute names `code` (and code nested in it) can read."""
    names = _CODE_NAMES.get(code)
    if names is None:
        out, stack = {}, [code]
        while stack:
            c = stack.pop()
            out.update(dict.fromkeys(c.co_names))
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        names = _CODE_NAMES[code] = tuple(out)
    return names


def _is_library(fn) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module.split(".", 1)[0] in _LIBRARY_PREFIXES


def _class_lookup(tp, name):
    for klass in tp.__mro__:
        d = klass.__dict__
        if name in d:
            return d[name]
    return _ABSENT


class _Fingerprint:
    """Walks a mod's reachable state into a hashable key plus the objects it names."""

    __slots__ = ("key", "pins", "seen")

    def __init__(self):
        self.key: list = []
        self.pins: list = []
        self.seen: dict[int, int] = {}

    def pin(self, obj) -> bool:
        """Identity atom; False if `obj` was already walked (cycles, shared objects)."""
        i = self.seen.get(id(obj))
        if i is not None:
            self.key.append(("<seen>", i))
            return False
        self.seen[id(obj)] = len(self.pins)
        self.pins.append(obj)
        self.key.append(id(obj))
        return True

    def value(self, v, names: tuple) -> None:
        key = self.key
        if len(key) > _MAX_ATOMS:
            raise _Uncacheable("too much state")
        tp = type(v)
        if tp in _VALUE_TYPES:
            key.append((tp, v))
        elif isinstance(v, torch.Tensor):
            if self.pin(v):
                key.append((v.dtype, v.shape))
        elif tp is types.FunctionType:
            self.function(v)
        elif tp is tuple or tp is list or isinstance(v, tuple):
            key.append((tp, len(v)))
            for x in v:
                self.value(x, names)
        elif tp is dict:
            key.append((dict, len(v)))
            for k, x in v.items():
                if type(k) not in _VALUE_TYPES:
                    raise _Uncacheable("dict key")
                key.append(k)
                self.value(x, names)
        elif tp is set or tp is frozenset:
            if not all(type(x) in _VALUE_TYPES for x in v):
                raise _Uncacheable("set")
            key.append((tp, frozenset(v)))
        elif isinstance(v, (int, float, complex, str, bytes, enum.Enum)):
            key.append((tp, v))
        elif tp is types.MethodType:
            key.append(types.MethodType)
            self.value(v.__func__, names)
            func_names = _code_names(v.__func__.__code__) if hasattr(v.__func__, "__code__") else ()
            self.object(v.__self__, func_names)
        elif tp is functools.partial:
            key.append(functools.partial)
            self.value(v.func, names)
            self.value(v.args, names)
            self.value(v.keywords, names)
        elif tp is types.ModuleType:
            if self.pin(v):
                d = v.__dict__
                for n in names:
                    a = d.get(n, _ABSENT)
                    if a is _ABSENT:
                        key.append(_ABSENT)
                    elif type(a) is types.FunctionType and _is_library(a):
                        self.pin(a)
                    else:
                        self.value(a, names)
        elif isinstance(v, type):
            if self.pin(v) and not _is_library(v):
                self.attributes(v, v, names)
        elif isinstance(v, _IMMORTAL_TYPES):
            self.pin(v)
        else:
            self.object(v, names)

    def function(self, f) -> None:
        i = self.seen.get(id(f))
        if i is not None:
            self.key.append(("<seen>", i))
            return
        if _is_library(f):
            self.pin(f)
            return
        self.seen[id(f)] = -len(self.key) - 1  # functions are keyed by code + state, not identity
        code = f.__code__
        names = _code_names(code)
        self.pin(code)
        self.pin(f.__globals__)
        self.key.append(f.__name__)
        self.value(f.__defaults__, names)
        self.value(f.__kwdefaults__, names)
        for cell in f.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                self.key.append(_EMPTY_CELL)
            else:
                self.value(contents, names)
        g = f.__globals__
        for n in names:
            if n in g:
                self.key.append(n)
                self.value(g[n], names)
            else:
                self.key.append(_ABSENT)
        if f.__dict__:
            self.value(f.__dict__, names)

    def object(self, obj, names: tuple) -> None:
        tp = type(obj)
        if tp.__getattribute__ is not object.__getattribute__:
            raise _Uncacheable("custom __getattribute__")
        hook = getattr(tp, "__getattr__", None)
        if hook is not None and hook is not torch.nn.Module.__getattr__:
            raise _Uncacheable("custom __getattr__")
        if not isinstance(getattr(obj, "__dict__", None), dict):
            raise _Uncacheable("object without __dict__")
        if self.pin(obj):
            self.pin(tp)
            self.attributes(obj, tp, names)

    def attributes(self, obj, tp, names: tuple) -> None:
        """The attributes of `obj` (an instance of `tp`, or a class) that `names` can read;
        methods found add the names their code reads."""
        d = obj.__dict__ if not isinstance(obj, type) else {}
        nn_dicts = [d[k] for k in ("_parameters", "_buffers", "_modules") if isinstance(d.get(k), dict)] \
            if isinstance(obj, torch.nn.Module) else []
        todo, done = list(names), set()
        while todo:
            n = todo.pop()
            if n in done:
                continue
            done.add(n)
            self.key.append(n)
            cls_attr = _class_lookup(tp, n)
            if cls_attr is not _ABSENT:
                ctp = type(cls_attr)
                if hasattr(ctp, "__set__") or hasattr(ctp, "__delete__"):
                    if not isinstance(cls_attr, _IMMORTAL_TYPES):  # a property: runs code on other state
                        raise _Uncacheable(f"data descriptor {n}")
                func = getattr(cls_attr, "__func__", cls_attr)  # staticmethod / classmethod
                if type(func) is types.FunctionType and not _is_library(func):
                    todo.extend(_code_names(func.__code__))
            if n in d:
                self.value(d[n], names)
                continue
            for nd in nn_dicts:
                if n in nd:
                    self.value(nd[n], names)
                    break
            else:
                if cls_attr is _ABSENT:
                    self.key.append(_ABSENT)
                else:
                    self.value(getattr(cls_attr, "__func__", cls_attr), names)


def fingerprint(fn, kind: str, name: str):
    """(cache key, pinned objects) for tracing `fn` (called `name`) as a `kind` mod, or None
    if uncacheable."""
    fp = _Fingerprint()
    try:
        fp.key.append(name)
        if type(fn) in (types.FunctionType, types.MethodType, functools.partial):
            fp.value(fn, ())
        else:
            fp.object(fn, ("__call__",))
    except _Uncacheable:
        return None
    except Exception:  # a walk that trips over something exotic: just don't cache
        return None
    try:
        key = (kind, tuple(fp.key))
        hash(key)
    except TypeError:
        return None
    return key, fp.pins


_TENSOR_METADATA = {id(getattr(torch.Tensor, n)) for n in
                    ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad")}
_TENSOR_METADATA_FUNCS = {torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.__len__,
                          torch.Tensor.ndimension, torch.Tensor.nelement, torch.Tensor.is_floating_point,
                          torch.Tensor.element_size}


class ValueReadDetector(TorchFunctionMode):
    """Notes a torch function run on real tensors without a traced value while a mod is
    traced: its result (a value read, or a new tensor) would be frozen into a cached graph.

    `traced_types`: the tracer's stand-in types (an argument of one of them marks a traced
    call); `tracer_files`: the tracer's own source files (torch calls made from there, such
    as dtype inference, are the machinery's, not the mod's)."""

    def __init__(self, traced_types: tuple, tracer_files: frozenset):
        super().__init__()
        self.value_read = None
        self.traced_types = traced_types
        self.tracer_files = tracer_files

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.value_read is None and not _is_metadata(func) and not self._traced(args, kwargs) \
                and not self._called_from_tracer():
            self.value_read = func
        return func(*args, **kwargs)

    def _called_from_tracer(self) -> bool:
        """Whether the torch call being intercepted comes from the tracing machinery itself
        (Proxy operators inferring dtypes) rather than from the mod's code (mods written
        inside flexattn - masks, mods, front ends - count as the mod's code)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        return frame is not None and os.path.abspath(frame.f_code.co_filename) in self.tracer_files

    def _traced(self, args, kwargs) -> bool:
        stack = list(args) + list(kwargs.values())
        while stack:
            a = stack.pop()
            if isinstance(a, self.traced_types):
                return True
            if isinstance(a, (tuple, list)):
                stack.extend(a)
        return False


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _is_metadata(func) -> bool:
    if func in _TENSOR_METADATA_FUNCS:
        return True
    return getattr(func, "__name__", None) == "__get__" and id(getattr(func, "__self__", None)) in _TENSOR_METADATA


def clear_trace_cache() -> None:
    """Forget every cached trace (they are also evicted least-recently-used)."""
    _TRACE_CACHE.clear()


def is_enabled() -> bool:
    """Whether `trace` uses the cache."""
    return _cache_enabled


def set_trace_cache_enabled(enabled: bool) -> bool:
    """Turn the trace cache on or off; returns the previous setting."""
    global _cache_enabled
    previous, _cache_enabled = _cache_enabled, bool(enabled)
    return previous


def lookup(key, pins) -> Graph | None:
    """A copy of the graph stored under `key`, with `pins`' tensors in its buffer slots,
    or None (not stored, or stored for other objects of the same ids)."""
    entry = _TRACE_CACHE.get(key)
    if entry is None:
        return None
    refs, slots, template = entry
    if len(refs) != len(pins) or any(r() is not p for r, p in zip(refs, pins)):
        return None
    try:
        _TRACE_CACHE.move_to_end(key)
    except KeyError:
        pass
    return template._with_buffers([pins[i] for i in slots])


def store(key, pins, graph: Graph) -> None:
    """Keep `graph` (without its tensors) under `key`, unless a buffer is a tensor the
    fingerprint did not reach."""
    index = {id(p): i for i, p in enumerate(pins)}
    slots = []
    for t in graph.buffers:
        i = index.get(id(t))
        if i is None:  # computed while tracing: its values would be frozen
            return
        slots.append(i)
    refs = []
    for p in pins:
        try:
            refs.append(weakref.ref(p))
        except TypeError:
            refs.append(_Strong(p))
    _TRACE_CACHE[key] = (refs, slots, graph._with_buffers([]))
    while len(_TRACE_CACHE) > _TRACE_CACHE_MAX:
        try:
            _TRACE_CACHE.popitem(last=False)
        except KeyError:
            break
