"""Tracing: run a mod on `Proxy` objects and record what it does as an IR `Graph`.

Python operators on a proxy and `__torch_function__` (torch.where, torch.exp2, tensor
methods, indexing a captured tensor with a proxy) each append one node. What can be traced
is exactly what `TORCH_FUNCTIONS` and the `Proxy` methods list; anything else raises a
`TraceError` that names the mod, the source line and the fix.

Captured tensors become `buffer` leaves, identified by object identity: their values never
enter the graph, so new values in the same tensor never change what is compiled.

A captured tensor indexed in all but its last dimension is a *row* (MLA's
`q_rope[b, h, q_idx]`): elementwise ops on rows give rows, and a row is summed to a scalar
with `.sum(-1)`, `torch.sum(x, -1)`, `.mean(-1)`, `torch.dot(a, b)`, `torch.inner`, or
`a @ b` (IR `vload` / `rowsum`). A row read once more by one index (`table[h][q_idx]`) is an
ordinary load.

`trace` is cached (`flexattn.trace_cache`): a mod traced again with the same code and
captured state (closure cells, defaults, globals it reads; tensors by identity, numbers by
value) gets a copy of the earlier graph in a few microseconds instead of a re-trace.
"""
from __future__ import annotations

import inspect
import linecache
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from . import trace_cache
from .ir import Graph, Node, IRError
from .trace_cache import clear_trace_cache, set_trace_cache_enabled  # noqa: F401 (public here)

_THIS_FILE = os.path.abspath(__file__)
# the tracing machinery's own files: torch calls from there (dtype inference) are not the mod's
_TRACER_FILES = frozenset({_THIS_FILE, os.path.join(os.path.dirname(_THIS_FILE), "ir.py")})


class TraceError(ValueError):
    """A mod did something that cannot be traced; the message names the line and the fix."""


# ---------------------------------------------------------------------------------------
# Where in the user's code are we? (for error messages)

def _user_frame_description() -> str:
    """`file:line: source` of the innermost frame outside flexattn's tracing machinery."""
    frame = sys._getframe(1)
    package_dir = os.path.dirname(_THIS_FILE)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        inside = filename.startswith(package_dir + os.sep) and not filename.endswith("masks.py") \
            and not filename.endswith("mods.py")
        inside = inside or filename.startswith(os.path.dirname(torch.__file__) + os.sep)
        if not inside:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return f"{frame.f_code.co_filename}:{frame.f_lineno}: {line}"
        frame = frame.f_back
    return "<unknown location>"


class _TraceState:
    def __init__(self, graph: Graph, fn_name: str):
        self.graph = graph
        self.fn_name = fn_name
        self.row_len: dict[int, int] = {}  # id of a row node -> its length (the buffer's last size)

    def fail(self, what: str, fix: str) -> "TraceError":
        return TraceError(f"cannot trace {self.graph.kind}_mod {self.fn_name!r}: {what}\n"
                          f"  at {_user_frame_description()}\n  fix: {fix}")


# ---------------------------------------------------------------------------------------
# Proxy

