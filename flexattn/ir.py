"""The IR: a closed, small op set that every mod is traced into.

A graph is a list of `Node`s in topological order plus one output node. A node has an
`op` (a name from `OPS`), `args` (other nodes, or for leaves a Python value) and a
`dtype` (a torch dtype). Three interpreters read the same graph:

* `flexattn.evaluate`  - runs it with torch on (broadcast) index tensors;
* `flexattn.analyse`   - bounds it over a box of indices (full / empty / undecided);
* `flexattn.codegen`   - prints it as Triton expressions for the kernels.

Leaves:
    input   args=(name,)     name in INPUT_NAMES; dtype int32 for indices, float32 for score
    const   args=(value,)    a Python bool/int/float; dtype bool/int64/float32, *weak*
                             (promotes like a Python scalar in torch)
    buffer  args=(slot,)     the captured tensor `graph.buffers[slot]`; dtype = its dtype
    param   args=(slot,)     a Python int/float passed to the kernels as an argument,
                             `graph.params[slot]`; typed and weak like a const. Tracing
                             makes consts only; `flexattn.codegen.kernel_graph` lifts
                             them into params so that a new value reuses a compiled kernel.
Everything else takes node args; `load(buffer, i0, i1, ...)` reads buffer[i0, i1, ...]
with one integer index per buffer dimension (zero for a 0-d buffer).

Rows: `vload(buffer, i0, ..., i_{n-2})` reads buffer[i0, ..., i_{n-2}, :], a *row* (the last
dimension left open; `node.row` is True). Elementwise ops on rows give rows (a scalar
operand is the same for every element of the row), and `rowsum(x)` sums a row into a
scalar (torch's x.sum(-1); `torch.dot(a, b)` is rowsum(a * b)). A row never leaves its
rowsum: the output and every load index are scalars. The row's length is the buffer's last
size, a run-time value like the other sizes (never part of the structure).

Dtypes follow torch's promotion exactly: `infer_dtype` runs the op on one-element dummy
tensors (and Python scalars for consts), so the IR, the torch evaluator and the user's
own eager code always agree. Its results are memoised per (op, argument dtypes/consts).

Nodes are immutable once added. A graph may grow (more nodes, a new output) but never
rewrites a node; `live_nodes()` and the body of `structure_key()` are memoised against a
stamp of (node count, output, first/last node), and the trace cache hands out copies
(`Graph._with_buffers`) that share node objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

INPUT_NAMES = ("score", "b", "h", "q_idx", "kv_idx")
INDEX_DTYPE = torch.int32
SCORE_DTYPE = torch.float32

LEAF_OPS = frozenset({"input", "const", "buffer", "param"})
UNARY_OPS = frozenset({
    "neg", "abs", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid",
    "sin", "cos", "floor", "ceil", "invert",  # invert: logical not on bool, bitwise not on ints
    "erf", "log1p", "expm1",
    "sign", "trunc", "round",  # round: half to even, as torch.round
    "isnan", "isinf",          # bool results (False for integers)
})
BINARY_ARITH_OPS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "minimum", "maximum",
    "fmod", "atan2",  # fmod: C's remainder (the dividend's sign), as torch.fmod
})
BITWISE_OPS = frozenset({"and", "or", "xor"})  # logical on bool, bitwise on ints
# Shifts on integers with torch's semantics: `>>` is arithmetic (sign-filling) on signed
# types; an amount that is negative or at least the bit width gives 0 for `<<` and the
# sign fill (0 or -1) for `>>`.
SHIFT_OPS = frozenset({"lshift", "rshift"})
COMPARE_OPS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
BINARY_OPS = BINARY_ARITH_OPS | BITWISE_OPS | SHIFT_OPS | COMPARE_OPS
OTHER_OPS = frozenset({"where", "cast", "load"})
ROW_OPS = frozenset({"vload", "rowsum"})  # a row of a captured tensor, and its sum
OPS = LEAF_OPS | UNARY_OPS | BINARY_OPS | OTHER_OPS | ROW_OPS

# How each non-leaf op runs in torch; the single source of truth for evaluate and dtype
# inference. floordiv and mod have Python (floor) semantics, as torch's `//` and `%` do.
TORCH_IMPL: dict[str, Callable[..., Any]] = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "exp2": torch.exp2,
    "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "sin": torch.sin, "cos": torch.cos,
    "floor": torch.floor, "ceil": torch.ceil, "erf": torch.erf, "log1p": torch.log1p,
    "expm1": torch.expm1, "sign": torch.sign, "trunc": torch.trunc, "round": torch.round,
    "isnan": torch.isnan, "isinf": torch.isinf,
    "fmod": lambda a, b: torch.fmod(_weak_tensor(a, b), b),
    "atan2": lambda a, b: torch.atan2(_weak_tensor(a, b), _weak_tensor(b, a)),
    "invert": lambda x: torch.logical_not(x) if x.dtype == torch.bool else torch.bitwise_not(x),
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": lambda a, b: a // b,
    "mod": lambda a, b: a % b, "pow": lambda a, b: a ** b,
    # torch.minimum/maximum take no Python scalars; as_tensor makes a weak 0-d tensor of a
    # constant and returns a tensor argument unchanged
    "minimum": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
    "maximum": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)),
    "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
    # torch's shifts, also when both operands are Python ints (Python's shifts raise on a
    # negative amount and never wrap)
    "lshift": lambda a, b: _tensor_if_both_scalars(a, b, lambda x, y: x << y),
    "rshift": lambda a, b: _tensor_if_both_scalars(a, b, lambda x, y: x >> y),
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "where": lambda c, a, b: torch.where(c, a, b),
    "rowsum": lambda x: x.sum(-1),
}

def _weak_tensor(x, other):
    """x, a Python number, as a 0-d tensor of the dtype it promotes to with `other` (for the
    torch functions that take no number in that place); a tensor x as it is."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=torch.result_type(other, x) if isinstance(other, torch.Tensor) else None)


