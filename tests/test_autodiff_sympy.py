"""autodiff's derivatives checked symbolically: each differentiable zoo score_mod's traced
graph is turned into a sympy expression, differentiated by sympy, and compared with the
sympy expression of the derivative graph `flexattn.autodiff.differentiate` builds.

The score, the indices and every load of a captured tensor are sympy symbols (a load's
value does not depend on the score), so d/d(score) and d/d(load) are plain sympy
derivatives. The two sides are compared by `sympy.simplify(lhs - rhs) == 0`; where
simplification cannot decide (piecewise expressions from torch.where, min/max), both sides
are evaluated exactly at sample points away from the kinks.
"""
from __future__ import annotations

import random

import pytest
import torch

sympy = pytest.importorskip("sympy")

from flexattn.autodiff import differentiate  # noqa: E402
from flexattn.ir import OPS  # noqa: E402
from flexattn.trace import trace_score  # noqa: E402
from mods_zoo import ROW_ZOO_NAMES, ZOO_NAMES, make_mod  # noqa: E402

_SYMBOLS = {name: sympy.Symbol(name, real=True) for name in ("score", "b", "h", "q_idx", "kv_idx")}


def _floor_div(a, b):
    return sympy.floor(a / b)


# op -> sympy builder; ops a score graph's float path never reaches are still listed so the
# table covers the IR (integer/bool ops are exact sympy functions too)
_SYMPY = {
    "neg": lambda a: -a, "abs": sympy.Abs, "exp": sympy.exp, "exp2": lambda a: 2 ** a,
    "log": sympy.log, "log2": lambda a: sympy.log(a, 2), "sqrt": sympy.sqrt, "rsqrt": lambda a: 1 / sympy.sqrt(a),
    "tanh": sympy.tanh, "sigmoid": lambda a: 1 / (1 + sympy.exp(-a)), "sin": sympy.sin, "cos": sympy.cos,
    "floor": sympy.floor, "ceil": sympy.ceiling, "invert": sympy.Not,
    "erf": sympy.erf, "log1p": lambda a: sympy.log(1 + a), "expm1": lambda a: sympy.exp(a) - 1,
    "sign": sympy.sign, "trunc": lambda a: sympy.Piecewise((sympy.floor(a), a >= 0), (sympy.ceiling(a), True)),
    "round": lambda a: sympy.floor(a + sympy.Rational(1, 2)),  # (half to even differs only on ties)
    "isnan": lambda a: sympy.false, "isinf": lambda a: sympy.false,
    "fmod": lambda a, b: a - b * sympy.Piecewise((sympy.floor(a / b), a / b >= 0), (sympy.ceiling(a / b), True)),
    "atan2": sympy.atan2,
    "lshift": lambda a, b: a * 2 ** b, "rshift": lambda a, b: sympy.floor(a / 2 ** b),
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": _floor_div, "mod": lambda a, b: sympy.Mod(a, b),
    "pow": lambda a, b: a ** b, "minimum": sympy.Min, "maximum": sympy.Max,
    "and": sympy.And, "or": sympy.Or, "xor": sympy.Xor,
    "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne,
    "where": lambda c, a, b: sympy.Piecewise((a, c), (b, True)),
}


def test_the_sympy_table_covers_the_ir():
    assert set(_SYMPY) | {"input", "const", "param", "buffer", "load", "vload", "rowsum", "cast"} == set(OPS)