class Proxy:
    """Stands in for a traced value (an index, the score, or anything computed from them)."""

    __slots__ = ("node", "_state")

    def __init__(self, node: Node, state: _TraceState):
        self.node = node
        self._state = state

    # -- helpers ---------------------------------------------------------------------
    def _lift(self, value) -> Node:
        return _lift(self._state, value)

    def _emit(self, op: str, *args, dtype=None) -> "Proxy":
        nodes = _widen_for_constants(self._state, op, [self._lift(a) for a in args])
        try:
            node = self._state.graph.op(op, *nodes, dtype=dtype)
        except (RuntimeError, TypeError, IRError) as e:
            raise self._state.fail(f"{op} is not defined for dtypes "
                                   f"{', '.join(str(n.dtype)[6:] for n in nodes)} ({e})",
                                   "cast the operands with .to(...) first") from None
        _record_row(self._state, op, nodes, node)
        return Proxy(node, self._state)

    @property
    def dtype(self) -> torch.dtype:
        return self.node.dtype

    @property
    def shape(self):
        return torch.Size([self._state.row_len[id(self.node)]] if self.node.row else [])

    def dim(self) -> int:
        return 1 if self.node.row else 0

    ndim = property(dim)

    def __repr__(self) -> str:
        return f"Proxy({self.node!r}: {self.node.dtype})"

    # -- control flow on a traced value cannot be recorded -----------------------------
    def __bool__(self):
        raise self._state.fail(
            "Python control flow (`if`, `while`, `and`, `or`, `not`, bool()) on a traced value",
            "use torch.where(cond, a, b) instead of `if`, and & | ~ instead of and/or/not")

    def _no_python_number(self, *_):
        raise self._state.fail("converting a traced value to a Python number",
                               "keep it a tensor: use torch functions (torch.log2, torch.floor, .to(dtype))")

    __int__ = __float__ = __index__ = __complex__ = _no_python_number

    def __iter__(self):
        raise self._state.fail("iterating over a traced value", "traced values are scalars per (b, h, q, kv)")

    def __len__(self):
        raise self._state.fail("len() of a traced value", "traced values are scalars per (b, h, q, kv)")

    def __getitem__(self, item):
        if self.node.op == "vload":  # table[h][q_idx]: the row's element, an ordinary load
            load = self.node
            return _index(self._state, self._state.graph.buffers[load.args[0].args[0]],
                          tuple(Proxy(i, self._state) for i in load.args[1:]) + _as_tuple(item))
        raise self._state.fail("indexing a traced value",
                               "index a captured tensor with traced values instead: table[q_idx]")

    def __setitem__(self, key, value):
        raise self._state.fail("assigning into a traced value", "build a new value with torch.where")

    # -- operators -------------------------------------------------------------------
    def __add__(self, o): return self._emit("add", self, o)
    def __radd__(self, o): return self._emit("add", o, self)
    def __sub__(self, o): return self._emit("sub", self, o)
    def __rsub__(self, o): return self._emit("sub", o, self)
    def __mul__(self, o): return self._emit("mul", self, o)
    def __rmul__(self, o): return self._emit("mul", o, self)
    def __truediv__(self, o): return self._emit("truediv", self, o)
    def __rtruediv__(self, o): return self._emit("truediv", o, self)
    def __floordiv__(self, o): return self._emit("floordiv", self, o)
    def __rfloordiv__(self, o): return self._emit("floordiv", o, self)
    def __mod__(self, o): return self._emit("mod", self, o)
    def __rmod__(self, o): return self._emit("mod", o, self)
    def __pow__(self, o): return self._emit("pow", self, o)
    def __rpow__(self, o): return self._emit("pow", o, self)
    def __and__(self, o): return self._emit("and", self, o)
    def __rand__(self, o): return self._emit("and", o, self)
    def __or__(self, o): return self._emit("or", self, o)
    def __ror__(self, o): return self._emit("or", o, self)
    def __xor__(self, o): return self._emit("xor", self, o)
    def __rxor__(self, o): return self._emit("xor", o, self)
    def __lt__(self, o): return self._emit("lt", self, o)
    def __le__(self, o): return self._emit("le", self, o)
    def __gt__(self, o): return self._emit("gt", self, o)
    def __ge__(self, o): return self._emit("ge", self, o)
    def __eq__(self, o): return self._emit("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return self._emit("ne", self, o)  # type: ignore[override]
    def __lshift__(self, o): return self._emit("lshift", self, o)
    def __rlshift__(self, o): return self._emit("lshift", o, self)
    def __rshift__(self, o): return self._emit("rshift", self, o)
    def __rrshift__(self, o): return self._emit("rshift", o, self)
    def __neg__(self): return self._emit("neg", self)
    def __pos__(self): return self
    def __abs__(self): return self._emit("abs", self)
    def __invert__(self): return self._emit("invert", self)
    __hash__ = object.__hash__

    # math.floor / math.ceil on a tensor give a tensor (torch's Tensor.__floor__ does too)
    def __floor__(self): return self._emit("floor", self)
    def __ceil__(self): return self._emit("ceil", self)

    def _unsupported_operator(name):
        def raiser(self, *_):
            raise self._state.fail(f"the operator {name} on a traced value is not supported in a mod",
                                   "rewrite it with the supported ops listed in flexattn.trace.SUPPORTED "
                                   "(e.g. torch.floor, torch.where, // and %)")
        return raiser

    def __matmul__(self, o):
        return _dot(self._state, self, o, "@") if self.node.row else self._no_matmul(o)

    def __rmatmul__(self, o):
        return _dot(self._state, o, self, "@") if self.node.row else self._no_matmul(o)

    _no_matmul = _unsupported_operator("@ (matrix product) of scalars")
    __divmod__ = __rdivmod__ = _unsupported_operator("divmod()")
    __round__ = _unsupported_operator("round()")
    __trunc__ = _unsupported_operator("math.trunc()")
    del _unsupported_operator

    # -- tensor methods ---------------------------------------------------------------
    def abs(self): return self._emit("abs", self)
    def neg(self): return self._emit("neg", self)
    def exp(self): return self._emit("exp", self)
    def exp2(self): return self._emit("exp2", self)
    def log(self): return self._emit("log", self)
    def log2(self): return self._emit("log2", self)
    def sqrt(self): return self._emit("sqrt", self)
    def rsqrt(self): return self._emit("rsqrt", self)
    def tanh(self): return self._emit("tanh", self)
    def sigmoid(self): return self._emit("sigmoid", self)
    def sin(self): return self._emit("sin", self)
    def cos(self): return self._emit("cos", self)
    def floor(self): return self._emit("floor", self)
    def ceil(self): return self._emit("ceil", self)
    def erf(self): return self._emit("erf", self)
    def log1p(self): return self._emit("log1p", self)
    def expm1(self): return self._emit("expm1", self)
    def sign(self): return self._emit("sign", self)
    sgn = sign
    def trunc(self): return self._emit("trunc", self)
    fix = trunc
    def frac(self): return self - self._emit("trunc", self)
    def round(self, decimals=0): return _round(self._state, self, decimals=decimals)
    def fmod(self, o): return self._emit("fmod", self, o)
    def atan2(self, o): return self._emit("atan2", self, o)
    arctan2 = atan2
    def isnan(self): return self._emit("isnan", self)
    def isinf(self): return self._emit("isinf", self)
    def isfinite(self): return ~(self._emit("isnan", self) | self._emit("isinf", self))
    def isposinf(self): return self._emit("isinf", self) & (self > 0)
    def isneginf(self): return self._emit("isinf", self) & (self < 0)
    def relu(self): return _relu(self._state, self)
    def sum(self, dim=None, keepdim=False, *, dtype=None): return _sum(self._state, self, dim, keepdim, dtype)
    def mean(self, dim=None, keepdim=False, *, dtype=None): return _sum(self._state, self, dim, keepdim, dtype, True)
    def dot(self, o): return _dot(self._state, self, o, "torch.dot")
    def inner(self, o): return _dot(self._state, self, o, "torch.inner")
    def bitwise_left_shift(self, o): return self._emit("lshift", self, o)
    def bitwise_right_shift(self, o): return self._emit("rshift", self, o)
    def logical_not(self): return self._emit("invert", self.to(torch.bool))
    def logical_and(self, o): return self._emit("and", self.to(torch.bool), _as_bool(self._state, o))
    def logical_or(self, o): return self._emit("or", self.to(torch.bool), _as_bool(self._state, o))
    def logical_xor(self, o): return self._emit("xor", self.to(torch.bool), _as_bool(self._state, o))
    def minimum(self, o): return self._emit("minimum", self, o)
    def maximum(self, o): return self._emit("maximum", self, o)
    def remainder(self, o): return self._emit("mod", self, o)
    def floor_divide(self, o): return self._emit("floordiv", self, o)
    def pow(self, o): return self._emit("pow", self, o)
    def square(self): return self._emit("mul", self, self)
    def reciprocal(self): return self._emit("truediv", 1.0, self)

    def clamp(self, min=None, max=None):
        out = self
        if min is not None:
            out = out._emit("maximum", out, min)
        if max is not None:
            out = out._emit("minimum", out, max)
        return out

    clip = clamp

    def clamp_min(self, min): return self.clamp(min=min)
    def clamp_max(self, max): return self.clamp(max=max)

    def where(self, condition, other):
        return _where(self._state, condition, self, other)

    @property
    def device(self) -> torch.device:
        """A placeholder: a traced mod runs wherever the attention runs, so `.to(device)` is
        a no-op and any device read here is as good as another."""
        return torch.device("cpu")

    def to(self, *args, **kwargs):
        """`.to(dtype)`, `.to(other)` (other's dtype), `.to(device[, dtype])`, keywords
        `dtype=`, `device=`, `non_blocking=`, `copy=`, `memory_format=`: a cast to the dtype,
        if any; device moves are no-ops (a traced value lives where the kernels run)."""
        dtype = kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (Proxy, torch.Tensor)):
                dtype = a.dtype
            elif not isinstance(a, (torch.device, str, int, bool)):
                raise self._state.fail(f".to() with an argument of type {type(a).__name__} ({a!r})",
                                       "pass a dtype, a device or a tensor: x.to(torch.float32)")
        if dtype is None:  # .to(device) and friends: values stay where they are
            return self
        if dtype not in _CASTABLE:
            raise self._state.fail(f"cast to {dtype}", f"cast to one of {sorted(str(d) for d in _CASTABLE)}")
        if dtype == self.node.dtype:
            return self
        return self._emit("cast", self, dtype=dtype)

    def type(self, dtype): return self.to(dtype)
    def type_as(self, other): return self.to(other.dtype)

    # -- constructors of scalars: torch's and_masks / or_masks start from
    # b.new_ones((), dtype=torch.bool); the result is a constant (of self's dtype unless
    # `dtype=` says otherwise; `device=` and the other keywords change nothing here)
    def new_ones(self, *size, dtype=None, **kwargs): return self._new_scalar("new_ones", size, 1, dtype)
    def new_zeros(self, *size, dtype=None, **kwargs): return self._new_scalar("new_zeros", size, 0, dtype)

    def new_full(self, size, fill_value, *, dtype=None, **kwargs):
        return self._new_scalar("new_full", (size,), fill_value, dtype)

    def new_tensor(self, data, *, dtype=None, **kwargs):
        return self._new_scalar("new_tensor", ((),), data, dtype)

    def _new_scalar(self, method, size, value, dtype):
        size = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if len(size) != 0:
            raise self._state.fail(f".{method}() of shape {tuple(size)}: a mod computes one value per "
                                   f"(b, h, q_idx, kv_idx)", f"use the shape (): x.{method}(())")
        dtype = dtype if dtype is not None else self.dtype
        if dtype == torch.bool and isinstance(value, (bool, int, float)):
            value = bool(value)  # a bool constant as it is: no cast node
        return Proxy(self._lift(value), self._state).to(dtype)
    def float(self): return self.to(torch.float32)
    def double(self): return self.to(torch.float64)
    def half(self): return self.to(torch.float16)
    def bfloat16(self): return self.to(torch.bfloat16)
    def int(self): return self.to(torch.int32)
    def long(self): return self.to(torch.int64)
    def bool(self): return self.to(torch.bool)

    def __getattr__(self, name):
        raise self._state.fail(f"the tensor method .{name}() is not supported in a mod",
                               "use the supported ops listed in flexattn.trace.SUPPORTED")

    # -- torch functions --------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = _find_state(args, kwargs)
        handler = TORCH_FUNCTIONS.get(func)
        if handler is None:
            name = getattr(func, "__name__", None) or repr(func)
            owner = "torch.Tensor" if isinstance(func, type(T.abs)) or "Tensor" in getattr(func, "__qualname__", "") \
                else "torch"
            raise state.fail(f"{owner}.{name} is not supported in a mod",
                             "rewrite it with the supported ops listed in flexattn.trace.SUPPORTED")
        return handler(state, *args, **kwargs)


