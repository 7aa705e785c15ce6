"""The IR pass before printing: Python number constants lifted into kernel arguments.

`kernel_graph(graph)` turns the mod's number constants into `param` leaves, so a mod that
differs only in such a number (a window width, a softcap, a bias scale) reuses the
compiled kernel. Constants stay literal where a use needs the literal: load indices
(bounds tests on literals, index math the compiler folds), integer divisors (division by a
literal is a multiply-shift; by an argument, a real division), pow exponents (printed
as multiplications / sqrt by value) and shift amounts.
"""
from __future__ import annotations

import math

from .ir import Graph

# (op, argument position) uses that keep a constant in the source: load indices (bounds
# tests on literals, and the index math the compiler folds), integer divisors (division by
# a literal is a multiply-shift; by an argument, a real division), pow exponents (printed
# as multiplications / sqrt by value), shift amounts (a literal amount inside [0, bits)
# prints as a bare shift; an argument needs torch's range handling at run time).
_KEEP_LITERAL = {("floordiv", 1), ("mod", 1), ("pow", 1), ("lshift", 1), ("rshift", 1)}
_INT32 = (-2 ** 31, 2 ** 31)


def _liftable(graph: Graph) -> set[int]:
    """ids of the live consts that become params: finite floats and ints that fit a 32-bit
    kernel argument, unless some use keeps them literal (_KEEP_LITERAL, load indices)."""
    live = graph.live_nodes()
    lift = {id(n) for n in live if n.op == "const" and not isinstance(n.args[0], bool) and (
        (isinstance(n.args[0], int) and _INT32[0] <= n.args[0] < _INT32[1])
        or (isinstance(n.args[0], float) and math.isfinite(n.args[0])))}
    for n in live:
        for pos, a in enumerate(n.inputs):
            if (n.op, pos) in _KEEP_LITERAL or (n.op in ("load", "vload") and pos > 0):
                lift.discard(id(a))
    return lift


def kernel_graph(graph: Graph | None) -> Graph | None:
    """`graph` with its Python number constants lifted into `param` leaves: the kernels take
    them as arguments, so a mod that differs only in such a number (a window width, a
    softcap, a bias scale) reuses the compiled kernel. Buffer slots are kept. The lifted
    template is memoised on the graph (copies from the trace cache share it)."""
    if graph is None:
        return None
    stamp = graph._stamp()
    hit = graph._memo.get("kernel")
    if hit is None or hit[0] != stamp:
        lift = _liftable(graph)
        # the memo keeps a buffer-less template: it outlives the call's captured tensors
        lifted = graph.copy(lift_consts=lift).verify()._with_buffers([]) if lift else None
        hit = graph._memo["kernel"] = (stamp, lifted)
    # nothing to lift: the graph itself (no copy on the per-call path)
    return graph if hit[1] is None else hit[1]._with_buffers(graph.buffers)