def to_sympy(graph, node, load_symbols, memo):
    """The sympy expression of `node`; loads become the symbols in `load_symbols` (by node id).
    A row is a tuple of expressions, one per element (a row load: one symbol per element);
    elementwise ops map over it (a scalar operand is every element's), rowsum adds it up."""
    if id(node) in memo:
        return memo[id(node)]
    op = node.op
    if op == "input":
        e = _SYMBOLS[node.args[0]]
    elif op == "const":
        v = node.args[0]
        e = sympy.true if v is True else sympy.false if v is False else sympy.nsimplify(v, rational=True)
    elif op == "param":
        e = sympy.nsimplify(graph.params[node.args[0]], rational=True)
    elif op == "load":
        e = load_symbols.setdefault(id(node), sympy.Symbol(f"load_{node.name}", real=True))
    elif op == "vload":
        length = graph.buffers[node.args[0].args[0]].shape[-1]
        e = load_symbols.setdefault(id(node), tuple(sympy.Symbol(f"load_{node.name}_{j}", real=True)
                                                    for j in range(length)))
    elif op == "rowsum":
        e = sympy.Add(*to_sympy(graph, node.args[0], load_symbols, memo))
    elif node.row:
        args = [to_sympy(graph, a, load_symbols, memo) for a in node.args]
        length = next(len(a) for a in args if isinstance(a, tuple))
        e = tuple(_scalar_sympy(graph, node, [a[j] if isinstance(a, tuple) else a for a in args])
                  for j in range(length))
    else:
        e = _scalar_sympy(graph, node, [to_sympy(graph, a, load_symbols, memo) for a in node.args])
    memo[id(node)] = e
    return e


def _scalar_sympy(graph, node, args):
    """The sympy expression of non-leaf `node` (not a row load or rowsum) on scalar `args`."""
    if node.op == "cast":
        (a,) = args
        src, dst = node.args[0].dtype, node.dtype
        if dst == torch.bool:
            return sympy.Ne(a, 0)
        if src == torch.bool:
            return sympy.Piecewise((1, a), (0, True))
        if src.is_floating_point and not dst.is_floating_point:
            return sympy.Piecewise((sympy.floor(a), a >= 0), (sympy.ceiling(a), True))  # truncation
        return a  # float <-> float and int -> float: the same real number (up to rounding)
    return _SYMPY[node.op](*args)


def _differentiable(name):
    m = make_mod(name, B=2, H=4, L=16, S=16, requires_grad=True)
    if m.score_mod is None:
        return None
    return m, trace_score(m.score_mod)


CASES = [n for n in ZOO_NAMES + ROW_ZOO_NAMES if make_mod(n, B=2, H=4, L=16, S=16).score_mod is not None]


def _same(lhs, rhs, symbols, rng):
    """lhs == rhs: symbolically when sympy can show it, else exactly at sample points."""
    diff = sympy.simplify(lhs - rhs)
    if diff == 0:
        return True
    for _ in range(8):
        point = {}
        for s in symbols:
            if s.name in ("b", "h", "q_idx", "kv_idx"):
                point[s] = rng.randint(0, 15)
            else:  # score and loaded values: away from 0 and from the integers (kinks)
                point[s] = sympy.Rational(rng.randint(-4000, 4000), 997) + sympy.Rational(1, 7919)
        l, r = lhs.subs(point), rhs.subs(point)
        if not (l.is_finite and r.is_finite):
            continue
        if abs(float((l - r).evalf(30))) > 1e-20 * max(1.0, abs(float(l.evalf(30)))):
            return False
    return True


@pytest.mark.parametrize("name", CASES)
def test_autodiff_matches_sympy(name):
    m, graph = _differentiable(name)
    slots = [i for i, t in enumerate(graph.buffers) if t.dtype.is_floating_point]
    d = differentiate(graph, slots)
    loads = {}
    expr = to_sympy(d.graph, d.graph.output, loads, {})
    memo_d = {}
    dscore = to_sympy(d.graph, d.dscore, loads, memo_d)
    rng = random.Random(0)
    symbols = sorted(expr.free_symbols | dscore.free_symbols | set(_SYMBOLS.values()), key=lambda s: s.name)
    assert _same(sympy.diff(expr, _SYMBOLS["score"]), dscore, symbols, rng), name
    assert len(d.load_grads) == sum(1 for n in graph.live_nodes() if n.op in ("load", "vload")
                                    and n.args[0].args[0] in slots and n.dtype.is_floating_point)
    for load, grad in d.load_grads:
        sym = loads[id(load)]
        got = to_sympy(d.graph, grad, loads, memo_d)
        if load.op == "vload":  # a row's gradient, element by element (a scalar: every element's)
            for j, s in enumerate(sym):
                g = got[j] if isinstance(got, tuple) else got
                assert _same(sympy.diff(expr, s), g, symbols, rng), (name, load.name, j)
        else:
            assert _same(sympy.diff(expr, sym), got, symbols, rng), (name, load.name)