def _record_row(state, op: str, args, node) -> None:
    """Remember the length of a new row node; rows combined elementwise must have equal
    lengths (torch would not broadcast a row of 8 with one of 4)."""
    if not node.row or op == "vload":
        return
    lengths = {state.row_len[id(a)] for a in args if a.row}
    if len(lengths) > 1:
        raise state.fail(f"{op} of rows of different lengths {sorted(lengths)} (rows of captured tensors: "
                         f"their last dimensions)", "combine rows of captured tensors whose last sizes are equal")
    state.row_len[id(node)] = lengths.pop()


def _reduced_dim(state, dim, what: str) -> None:
    """Check that `dim` (of a sum / mean of a row) names the row's only dimension."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if dim is None or (len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (0, -1)):
        return
    raise state.fail(f"{what} over dim={dim!r} of a row (a captured tensor indexed in all but its last "
                     f"dimension: one dimension)", f"reduce the row over its last dimension: x.{what}(-1)")


def _sum(state, x, dim=None, keepdim=False, dtype=None, mean=False) -> "Proxy":
    """x.sum(dim) / x.mean(dim) of a row: its rowsum (a scalar); of a scalar: the scalar
    (as torch on a 0-d tensor: sums of bool / integers are int64)."""
    what = "mean" if mean else "sum"
    p = _proxy_of(state, x)
    if keepdim:
        raise state.fail(f"{what}(keepdim=True) (a mod computes one value per (b, h, q_idx, kv_idx))",
                         f"leave keepdim out: x.{what}(-1)")
    if dtype is not None:
        p = p.to(dtype)
    if not p.node.row:
        if dim not in (None, 0, -1, (), (0,), (-1,), [], [0], [-1]):
            raise state.fail(f"{what} over dim={dim!r} of a scalar", f"x.{what}() of a scalar is the scalar itself")
        if mean and not p.dtype.is_floating_point:
            raise state.fail(f"mean of a {str(p.dtype)[6:]} value (torch defines it for floats only)",
                             "cast to a float first: x.float().mean()")
        return p if p.dtype.is_floating_point or p.dtype == torch.int64 else p.to(torch.int64)
    _reduced_dim(state, dim, what)
    if mean and not p.dtype.is_floating_point:
        raise state.fail(f"mean of a {str(p.dtype)[6:]} row (torch defines it for floats only)",
                         "cast to a float first: x.float().mean(-1)")
    out = Proxy(state.graph.op("rowsum", p.node), state)
    return out / state.row_len[id(p.node)] if mean else out


def _dot(state, a, b, name: str) -> "Proxy":
    """torch.dot / torch.inner / @ of two rows: rowsum(a * b)."""
    pa, pb = _proxy_of(state, a), _proxy_of(state, b)
    if not (pa.node.row and pb.node.row):
        raise state.fail(f"{name} of {'a row' if pa.node.row else 'a scalar'} and "
                         f"{'a row' if pb.node.row else 'a scalar'} (it takes two rows of captured tensors)",
                         "for a product with a scalar use *; for rows index captured tensors in all but "
                         "their last dimension: torch.dot(q_rope[b, h, q_idx], k_rope[b, h, kv_idx])")
    return _sum(state, pa * pb)


_CASTABLE = {torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
             torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _find_state(args, kwargs) -> _TraceState:
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, Proxy):
            return a._state
        if isinstance(a, (tuple, list)):
            stack.extend(a)
    raise TraceError("internal: __torch_function__ reached without a proxy argument")


def _lift(state: _TraceState, value) -> Node:
    """A node for a proxy, a Python constant, or a 0-d captured tensor."""
    if isinstance(value, Proxy):
        return value.node
    if isinstance(value, (bool, int, float)):
        return state.graph.const(value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            buf = state.graph.buffer(value)
            return state.graph.op("load", buf)
        raise state.fail(f"a captured tensor of shape {tuple(value.shape)} is used without indexing",
                         "index it with traced values, e.g. table[h] or bias[q_idx - kv_idx]")
    raise state.fail(f"a value of type {type(value).__name__} ({value!r}) cannot enter a mod",
                     "use Python numbers, captured tensors indexed by traced values, or traced values")


def _as_bool(state, v):
    return v.to(torch.bool) if isinstance(v, Proxy) else v


def _where(state: _TraceState, cond, a, b) -> Proxy:
    cond_node = _lift(state, cond)
    if cond_node.dtype != torch.bool:
        raise state.fail(f"torch.where's condition has dtype {cond_node.dtype}",
                         "compare to get a bool, e.g. torch.where(x > 0, a, b)")
    a_node, b_node = _widen_for_constants(state, "where", [_lift(state, a), _lift(state, b)])
    node = state.graph.op("where", cond_node, a_node, b_node)
    _record_row(state, "where", (cond_node, a_node, b_node), node)
    return Proxy(node, state)


_NARROW_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32)
_INT32_RANGE = (-2 ** 31, 2 ** 31)


def _widen_for_constants(state: _TraceState, op: str, nodes: list) -> list:
    """Operands of `op` with the narrow integer ones cast to int64 where an integer constant
    operand does not fit int32 (`q_idx < 2**40`, `q_idx + 2**31`): torch would wrap the
    constant into the index's int32 (or compare against the wrapped value), while Python and
    torch's int64 indices keep its value. Shift amounts and pow exponents are left alone."""
    if op in ("cast", "load", "lshift", "rshift", "pow"):
        return nodes
    if not any(n.op == "const" and type(n.args[0]) is int and not _INT32_RANGE[0] <= n.args[0] < _INT32_RANGE[1]
               for n in nodes):
        return nodes
    return [state.graph.op("cast", n, dtype=torch.int64) if n.op != "const" and n.dtype in _NARROW_INTS else n
            for n in nodes]


