"""Reverse-mode derivative of a score_mod IR graph, as new IR.

    d = differentiate(graph, grad_slots=[0])
    d.graph        # a copy of `graph` with the adjoint nodes appended (same buffers)
    d.dscore       # node: d(output)/d(score)
    d.load_grads   # [(load node, node: d(output)/d(value loaded))] for loads of the slots

The backward kernels print `d.dscore` (times the incoming gradient) and, for captured
float tensors that require grad, each load's adjoint: its value times the incoming
gradient is added into the buffer's gradient at the load's index. A tensor read several
times gets one entry per read (their contributions add up), which is how we support
what torch FlexAttention rejects.

Rules follow torch's autograd formulas, including its conventions at kinks:
abs'(0) = 0, maximum/minimum split the gradient evenly on ties, floor/ceil/round and
integer casts have zero derivative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .ir import Graph, Node

LN2 = math.log(2.0)


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
        elif n.op in ("const", "param", "buffer"):
            deps[id(n)] = set()
        else:
            deps[id(n)] = set().union(*[deps[id(a)] for a in n.args])

    # which nodes carry a derivative: float nodes downstream of score or a grad load
    active: set[int] = set()
    for n in live:
        if n.op == "input" and n.args[0] == "score":
            active.add(id(n))
        elif n.op == "load" and n.args[0].args[0] in grad_slots and n.dtype.is_floating_point:
            active.add(id(n))
        elif n.op not in ("input", "const", "param", "buffer", "load") and n.dtype.is_floating_point \
                and any(id(a) in active for a in n.args):
            active.add(id(n))

    zero = g.const(0.0)
    one = g.const(1.0)
    adj: dict[int, Node] = {id(g.output): one} if id(g.output) in active else {}

    def acc(node: Node, val: Node):
        if id(node) not in active or val is None:
            return
        adj[id(node)] = val if id(node) not in adj else g.op("add", adj[id(node)], val)

    op = g.op
    for n in reversed(live):
        if id(n) not in adj or n.op in ("input", "const", "param", "buffer", "load"):
            continue
        ga = adj[id(n)]
        a = n.args
        if n.op == "add":
            acc(a[0], ga); acc(a[1], ga)
        elif n.op == "sub":
            acc(a[0], ga); acc(a[1], op("neg", ga))
        elif n.op == "mul":
            acc(a[0], op("mul", ga, a[1])); acc(a[1], op("mul", ga, a[0]))
        elif n.op == "truediv":
            acc(a[0], op("truediv", ga, a[1]))
            if id(a[1]) in active:
                acc(a[1], op("neg", op("truediv", op("mul", ga, n), a[1])))
        elif n.op == "neg":
            acc(a[0], op("neg", ga))
        elif n.op == "abs":
            acc(a[0], op("where", op("gt", a[0], zero), ga,
                         op("where", op("lt", a[0], zero), op("neg", ga), zero)))
        elif n.op == "exp":
            acc(a[0], op("mul", ga, n))
        elif n.op == "exp2":
            acc(a[0], op("mul", op("mul", ga, n), g.const(LN2)))
        elif n.op == "log":
            acc(a[0], op("truediv", ga, a[0]))
        elif n.op == "log2":
            acc(a[0], op("truediv", ga, op("mul", a[0], g.const(LN2))))
        elif n.op == "sqrt":
            acc(a[0], op("truediv", op("mul", ga, g.const(0.5)), n))
        elif n.op == "rsqrt":
            acc(a[0], op("mul", op("mul", ga, g.const(-0.5)), op("truediv", n, a[0])))
        elif n.op == "tanh":
            acc(a[0], op("mul", ga, op("sub", one, op("mul", n, n))))
        elif n.op == "sigmoid":
            acc(a[0], op("mul", op("mul", ga, n), op("sub", one, n)))
        elif n.op == "sin":
            acc(a[0], op("mul", ga, op("cos", a[0])))
        elif n.op == "cos":
            acc(a[0], op("neg", op("mul", ga, op("sin", a[0]))))
        elif n.op in ("floor", "ceil", "floordiv"):
            pass  # piecewise constant
        elif n.op == "mod":  # a - b * floor(a / b)
            acc(a[0], ga)
            if id(a[1]) in active:
                acc(a[1], op("neg", op("mul", ga, op("floor", op("truediv", a[0], a[1])))))
        elif n.op == "pow":
            if a[1].op == "const":
                e = a[1].args[0]
                acc(a[0], op("mul", ga, op("mul", g.const(float(e)), op("pow", a[0], g.const(float(e) - 1.0)))))
            else:
                acc(a[0], op("mul", ga, op("mul", a[1], op("pow", a[0], op("sub", a[1], one)))))
                acc(a[1], op("mul", ga, op("mul", n, op("log", a[0]))))
        elif n.op in ("minimum", "maximum"):
            win = "lt" if n.op == "minimum" else "gt"
            half = op("mul", ga, g.const(0.5))
            tie = op("eq", a[0], a[1])
            acc(a[0], op("where", op(win, a[0], a[1]), ga, op("where", tie, half, zero)))
            acc(a[1], op("where", op(win, a[1], a[0]), ga, op("where", tie, half, zero)))
        elif n.op == "where":
            acc(a[1], op("where", a[0], ga, zero)); acc(a[2], op("where", a[0], zero, ga))
        elif n.op == "cast":
            if a[0].dtype.is_floating_point:
                acc(a[0], ga if ga.dtype == a[0].dtype else op("cast", ga, dtype=a[0].dtype))
        else:
            raise NotImplementedError(f"no derivative rule for {n.op}")

    score = g.input("score")
    dscore = adj.get(id(score), zero)
    if dscore.dtype != torch.float32:
        dscore = g.op("cast", dscore, dtype=torch.float32)
    load_grads = []
    for n in live:
        if n.op == "load" and id(n) in active:
            ga = adj.get(id(n), zero)
            if ga.dtype != torch.float32:
                ga = g.op("cast", ga, dtype=torch.float32)
            load_grads.append((n, ga))
    for n in g.nodes:  # new nodes too
        if id(n) not in deps:
            deps[id(n)] = set().union(*[deps[id(x)] for x in n.inputs]) if n.inputs else \
                ({n.args[0]} if n.op == "input" else set())
    return Derivative(g, dscore, load_grads, deps)