def _tensor_if_both_scalars(a, b, fn):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a = torch.as_tensor(a)
    return fn(a, b)


# Infix spellings for printing (and for Python-like codegen).
INFIX = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
    "pow": "**", "and": "&", "or": "|", "xor": "^", "lshift": "<<", "rshift": ">>", "lt": "<", "le": "<=", "gt": ">",
    "ge": ">=", "eq": "==", "ne": "!=",
}


class IRError(ValueError):
    """A graph broke an IR invariant (a bug in a tracer or a pass, or a hand-built graph)."""


@dataclass(eq=False)
class Node:
    op: str
    args: tuple
    dtype: torch.dtype
    name: str = ""  # printing name, assigned by Graph.add
    row: bool = False  # a row (vload and what is computed from one before its rowsum)

    @property
    def inputs(self) -> tuple["Node", ...]:
        return () if self.op in LEAF_OPS else tuple(self.args)

    def __repr__(self) -> str:
        return f"%{self.name}" if self.name else f"<{self.op}>"


def _dummy(node: Node):
    """A stand-in value with node's promotion behaviour: Python scalar for consts."""
    if node.op == "const":
        return node.args[0]
    if node.op == "param":  # any value of its type promotes the same way (a weak scalar)
        return 2 if node.dtype == torch.int64 else 2.0
    return torch.ones(1, dtype=node.dtype) if node.dtype != torch.bool else torch.ones(1, dtype=torch.bool)


# infer_dtype results by (op, per-argument signature): a const's signature is its type and
# value (torch's promotion depends on the type only, but whether it raises - an int too
# large for an int32 operand, a negative integer power - can depend on the value), any
# other node's is its dtype. Only successes are stored; errors re-raise every time.
_DTYPE_CACHE: dict[tuple, torch.dtype] = {}
_DTYPE_CACHE_MAX = 8192


def _signature(node) -> object:
    if node.op == "const":
        v = node.args[0]
        return (type(v), "nan" if v != v else v)
    if node.op == "param":
        return ("param", node.dtype)
    return node.dtype


def infer_dtype(op: str, args: tuple[Node, ...], cast_to: torch.dtype | None = None) -> torch.dtype:
    """Result dtype of `op` on `args`, by running torch on one-element dummies (memoised)."""
    if op == "cast":
        return cast_to
    if op in ("load", "vload"):
        return args[0].dtype
    key = (op, *[_signature(a) for a in args])
    dtype = _DTYPE_CACHE.get(key)
    if dtype is None:
        dummies = [_dummy(a) for a in args]
        if all(not isinstance(d, torch.Tensor) for d in dummies):
            dummies[0] = torch.as_tensor(dummies[0]).reshape(1)
        with torch.no_grad():
            dtype = TORCH_IMPL[op](*dummies).dtype
        if len(_DTYPE_CACHE) >= _DTYPE_CACHE_MAX:
            _DTYPE_CACHE.clear()
        _DTYPE_CACHE[key] = dtype
    return dtype