# ---------------------------------------------------------------------------------------
# Indexing captured tensors

class _PartialIndex:
    """`table[h]` of a 2-d table: remembers the indices until every dimension has one."""

    def __init__(self, state, tensor, indices):
        self.state, self.tensor, self.indices = state, tensor, indices

    def __getitem__(self, item):
        return _index(self.state, self.tensor, self.indices + _as_tuple(item))

    def __getattr__(self, name):
        raise self.state.fail(f"a partly indexed captured tensor of shape {tuple(self.tensor.shape)} "
                              f"(indexed by {len(self.indices)} of its {self.tensor.dim()} dimensions) was used",
                              "give one index per dimension, e.g. table[h, q_idx]")

    def _bad(self, *a, **k):
        return self.__getattr__("")

    def _row_reduction(self, *a, **k):
        raise self.state.fail(
            f"a captured tensor of shape {tuple(self.tensor.shape)} indexed in {len(self.indices)} of its "
            f"{self.tensor.dim()} dimensions is computed with or reduced (torch.dot, (a * b).sum(-1)); only rows "
            f"(every dimension indexed but the last) can be",
            "index every dimension but the last: torch.dot(q_rope[b, h, q_idx], k_rope[b, h, kv_idx])")

    __add__ = __radd__ = __sub__ = __rsub__ = __truediv__ = _bad
    __mul__ = __rmul__ = __matmul__ = __rmatmul__ = sum = _row_reduction
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __and__ = __or__ = __bool__ = _bad
    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        part = next(a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, _PartialIndex))
        if func in (torch.dot, T.dot, torch.inner, T.inner, torch.vdot, torch.sum, T.sum, torch.mul, T.mul,
                    T.__mul__, T.__rmul__, torch.matmul, T.matmul, T.__matmul__):
            return part._row_reduction()
        return part._bad()


