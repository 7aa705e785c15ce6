"""Analyse: bound a mask graph over boxes of indices, deciding FULL / EMPTY / UNDECIDED.

`BoxAnalyser(graph, Q_LEN, KV_LEN).decide(b, h, q_lo, q_hi, kv_lo, kv_hi)` looks at the
boxes {b} x {h} x [q_lo, q_hi] x [kv_lo, kv_hi] (inclusive; q_* shaped [n, 1], kv_* shaped
[1, m], so one call covers a chunk of q-blocks against every kv-block) and returns an int8
tensor of FULL (mask provably true everywhere in the box), EMPTY (provably false) or
UNDECIDED. Every decision is sound: UNDECIDED is always allowed, and the caller evaluates
those boxes exactly.

Abstract values (`AV`), one per IR node:

* integer values linear in q_idx / kv_idx keep an exact affine form c_q*q + c_kv*kv + c0
  (b and h are points here, so they are constants); a linear form's bounds over a box
  are exact, which avoids the interval dependency problem (`q - (q - kv)`, `q - kv >= 0`);
* everything else is an interval [lo, hi] held as float64 tensors broadcastable to [n, m].
  Integer bounds are exact (a bound past 2**53 or the dtype's range - where torch would
  wrap - becomes the dtype's whole range). Float bounds are widened outward by a few ulps
  of the node's dtype after every rounding op, so float32 rounding can never turn a
  decision wrong; a float value may also be NaN where `nan` is set;
* bools are intervals with bounds in {0, 1}: lo = 1 means surely true, hi = 0 surely false.

Captured tensors (`load`) are bounded by their min / max over the indexed range, read from a
lazily built sparse table (O(1) per box). Index dimensions that are points (e.g. `table[h,
q_idx]` with h fixed) select; several ranged dimensions reduce over their joint range.
An index that may fall outside the buffer gives an unknown value, so the exact evaluation
(which raises a clear IndexError) decides.

Rows (`vload`, see flexattn.ir): every element lies in the buffer's whole [min, max], widened
to include 0 (what the kernels read out of bounds); elementwise rules do not care that a
value is a row; a `rowsum` of R elements lies in R times its row's bounds, widened by the
rounding of R float32 additions.
"""
from __future__ import annotations

import math

import torch

from .ir import COMPARE_OPS, OPS, Graph, Node, _dummy

EMPTY, FULL, UNDECIDED = 0, 2, 3
_F64 = torch.float64
_EXACT_INT = float(2 ** 53)  # float64 holds every integer up to this exactly
_INF = math.inf


