"""Reverse-mode derivative of a score_mod IR graph, as new IR.

    d = differentiate(graph, grad_slots=[0])
    d.graph        # a copy of `graph` with the adjoint nodes appended (same buffers)
    d.dscore       # node: d(output)/d(score)
    d.load_grads   # [(load node, node: d(output)/d(value loaded))] for loads of the slots
                   # (row loads too: the node is a row, or a scalar that every element gets)

The backward kernels print `d.dscore` (times the incoming gradient) and, for captured
float tensors that require grad, each load's adjoint: its value times the incoming
gradient is added into the buffer's gradient at the load's index. A tensor read several
times gets one entry per read (their contributions add up), which is how we support
what torch FlexAttention rejects.

Rules follow torch's autograd formulas, including its conventions at kinks:
abs'(0) = 0, maximum/minimum split the gradient evenly on ties, floor/ceil/round/trunc/sign
and integer casts have zero derivative. Integer ops (comparisons, bit ops, shifts) carry none.

Rows (flexattn.ir): the adjoint of a row is a row, or a scalar meaning the same value for
every element (rowsum passes its own adjoint down unchanged); where a scalar operand meets
a row in an op, its adjoint is the rowsum of what the row op gives it (broadcasting
reversed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .ir import BITWISE_OPS, COMPARE_OPS, LEAF_OPS, OPS, SHIFT_OPS, Graph, Node

LN2 = math.log(2.0)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


@dataclass
class Derivative:
    graph: Graph
    dscore: Node
    load_grads: list = field(default_factory=list)
    _deps: dict = field(default_factory=dict)

    def depends(self, node: Node) -> set[str]:
        """Which inputs (score, b, h, q_idx, kv_idx) `node` depends on."""
        return self._deps[id(node)]


def grad_slots(graph: Graph | None) -> tuple[int, ...]:
    """Slots of the captured float tensors that require grad and that the output reads:
    the buffers the backward returns gradients for."""
    if graph is None:
        return ()
    read = {n.args[0].args[0] for n in graph.loads()}
    return tuple(i for i, t in enumerate(graph.buffers)
                 if t.requires_grad and t.dtype.is_floating_point and i in read)


def differentiate(graph: Graph, grad_slots=()) -> Derivative:
    """d(output)/d(score) and d(output)/d(each load of a buffer in grad_slots), as IR."""
    g = graph.copy()
    grad_slots = set(grad_slots)
    live = g.live_nodes()

    deps: dict[int, set] = {}
    for n in g.nodes:
        if n.op == "input":
            deps[id(n)] = {n.args[0]}
        elif n.op in LEAF_OPS:
            deps[id(n)] = set()
        else:
            deps[id(n)] = set().union(*[deps[id(a)] for a in n.args])

    # which nodes carry a derivative: float nodes downstream of score or a grad load
    active: set[int] = set()
    for n in live:
        if n.op == "input" and n.args[0] == "score":
            active.add(id(n))
        elif n.op in ("load", "vload") and n.args[0].args[0] in grad_slots and n.dtype.is_floating_point:
            active.add(id(n))
        elif n.op not in _SOURCES and n.dtype.is_floating_point \
                and any(id(a) in active for a in n.args):
            active.add(id(n))

    zero = g.const(0.0)
    one = g.const(1.0)
    adj: dict[int, Node] = {id(g.output): one} if id(g.output) in active else {}

    def acc(node: Node, val: Node):
        if id(node) not in active or val is None:
            return
        if val.row and not node.row:  # a scalar broadcast over a row: its adjoint sums the row's
            val = g.op("rowsum", val)
        adj[id(node)] = val if id(node) not in adj else g.op("add", adj[id(node)], val)

    ctx = _Context(g, acc, active, zero, one)
    for n in reversed(live):
        if id(n) not in adj or n.op in _SOURCES:
            continue
        rule = RULES.get(n.op)
        if rule is None:
            raise NotImplementedError(f"no derivative rule for {n.op}")
        rule(ctx, n, n.args, adj[id(n)])

    score = g.input("score")
    dscore = adj.get(id(score), zero)
    if dscore.dtype != torch.float32:
        dscore = g.op("cast", dscore, dtype=torch.float32)
    load_grads = []
    for n in live:
        if n.op in ("load", "vload") and id(n) in active:
            ga = adj.get(id(n), zero)
            if ga.dtype != torch.float32:
                ga = g.op("cast", ga, dtype=torch.float32)
            load_grads.append((n, ga))
    for n in g.nodes:  # new nodes too
        if id(n) not in deps:
            deps[id(n)] = set().union(*[deps[id(x)] for x in n.inputs]) if n.inputs else \
                ({n.args[0]} if n.op == "input" else set())
    return Derivative(g, dscore, load_grads, deps)


# ---------------------------------------------------------------------------------------
# Rules, one per op: rule(ctx, n, args, ga) adds the adjoint of n's args given ga, n's own.

class _Context:
    __slots__ = ("g", "op", "acc", "active", "zero", "one")

    def __init__(self, g, acc, active, zero, one):
        self.g, self.op, self.acc, self.active, self.zero, self.one = g, g.op, acc, active, zero, one


def _add(c, n, a, ga):
    c.acc(a[0], ga); c.acc(a[1], ga)


def _sub(c, n, a, ga):
    c.acc(a[0], ga); c.acc(a[1], c.op("neg", ga))


def _mul(c, n, a, ga):
    c.acc(a[0], c.op("mul", ga, a[1])); c.acc(a[1], c.op("mul", ga, a[0]))


def _truediv(c, n, a, ga):
    c.acc(a[0], c.op("truediv", ga, a[1]))
    if id(a[1]) in c.active:
        c.acc(a[1], c.op("neg", c.op("truediv", c.op("mul", ga, n), a[1])))


def _neg(c, n, a, ga):
    c.acc(a[0], c.op("neg", ga))


def _abs(c, n, a, ga):
    op, zero = c.op, c.zero
    c.acc(a[0], op("where", op("gt", a[0], zero), ga, op("where", op("lt", a[0], zero), op("neg", ga), zero)))


def _exp(c, n, a, ga):
    c.acc(a[0], c.op("mul", ga, n))


def _exp2(c, n, a, ga):
    c.acc(a[0], c.op("mul", c.op("mul", ga, n), c.g.const(LN2)))


def _log(c, n, a, ga):
    c.acc(a[0], c.op("truediv", ga, a[0]))


def _log2(c, n, a, ga):
    c.acc(a[0], c.op("truediv", ga, c.op("mul", a[0], c.g.const(LN2))))


def _sqrt(c, n, a, ga):
    c.acc(a[0], c.op("truediv", c.op("mul", ga, c.g.const(0.5)), n))


def _rsqrt(c, n, a, ga):
    c.acc(a[0], c.op("mul", c.op("mul", ga, c.g.const(-0.5)), c.op("truediv", n, a[0])))


def _tanh(c, n, a, ga):
    c.acc(a[0], c.op("mul", ga, c.op("sub", c.one, c.op("mul", n, n))))


def _sigmoid(c, n, a, ga):
    c.acc(a[0], c.op("mul", c.op("mul", ga, n), c.op("sub", c.one, n)))


def _sin(c, n, a, ga):
    c.acc(a[0], c.op("mul", ga, c.op("cos", a[0])))


def _cos(c, n, a, ga):
    c.acc(a[0], c.op("neg", c.op("mul", ga, c.op("sin", a[0]))))


def _erf(c, n, a, ga):  # 2 / sqrt(pi) * exp(-x^2)
    op, g = c.op, c.g
    c.acc(a[0], op("mul", ga, op("mul", g.const(TWO_OVER_SQRT_PI), op("exp", op("neg", op("mul", a[0], a[0]))))))


def _log1p(c, n, a, ga):
    c.acc(a[0], c.op("truediv", ga, c.op("add", a[0], c.one)))


def _expm1(c, n, a, ga):  # exp(x) = expm1(x) + 1, as torch's expm1_backward
    c.acc(a[0], c.op("mul", ga, c.op("add", n, c.one)))


def _piecewise_constant(c, n, a, ga):
    pass


def _fmod(c, n, a, ga):  # a - b * trunc(a / b)
    c.acc(a[0], ga)
    if id(a[1]) in c.active:
        c.acc(a[1], c.op("neg", c.op("mul", ga, c.op("trunc", c.op("truediv", a[0], a[1])))))


def _atan2(c, n, a, ga):  # d/dy = x / (x^2 + y^2), d/dx = -y / (x^2 + y^2)
    op = c.op
    y, x = a
    r2 = op("add", op("mul", x, x), op("mul", y, y))
    c.acc(y, op("truediv", op("mul", ga, x), r2))
    c.acc(x, op("neg", op("truediv", op("mul", ga, y), r2)))


def _mod(c, n, a, ga):  # a - b * floor(a / b)
    c.acc(a[0], ga)
    if id(a[1]) in c.active:
        c.acc(a[1], c.op("neg", c.op("mul", ga, c.op("floor", c.op("truediv", a[0], a[1])))))


def _pow(c, n, a, ga):
    op, g = c.op, c.g
    if a[1].op == "const":
        e = a[1].args[0]
        c.acc(a[0], op("mul", ga, op("mul", g.const(float(e)), op("pow", a[0], g.const(float(e) - 1.0)))))
    else:
        c.acc(a[0], op("mul", ga, op("mul", a[1], op("pow", a[0], op("sub", a[1], c.one)))))
        c.acc(a[1], op("mul", ga, op("mul", n, op("log", a[0]))))


def _minmax(win):
    def rule(c, n, a, ga):
        op, zero = c.op, c.zero
        half = op("mul", ga, c.g.const(0.5))
        tie = op("eq", a[0], a[1])
        c.acc(a[0], op("where", op(win, a[0], a[1]), ga, op("where", tie, half, zero)))
        c.acc(a[1], op("where", op(win, a[1], a[0]), ga, op("where", tie, half, zero)))
    return rule


def _where(c, n, a, ga):
    c.acc(a[1], c.op("where", a[0], ga, c.zero)); c.acc(a[2], c.op("where", a[0], c.zero, ga))


def _rowsum(c, n, a, ga):
    c.acc(a[0], ga)


def _cast(c, n, a, ga):
    if a[0].dtype.is_floating_point:
        c.acc(a[0], ga if ga.dtype == a[0].dtype else c.op("cast", ga, dtype=a[0].dtype))


RULES = {
    "add": _add, "sub": _sub, "mul": _mul, "truediv": _truediv, "neg": _neg, "abs": _abs,
    "exp": _exp, "exp2": _exp2, "log": _log, "log2": _log2, "sqrt": _sqrt, "rsqrt": _rsqrt,
    "tanh": _tanh, "sigmoid": _sigmoid, "sin": _sin, "cos": _cos, "erf": _erf, "log1p": _log1p,
    "floor": _piecewise_constant, "ceil": _piecewise_constant, "floordiv": _piecewise_constant,
    "expm1": _expm1, "sign": _piecewise_constant, "trunc": _piecewise_constant, "round": _piecewise_constant,
    "fmod": _fmod, "atan2": _atan2,
    "mod": _mod, "pow": _pow, "minimum": _minmax("lt"), "maximum": _minmax("gt"),
    "where": _where, "cast": _cast, "rowsum": _rowsum,
}
# Where derivatives start (the score input, loads of captured tensors) or stop (leaves).
_SOURCES = LEAF_OPS | {"load", "vload"}
# Ops whose result is never a float (bool or integer), so it never carries a derivative.
NOT_DIFFERENTIABLE = COMPARE_OPS | BITWISE_OPS | SHIFT_OPS | {"invert", "isnan", "isinf"}
assert set(RULES) | NOT_DIFFERENTIABLE | _SOURCES == set(OPS), \
    f"autodiff rules missing for {set(OPS) - set(RULES) - NOT_DIFFERENTIABLE - _SOURCES}"