def _as_tuple(item):
    return item if isinstance(item, tuple) else (item,)


def _index(state: _TraceState, tensor: torch.Tensor, indices: tuple):
    if len(indices) > tensor.dim():
        raise state.fail(f"a captured tensor of shape {tuple(tensor.shape)} is indexed with "
                         f"{len(indices)} indices", f"give at most {tensor.dim()} indices")
    nodes = []
    for i, idx in enumerate(indices):
        if isinstance(idx, slice) or idx is Ellipsis or idx is None:
            raise state.fail(f"slicing a captured tensor ({idx!r} in dimension {i})",
                             "index every dimension with one integer value, e.g. table[h, q_idx]")
        if isinstance(idx, bool) or isinstance(idx, float):
            raise state.fail(f"index {idx!r} in dimension {i} of a captured tensor is not an integer",
                             "use an integer index")
        node = _lift(state, idx)
        if node.dtype.is_floating_point or node.dtype == torch.bool:
            raise state.fail(f"a captured tensor of shape {tuple(tensor.shape)} is indexed in dimension "
                             f"{i} by a {str(node.dtype)[6:]} value",
                             "index with integers: cast with .to(torch.int32) or use // instead of /")
        if node.row:
            raise state.fail(f"a captured tensor of shape {tuple(tensor.shape)} is indexed in dimension {i} "
                             f"by a row (a gather by a whole row of indices)",
                             "index with scalars computed from b, h, q_idx, kv_idx")
        nodes.append(node)
    if len(nodes) < tensor.dim() - 1:
        return _PartialIndex(state, tensor, tuple(indices))
    if tensor.dtype.is_complex:
        raise state.fail("a complex captured tensor", "use real tensors")
    buf = state.graph.buffer(tensor)
    if len(nodes) == tensor.dim() - 1:  # the last dimension left open: a row
        node = state.graph.op("vload", buf, *nodes)
        state.row_len[id(node)] = tensor.shape[-1]
        return Proxy(node, state)
    return Proxy(state.graph.op("load", buf, *nodes), state)


def _getitem(state, tensor, item):
    if isinstance(tensor, Proxy):
        return tensor[item]
    return _index(state, tensor, _as_tuple(item))


# ---------------------------------------------------------------------------------------
# The whitelist: every torch function a mod may call, and how it becomes IR.

def _unary(op):
    return lambda state, x, *a, **k: _proxy_of(state, x)._emit(op, x)


def _binary(op, swap=False):
    def handler(state, a, b, *rest, **kw):
        p = a if isinstance(a, Proxy) else b if isinstance(b, Proxy) else None
        if p is None:
            p = Proxy(_lift(state, a), state)
        return p._emit(op, b, a) if swap else p._emit(op, a, b)
    return handler


def _proxy_of(state, x) -> Proxy:
    return x if isinstance(x, Proxy) else Proxy(_lift(state, x), state)


def _div(state, a, b, *, rounding_mode=None):
    p = _proxy_of(state, a)
    if rounding_mode is None:
        return p._emit("truediv", a, b)
    if rounding_mode == "floor":
        return p._emit("floordiv", a, b)
    raise state.fail(f"torch.div with rounding_mode={rounding_mode!r}", "use rounding_mode='floor' or //")