def _int_range(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.bool:
        return 0.0, 1.0
    info = torch.iinfo(dtype)
    return float(max(info.min, -_EXACT_INT)), float(min(info.max, _EXACT_INT))


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and dtype != torch.bool


class AV:
    """Abstract value: affine form (ints only) or interval [lo, hi] (+ may-be-NaN flag)."""

    __slots__ = ("dtype", "aff", "lo", "hi", "nan", "abs_of")

    def __init__(self, dtype, aff=None, lo=None, hi=None, nan=False, abs_of=None):
        self.abs_of = abs_of  # this value is |affine form abs_of| (kept for exact compares)
        self.dtype = dtype
        self.aff = aff      # (c_q, c_kv, c0) Python ints, or None
        self.lo = lo        # float64 tensor / float, or None when aff is set (computed lazily)
        self.hi = hi
        self.nan = nan      # bool tensor / bool: the value may be NaN (float dtypes only)

    @property
    def is_point(self) -> bool:
        return self.aff is not None and self.aff[0] == 0 and self.aff[1] == 0


class BoxAnalyser:
    """Abstract interpreter of one mask graph; reusable across (b, h) and box chunks."""

    def __init__(self, graph: Graph, Q_LEN: int, KV_LEN: int, device="cpu"):
        self.graph = graph
        self.Q_LEN, self.KV_LEN = int(Q_LEN), int(KV_LEN)
        self.device = torch.device(device)
        self.nodes = graph.live_nodes()
        self._tables: dict = {}       # (slot, points) -> {level: (min, max)} sparse tables
        self._buf_info: dict = {}     # slot -> (has_nan, exceeds_exact)

    # ---- public --------------------------------------------------------------------
    def decide(self, b: int, h: int, q_lo, q_hi, kv_lo, kv_hi) -> torch.Tensor:
        """int8 FULL / EMPTY / UNDECIDED for the boxes, broadcast of the bound shapes.

        Boxes must lie inside [0, Q_LEN) x [0, KV_LEN): the overflow checks of the linear
        forms are done once over that domain."""
        self.b, self.h = int(b), int(h)
        self.box = tuple(torch.as_tensor(x, device=self.device).to(_F64) for x in (q_lo, q_hi, kv_lo, kv_hi))
        env: dict[int, AV] = {}
        for n in self.nodes:
            env[id(n)] = _HANDLED[n.op](self, n, [env[id(a)] for a in n.inputs])  # leaves: none
        out = self.as_bool(env[id(self.graph.output)])
        full = torch.as_tensor(out.lo, device=self.device)
        possible = torch.as_tensor(out.hi, device=self.device)
        # UNDECIDED (3) - 1 where full (2) - 3 where empty (0); full implies possible
        return (UNDECIDED - full.to(torch.int8) - 3 * (~possible).to(torch.int8))

    # ---- value helpers -------------------------------------------------------------
    def bounds(self, v: AV):
        """(lo, hi) of v over the current boxes (float64 tensors or floats)."""
        if v.lo is not None:
            return v.lo, v.hi
        cq, ckv, c0 = v.aff
        qlo, qhi, klo, khi = self.box
        lo = hi = float(c0)
        if cq:
            lo = lo + (cq * qlo if cq > 0 else cq * qhi)
            hi = hi + (cq * qhi if cq > 0 else cq * qlo)
        if ckv:
            lo = lo + (ckv * klo if ckv > 0 else ckv * khi)
            hi = hi + (ckv * khi if ckv > 0 else ckv * klo)
        return lo, hi

    def aff_value(self, dtype, aff) -> AV:
        """An affine AV, or the dtype's whole range if it could leave the dtype anywhere in
        the analysis domain (q in [0, Q_LEN), kv in [0, KV_LEN)): torch would wrap there."""
        cq, ckv, c0 = aff
        lo = c0 + min(0, cq * (self.Q_LEN - 1)) + min(0, ckv * (self.KV_LEN - 1))
        hi = c0 + max(0, cq * (self.Q_LEN - 1)) + max(0, ckv * (self.KV_LEN - 1))
        dmin, dmax = _int_range(dtype)
        if lo < dmin or hi > dmax:
            return self.unknown(dtype)
        return AV(dtype, aff=(int(cq), int(ckv), int(c0)))

    def unknown(self, dtype) -> AV:
        if dtype == torch.bool:
            return AV(dtype, lo=False, hi=True)
        if dtype.is_floating_point:
            return AV(dtype, lo=-_INF, hi=_INF, nan=True)
        lo, hi = _int_range(dtype)
        return AV(dtype, lo=lo, hi=hi)

    def interval(self, dtype, lo, hi, nan=False, rounded=True) -> AV:
        """An interval AV of `dtype`: ints are checked against the dtype's range (where a
        bound leaves it, torch would wrap: whole range there); floats are widened outward
        when `rounded` (the op rounds to dtype) and NaN bounds become (-inf, inf, nan)."""
        lo = torch.as_tensor(lo, dtype=_F64, device=self.device)
        hi = torch.as_tensor(hi, dtype=_F64, device=self.device)
        if dtype == torch.bool:  # bool bounds are bools: lo = surely true, hi = possibly true
            return AV(dtype, lo=lo >= 1, hi=hi > 0)
        if not dtype.is_floating_point:
            dmin, dmax = _int_range(dtype)
            bad = (lo < dmin) | (hi > dmax) | torch.isnan(lo) | torch.isnan(hi)
            if bool(bad.any()):
                lo = torch.where(bad, dmin, lo)
                hi = torch.where(bad, dmax, hi)
            return AV(dtype, lo=lo, hi=hi)
        bad = torch.isnan(lo) | torch.isnan(hi)
        if bool(bad.any()):
            lo = torch.where(bad, -_INF, lo)
            hi = torch.where(bad, _INF, hi)
            nan = bad | nan
        if rounded:
            fi = torch.finfo(dtype)
            rel = 8 * fi.eps
            tiny = fi.smallest_normal
            lo = lo - lo.abs() * rel - tiny
            hi = hi + hi.abs() * rel + tiny
            # past the largest finite value the result is +-inf
            lo = torch.where(lo < -fi.max, -_INF, torch.where(lo > fi.max, fi.max, lo))
            hi = torch.where(hi > fi.max, _INF, torch.where(hi < -fi.max, -fi.max, hi))
        return AV(dtype, lo=lo, hi=hi, nan=nan)

    def convert(self, v: AV, dtype) -> AV:
        """v as `dtype` (torch's cast / implicit promotion)."""
        if v.dtype == dtype:
            return v
        if dtype == torch.bool:
            return self.as_bool(v)
        lo, hi = self.bounds(v)
        if dtype.is_floating_point:
            return self.interval(dtype, lo, hi, v.nan, rounded=True)
        if v.dtype.is_floating_point:
            # float -> int truncates toward zero (monotone); NaN / inf / out of range: anything
            lo_t = torch.as_tensor(lo, dtype=_F64, device=self.device)
            hi_t = torch.as_tensor(hi, dtype=_F64, device=self.device)
            out = self.interval(dtype, torch.trunc(lo_t), torch.trunc(hi_t))
            if not (isinstance(v.nan, bool) and not v.nan):
                dmin, dmax = _int_range(dtype)
                nan = torch.as_tensor(v.nan, device=self.device)
                out = AV(dtype, lo=torch.where(nan, dmin, out.lo), hi=torch.where(nan, dmax, out.hi))
            return out
        if v.aff is not None:
            return self.aff_value(dtype, v.aff)
        return self.interval(dtype, lo, hi)

    def as_bool(self, v: AV) -> AV:
        if v.dtype == torch.bool:
            return v
        lo, hi = self.bounds(v)
        return _compare_bounds(self, "ne", (lo, hi, v.nan), (0.0, 0.0, False))

    def t(self, x):
        """x (bound: float / tensor, bools included) as a float64 tensor."""
        return torch.as_tensor(x, device=self.device).to(_F64)

    def aff_parts(self, aff):
        """(q_lo, q_hi, kv_lo, kv_hi) of an affine form split as q-part + c0 ([n, 1]) and
        kv-part ([1, m]); its bounds are q_lo + kv_lo and q_hi + kv_hi."""
        cq, ckv, c0 = aff
        qlo, qhi, klo, khi = self.box
        ql, qh = (cq * qlo, cq * qhi) if cq >= 0 else (cq * qhi, cq * qlo)
        kl, kh = (ckv * klo, ckv * khi) if ckv >= 0 else (ckv * khi, ckv * klo)
        return ql + c0, qh + c0, kl, kh


# ---------------------------------------------------------------------------------------
# Rules, one per op

def _input(A: BoxAnalyser, n: Node, _):
    name = n.args[0]
    if name == "b":
        return AV(n.dtype, aff=(0, 0, A.b))
    if name == "h":
        return AV(n.dtype, aff=(0, 0, A.h))
    if name == "q_idx":
        return AV(n.dtype, aff=(1, 0, 0))
    if name == "kv_idx":
        return AV(n.dtype, aff=(0, 1, 0))
    return A.unknown(n.dtype)  # score: unknown float


def _const(A: BoxAnalyser, n: Node, _):
    v = n.args[0]
    if isinstance(v, bool):
        return AV(torch.bool, lo=v, hi=v)
    if isinstance(v, int):
        if abs(v) > _EXACT_INT:
            return A.unknown(torch.int64)
        return AV(torch.int64, aff=(0, 0, v))
    # Python float: exact in float64; rounding into float32 when combined is covered by
    # the widening of the op that uses it. NaN consts are flagged.
    if math.isnan(v):
        return AV(n.dtype, lo=-_INF, hi=_INF, nan=True)
    return A.interval(n.dtype, float(v), float(v))  # widened: it may round into float32


def _param(A: BoxAnalyser, n: Node, _):
    # a lifted constant (codegen.kernel_graph): bounded by its value, like the const it was
    return _const(A, Node("const", (A.graph.params[n.args[0]],), n.dtype), None)


def _buffer(A, n, _):
    return AV(n.dtype, lo=-_INF, hi=_INF)  # only ever read through load


def _compute_dtype(n: Node) -> torch.dtype:
    """dtype torch computes a binary op in: the node's own for arithmetic, the promoted
    operand dtype for comparisons."""
    if n.op in COMPARE_OPS:
        a, b = (_dummy(x) for x in n.args)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.as_tensor(a).reshape(1)
        return torch.result_type(a, b)
    return n.dtype


def _promote2(A, n, args):
    """Both operands converted (as torch promotes them) to the dtype the op computes in."""
    dt = _compute_dtype(n)
    return dt, [A.convert(a, dt) if (a.dtype != dt) else a for a in args]


def _unary_monotone(fn, increasing=True, domain_lo=None):
    def rule(A: BoxAnalyser, n: Node, args):
        (x,) = args
        dt = n.dtype
        if not dt.is_floating_point:  # floor/ceil of an int: identity
            return x if x.dtype == dt else A.convert(x, dt)
        x = A.convert(x, dt)
        lo, hi = (A.t(v) for v in A.bounds(x))
        nan = x.nan
        if domain_lo is not None:  # below the domain: NaN
            below = lo < domain_lo
            if bool(below.any()):
                nan = below | nan
            lo = lo.clamp(min=domain_lo)
            hi = hi.clamp(min=domain_lo)
        flo, fhi = fn(lo), fn(hi)
        if not increasing:
            flo, fhi = fhi, flo
        return A.interval(dt, flo, fhi, nan)
    return rule


def _sin_bounds(lo, hi):
    """Bounds of sin over [lo, hi] (float64 tensors)."""
    two_pi = 2 * math.pi
    width_ok = torch.isfinite(lo) & torch.isfinite(hi) & ((hi - lo) < two_pi)
    lo_s, hi_s = torch.sin(lo), torch.sin(hi)
    lo_c = torch.where(width_ok, lo, 0.0)
    hi_c = torch.where(width_ok, hi, 0.0)
    # a maximum (pi/2 + 2k pi) inside [lo, hi]?
    k = torch.ceil((lo_c - math.pi / 2) / two_pi)
    has_max = (math.pi / 2 + k * two_pi) <= hi_c
    k = torch.ceil((lo_c + math.pi / 2) / two_pi)
    has_min = (-math.pi / 2 + k * two_pi) <= hi_c
    out_lo = torch.where(has_min | ~width_ok, -1.0, torch.minimum(lo_s, hi_s))
    out_hi = torch.where(has_max | ~width_ok, 1.0, torch.maximum(lo_s, hi_s))
    return out_lo, out_hi


def _trig(shift):
    def rule(A, n, args):
        x = A.convert(args[0], n.dtype)
        lo, hi = (A.t(v) for v in A.bounds(x))
        nan = x.nan
        inf = ~(torch.isfinite(lo) & torch.isfinite(hi))
        if bool(inf.any()):
            nan = inf | nan  # sin(inf) is NaN
        slo, shi = _sin_bounds(lo + shift, hi + shift)
        out = A.interval(n.dtype, slo, shi, nan)
        return AV(n.dtype, lo=out.lo.clamp(-1, 1), hi=out.hi.clamp(-1, 1), nan=out.nan)
    return rule


def _neg(A, n, args):
    (x,) = args
    if x.aff is not None and _is_int(n.dtype):
        return A.aff_value(n.dtype, tuple(-c for c in x.aff))
    lo, hi = A.bounds(x)
    return A.interval(n.dtype, -A.t(hi), -A.t(lo), x.nan, rounded=False)


def _abs(A, n, args):
    (x,) = args
    lo, hi = (A.t(v) for v in A.bounds(x))
    alo = torch.where((lo <= 0) & (hi >= 0), 0.0, torch.minimum(lo.abs(), hi.abs()))
    ahi = torch.maximum(lo.abs(), hi.abs())
    out = A.interval(n.dtype, alo, ahi, x.nan, rounded=False)
    if x.aff is not None and _is_int(n.dtype) and x.dtype == n.dtype:
        cq, ckv, c0 = x.aff  # |d| cannot overflow: d > dtype min on the whole domain
        dom_lo = c0 + min(0, cq * (A.Q_LEN - 1)) + min(0, ckv * (A.KV_LEN - 1))
        if dom_lo > _int_range(n.dtype)[0]:
            out.abs_of = x.aff
    return out


def _abs_compare(A, op, aff, c):
    """`|d| op c` for a linear form d and a constant c, exactly and without full-size
    float intermediates: |d| <= c  <=>  -c <= d <= c."""
    ql, qh, kl, kh = A.aff_parts(aff)
    kl, kh = -kl, -kh  # d.lo = ql - kl, d.hi = qh - kh  (after negation)
    eps = 1 if op in ("lt", "gt") else 0  # ints: |d| < c  <=>  |d| <= c - 1
    if op in ("lt", "le"):
        cc = c - eps                       # |d| <= cc
        full = (qh - cc <= kh) & (ql + cc >= kl)
        empty = (ql - cc > kl) | (qh + cc < kh)
    else:
        cc = c + eps                       # |d| >= cc
        full = (ql - cc >= kl) | (qh + cc <= kh)
        empty = (qh - cc < kh) & (ql + cc > kl)
    if cc < 0:  # |d| <= negative: never;  |d| >= negative-or-zero: always
        t = torch.ones((), dtype=torch.bool, device=A.device)
        full, empty = (~t, t) if op in ("lt", "le") else (t, ~t)
    return AV(torch.bool, lo=full, hi=~empty)


def _invert(A, n, args):
    (x,) = args
    if n.dtype == torch.bool:
        return AV(torch.bool, lo=_not(x.hi), hi=_not(x.lo))
    if x.aff is not None:  # ~x == -x - 1 on two's complement ints
        cq, ckv, c0 = x.aff
        return A.aff_value(n.dtype, (-cq, -ckv, -c0 - 1))
    lo, hi = A.bounds(x)
    return A.interval(n.dtype, -A.t(hi) - 1, -A.t(lo) - 1)


def _add_sub(sign):
    def rule(A, n, args):
        dt, (a, b) = _promote2(A, n, args)
        if _is_int(dt) and a.aff is not None and b.aff is not None:
            return A.aff_value(dt, tuple(x + sign * y for x, y in zip(a.aff, b.aff)))
        alo, ahi = (A.t(v) for v in A.bounds(a))
        blo, bhi = (A.t(v) for v in A.bounds(b))
        if sign > 0:
            lo, hi = alo + blo, ahi + bhi
        else:
            lo, hi = alo - bhi, ahi - blo
        return A.interval(dt, lo, hi, _or(a.nan, b.nan))
    return rule


def _or(x, y):
    if isinstance(x, bool) and not x:
        return y
    if isinstance(y, bool) and not y:
        return x
    return torch.as_tensor(x) | torch.as_tensor(y)


def _corners(A, f, a: AV, b: AV):
    alo, ahi = (A.t(v) for v in A.bounds(a))
    blo, bhi = (A.t(v) for v in A.bounds(b))
    c = [f(x, y) for x in (alo, ahi) for y in (blo, bhi)]
    shape = torch.broadcast_shapes(*[x.shape for x in c])
    st = torch.stack([x.expand(shape) for x in c])
    nan = torch.isnan(st).any(0)
    return st.nan_to_num(nan=0.0).amin(0), st.nan_to_num(nan=0.0).amax(0), nan, (alo, ahi, blo, bhi)


def _mul(A, n, args):
    dt, (a, b) = _promote2(A, n, args)
    if _is_int(dt) and a.aff is not None and b.aff is not None and (a.is_point or b.is_point):
        k, other = (a.aff[2], b) if a.is_point else (b.aff[2], a)
        return A.aff_value(dt, tuple(k * c for c in other.aff))
    lo, hi, nan, _ = _corners(A, lambda x, y: x * y, a, b)
    if dt.is_floating_point:
        # 0 * inf is NaN: give up there
        lo = torch.where(nan, -_INF, lo)
        hi = torch.where(nan, _INF, hi)
        return A.interval(dt, lo, hi, _or(_or(a.nan, b.nan), nan))
    return A.interval(dt, lo, hi)


def _contains_zero(A, b: AV):
    blo, bhi = (A.t(v) for v in A.bounds(b))
    return (blo <= 0) & (bhi >= 0)


def _truediv(A, n, args):
    dt, (a, b) = _promote2(A, n, args)
    lo, hi, nan, _ = _corners(A, lambda x, y: x / y, a, b)
    bad = _contains_zero(A, b) | nan
    lo = torch.where(bad, -_INF, lo)
    hi = torch.where(bad, _INF, hi)
    return A.interval(dt, lo, hi, _or(_or(a.nan, b.nan), bad))


def _floordiv(A, n, args):
    dt, (a, b) = _promote2(A, n, args)
    if _is_int(dt):
        # exact integer floor division at the corners (monotone in each argument when the
        # divisor keeps its sign); a divisor range holding 0: unknown (torch raises there)
        lo, hi, _, _ = _corners(A, lambda x, y: torch.div(x.to(torch.int64), torch.where(y == 0, 1, y).to(torch.int64),
                                                          rounding_mode="floor").to(_F64), a, b)
        bad = _contains_zero(A, b)
        dmin, dmax = _int_range(dt)
        return A.interval(dt, torch.where(bad, dmin, lo), torch.where(bad, dmax, hi))
    lo, hi, nan, _ = _corners(A, lambda x, y: torch.floor(x / y), a, b)
    bad = _contains_zero(A, b) | nan
    return A.interval(dt, torch.where(bad, -_INF, lo), torch.where(bad, _INF, hi), _or(_or(a.nan, b.nan), bad))


def _mod(A, n, args):
    dt, (a, b) = _promote2(A, n, args)
    alo, ahi = (A.t(v) for v in A.bounds(a))
    blo, bhi = (A.t(v) for v in A.bounds(b))
    pos, neg = blo > 0, bhi < 0
    if _is_int(dt):
        # Python semantics: the result has the divisor's sign, |result| < |divisor|
        lo = torch.where(pos, 0.0, torch.where(neg, blo + 1, _int_range(dt)[0]))
        hi = torch.where(pos, bhi - 1, torch.where(neg, 0.0, _int_range(dt)[1]))
        # a constant divisor and a range inside one period: exact shift
        point = pos & (blo == bhi)
        d = torch.where(point, blo, 1.0).to(torch.int64)
        ka = torch.div(alo.to(torch.int64), d, rounding_mode="floor")
        kb = torch.div(ahi.to(torch.int64), d, rounding_mode="floor")
        same = point & (ka == kb)
        shift = (ka * d).to(_F64)
        lo = torch.where(same, alo - shift, lo)
        hi = torch.where(same, ahi - shift, hi)
        # 0 <= a < every divisor value: a % b == a
        ident = pos & (alo >= 0) & (ahi < blo)
        lo = torch.where(ident, alo, lo)
        hi = torch.where(ident, ahi, hi)
        return A.interval(dt, lo, hi)
    finite = torch.isfinite(alo) & torch.isfinite(ahi)
    lo = torch.where(pos, 0.0, torch.where(neg, blo, -_INF))
    hi = torch.where(pos, bhi, torch.where(neg, 0.0, _INF))
    ident = pos & (alo >= 0) & (ahi < blo)
    lo = torch.where(ident, alo, lo)
    hi = torch.where(ident, ahi, hi)
    nan = _or(_or(a.nan, b.nan), ~(pos | neg) | ~finite)
    return A.interval(dt, lo, hi, nan)


def _pow(A, n, args):
    dt, (a, b) = _promote2(A, n, args)
    alo, ahi = (A.t(v) for v in A.bounds(a))
    blo, bhi = (A.t(v) for v in A.bounds(b))
    # an integer exponent k >= 0 that is the same everywhere in the box
    kpoint = (blo == bhi) & (blo >= 0) & (torch.floor(blo) == blo) & (blo <= 64)
    k = torch.where(kpoint, blo, 0.0)
    odd = torch.remainder(k, 2) == 1
    mx = torch.maximum(alo.abs(), ahi.abs())
    mn = torch.where((alo <= 0) & (ahi >= 0), 0.0, torch.minimum(alo.abs(), ahi.abs()))
    lo_k = torch.where(odd, torch.pow(alo, k), torch.pow(mn, k))
    hi_k = torch.where(odd, torch.pow(ahi, k), torch.pow(mx, k))
    if _is_int(dt):
        lo = torch.where(kpoint, lo_k, _int_range(dt)[0])
        hi = torch.where(kpoint, hi_k, _int_range(dt)[1])
        return A.interval(dt, lo, hi)
    # positive base: x**y = exp(y log x) is extremal at the corners
    clo, chi, cnan, _ = _corners(A, torch.pow, a, b)
    posbase = alo > 0
    lo = torch.where(kpoint, lo_k, torch.where(posbase, clo, -_INF))
    hi = torch.where(kpoint, hi_k, torch.where(posbase, chi, _INF))
    bad = ~(kpoint | posbase) | (cnan & ~kpoint)
    return A.interval(dt, torch.where(bad, -_INF, lo), torch.where(bad, _INF, hi), _or(_or(a.nan, b.nan), bad))


def _minmax(fn):
    def rule(A, n, args):
        dt, (a, b) = _promote2(A, n, args)
        alo, ahi = (A.t(v) for v in A.bounds(a))
        blo, bhi = (A.t(v) for v in A.bounds(b))
        return A.interval(dt, fn(alo, blo), fn(ahi, bhi), _or(a.nan, b.nan), rounded=False)
    return rule


def _bitwise(op):
    def rule(A, n, args):
        dt, (a, b) = _promote2(A, n, args)
        if dt == torch.bool:
            if op == "and":
                return AV(dt, lo=a.lo & b.lo, hi=a.hi & b.hi)
            if op == "or":
                return AV(dt, lo=a.lo | b.lo, hi=a.hi | b.hi)
            # xor is decided where both sides are
            dec = _tb(A, (a.lo == a.hi) & (b.lo == b.hi))
            val = _tb(A, a.lo != b.lo)
            return AV(dt, lo=dec & val, hi=~dec | val)
        alo, ahi = (A.t(v) for v in A.bounds(a))
        blo, bhi = (A.t(v) for v in A.bounds(b))
        # non-negative ints: a & b <= min; a | b, a ^ b < next power of two above max
        nonneg = (alo >= 0) & (blo >= 0)
        top = torch.exp2(torch.ceil(torch.log2(torch.maximum(ahi, bhi) + 1))) - 1
        if op == "and":
            lo, hi = torch.zeros_like(top), torch.minimum(ahi, bhi)
        elif op == "or":
            lo, hi = torch.maximum(alo, blo), top
        else:
            lo, hi = torch.zeros_like(top), top
        dmin, dmax = _int_range(dt)
        return A.interval(dt, torch.where(nonneg, lo, dmin), torch.where(nonneg, hi, dmax))
    return rule


def _shift(op):
    """`a << k` is a * 2**k wrapped to the dtype (exact where the product stays in range:
    `interval` and `aff_value` give the whole range where it may not); `a >> k` is
    floor(a / 2**k). Out-of-range amounts follow torch: 0 for <<, the sign fill for >>
    (floor(a / 2**(bits - 1)) on a signed type, 0 on uint8). Both are monotone in each
    operand for amounts inside [0, bits), so a ranged amount is bounded at the corners;
    one that may leave that range gives the dtype's whole range."""
    def rule(A, n, args):
        dt, (a, b) = _promote2(A, n, args)
        bits = torch.iinfo(dt).bits
        signed = dt != torch.uint8
        if b.is_point:
            k = b.aff[2]
            if op == "lshift":
                if not 0 <= k < bits:
                    return A.aff_value(dt, (0, 0, 0))
                if a.aff is not None:
                    return A.aff_value(dt, tuple(c << k for c in a.aff))
                lo, hi = (A.t(v) for v in A.bounds(a))
                return A.interval(dt, lo * 2.0 ** k, hi * 2.0 ** k)
            if not 0 <= k < bits:
                k = bits - 1 if signed else bits
            lo, hi = (A.t(v) for v in A.bounds(a))
            return A.interval(dt, torch.floor(lo / 2.0 ** k), torch.floor(hi / 2.0 ** k))
        blo, bhi = (A.t(v) for v in A.bounds(b))
        if op == "lshift":
            f = lambda x, y: x * torch.exp2(y)  # noqa: E731
        else:
            f = lambda x, y: torch.floor(x / torch.exp2(y))  # noqa: E731
        lo, hi, _, _ = _corners(A, f, a, b)
        bad = (blo < 0) | (bhi > bits - 1)
        dmin, dmax = _int_range(dt)
        return A.interval(dt, torch.where(bad, dmin, lo), torch.where(bad, dmax, hi))
    return rule


def _compare_bounds(A, op, a, b):
    """Bool AV of `a op b` from (lo, hi, nan) triples."""
    alo, ahi, anan = a
    blo, bhi, bnan = b
    alo, ahi, blo, bhi = (A.t(v) for v in (alo, ahi, blo, bhi))
    if op in ("gt", "ge"):
        op = {"gt": "lt", "ge": "le"}[op]
        alo, ahi, blo, bhi = blo, bhi, alo, ahi
    if op == "lt":
        full, empty = ahi < blo, alo >= bhi
    elif op == "le":
        full, empty = ahi <= blo, alo > bhi
    else:
        full = (alo == ahi) & (blo == bhi) & (alo == blo)
        empty = (ahi < blo) | (bhi < alo)
        if op == "ne":
            full, empty = empty, full
    nan = _or(anan, bnan)
    if not (isinstance(nan, bool) and not nan):
        nan = torch.as_tensor(nan, device=A.device)
        if op == "ne":  # NaN != x is True
            empty = empty & ~nan
        else:           # NaN < x, NaN == x are False
            full = full & ~nan
    return AV(torch.bool, lo=full, hi=~empty)


def _compare(op):
    def rule(A, n, args):
        dt, (a, b) = _promote2(A, n, args)
        if _is_int(dt) and op in ("lt", "le", "gt", "ge"):
            # |affine| against a constant (sliding windows): exact, cheap
            if a.abs_of is not None and b.is_point:
                return _abs_compare(A, op, a.abs_of, b.aff[2])
            if b.abs_of is not None and a.is_point:
                return _abs_compare(A, {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}[op], b.abs_of, a.aff[2])
        if _is_int(dt) and a.aff is not None and b.aff is not None:
            # exact: bound d = a - b, a linear form whose bounds are ql + kl and qh + kh;
            # compare the [n, 1] q-part against the negated [1, m] kv-part directly (no
            # full-size intermediate)
            ql, qh, kl, kh = A.aff_parts(tuple(x - y for x, y in zip(a.aff, b.aff)))
            kl, kh = -kl, -kh  # d.lo OP 0  <=>  ql OP kl (after negation), same for hi
            if op == "gt":
                full, empty = ql > kl, qh <= kh
            elif op == "ge":
                full, empty = ql >= kl, qh < kh
            elif op == "lt":
                full, empty = qh < kh, ql >= kl
            elif op == "le":
                full, empty = qh <= kh, ql > kl
            else:
                full = (ql == kl) & (qh == kh)
                empty = (ql > kl) | (qh < kh)
                if op == "ne":
                    full, empty = empty, full
            return AV(torch.bool, lo=_tb(A, full), hi=_tb(A, ~_tb(A, empty)))
        return _compare_bounds(A, op, (*A.bounds(a), a.nan), (*A.bounds(b), b.nan))
    return rule


def _where(A, n, args):
    c, a, b = args
    a, b = A.convert(a, n.dtype), A.convert(b, n.dtype)
    surely, never = _tb(A, c.lo), _not(c.hi)
    if n.dtype == torch.bool:
        lo = torch.where(surely, _tb(A, a.lo), torch.where(never, _tb(A, b.lo), _tb(A, a.lo) & _tb(A, b.lo)))
        hi = torch.where(surely, _tb(A, a.hi), torch.where(never, _tb(A, b.hi), _tb(A, a.hi) | _tb(A, b.hi)))
        return AV(torch.bool, lo=lo, hi=hi)
    alo, ahi = (A.t(v) for v in A.bounds(a))
    blo, bhi = (A.t(v) for v in A.bounds(b))
    lo = torch.where(surely, alo, torch.where(never, blo, torch.minimum(alo, blo)))
    hi = torch.where(surely, ahi, torch.where(never, bhi, torch.maximum(ahi, bhi)))
    nan = False
    if not (isinstance(a.nan, bool) and not a.nan) or not (isinstance(b.nan, bool) and not b.nan):
        an, bn = torch.as_tensor(a.nan, device=A.device), torch.as_tensor(b.nan, device=A.device)
        nan = torch.where(surely, an, torch.where(never, bn, an | bn))
    return AV(n.dtype, lo=lo, hi=hi, nan=nan)


def _tb(A, x):
    return torch.as_tensor(x, device=A.device)


def _not(x):
    return (not x) if isinstance(x, bool) else ~x


def _cast(A, n, args):
    return A.convert(args[0], n.dtype)


# ---- load: sparse tables over captured tensors ------------------------------------------

def _buf_info(A: BoxAnalyser, slot: int):
    if slot not in A._buf_info:
        t = A.graph.buffers[slot]
        has_nan = bool(torch.isnan(t).any()) if t.dtype.is_floating_point else False
        exceeds = bool((t.abs() > _EXACT_INT).any()) if t.dtype == torch.int64 else False
        A._buf_info[slot] = (has_nan, exceeds)
    return A._buf_info[slot]


def _table(A: BoxAnalyser, key, vec: torch.Tensor, level: int):
    """(min, max) over windows of length 2**level: tab[i] = reduce(vec[i : i + 2**level])."""
    levels = A._tables.setdefault(key, {})
    if level in levels:
        return levels[level]
    if level == 0:
        v = vec.to(_F64)
        levels[0] = (v, v)
        return levels[0]
    below = max(l for l in range(level) if l in levels or l == 0)
    mn, mx = _table(A, key, vec, below)
    for l in range(below + 1, level + 1):
        half = 1 << (l - 1)
        mn = torch.minimum(mn[:-half], mn[half:])
        mx = torch.maximum(mx[:-half], mx[half:])
    levels[level] = (mn, mx)
    return levels[level]


def _range_minmax(A, key, vec: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """min / max of vec[lo..hi] (inclusive, valid, lo <= hi) elementwise, O(1) each."""
    length = (hi - lo + 1).clamp(min=1)
    lvl = torch.floor(torch.log2(length)).to(torch.int64)
    # guard against log2 rounding: 2**lvl must be <= length < 2**(lvl+1)
    lvl = torch.where((1 << (lvl + 1)) <= length.to(torch.int64), lvl + 1, lvl)
    lvl = torch.where((1 << lvl) > length.to(torch.int64), lvl - 1, lvl)
    shape = torch.broadcast_shapes(lo.shape, hi.shape)
    out_mn = torch.empty(shape, dtype=_F64, device=A.device)
    out_mx = torch.empty(shape, dtype=_F64, device=A.device)
    lo_i, hi_i = lo.to(torch.int64).expand(shape), hi.to(torch.int64).expand(shape)
    lvl = lvl.expand(shape)
    for L in torch.unique(lvl).tolist():
        mn, mx = _table(A, key, vec, int(L))
        sel = lvl == L
        i0 = lo_i.clamp(0, mn.numel() - 1)
        i1 = (hi_i - (1 << int(L)) + 1).clamp(0, mn.numel() - 1)
        out_mn = torch.where(sel, torch.minimum(mn[i0], mn[i1]), out_mn)
        out_mx = torch.where(sel, torch.maximum(mx[i0], mx[i1]), out_mx)
    return out_mn, out_mx


def _load(A: BoxAnalyser, n: Node, args):
    buf_node = n.args[0]
    slot = buf_node.args[0]
    t = A.graph.buffers[slot]
    has_nan, exceeds = _buf_info(A, slot)
    dt = n.dtype
    if exceeds:
        return A.unknown(dt)
    idx = args[1:]
    if not idx:  # 0-d buffer: a known constant
        v = t.item()
        return _const_value(A, dt, v)
    points, ranged = [], []
    for d, v in enumerate(idx):
        if v.is_point and 0 <= v.aff[2] < t.shape[d]:
            points.append(v.aff[2])
        elif v.is_point:
            return A.unknown(dt)  # a constant out-of-bounds read: let evaluation raise
        else:
            points.append(None)
            ranged.append(d)
    if not ranged:
        return _const_value(A, dt, t[tuple(points)].item())
    bounds = [tuple(A.t(x) for x in A.bounds(idx[d])) for d in ranged]
    inside = None
    for (lo, hi), d in zip(bounds, ranged):
        ok = (lo >= 0) & (hi <= t.shape[d] - 1)
        inside = ok if inside is None else inside & ok
    sub = t[tuple(p if p is not None else slice(None) for p in points)]
    if len(ranged) == 1:
        lo, hi = bounds[0]
        lo = lo.clamp(0, t.shape[ranged[0]] - 1)
        hi = torch.maximum(hi.clamp(0, t.shape[ranged[0]] - 1), lo)
        key = (slot, tuple(points))
        mn, mx = _range_minmax(A, key, sub.reshape(-1), lo, hi)
    else:
        # several ranged dims: reduce over the union of their ranges (coarse but sound)
        sl = []
        for (lo, hi), d in zip(bounds, ranged):
            a = int(lo.clamp(0, t.shape[d] - 1).min())
            b = int(hi.clamp(0, t.shape[d] - 1).max())
            sl.append(slice(a, max(a, b) + 1))
        region = sub[tuple(sl)].to(_F64)
        mn, mx = A.t(float(region.min())), A.t(float(region.max()))
    nan = False
    if has_nan:
        nan = torch.isnan(mn) | torch.isnan(mx)
        mn, mx = torch.where(nan, -_INF, mn), torch.where(nan, _INF, mx)
    out = A.interval(dt, mn, mx, nan, rounded=False)
    # a box that may read out of bounds: unknown (evaluation reports the IndexError)
    unk = A.unknown(dt)
    lo = torch.where(inside, out.lo, unk.lo)
    hi = torch.where(inside, out.hi, unk.hi)
    return AV(dt, lo=lo, hi=hi, nan=_or(out.nan, ~inside) if dt.is_floating_point else False)


def _vload(A: BoxAnalyser, n: Node, args):
    slot = n.args[0].args[0]
    has_nan, exceeds = _buf_info(A, slot)
    t = A.graph.buffers[slot]
    if has_nan or exceeds or t.numel() == 0:
        return A.unknown(n.dtype)
    key = ("row", slot)
    if key not in A._tables:
        A._tables[key] = (min(float(t.min()), 0.0), max(float(t.max()), 0.0))
    lo, hi = A._tables[key]
    return A.interval(n.dtype, lo, hi, rounded=False)


def _rowsum(A: BoxAnalyser, n: Node, args):
    (x,) = args
    length = next(A.graph.buffers[r.args[0].args[0]].shape[-1]
                  for r in A.graph.upstream([n.args[0]]) if r.op == "vload")
    lo, hi = (A.t(v) for v in A.bounds(x))
    if length == 0:
        return _const_value(A, n.dtype, 0)
    if not n.dtype.is_floating_point:
        return A.interval(n.dtype, lo * length, hi * length)
    # each of the R additions rounds by at most eps * |partial sum| <= eps * R * max|element|
    slack = length * length * torch.finfo(torch.float32).eps * torch.maximum(lo.abs(), hi.abs())
    return A.interval(n.dtype, lo * length - slack, hi * length + slack, x.nan, rounded=True)


def _sign(A, n, args):
    """sign is monotone; torch.sign(NaN) is 0 (not NaN), so a maybe-NaN input widens the
    bounds to include 0 instead of flagging the result."""
    (x,) = args
    if n.dtype == torch.bool:
        return x
    lo, hi = (torch.sign(A.t(v)) for v in A.bounds(x))
    if n.dtype.is_floating_point and not (isinstance(x.nan, bool) and not x.nan):
        nan = torch.as_tensor(x.nan, device=A.device)
        lo, hi = torch.where(nan, lo.clamp(max=0), lo), torch.where(nan, hi.clamp(min=0), hi)
    return A.interval(n.dtype, lo, hi, rounded=False)


def _isnan(A, n, args):
    (x,) = args
    return AV(torch.bool, lo=False, hi=x.nan if x.dtype.is_floating_point else False)


def _isinf(A, n, args):
    (x,) = args
    if not x.dtype.is_floating_point:
        return AV(torch.bool, lo=False, hi=False)
    lo, hi = (A.t(v) for v in A.bounds(x))
    surely = (lo == hi) & torch.isinf(lo)
    if not (isinstance(x.nan, bool) and not x.nan):
        surely = surely & ~torch.as_tensor(x.nan, device=A.device)
    return AV(torch.bool, lo=surely, hi=torch.isinf(lo) | torch.isinf(hi))


def _fmod(A, n, args):
    """|fmod(a, b)| <= |a| with a's sign (or zero): between min(a.lo, 0) and max(a.hi, 0);
    exact (no rounding). Floats: NaN where a may be NaN or infinite, or b NaN or zero."""
    dt, (x, y) = _promote2(A, n, args)
    lo, hi = (A.t(v) for v in A.bounds(x))
    if not dt.is_floating_point:
        return A.interval(dt, lo.clamp(max=0), hi.clamp(min=0))
    ylo, yhi = (A.t(v) for v in A.bounds(y))
    nan = _or(_or(x.nan, y.nan), torch.isinf(lo) | torch.isinf(hi) | ((ylo <= 0) & (yhi >= 0)))
    return A.interval(dt, lo.clamp(max=0), hi.clamp(min=0), nan, rounded=False)


def _atan2(A, n, args):
    """atan2 lies in [-pi, pi] (widened for rounding); NaN only from a NaN operand."""
    dt, (y, x) = _promote2(A, n, args)
    return A.interval(dt, -math.pi, math.pi, _or(y.nan, x.nan))


def _const_value(A, dt, v):
    if dt == torch.bool:
        return AV(dt, lo=bool(v), hi=bool(v))
    if _is_int(dt):
        return A.aff_value(dt, (0, 0, int(v)))
    if math.isnan(v):
        return AV(dt, lo=-_INF, hi=_INF, nan=True)
    return AV(dt, lo=float(v), hi=float(v))


_HANDLED = {
    "input": _input, "const": _const, "param": _param, "buffer": _buffer,
    "neg": _neg, "abs": _abs, "invert": _invert,
    "exp": _unary_monotone(torch.exp), "exp2": _unary_monotone(torch.exp2),
    "log": _unary_monotone(torch.log, domain_lo=0.0), "log2": _unary_monotone(torch.log2, domain_lo=0.0),
    "sqrt": _unary_monotone(torch.sqrt, domain_lo=0.0),
    "rsqrt": _unary_monotone(torch.rsqrt, increasing=False, domain_lo=0.0),
    "tanh": _unary_monotone(torch.tanh), "sigmoid": _unary_monotone(torch.sigmoid),
    "floor": _unary_monotone(torch.floor), "ceil": _unary_monotone(torch.ceil),
    "sin": _trig(0.0), "cos": _trig(math.pi / 2),
    "erf": _unary_monotone(torch.erf), "log1p": _unary_monotone(torch.log1p, domain_lo=-1.0),
    "expm1": _unary_monotone(torch.expm1), "trunc": _unary_monotone(torch.trunc),
    "round": _unary_monotone(torch.round), "sign": _sign, "isnan": _isnan, "isinf": _isinf,
    "fmod": _fmod, "atan2": _atan2,
    "lshift": _shift("lshift"), "rshift": _shift("rshift"),
    "add": _add_sub(+1), "sub": _add_sub(-1), "mul": _mul, "truediv": _truediv,
    "floordiv": _floordiv, "mod": _mod, "pow": _pow,
    "minimum": _minmax(torch.minimum), "maximum": _minmax(torch.maximum),
    "and": _bitwise("and"), "or": _bitwise("or"), "xor": _bitwise("xor"),
    "lt": _compare("lt"), "le": _compare("le"), "gt": _compare("gt"), "ge": _compare("ge"),
    "eq": _compare("eq"), "ne": _compare("ne"),
    "where": _where, "cast": _cast, "load": _load, "vload": _vload, "rowsum": _rowsum,
}
assert set(_HANDLED) == set(OPS), f"analyse rules missing for {set(OPS) - set(_HANDLED)}"


def analyse_blocks(graph: Graph, b: int, h: int, Q_LEN: int, KV_LEN: int, BLOCK_SIZE=(128, 128)) -> torch.Tensor:
    """Convenience: int8 [nQ, nKV] FULL / EMPTY / UNDECIDED for one (b, h), real positions only."""
    qb, kvb = BLOCK_SIZE
    nq, nkv = -(-Q_LEN // qb), -(-KV_LEN // kvb)
    q_lo = torch.arange(nq, dtype=torch.int64) * qb
    kv_lo = torch.arange(nkv, dtype=torch.int64) * kvb
    A = BoxAnalyser(graph, Q_LEN, KV_LEN)
    out = A.decide(b, h, q_lo[:, None], (q_lo + qb - 1).clamp(max=Q_LEN - 1)[:, None],
                   kv_lo[None, :], (kv_lo + kvb - 1).clamp(max=KV_LEN - 1)[None, :])
    return out.expand(nq, nkv)