class Graph:
    """A traced mod: nodes in topological order, the output, and the captured buffers.

    `kind` is "mask" (inputs b, h, q_idx, kv_idx; bool output) or "score" (inputs score,
    b, h, q_idx, kv_idx; float output). `buffers[i]` is the tensor behind `buffer` slot i;
    buffers are identified by identity and never enter `structure_key()`.
    """

    def __init__(self, kind: str, fn_name: str = "<mod>"):
        if kind not in ("mask", "score"):
            raise IRError(f"Graph kind must be 'mask' or 'score', got {kind!r}")
        self.kind = kind
        self.fn_name = fn_name
        self.nodes: list[Node] = []
        self.buffers: list[torch.Tensor] = []
        self.params: list[int | float] = []  # values of the `param` leaves, by slot
        self.output: Node | None = None
        self._inputs: dict[str, Node] = {}
        self._consts: dict[tuple, Node] = {}
        self._interned: dict[tuple, Node] = {}  # (op, arg ids, dtype) -> node: common subexpressions once
        self._memo: dict[str, tuple] = {}  # name -> (stamp, value): live_nodes, the printed body

    def _stamp(self) -> tuple:
        """Changes whenever nodes are appended or replaced or the output is set (memo validity;
        nodes themselves are immutable once added). Equal for copies from `_with_buffers`."""
        nodes = self.nodes
        return (len(nodes), id(self.output), id(nodes[0]) if nodes else 0, id(nodes[-1]) if nodes else 0)

    def _with_buffers(self, buffers: list) -> "Graph":
        """A copy sharing this graph's (immutable) nodes, with `buffers` in the slots.

        The trace cache hands these out: every copy has its own containers, so building on
        one (g.op(...), g.output = ...) never changes another; memos are shared and stamped."""
        g = Graph.__new__(Graph)
        g.kind, g.fn_name = self.kind, self.fn_name
        g.nodes, g.buffers, g.output = list(self.nodes), list(buffers), self.output
        g.params = list(self.params)
        g._inputs, g._consts, g._interned = dict(self._inputs), dict(self._consts), dict(self._interned)
        g._memo = self._memo
        return g

    def copy(self, lift_consts=frozenset()) -> "Graph":
        """A new graph computing the same, node by node, with the same buffer slots and
        params; the consts whose ids are in `lift_consts` become new `param` leaves."""
        g = Graph(self.kind, self.fn_name)
        g.buffers = list(self.buffers)
        m: dict[int, Node] = {}
        for n in self.nodes:
            if n.op == "input":
                m[id(n)] = g.input(n.args[0])
            elif n.op == "const":
                m[id(n)] = g.param(n.args[0]) if id(n) in lift_consts else g.const(n.args[0])
            elif n.op == "param":
                m[id(n)] = g.param(self.params[n.args[0]])
            elif n.op == "buffer":  # the same slot, whatever order the nodes come in
                m[id(n)] = g._append(Node("buffer", n.args, n.dtype, n.name))
            else:
                m[id(n)] = g.op(n.op, *[m[id(a)] for a in n.args], dtype=n.dtype if n.op == "cast" else None)
        g.output = m[id(self.output)]
        return g

    # ---- building -------------------------------------------------------------------
    def _append(self, node: Node) -> Node:
        node.name = f"{node.op}{len(self.nodes)}" if node.op not in LEAF_OPS else node.name
        self.nodes.append(node)
        return node

    def input(self, name: str) -> Node:
        if name not in INPUT_NAMES:
            raise IRError(f"unknown input {name!r}; inputs are {INPUT_NAMES}")
        if name not in self._inputs:
            dtype = SCORE_DTYPE if name == "score" else INDEX_DTYPE
            self._inputs[name] = self._append(Node("input", (name,), dtype, name))
        return self._inputs[name]

    def const(self, value) -> Node:
        if isinstance(value, bool):
            dtype = torch.bool
        elif isinstance(value, int):
            dtype = torch.int64
        elif isinstance(value, float):
            dtype = torch.float32
        else:
            raise IRError(f"constants are Python bool/int/float, got {type(value).__name__}")
        key = (type(value), value if not (isinstance(value, float) and math.isnan(value)) else "nan")
        if key not in self._consts:
            self._consts[key] = self._append(Node("const", (value,), dtype, f"c{len(self._consts)}"))
        return self._consts[key]

    def buffer(self, tensor: torch.Tensor) -> Node:
        for i, t in enumerate(self.buffers):
            if t is tensor:
                return next(n for n in self.nodes if n.op == "buffer" and n.args[0] == i)
        self.buffers.append(tensor)
        slot = len(self.buffers) - 1
        return self._append(Node("buffer", (slot,), tensor.dtype, f"buf{slot}"))

    def param(self, value) -> Node:
        """A new kernel-argument leaf holding the Python int or float `value` (never shared:
        one per lifted constant)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise IRError(f"params are Python ints/floats, got {type(value).__name__}")
        self.params.append(value)
        slot = len(self.params) - 1
        dtype = torch.int64 if isinstance(value, int) else torch.float32
        return self._append(Node("param", (slot,), dtype, f"p{slot}"))

    def op(self, op: str, *args: Node, dtype: torch.dtype | None = None) -> Node:
        if op not in OPS or op in LEAF_OPS:
            raise IRError(f"unknown op {op!r}")
        row = op == "vload" or (op != "rowsum" and any(a.row for a in args))
        node = Node(op, tuple(args), infer_dtype(op, args, dtype), row=row)
        key = (op, tuple(id(a) for a in args), node.dtype)
        if key not in self._interned:
            self._interned[key] = self._append(node)
        return self._interned[key]

    # ---- reading --------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return ("score", "b", "h", "q_idx", "kv_idx") if self.kind == "score" else ("b", "h", "q_idx", "kv_idx")

    def uses(self, name: str) -> bool:
        """Whether input `name` reaches the output."""
        return name in {n.args[0] for n in self.live_nodes() if n.op == "input"}

    def live_nodes(self) -> list[Node]:
        """Nodes the output depends on, in topological order."""
        stamp = self._stamp()
        hit = self._memo.get("live")
        if hit is None or hit[0] != stamp:
            hit = self._memo["live"] = (stamp, self._live_nodes())
        return list(hit[1])

    def _live_nodes(self) -> list[Node]:
        return self.upstream([self.output])

    def upstream(self, outputs) -> list[Node]:
        """Nodes any of `outputs` depends on (themselves included), in topological order."""
        needed: set[int] = set()
        stack = list(outputs)
        while stack:
            n = stack.pop()
            if id(n) in needed:
                continue
            needed.add(id(n))
            stack.extend(n.inputs)
        return [n for n in self.nodes if id(n) in needed]

    def loads(self) -> list[Node]:
        """The live reads of captured tensors: loads and row loads (vload)."""
        return [n for n in self.live_nodes() if n.op in ("load", "vload")]

    def structure_key(self) -> str:
        """Identifies the computation, not the captured values: buffer dtypes and ranks
        are part of it, buffer contents and sizes are not; param types are, their values
        are not (const values are)."""
        bufs = ",".join(f"{str(t.dtype)[6:]}[{t.dim()}]" for t in self.buffers)
        if self.params:  # their types, never their values
            bufs += ";" + ",".join(type(v).__name__ for v in self.params)
        stamp = self._stamp()
        hit = self._memo.get("body")
        if hit is None or hit[0] != stamp:
            # the printed buffer / param comments carry shapes and values: leave them out
            # (neither recompiles)
            body = "\n".join(l for l in str(self).splitlines()
                             if not l.lstrip().startswith(("# buf", "# param")))
            hit = self._memo["body"] = (stamp, body)
        return f"{self.kind}({bufs})\n{hit[1]}"

    def __str__(self) -> str:
        lines = [f"def {self.kind}_mod({', '.join(self.input_names)}):  # traced from {self.fn_name}"]
        for i, t in enumerate(self.buffers):
            lines.append(f"    # buf{i}: captured {str(t.dtype)[6:]} tensor of shape {tuple(t.shape)}")
        for i, v in enumerate(self.params):
            lines.append(f"    # param p{i} = {v!r} (a kernel argument)")
        for n in self.live_nodes():
            if n.op in ("input", "buffer", "param"):
                continue
            if n.op == "const":
                continue
            lines.append(f"    {n.name}: {str(n.dtype)[6:]}{'[:]' if n.row else ''} = {_format_rhs(n)}")
        lines.append(f"    return {_format_arg(self.output)}")
        return "\n".join(lines)

    __repr__ = __str__

    # ---- checking -------------------------------------------------------------------
    def verify(self) -> "Graph":
        """Check arity, leaves, dtypes and topological order; raise IRError naming the node."""
        seen: set[int] = set()
        for n in self.nodes:
            if n.op not in OPS:
                raise IRError(f"{n.name}: unknown op {n.op!r}")
            if n.op in LEAF_OPS:
                if len(n.args) != 1:
                    raise IRError(f"{n.name}: leaf {n.op} takes one argument, got {n.args}")
                if n.op == "input" and n.args[0] not in self.input_names:
                    raise IRError(f"{n.name}: input {n.args[0]!r} is not an input of a {self.kind} mod")
                if n.op == "buffer" and not (0 <= n.args[0] < len(self.buffers)):
                    raise IRError(f"{n.name}: buffer slot {n.args[0]} out of range")
                if n.op == "param" and not (0 <= n.args[0] < len(self.params)):
                    raise IRError(f"{n.name}: param slot {n.args[0]} out of range")
            else:
                for a in n.args:
                    if not isinstance(a, Node):
                        raise IRError(f"{n.name}: argument {a!r} is not a node")
                    if id(a) not in seen:
                        raise IRError(f"{n.name}: argument {a.name} is not defined before use")
                arity = {"where": 3, "cast": 1, "rowsum": 1}.get(n.op, 1 if n.op in UNARY_OPS else 2)
                if n.row != (n.op == "vload" or (n.op != "rowsum" and any(a.row for a in n.args))):
                    raise IRError(f"{n.name}: row flag {n.row} does not follow from its op and arguments")
                if n.op in ("load", "vload"):
                    buf = n.args[0]
                    if buf.op != "buffer":
                        raise IRError(f"{n.name}: {n.op} reads a buffer leaf, got {buf.op}")
                    ndim = self.buffers[buf.args[0]].dim() - (n.op == "vload")
                    if len(n.args) - 1 != ndim:
                        raise IRError(f"{n.name}: {n.op} of a {ndim + (n.op == 'vload')}-d buffer takes {ndim} "
                                      f"indices, got {len(n.args) - 1}")
                    for idx in n.args[1:]:
                        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dtype.is_complex:
                            raise IRError(f"{n.name}: load index {idx.name} has dtype {idx.dtype}, expected an integer")
                        if idx.row:
                            raise IRError(f"{n.name}: load index {idx.name} is a row, expected a scalar")
                elif n.op == "rowsum" and (len(n.args) != 1 or not n.args[0].row):
                    raise IRError(f"{n.name}: rowsum takes one row")
                elif len(n.args) != arity:
                    raise IRError(f"{n.name}: {n.op} takes {arity} arguments, got {len(n.args)}")
                if n.op == "where" and n.args[0].dtype != torch.bool:  # before infer_dtype, which would crash
                    raise IRError(f"{n.name}: where's condition must be bool, got {n.args[0].dtype}")
                if n.op not in ("cast", "load", "vload"):
                    try:
                        expected = infer_dtype(n.op, n.args)
                    except RuntimeError as e:
                        raise IRError(f"{n.name}: {n.op} is not defined for its argument dtypes ({e})") from None
                    if expected != n.dtype:
                        raise IRError(f"{n.name}: {n.op} should have dtype {expected}, has {n.dtype}")
            seen.add(id(n))
        if self.output is None or id(self.output) not in seen:
            raise IRError("graph has no output node")
        if self.output.row:
            raise IRError(f"the output {self.output.name} is a row: a mod returns one value")
        if self.kind == "mask" and self.output.dtype != torch.bool:
            raise IRError(f"a mask mod must return bool, returns {self.output.dtype}")
        if self.kind == "score" and not self.output.dtype.is_floating_point:
            raise IRError(f"a score mod must return a float, returns {self.output.dtype}")
        return self


def _format_arg(a) -> str:
    if isinstance(a, Node):
        if a.op == "input":
            return a.args[0]
        if a.op == "const":
            return repr(a.args[0])
        return a.name
    return repr(a)


def _format_rhs(n: Node) -> str:
    args = [_format_arg(a) for a in n.args]
    if n.op in INFIX:
        return f"{args[0]} {INFIX[n.op]} {args[1]}"
    if n.op == "cast":
        return f"{args[0]}.to({n.dtype})"
    if n.op == "load":
        return f"{args[0]}[{', '.join(args[1:])}]"
    if n.op == "vload":
        return f"{args[0]}[{', '.join(args[1:] + [':'])}]"
    if n.op == "rowsum":
        return f"{args[0]}.sum(-1)"
    if n.op == "neg":
        return f"-{args[0]}"
    if n.op == "invert":
        return f"~{args[0]}"
    return f"{n.op}({', '.join(args)})"