def _clamp(state, x, min=None, max=None):
    return _proxy_of(state, x).clamp(min, max)


def _to(state, x, *args, **kwargs):
    return _proxy_of(state, x).to(*args, **kwargs)


def _relu(state, x):
    # where(x <= 0, 0, x): NaN stays NaN (as torch.relu), and the derivative at 0 is 0 (as
    # torch's threshold_backward), which maximum(x, 0) - ties split evenly - would not give
    p = _proxy_of(state, x)
    return _where(state, p <= 0, 0, p)


_SQRT1_2 = 0.7071067811865476               # M_SQRT1_2
_GELU_BETA = 0.7978845608028654             # M_SQRT2 * M_2_SQRTPI * 0.5 = sqrt(2 / pi)
_GELU_KAPPA = 0.044715


def _gelu(state, x, approximate="none"):
    """torch's formulas (aten's GeluKernel): erf form, or its tanh approximation."""
    p = _proxy_of(state, x)
    if approximate == "none":
        return p * 0.5 * (1 + p._emit("erf", p * _SQRT1_2))
    if approximate == "tanh":
        inner = _GELU_BETA * (p + _GELU_KAPPA * (p * p * p))
        return 0.5 * p * (1 + p._emit("tanh", inner))
    raise state.fail(f"gelu with approximate={approximate!r}", "use approximate='none' or 'tanh'")


def _silu(state, x, inplace=False):
    p = _proxy_of(state, x)
    return p * p._emit("sigmoid", p)


def _softplus(state, x, beta=1.0, threshold=20.0):
    """torch's softplus: x where x * beta > threshold, else log1p(exp(x * beta)) / beta. The
    exponent is zeroed where the linear branch is taken, so its derivative there is 0 * a
    finite number (never inf * 0 = NaN), as torch's softplus_backward."""
    for name, v in (("beta", beta), ("threshold", threshold)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise state.fail(f"softplus with a {name} of type {type(v).__name__}", f"pass {name} as a Python number")
    p = _proxy_of(state, x)
    xb = p * beta if beta != 1 else p
    linear = xb > threshold
    soft = _where(state, linear, 0.0, xb).exp().log1p()
    if beta != 1:
        soft = soft / beta
    return _where(state, linear, p, soft)


def _round(state, x, decimals=0):
    """torch.round: half to even; with `decimals`, aten's formula (x * 10^d rounded, then
    divided by 10^d; for d < 0, x / 10^-d rounded, then multiplied)."""
    p = _proxy_of(state, x)
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise state.fail(f"round with decimals of type {type(decimals).__name__}", "pass decimals as a Python int")
    if decimals == 0:
        return p._emit("round", p)
    if not p.dtype.is_floating_point:
        raise state.fail(f"round(decimals={decimals}) of an integer value (torch does not define it)",
                         "round integers with decimals=0, or cast to a float first")
    if decimals > 0:
        ten = 10.0 ** decimals
        return (p * ten)._emit("round", p * ten) / ten
    ten = 10.0 ** -decimals
    return (p / ten)._emit("round", p / ten) * ten


def _full_like(value):
    def handler(state, x, *args, dtype=None, **kwargs):
        v = args[0] if value is None else value
        node = _lift(state, v)
        out = Proxy(node, state)
        dtype = dtype or (x.dtype if isinstance(x, (Proxy, torch.Tensor)) else None)
        return out.to(dtype) if dtype is not None and dtype != node.dtype else out
    return handler


T = torch.Tensor
TORCH_FUNCTIONS: dict[Callable, Callable] = {
    T.__getitem__: _getitem,
    torch.where: lambda s, c, a, b: _where(s, c, a, b),
    T.where: lambda s, x, c, o: _where(s, c, x, o),
    torch.clamp: _clamp, T.clamp: _clamp, torch.clip: _clamp, T.clip: _clamp,
    T.clamp_min: lambda s, x, m: _clamp(s, x, min=m), T.clamp_max: lambda s, x, m: _clamp(s, x, max=m),
    torch.clamp_min: lambda s, x, m: _clamp(s, x, min=m), torch.clamp_max: lambda s, x, m: _clamp(s, x, max=m),
    T.to: _to, T.float: lambda s, x: _to(s, x, torch.float32), T.int: lambda s, x: _to(s, x, torch.int32),
    T.long: lambda s, x: _to(s, x, torch.int64), T.bool: lambda s, x: _to(s, x, torch.bool),
    T.half: lambda s, x: _to(s, x, torch.float16), T.double: lambda s, x: _to(s, x, torch.float64),
    torch.div: _div, T.div: _div, torch.true_divide: _binary("truediv"), T.__truediv__: _binary("truediv"),
    T.__rtruediv__: _binary("truediv", swap=True),
    torch.floor_divide: _binary("floordiv"), T.__floordiv__: _binary("floordiv"),
    T.__rfloordiv__: _binary("floordiv", swap=True),
    torch.remainder: _binary("mod"), T.__mod__: _binary("mod"), T.__rmod__: _binary("mod", swap=True),
    torch.ones_like: _full_like(1), torch.zeros_like: _full_like(0), torch.full_like: _full_like(None),
}
for _name, _op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("pow", "pow"),
                   ("minimum", "minimum"), ("maximum", "maximum"), ("min", "minimum"), ("max", "maximum"),
                   ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                   ("bitwise_and", "and"), ("bitwise_or", "or"), ("bitwise_xor", "xor")]:
    TORCH_FUNCTIONS[getattr(torch, _name)] = _binary(_op)
    TORCH_FUNCTIONS[getattr(T, _name)] = _binary(_op)
for _name, _op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("pow", "pow"), ("and", "and"),
                   ("or", "or"), ("xor", "xor"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                   ("eq", "eq"), ("ne", "ne")]:
    TORCH_FUNCTIONS[getattr(T, f"__{_name}__")] = _binary(_op)
    if hasattr(T, f"__r{_name}__"):
        TORCH_FUNCTIONS[getattr(T, f"__r{_name}__")] = _binary(_op, swap=True)
for _name in ["logical_and", "logical_or", "logical_xor"]:
    _h = (lambda n: lambda s, a, b: getattr(_proxy_of(s, a).to(torch.bool), n)(b))(_name)
    TORCH_FUNCTIONS[getattr(torch, _name)] = _h
    TORCH_FUNCTIONS[getattr(T, _name)] = _h
TORCH_FUNCTIONS[torch.logical_not] = TORCH_FUNCTIONS[T.logical_not] = \
    lambda s, x: _proxy_of(s, x).logical_not()
TORCH_FUNCTIONS[torch.bitwise_not] = TORCH_FUNCTIONS[T.bitwise_not] = TORCH_FUNCTIONS[T.__invert__] = \
    _unary("invert")
TORCH_FUNCTIONS[T.__neg__] = TORCH_FUNCTIONS[torch.neg] = TORCH_FUNCTIONS[T.neg] = _unary("neg")
TORCH_FUNCTIONS[T.__abs__] = _unary("abs")
for _name in ["abs", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid", "sin", "cos",
              "floor", "ceil"]:
    TORCH_FUNCTIONS[getattr(torch, _name)] = _unary(_name)
    TORCH_FUNCTIONS[getattr(T, _name)] = _unary(_name)
TORCH_FUNCTIONS[torch.square] = TORCH_FUNCTIONS[T.square] = lambda s, x: _proxy_of(s, x).square()
TORCH_FUNCTIONS[torch.reciprocal] = TORCH_FUNCTIONS[T.reciprocal] = lambda s, x: _proxy_of(s, x).reciprocal()
TORCH_FUNCTIONS[torch.special.expit] = _unary("sigmoid")
for _f in (torch.erf, T.erf, torch.special.erf):
    TORCH_FUNCTIONS[_f] = _unary("erf")
for _f in (torch.log1p, T.log1p, torch.special.log1p):
    TORCH_FUNCTIONS[_f] = _unary("log1p")
for _f in (torch.expm1, T.expm1, torch.special.expm1):
    TORCH_FUNCTIONS[_f] = _unary("expm1")
for _f in (torch.sign, T.sign, torch.sgn, T.sgn):
    TORCH_FUNCTIONS[_f] = _unary("sign")
for _f in (torch.trunc, T.trunc, torch.fix, T.fix):
    TORCH_FUNCTIONS[_f] = _unary("trunc")
for _f in (torch.round, T.round, torch.special.round):
    TORCH_FUNCTIONS[_f] = lambda s, x, decimals=0: _round(s, x, decimals=decimals)
for _name in ("frac", "isnan", "isinf", "isfinite", "isposinf", "isneginf"):
    TORCH_FUNCTIONS[getattr(torch, _name)] = TORCH_FUNCTIONS[getattr(T, _name)] = \
        (lambda n: lambda s, x: getattr(_proxy_of(s, x), n)())(_name)
for _f in (torch.fmod, T.fmod):
    TORCH_FUNCTIONS[_f] = _binary("fmod")
for _f in (torch.atan2, T.atan2, torch.arctan2, T.arctan2):
    TORCH_FUNCTIONS[_f] = _binary("atan2")
for _f in (torch.bitwise_left_shift, T.bitwise_left_shift, T.__lshift__):
    TORCH_FUNCTIONS[_f] = _binary("lshift")
for _f in (torch.bitwise_right_shift, T.bitwise_right_shift, T.__rshift__):
    TORCH_FUNCTIONS[_f] = _binary("rshift")
TORCH_FUNCTIONS[T.__rlshift__] = _binary("lshift", swap=True)
TORCH_FUNCTIONS[T.__rrshift__] = _binary("rshift", swap=True)
for _f in (torch.relu, T.relu, F.relu):
    TORCH_FUNCTIONS[_f] = lambda s, x, inplace=False: _relu(s, x)
TORCH_FUNCTIONS[F.gelu] = _gelu
for _f in (torch.sum, T.sum):
    TORCH_FUNCTIONS[_f] = lambda s, x, dim=None, keepdim=False, *, dtype=None: _sum(s, x, dim, keepdim, dtype)
for _f in (torch.mean, T.mean):
    TORCH_FUNCTIONS[_f] = lambda s, x, dim=None, keepdim=False, *, dtype=None: _sum(s, x, dim, keepdim, dtype, True)
for _f, _name in ((torch.dot, "torch.dot"), (T.dot, "torch.dot"), (torch.inner, "torch.inner"),
                  (T.inner, "torch.inner"), (torch.vdot, "torch.vdot"), (torch.matmul, "torch.matmul"),
                  (T.matmul, "torch.matmul"), (T.__matmul__, "@")):
    TORCH_FUNCTIONS[_f] = (lambda n: lambda s, a, b: _dot(s, a, b, n))(_name)
TORCH_FUNCTIONS[T.__rmatmul__] = lambda s, a, b: _dot(s, b, a, "@")
TORCH_FUNCTIONS[F.silu] = _silu
TORCH_FUNCTIONS[F.softplus] = _softplus

SUPPORTED = sorted({getattr(f, "__qualname__", None) or getattr(f, "__name__", "?") for f in TORCH_FUNCTIONS})


# ---------------------------------------------------------------------------------------
# Entry points

MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")


def _mod_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def check_arity(fn: Callable, kind: str, argument: str) -> None:
    """Raise TypeError (naming `argument`) unless `fn` takes the arguments of a `kind` mod."""
    if not callable(fn):
        raise TypeError(f"{argument} must be a callable, got {type(fn).__name__}")
    expected = SCORE_ARGS if kind == "score" else MASK_ARGS
    if torch.compiler.is_compiling():
        return  # dynamo cannot trace inspect.signature; the trace (run outside dynamo) checks again
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins / C callables: let the trace find out
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= len(expected) <= len(positional):
        return
    other = "mask_mod" if kind == "score" else "score_mod"
    hint = ""
    if len(required) == (4 if kind == "score" else 5):
        hint = f" It looks like a {other}: pass it as {other}=..."
    raise TypeError(f"{argument} must take {len(expected)} arguments ({', '.join(expected)}), "
                    f"but {_mod_name(fn)!r} takes {len(positional)} "
                    f"({', '.join(p.name for p in positional)}).{hint}")


def trace(fn: Callable, kind: str, argument: str | None = None) -> Graph:
    """Trace `fn` as a "mask" or "score" mod into a verified IR `Graph`.

    Cached (`flexattn.trace_cache`): calling it again on the same mod with the same
    captured state returns a copy of the earlier graph without running `fn`; new values
    inside a captured tensor keep the graph, a rebound capture or a changed Python number
    traces again."""
    argument = argument or f"{kind}_mod"
    fp = trace_cache.fingerprint(fn, kind, _mod_name(fn)) if trace_cache.is_enabled() else None
    if fp is not None:
        hit = trace_cache.lookup(*fp)
        if hit is not None:
            return hit
    check_arity(fn, kind, argument)
    graph = Graph(kind, _mod_name(fn))
    state = _TraceState(graph, _mod_name(fn))
    names = SCORE_ARGS if kind == "score" else MASK_ARGS
    proxies = [Proxy(graph.input(n), state) for n in names]
    if fp is None:
        out = fn(*proxies)
    else:
        detector = trace_cache.ValueReadDetector((Proxy, _PartialIndex), _TRACER_FILES)
        with detector:
            out = fn(*proxies)
        if detector.value_read is not None:
            fp = None
    graph = _finish(graph, state, out, kind, argument, fn)
    if fp is not None:
        trace_cache.store(*fp, graph)
    return graph


def _finish(graph: Graph, state: _TraceState, out, kind: str, argument: str, fn) -> Graph:
    if isinstance(out, (bool, int, float)) and not isinstance(out, Proxy):
        out_node = graph.const(bool(out) if kind == "mask" else float(out))
    elif isinstance(out, Proxy):
        out_node = out.node
        if out_node.row:
            raise state.fail(f"the {kind}_mod returns a row of length {state.row_len[id(out_node)]} (a captured "
                             f"tensor indexed in all but its last dimension) instead of one value",
                             "reduce the row: (q_rope[b, h, q_idx] * k_rope[b, h, kv_idx]).sum(-1) or torch.dot")
    elif isinstance(out, torch.Tensor) and out.dim() == 0:
        out_node = _lift(state, out)
    else:
        raise TypeError(f"{argument} {_mod_name(fn)!r} returned {type(out).__name__}; a {kind} mod must return "
                        f"a traced value (a {'bool' if kind == 'mask' else 'float'} computed from its arguments)")
    if kind == "mask":
        if out_node.dtype.is_floating_point:
            raise TypeError(f"{argument} {_mod_name(fn)!r} returns a float, but a mask_mod returns a bool. "
                            f"It looks like a score_mod: pass it as score_mod=...")
        if out_node.dtype != torch.bool:
            out_node = graph.op("cast", out_node, dtype=torch.bool)
    else:
        if out_node.dtype == torch.bool:
            raise TypeError(f"{argument} {_mod_name(fn)!r} returns a bool, but a score_mod returns the new score. "
                            f"It looks like a mask_mod: pass it through create_block_mask(...) as block_mask=...")
        if not out_node.dtype.is_floating_point:
            out_node = graph.op("cast", out_node, dtype=torch.float32)
    graph.output = out_node
    return graph.verify()


def trace_mask(fn: Callable, argument: str = "mask_mod") -> Graph:
    return trace(fn, "mask", argument)


def trace_score(fn: Callable, argument: str = "score_mod") -> Graph:
    return trace(fn, "score", argument)


def check_buffers_device(graph: Graph, device: torch.device, argument: str) -> None:
    """Every captured tensor must live on `device` (the kernels read it there)."""
    device = torch.device(device)
    for i, t in enumerate(graph.buffers):
        if t.device.type != device.type or (device.index is not None and t.device.index not in (None, device.index)):
            raise TraceError(f"{argument} {graph.fn_name!r} captures a tensor of shape {tuple(t.shape)} on "
                             f"{t.device}, but the attention runs on {device}: move it with .to({str(device)!r}) "
                             f"before defining the mod")
