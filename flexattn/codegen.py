"""IR -> Triton: an expression printer and the mod functions the kernel templates call.

The kernels in `flexattn.kernels` are real Triton source templates with a few named
holes (`{SCORE_MOD}`, `{MASK_MOD}`, `{SCORE_BUF_PARAMS_TRAIL}`, ...). This module prints
what goes into them:

* `TritonPrinter` prints one IR graph as the body of a `@triton.jit` helper: one
  `_print_<op>` method per IR op; ops in `UNSUPPORTED` (and anything without a method)
  raise `CodegenError` naming the op and the mod.
* `mod_function(...)` wraps a printed body as `@triton.jit def <name>(score, off_z, off_h,
  q_idx, kv_idx, <buffer args>)`. Inputs broadcast like torch tensors: the kernels pass
  `q_idx` as an [M, 1] (or [1, M]) int32 tile and `kv_idx` as [1, N] (or [N, 1]).
* Captured tensors become three kinds of argument per buffer slot: a pointer, one stride
  and one size per dimension (`sb0_ptr, sb0_s0, sb0_n0, ...`). Loads are bounds-checked
  (out-of-range reads give 0) and address math is int64.
* Rows (`vload` / `rowsum`, MLA's `torch.dot(q_rope[b, h, q_idx], k_rope[b, h, kv_idx])`).
  The rowsum of a product of a q-indexed and a kv-indexed row load of one float dtype is a
  matrix product over the tile: `tl.dot` of [M, 16] and [16, N] chunks of the rows (tensor
  cores for 16-bit rows; float32 rows exactly, input_precision "ieee", on the CUDA cores).
  Any other rowsum prints as a loop over the row's elements, `for d in range(0, <last
  size>)`, the row nodes printed in the body on [M, 1] / [1, N] tiles (one gathered element
  per row and column of the tile per step) and summed into a float32 accumulator of the
  tile's shape: R steps of two gathered loads and M*N multiply-adds on the CUDA cores. The
  backward adds a row load's gradient in such a loop, one element per step (reduced over
  the tile axis its index does not depend on, then atomics).

The pass that runs before printing (number constants lifted into kernel arguments) is
`flexattn.lift_params.kernel_graph`; the on-disk cache of generated source is
`flexattn.source_cache` (both re-exported here for the kernels).

Semantics that differ between torch and Triton and are handled here:
* `//` and `%` on integers: torch floors, Triton truncates -> `_floordiv` / `_floormod`.
* dtype promotion: every node's result is cast to its IR dtype (a no-op when it already
  is), so Triton's promotion rules never leak into the result.

Arithmetic that costs fewer instructions per score than a literal translation (a softcap
kernel is bound by instruction issue; `benchmarks/aot_inspect.py` counts them): tanh as
2 / (1 + exp(-2x)) - 1 with the hardware reciprocal (for 16-bit inputs the hardware's
approximate tanh, one instruction: FAST_TANH_DTYPES), a division by a number as a
multiply by its reciprocal (within 1.5 ulp of the division), and, when the indices are
small (`small_indices`), an index difference used as a float (ALiBi's `kv - q`) as the
difference of the indices converted once per row and column: bit-identical, and it saves
an integer add and an int-to-float conversion per score.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .ir import LEAF_OPS, OPS, Graph, Node
from .lift_params import kernel_graph  # noqa: F401 (re-exported for the kernels)
from .source_cache import load_module, source_key  # noqa: F401 (re-exported for the kernels)

# Ops the printer declares unsupported (with the reason shown to the user).
UNSUPPORTED = {
    "pow": "pow with a non-constant exponent (a traced value) - rewrite with exp2/log2, "
           "or use a Python number as the exponent",
}


class CodegenError(ValueError):
    """The IR uses an op (or dtype) the Triton printer cannot express."""


TL_DTYPES = {
    torch.bool: "tl.int1", torch.int8: "tl.int8", torch.int16: "tl.int16", torch.int32: "tl.int32",
    torch.int64: "tl.int64", torch.uint8: "tl.uint8", torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32", torch.float64: "tl.float64",
}

# Whether the generated code may use PTX's approximate math instructions (inline assembly):
# not under the interpreter, not on AMD GPUs.
HARDWARE_MATH = os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None

# The input dtypes whose kernels print tanh as the hardware's approximate tanh (Plan.fast_tanh;
# as FlashAttention's soft-capping does): its error, 2^-11 of the value, is below what rounding
# P to 16 bits for the P @ V product already costs (2^-9), and a soft-capped kernel is bound by
# its MUFU ops (tanh by exp2 + reciprocal takes two a score, on top of the softmax's exp2).
FAST_TANH_DTYPES = (torch.float16, torch.bfloat16)

# Helper functions every generated module starts with (torch semantics in Triton).
PRELUDE = '''
import triton
import triton.language as tl


@triton.jit
def _floordiv(a, b):
    # Python/torch floor division on integers (Triton's // truncates toward zero)
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def _floormod(a, b):
    # Python/torch remainder on integers: the result has the divisor's sign
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _tanh(x):
    # tanh(x) = 2 / (1 + exp(-2x)) - 1: one exp2, one reciprocal, one fma (signs and
    # infinities come out of the formula: no abs, no select). In float32 whatever the
    # dtype: |error| <= 3e-7 absolute.
    t = 2.0 * _rcp(1.0 + tl.exp2(-2.8853900817779268 * x.to(tl.float32))) - 1.0
    return t.to(x.dtype)


@triton.jit
def _atan2(y, x):
    # torch.atan2 in float32: t = min(|x|, |y|) / max(|x|, |y|) in [0, 1], atan(t) by
    # Cephes' atanf polynomial (|t| <= tan(pi/8) after t -> (t - 1) / (t + 1) past it),
    # then the octant and quadrant from |y| > |x|, the sign of x and the sign of y (a -0.0
    # counts as negative: 1 / -0.0 = -inf), as C's atan2 for zeros and infinities
    y = y.to(tl.float32)
    x = x.to(tl.float32)
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    t = tl.where(hi == 0.0, 0.0, tl.where(lo == float('inf'), 1.0, lo / hi))
    big = t > 0.41421356237309503
    u = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z = u * u
    a = (((0.0805374449538 * z - 0.138776856032) * z + 0.199777106478) * z - 0.333329491539) * z * u + u
    a = tl.where(big, 0.7853981633974483 + a, a)
    a = tl.where(ay > ax, 1.5707963267948966 - a, a)
    a = tl.where((x < 0.0) | ((x == 0.0) & (1.0 / x < 0.0)), 3.141592653589793 - a, a)
    a = tl.where((y < 0.0) | ((y == 0.0) & (1.0 / y < 0.0)), -a, a)
    return tl.where((x != x) | (y != y), float('nan'), a)
''' + ('''

@triton.jit
def _rcp(x):
    # the hardware reciprocal (1 ulp): a division would add range checks and rescaling
    # (five instructions per element), and a softcap kernel is bound by instruction issue
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _tanh_approx(x):
    # the hardware tanh: one MUFU op (relative error below 2^-10.98) where _tanh takes two
    # (exp2, reciprocal); printed only for 16-bit inputs (see FAST_TANH_DTYPES)
    t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x.to(tl.float32)], dtype=tl.float32,
                                  is_pure=True, pack=1)
    return t.to(x.dtype)
''' if HARDWARE_MATH else '''

@triton.jit
def _rcp(x):
    return 1.0 / x  # the interpreter runs no inline assembly; AMD GPUs no PTX


@triton.jit
def _tanh_approx(x):
    return _tanh(x)
''')


# `small_indices`: every index input (b, h, q_idx, kv_idx) of an in-range position is below
# SMALL_INDEX_LIMIT. Then any partial sum of up to FLOAT_INDEX_TERMS of them (or of integer
# literals that small) is below 2^24, so exact in float32: the sum computed in float32 from
# the converted inputs rounds once, at the end, like the int32 sum converted - the same bits.
SMALL_INDEX_LIMIT = 2 ** 22
FLOAT_INDEX_TERMS = 4
INDEX_INPUT_NAMES = ("b", "h", "q_idx", "kv_idx")


# Rows summed as a matrix product (TritonPrinter._print_row_dot): chunk of the row per tl.dot
# (the tensor cores' k step), and the row dtypes it takes.
ROW_DOT_CHUNK = 16
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Leaves that promote like Python scalars (torch's "weak" types): a const, or a param
# (a const lifted into a kernel argument).
WEAK_LEAVES = ("const", "param")


# Conversions print as tl.cast(x, dtype), not x.to(dtype): the same on a tensor, and it
# also takes a Python number (what a scalar argument is under the interpreter).


def _lit(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return repr(value)
    if math.isnan(value):
        return "float('nan')"
    if math.isinf(value):
        return "float('inf')" if value > 0 else "float('-inf')"
    return repr(float(value))


class TritonPrinter:
    """Prints the live nodes of an IR graph (plus any extra output nodes) as Triton lines.

    `input_names` maps IR input names to Triton variable names; `buf_prefix` names the
    buffer arguments (`{buf_prefix}{slot}_ptr`, `_s{d}`, `_n{d}`). `small_indices`: the
    kernel's index inputs are below SMALL_INDEX_LIMIT (an int sum of indices converted to
    float32 is then printed as a float32 sum of the converted indices: `_float_index`).
    `fast_tanh`: tanh below float64 prints as the hardware's approximate tanh (FAST_TANH_DTYPES).
    """

    def __init__(self, graph: Graph, input_names: dict[str, str], buf_prefix: str = "sb",
                 small_indices: bool = False, fast_tanh: bool = False):
        self.graph = graph
        self.input_names = input_names
        self.buf_prefix = buf_prefix
        self.small_indices = small_indices
        self.fast_tanh = fast_tanh
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.float_names: dict[int, str] = {}  # node id -> its float32 twin (_float_index)
        self.row_index = None  # the loop variable over a row's elements, inside a row loop
        self.loops = 0

    # ---- rows ------------------------------------------------------------------------
    def row_loop(self, outputs: list[Node], vload: Node | None = None):
        """Print the row nodes `outputs` depend on as the body of a loop over the row's
        elements: returns (loop variable, length expression, body lines, output exprs).
        Scalars they use are printed before (outside the loop); the row nodes' names are
        forgotten after it. The length is the last size of `vload` (default: the first row
        load the outputs read; rows combined in one op have equal lengths)."""
        for o in outputs:
            self.print_nodes([a for a in self.graph.upstream([o]) if not a.row])
        rows = [n for n in self.graph.upstream(outputs) if n.row]
        vload = vload or next(n for n in rows if n.op == "vload")
        buf = f"{self.buf_prefix}{vload.args[0].args[0]}"
        length = f"{buf}_n{self.graph.buffers[vload.args[0].args[0]].dim() - 1}"
        d = f"d{self.loops}"
        self.loops += 1
        saved = self.lines, dict(self.float_names), self.row_index
        self.lines, self.row_index = [], d
        for n in rows:
            self.names[id(n)] = self.emit(n)
        exprs = [self.names[id(o)] for o in outputs]
        body = self.lines
        self.lines, self.float_names, self.row_index = saved
        for n in rows:
            del self.names[id(n)]
        return d, length, body, exprs

    def _row_dot_loads(self, x: Node):
        """(q-indexed load, kv-indexed load) when x is the product of two float row loads of
        one dtype, one indexed by q_idx (not kv_idx) and the other by kv_idx (not q_idx):
        their rowsum is a matrix product over the tile. Else None."""
        if x.op != "mul" or not all(a.op == "vload" for a in x.args) or x.dtype not in _DOT_DTYPES \
                or any(a.dtype != x.dtype for a in x.args):
            return None
        deps = []
        for load in x.args:
            names = {m.args[0] for m in self.graph.upstream(list(load.args[1:])) if m.op == "input"}
            deps.append(("q_idx" in names) - ("kv_idx" in names))
        if deps == [1, -1]:
            return x.args[0], x.args[1]
        if deps == [-1, 1]:
            return x.args[1], x.args[0]
        return None

    def _row_dot_lines(self, n: Node, acc: str, qload: Node, kload: Node):
        """rowsum(q_row * kv_row) as tl.dot over chunks of ROW_DOT_CHUNK elements of the
        rows: [M, C] x [C, N] on the tensor cores (float32 rows exactly: input_precision
        ieee). Prints the rows' offset tiles; returns (q offsets, kv offsets, lines of the
        loop for q along the tile's first axis, lines for q along its second)."""
        C = ROW_DOT_CHUNK
        d = f"d{self.loops}"
        self.loops += 1
        parts = []
        for load, tag in ((qload, "q"), (kload, "k")):
            buf = self.names[id(load.args[0])]
            offs, ok = index_terms(buf, load.args[1:], [self.names[id(i)] for i in load.args[1:]])
            row = f"r{tag}_{n.name}"
            self.lines.append(f"{row} = {' + '.join(offs)}")
            parts.append((buf, row, " & ".join(ok) or "True", f"{buf}_s{len(load.args) - 1}"))
        length = f"{parts[0][0]}_n{len(qload.args) - 1}"
        prec = ", input_precision='ieee'" if n.args[0].dtype == torch.float32 else ""

        def load(part, across):  # across: the chunk along axis 1 ([X, C]) or axis 0 ([C, X])
            buf, row, ok, last = part
            dd = "dd[None, :]" if across else "dd[:, None]"
            return f"tl.load({buf}_ptr + {row} + {dd}.to(tl.int64) * {last}, mask=({ok}) & ({dd} < {length}), other=0)"

        def loop(left, right):
            return [f"for {d} in range(0, {length}, {C}):", f"    dd = {d} + tl.arange(0, {C})",
                    f"    {acc} += tl.dot({load(left, True)}, {load(right, False)}{prec})"]
        q, k = parts
        return q[1], k[1], loop(q, k), loop(k, q)

    def _print_rowsum_loop(self, n: Node) -> str:
        acc_dtype = torch.float32 if n.dtype in (torch.float16, torch.bfloat16) else n.dtype
        acc = f"v_{n.name}"
        d, length, body, (x,) = self.row_loop([n.args[0]])
        loop = [f"for {d} in range(0, {length}):"] + ["    " + ln for ln in body]
        loop.append(f"    {acc} = {acc} + tl.cast({x}, {TL_DTYPES[acc_dtype]})")
        dot = self._row_dot_loads(n.args[0])
        if dot is not None:
            rq, rk, q_first, q_second = self._row_dot_lines(n, acc, *dot)
        zero = " + ".join(f"{self.input_names[k]} * 0" for k in INDEX_INPUT_NAMES)
        self.lines.append(f"{acc} = tl.cast({zero}, {TL_DTYPES[acc_dtype]})  # the tile's shape")
        if dot is None:
            self.lines += loop
        else:
            # the matrix product where the q rows run along one tile axis and the kv rows along
            # the other (shapes are constexpr: one branch is compiled); the element loop where
            # a kv row's index varies along both (the decode kernel's packed heads: h // g)
            self.lines.append(f"if ({rq}.shape[1] == 1) and ({rk}.shape[0] == 1):")
            self.lines += ["    " + ln for ln in q_first]
            self.lines.append(f"elif ({rq}.shape[0] == 1) and ({rk}.shape[1] == 1):")
            self.lines += ["    " + ln for ln in q_second]
            self.lines.append("else:")
            self.lines += ["    " + ln for ln in loop]
        return acc if acc_dtype == n.dtype else f"tl.cast({acc}, {TL_DTYPES[n.dtype]})"

    # ---- driver ------------------------------------------------------------------------
    def print_nodes(self, outputs: list[Node]) -> list[str | None]:
        """Emit code for everything `outputs` depend on; returns their expressions (None for
        a row: rows are printed inside loops, `row_loop`)."""
        for n in self.graph.upstream(outputs):
            if id(n) not in self.names and not n.row:
                self.names[id(n)] = self._print_rowsum_loop(n) if n.op == "rowsum" else self.emit(n)
        return [self.names.get(id(o)) for o in outputs]

    def emit(self, n: Node) -> str:
        if n.op == "input":
            return self.input_names[n.args[0]]
        if n.op == "const":
            return _lit(n.args[0])
        if n.op == "param":
            return f"{self.buf_prefix}p{n.args[0]}"
        if n.op == "buffer":
            return f"{self.buf_prefix}{n.args[0]}"
        if n.op in UNSUPPORTED and not (n.op == "pow" and n.args[1].op == "const"):
            raise CodegenError(f"{self.graph.kind}_mod {self.graph.fn_name!r}: the GPU kernels do not support "
                               f"{UNSUPPORTED[n.op]} (node {n.name}); the CPU path does")
        method = getattr(self, f"_print_{n.op}", None)
        if method is None:
            raise CodegenError(f"{self.graph.kind}_mod {self.graph.fn_name!r}: op {n.op!r} has no Triton printer")
        if n.dtype not in TL_DTYPES:
            raise CodegenError(f"{self.graph.kind}_mod {self.graph.fn_name!r}: dtype {n.dtype} is not supported "
                               f"in the GPU kernels (node {n.name})")
        args = [self.names[id(a)] for a in n.args]
        expr = method(n, *args)
        var = f"v_{n.name}"
        self.lines.append(f"{var} = {expr}")
        return var

    # ---- helpers -----------------------------------------------------------------------
    def _cast(self, expr: str, src: Node, dst: torch.dtype) -> str:
        """`expr` (the value of node `src`) converted to `dst` with torch's semantics."""
        if src.op == "const":
            v = src.args[0]
            if dst == torch.bool:
                return _lit(bool(v))
            if dst.is_floating_point:
                return _lit(float(v))
            return _lit(int(v))
        if src.op == "param":  # a 32-bit kernel argument whatever its IR dtype: always convert
            return f"({expr} != 0)" if dst == torch.bool else f"tl.cast({expr}, {TL_DTYPES[dst]})"
        if src.dtype == dst:
            return expr
        if dst == torch.bool:
            return f"({expr} != 0)"
        if dst == torch.float32 and self._index_terms(src) is not None:
            return self._float_index(src)
        return f"tl.cast({expr}, {TL_DTYPES[dst]})"

    def _index_terms(self, n: Node) -> int | None:
        """How many index inputs / small literals int32 node n sums (+, -, unary -), or None
        when it is anything else, has more than FLOAT_INDEX_TERMS, or indices are not small."""
        if not self.small_indices or n.dtype != torch.int32:
            return None
        if n.op == "input":
            return 1 if n.args[0] in INDEX_INPUT_NAMES else None
        if n.op == "const":
            v = n.args[0]
            return 1 if type(v) is int and abs(v) < SMALL_INDEX_LIMIT else None
        if n.op in ("add", "sub", "neg"):
            counts = [self._index_terms(a) for a in n.args]
            if None in counts or sum(counts) > FLOAT_INDEX_TERMS:
                return None
            return sum(counts)
        return None

    def _float_index(self, n: Node) -> str:
        """n (for which _index_terms is not None) as float32, computed from the index inputs
        converted to float32 - once per row or column of the tile, not once per score."""
        name = self.float_names.get(id(n))
        if name is not None:
            return name
        if n.op == "const":
            return _lit(float(n.args[0]))
        if n.op == "input":
            expr = f"tl.cast({self.input_names[n.args[0]]}, tl.float32)"
        elif n.op == "neg":
            expr = f"-({self._float_index(n.args[0])})"
        else:
            a, b = (self._float_index(x) for x in n.args)
            expr = f"({a}) {'+' if n.op == 'add' else '-'} ({b})"
        name = self.float_names[id(n)] = f"f_{n.name}"
        self.lines.append(f"{name} = {expr}")
        return name

    def _out(self, n: Node, expr: str) -> str:
        # Scalar-only subexpressions (consts, params) stay scalars; tensors are cast to the IR dtype.
        if all(a.op in WEAK_LEAVES for a in n.inputs):
            return expr
        return f"tl.cast({expr}, {TL_DTYPES[n.dtype]})" if n.dtype != torch.bool else expr

    def _float_arg(self, n: Node, i: int, expr: str) -> str:
        """Argument i of float-valued node n, cast to n's dtype (torch computes in it)."""
        return self._cast(expr, n.args[i], n.dtype)

    def _wide_arg(self, n: Node, i: int, expr: str) -> str:
        """Argument i of float-valued node n in n's dtype, or float32 for a 16-bit n (tl.floor,
        tl.exp and friends take float32 / float64 only; the result is cast back by _out)."""
        return self._cast(expr, n.args[i], torch.float32 if n.dtype.itemsize < 4 else n.dtype)

    def _unary_math(self, fn: str):
        def p(n, a):
            return self._out(n, f"{fn}({self._float_arg(n, 0, a)})")
        return p

    # ---- unary -------------------------------------------------------------------------
    def _print_neg(self, n, a): return self._out(n, f"-({a})")
    def _print_abs(self, n, a): return self._out(n, f"tl.abs({a})")
    def _print_exp(self, n, a): return self._unary_math("tl.exp")(n, a)
    def _print_exp2(self, n, a): return self._unary_math("tl.exp2")(n, a)
    def _print_log(self, n, a): return self._unary_math("tl.log")(n, a)
    def _print_log2(self, n, a): return self._unary_math("tl.log2")(n, a)
    def _print_sqrt(self, n, a): return self._unary_math("tl.sqrt")(n, a)
    def _print_rsqrt(self, n, a): return self._unary_math("tl.rsqrt")(n, a)
    def _print_tanh(self, n, a):
        return self._unary_math("_tanh_approx" if self.fast_tanh and n.dtype != torch.float64 else "_tanh")(n, a)
    def _print_sigmoid(self, n, a): return self._unary_math("tl.sigmoid")(n, a)
    def _print_sin(self, n, a): return self._unary_math("tl.sin")(n, a)
    def _print_cos(self, n, a): return self._unary_math("tl.cos")(n, a)

    def _print_erf(self, n, a):
        if n.dtype in (torch.float32, torch.float64):
            return self._unary_math("tl.erf")(n, a)
        # libdevice has erf for float32 / float64 only: a 16-bit value goes through float32
        return self._out(n, f"tl.erf({self._cast(a, n.args[0], torch.float32)})")

    def _print_log1p(self, n, a):
        # log1p(x) = log(u) * x / (u - 1) with u = 1 + x (Goldberg): within a few ulp of
        # the exact value also for tiny x, where log(1 + x) would lose it all; u == 1
        # (x below half an ulp of 1) gives x, u == inf (x == inf) gives inf
        x = self._float_arg(n, 0, a)
        u = f"u_{n.name}"
        self.lines.append(f"{u} = 1.0 + ({x})")
        return self._out(n, f"tl.where(({u} == 1.0) | ({u} == float('inf')), {x}, "
                            f"tl.log({u}) * (({x}) / ({u} - 1.0)))")

    def _print_expm1(self, n, a):
        # expm1(x) = (u - 1) * x / log(u) with u = exp(x) (Kahan): the rounding of u cancels
        # between the two factors, so it keeps full precision for tiny x where exp(x) - 1
        # would lose it all; u == 1 gives x, u == inf gives inf, u - 1 == -1 gives -1
        x = self._wide_arg(n, 0, a)
        u = f"u_{n.name}"
        self.lines.append(f"{u} = tl.exp({x})")
        return self._out(n, f"tl.where({u} == 1.0, {x}, tl.where(({u} == float('inf')) | ({u} - 1.0 == -1.0), "
                            f"{u} - 1.0, ({u} - 1.0) * (({x}) / tl.log({u}))))")

    def _print_sign(self, n, a):
        if n.dtype == torch.bool:
            return a
        x = self._float_arg(n, 0, a)
        if n.dtype.is_floating_point:  # NaN and -0.0 give 0.0, as torch.sign
            return self._out(n, f"tl.where(({x}) > 0, 1.0, tl.where(({x}) < 0, -1.0, 0.0))")
        return self._out(n, f"tl.cast(({x}) > 0, {TL_DTYPES[n.dtype]}) - tl.cast(({x}) < 0, {TL_DTYPES[n.dtype]})")

    def _print_trunc(self, n, a):
        if not n.dtype.is_floating_point:
            return a
        x = self._wide_arg(n, 0, a)
        return self._out(n, f"tl.where(({x}) < 0, tl.ceil({x}), tl.floor({x}))")

    def _print_round(self, n, a):
        # half to even: r = floor(x), d = x - r (exact); up when d > 1/2, or d == 1/2 and r
        # odd; a zero result takes x's sign (x * 0.0), as torch.round(-0.3) == -0.0
        if not n.dtype.is_floating_point:
            return a
        x = self._wide_arg(n, 0, a)
        r, d, y = f"r_{n.name}", f"d_{n.name}", f"y_{n.name}"
        self.lines.append(f"{r} = tl.floor({x})")
        self.lines.append(f"{d} = ({x}) - {r}")
        self.lines.append(f"{y} = tl.where(({d} > 0.5) | (({d} == 0.5) & ({r} - 2.0 * tl.floor({r} * 0.5) != 0.0)), "
                          f"{r} + 1.0, {r})")
        return self._out(n, f"tl.where({y} == 0.0, ({x}) * 0.0, {y})")

    def _print_isnan(self, n, a):
        return f"({a}) != ({a})"  # False for integers

    def _print_isinf(self, n, a):
        if not n.args[0].dtype.is_floating_point:
            return f"({a}) != ({a})"
        return f"tl.abs({a}) == float('inf')"

    def _print_floor(self, n, a):
        return a if not n.dtype.is_floating_point else self._unary_math("tl.floor")(n, a)

    def _print_ceil(self, n, a):
        return a if not n.dtype.is_floating_point else self._unary_math("tl.ceil")(n, a)

    def _print_invert(self, n, a):
        if n.dtype == torch.bool:
            return f"({a} == 0)"
        return self._out(n, f"~({a})")

    # ---- binary ------------------------------------------------------------------------
    def _binop(self, n, a, b, op):
        if n.dtype.is_floating_point:  # torch computes in the promoted float dtype
            a, b = self._float_arg(n, 0, a), self._float_arg(n, 1, b)
        return self._out(n, f"({a}) {op} ({b})")

    def _scaling_args(self, n, a, b):
        """The arguments of a float mul / truediv: torch multiplies and divides a 16-bit float
        by a Python number in float32, the number as it is (not rounded to the 16-bit dtype
        first, as it is for + and -), and rounds the result once; so both go to float32."""
        if n.dtype.itemsize < 4 and any(x.op in WEAK_LEAVES for x in n.args):
            return self._wide_arg(n, 0, a), self._wide_arg(n, 1, b)
        return self._float_arg(n, 0, a), self._float_arg(n, 1, b)

    def _print_add(self, n, a, b): return self._binop(n, a, b, "+")
    def _print_sub(self, n, a, b): return self._binop(n, a, b, "-")

    def _print_mul(self, n, a, b):
        if n.dtype.is_floating_point:
            a, b = self._scaling_args(n, a, b)
        return self._out(n, f"({a}) * ({b})")

    def _print_truediv(self, n, a, b):
        a, b = self._scaling_args(n, a, b)
        if n.args[1].op in WEAK_LEAVES and n.args[0].op not in WEAK_LEAVES:
            # by a number: multiply by its reciprocal, a scalar computed once (a division per
            # element costs a reciprocal and range checks; x * (1/c) is within 1.5 ulp of x / c)
            return self._out(n, f"({a}) * (1.0 / ({b}))")
        return self._out(n, f"({a}) / ({b})")

    def _print_floordiv(self, n, a, b):
        if n.dtype.is_floating_point:
            return self._out(n, f"tl.floor(({self._float_arg(n, 0, a)}) / ({self._float_arg(n, 1, b)}))")
        return self._out(n, f"_floordiv({a}, {b})")

    def _print_mod(self, n, a, b):
        if n.dtype.is_floating_point:
            a, b = self._float_arg(n, 0, a), self._float_arg(n, 1, b)
            return self._out(n, f"({a}) - tl.floor(({a}) / ({b})) * ({b})")
        return self._out(n, f"_floormod({a}, {b})")

    def _print_fmod(self, n, a, b):
        # Triton's % is C's remainder (LLVM frem / srem): the dividend's sign, as torch.fmod;
        # both operands cast, so two numbers do not meet Python's %
        dt = TL_DTYPES[n.dtype]
        return self._out(n, f"tl.cast({self._cast(a, n.args[0], n.dtype)}, {dt}) % "
                            f"tl.cast({self._cast(b, n.args[1], n.dtype)}, {dt})")

    def _print_atan2(self, n, a, b):
        return self._out(n, f"_atan2({self._float_arg(n, 0, a)}, {self._float_arg(n, 1, b)})")

    def _print_pow(self, n, a, b):
        e = n.args[1].args[0]  # a constant exponent (non-constant ones are UNSUPPORTED)
        base = self._float_arg(n, 0, a) if n.dtype.is_floating_point else a
        if isinstance(e, (int, float)) and float(e).is_integer() and 0 <= e <= 8:
            if e == 0:
                return self._out(n, f"({base}) * 0 + 1")
            return self._out(n, " * ".join([f"({base})"] * int(e)))
        if e == 0.5:
            return self._out(n, f"tl.sqrt({base})")
        if e == -0.5:
            return self._out(n, f"tl.rsqrt({base})")
        if isinstance(e, (int, float)) and float(e).is_integer() and -8 <= e < 0:
            return self._out(n, "1.0 / (" + " * ".join([f"({base})"] * int(-e)) + ")")
        # general real exponent: defined for positive bases (NaN for negative, as torch)
        return self._out(n, f"tl.where(({base}) == 0, 0.0, tl.exp2(tl.log2({base}) * {_lit(float(e))}))")

    def _print_minimum(self, n, a, b):
        if n.dtype.is_floating_point:
            a, b = self._float_arg(n, 0, a), self._float_arg(n, 1, b)
        return self._out(n, f"tl.minimum({a}, {b})")

    def _print_maximum(self, n, a, b):
        if n.dtype.is_floating_point:
            a, b = self._float_arg(n, 0, a), self._float_arg(n, 1, b)
        return self._out(n, f"tl.maximum({a}, {b})")

    def _print_and(self, n, a, b): return self._binop(n, a, b, "&")
    def _print_or(self, n, a, b): return self._binop(n, a, b, "|")
    def _print_xor(self, n, a, b): return self._binop(n, a, b, "^")

    def _shift(self, n, a, b, op):
        """torch's shifts: amounts outside [0, bits) give 0 (<<) or the sign fill (>>; Triton's
        >> on a signed type is arithmetic, as torch's); Triton (LLVM) leaves them undefined,
        so a non-literal amount is tested at run time."""
        dt = n.dtype
        bits = torch.iinfo(dt).bits
        x, k = n.args
        a = self._cast(a, x, dt)
        fill = f"tl.where(({a}) < 0, -1, 0)" if op == ">>" and dt != torch.uint8 else f"({a}) * 0"
        if k.op == "const":
            amount = int(k.args[0])
            return self._out(n, f"({a}) {op} {amount}" if 0 <= amount < bits else fill)
        b = self._cast(b, k, dt)
        ok = f"(({b}) >= 0) & (({b}) < {bits})"
        return self._out(n, f"tl.where({ok}, ({a}) {op} tl.where({ok}, {b}, 0), {fill})")

    def _print_lshift(self, n, a, b): return self._shift(n, a, b, "<<")
    def _print_rshift(self, n, a, b): return self._shift(n, a, b, ">>")

    def _compare(self, n, a, b, op):
        x, y = n.args
        if x.dtype.is_floating_point or y.dtype.is_floating_point:
            common = torch.promote_types(x.dtype, y.dtype) \
                if x.op not in WEAK_LEAVES and y.op not in WEAK_LEAVES else \
                (x.dtype if y.op in WEAK_LEAVES else y.dtype)
            if common.is_floating_point:
                a, b = self._cast(a, x, common), self._cast(b, y, common)
        return f"({a}) {op} ({b})"

    def _print_lt(self, n, a, b): return self._compare(n, a, b, "<")
    def _print_le(self, n, a, b): return self._compare(n, a, b, "<=")
    def _print_gt(self, n, a, b): return self._compare(n, a, b, ">")
    def _print_ge(self, n, a, b): return self._compare(n, a, b, ">=")
    def _print_eq(self, n, a, b): return self._compare(n, a, b, "==")
    def _print_ne(self, n, a, b): return self._compare(n, a, b, "!=")

    # ---- other -------------------------------------------------------------------------
    def _print_where(self, n, c, a, b):
        return self._out(n, f"tl.where({c}, {self._cast(a, n.args[1], n.dtype)}, {self._cast(b, n.args[2], n.dtype)})")

    def _print_cast(self, n, a):
        return self._cast(a, n.args[0], n.dtype)

    def _print_load(self, n, buf, *idx):
        """buffer[i0, i1, ...]: int64 address math, out-of-range indices read 0."""
        if not idx:
            return f"tl.load({buf}_ptr)"
        offs, ok = index_terms(buf, n.args[1:], idx)
        return f"tl.load({buf}_ptr + {' + '.join(offs)}, mask={' & '.join(ok)}, other=0)"

    def _print_vload(self, n, buf, *idx):
        """buffer[i0, ..., row_index]: the row's element at the loop's step."""
        offs, ok = index_terms(buf, n.args[1:], idx)
        offs.append(f"tl.cast({self.row_index}, tl.int64) * {buf}_s{len(idx)}")
        mask = f", mask={' & '.join(ok)}, other=0" if ok else ""
        return f"tl.load({buf}_ptr + {' + '.join(offs)}{mask})"


# Every IR op is printed: leaves by `emit`, the rest by a `_print_<op>` method, except
# what UNSUPPORTED declares (pow has a method for constant exponents and is declared for
# the rest).
PRINTED = frozenset(op for op in OPS if hasattr(TritonPrinter, f"_print_{op}")) | {"rowsum"}  # rowsum: a loop
assert LEAF_OPS | PRINTED | set(UNSUPPORTED) == set(OPS), \
    f"Triton printer rules missing for {set(OPS) - LEAF_OPS - PRINTED - set(UNSUPPORTED)}"


def index_terms(buf: str, index_nodes, exprs) -> tuple[list[str], list[str]]:
    """Address terms (int64) and in-bounds conditions for buffer `buf` read at `exprs`.

    A constant index is a Python int in the kernel source (no `.to`), and its bounds test
    is a plain comparison with the size argument."""
    offs, ok = [], []
    for d, (node, e) in enumerate(zip(index_nodes, exprs)):
        if node.op == "const":
            v = int(node.args[0])
            offs.append(f"{v} * {buf}_s{d}")
            ok.append(f"({buf}_n{d} > {v})" if v >= 0 else "False")
        else:
            offs.append(f"({e}).to(tl.int64) * {buf}_s{d}")
            ok.append(f"(({e}) >= 0) & (({e}) < {buf}_n{d})")
    return offs, ok


# ---- the tile-table lookup -------------------------------------------------------------

def _const_int(n: Node):
    return n.args[0] if n.op == "const" and isinstance(n.args[0], int) and not isinstance(n.args[0], bool) else None


@dataclass(frozen=True)
class TileLookup:
    """The parts of a tile-table lookup (see tile_table_lookup): the buffer slot of `slots`,
    those of the tables (`tiles`; or `lows`, `highs` for the interval form), the kernel
    expressions of b and h ("off_z" / "off_h" or "0"), the block sizes and, for tiles, the
    node the tile's byte is compared with."""
    slots: int
    tables: tuple
    b: str
    h: str
    qb: int
    kvb: int
    zero: Node | None = None

    @property
    def intervals(self) -> bool:
        return len(self.tables) == 2


def _slot_load(slot: Node):
    """(slots buffer node, b, h, QB, KVB) of `slots[b, h, q_idx // QB, kv_idx // KVB]` (an int32
    4-d buffer; QB, KVB powers of two), else None."""
    if slot.op != "load" or len(slot.args) != 5:
        return None
    slots_buf, b, h, q_blk, kv_blk = slot.args
    if slots_buf.op != "buffer" or slots_buf.dtype != torch.int32:
        return None
    sizes = []
    for blk, name in ((q_blk, "q_idx"), (kv_blk, "kv_idx")):
        if blk.op != "floordiv" or not _is_input(blk.args[0], name):
            return None
        size = _const_int(blk.args[1])
        if size is None or size <= 0 or size & (size - 1):
            return None
        sizes.append(size)
    return slots_buf, b, h, *sizes


def _is_input(n: Node, name: str) -> bool:
    return n.op == "input" and n.args[0] == name


def _within(n: Node, name: str, size: int) -> bool:
    """n is `name % size` (the position within its block)."""
    return n.op == "mod" and _is_input(n.args[0], name) and _const_int(n.args[1]) == size


def _index_exprs(b: Node, h: Node):
    """The kernel expressions of a lookup's b and h (the input, or a literal 0), else None."""
    read = []
    for node, name in ((b, "b"), (h, "h")):
        if _is_input(node, name):
            read.append(INDEX_INPUTS[name])
        elif _const_int(node) == 0:
            read.append("0")
        else:
            return None
    return read


def tile_table_lookup(graph: Graph) -> TileLookup | None:
    """The parts of `graph` when it is a lookup of flexattn.mask_tiles, else None: the tile
    form `tiles[slots[b, h, q_idx // QB, kv_idx // KVB], q_idx % QB, kv_idx % KVB] != 0`
    (tiles int8 [3-d]) or the interval form `(kv_idx % KVB >= lows[s, q_idx % QB]) &
    (kv_idx % KVB < highs[s, q_idx % QB])` with s that slot (lows, highs int32 [2-d]); b, h
    each the input or the literal 0; QB, KVB powers of two; slots int32 [4-d]."""
    out = graph.output
    if out is None:
        return None
    if out.op == "ne" and out.args[0].op == "load":   # tiles
        tile, zero = out.args
        if not (zero.op == "const" and zero.args[0] == 0 or zero.op == "param" and graph.params[zero.args[0]] == 0):
            return None
        if len(tile.args) != 4:
            return None
        tiles_buf, slot, q_in, kv_in = tile.args
        parts = _slot_load(slot)
        if parts is None or tiles_buf.op != "buffer" or tiles_buf.dtype != torch.int8:
            return None
        slots_buf, b, h, qb, kvb = parts
        if not (_within(q_in, "q_idx", qb) and _within(kv_in, "kv_idx", kvb)):
            return None
        read = _index_exprs(b, h)
        return None if read is None else TileLookup(slots_buf.args[0], (tiles_buf.args[0],), *read, qb, kvb, zero)
    if out.op != "and" or out.args[0].op != "ge" or out.args[1].op != "lt":   # intervals
        return None
    (col, low), (col2, high) = out.args[0].args, out.args[1].args
    if col2 is not col or low.op != "load" or high.op != "load" or len(low.args) != 3 or len(high.args) != 3:
        return None
    (lows_buf, slot, row), (highs_buf, slot2, row2) = low.args, high.args
    parts = _slot_load(slot)
    if parts is None or slot2 is not slot or row2 is not row:
        return None
    slots_buf, b, h, qb, kvb = parts
    if any(t.op != "buffer" or t.dtype != torch.int32 for t in (lows_buf, highs_buf)) \
            or not (_within(row, "q_idx", qb) and _within(col, "kv_idx", kvb)):
        return None
    read = _index_exprs(b, h)
    return None if read is None else TileLookup(slots_buf.args[0], (lows_buf.args[0], highs_buf.args[0]), *read,
                                                qb, kvb)


def _tile_table_body(lookup: TileLookup, prefix: str, slot_per_row: bool = False) -> list[str]:
    """The lookup of `tile_table_lookup` printed for the kernels: the same values as the
    generic print, with one slot per tile instead of one per score (per row where the decode
    kernel packs query heads into its rows and the mask reads h), the interval form's two
    numbers per row, and the tile form's bytes at affine addresses. Those load as vectors
    only where Triton sees the column offset contiguous: `kv_idx % KVB` (kv_idx >= 0 in every
    kernel), not _floormod, whose select hides it (one byte load per score: at D=64 on an
    H200 the Triton forward's tile form of sliding-window and document masks ran at
    0.29-0.30x the masks' own kernels, 0.74-0.78x with vector loads). Printed per score, the
    two gathers per score were slower still.

    The slot is read as its two 16-bit halves (little-endian, as every GPU and the
    interpreter's host), loads narrower than 32 bits a thread, which Triton's software
    pipeliner leaves out, and once per tile (a kernel's q tile lies in one q block). Read as
    one int32 it began a chain of dependent loads (the slot, then the run's ends or the tile's
    bytes at it) that the pipeliner took and could not schedule: every kernel's partial-block
    loop ran unpipelined, every async copy waited for at once (H200: the backward of the
    tile form at 0.72x the own kernels' at D=64). Narrow loads of the ends instead (the slot
    per row) pipelined the backward but not the forward, which spilled around them.

    slot_per_row (the Triton forward: kernels.source.SLOT_PER_ROW_KINDS): the slot read per row,
    as one int32. On an H200 at D=64 the Triton forward's tile form ran at 0.91-0.99x its own
    kernels' forward that way and at 0.60-0.69x with the slot per tile as 16-bit halves
    (sliding window, document, prefix-LM, causal; the two alternating in one process,
    benchmarks/bench_tile_form.py --forward-slot), although compiled for sm_90 the
    per-row loop is the one left unpipelined (1652 instructions, 12 B spilled; per tile 1738,
    pipelined). The Hopper forward and the backward keep the slot per tile (measured there:
    0.98-1.00x, and the backward's pipelined loops above).

    Exact because a kernel's kv tile never straddles a kv block of KVB columns (every
    template walks kv tiles of BLOCK_N columns at multiples of BLOCK_N, and BLOCK_N <= KVB,
    both powers of two: the constexpr test) and a q tile never straddles a q block (every
    kernel's tiles, the decode kernel's packed rows too, lie in one). Out-of-range indices
    read 0, as in the generic print."""
    b, h, qb, kvb = lookup.b, lookup.h, lookup.qb, lookup.kvb
    slots = f"{prefix}{lookup.slots}"
    lines = ["kj = tl.min(tl.min(kv_idx, 1), 0) // " + str(kvb)]  # kv_idx >= 0: // floors
    if slot_per_row:
        lines += [
            f"qi = _floordiv(q_idx, {qb})",
            f"slot = tl.load({slots}_ptr + {b} * {slots}_s0 + {h} * {slots}_s1 + qi.to(tl.int64) * {slots}_s2"
            f" + kj.to(tl.int64) * {slots}_s3,",
            f"               mask=({slots}_n0 > {b}) & ({slots}_n1 > {h}) & (qi >= 0) & (qi < {slots}_n2)"
            f" & (kj < {slots}_n3), other=0)"]
    else:
        lines += [
            "qi = tl.min(tl.min(q_idx, 1), 0) // " + str(qb),  # every kernel's q tile lies in one q block
            f"slot_ok = ({slots}_n0 > {b}) & ({slots}_n1 > {h}) & (qi < {slots}_n2) & (kj < {slots}_n3)",
            f"slot_p = {slots}_ptr.to(tl.pointer_type(tl.int16)) + 2 * ({b} * {slots}_s0 + {h} * {slots}_s1"
            f" + qi.to(tl.int64) * {slots}_s2 + kj.to(tl.int64) * {slots}_s3)",
            "slot = (tl.load(slot_p + 1, mask=slot_ok, other=0).to(tl.int32) << 16) \\",
            "    | (tl.load(slot_p, mask=slot_ok, other=0).to(tl.int32) & 0xFFFF)"]
    lines += [
        f"q_in = _floormod(q_idx, {qb})",
        f"kv_in = kv_idx % {kvb}",  # kv_idx >= 0: the floor remainder, contiguous along the tile
    ]
    if lookup.intervals:
        for name, t in zip(("lo", "hi"), lookup.tables):
            t = f"{prefix}{t}"
            lines += [f"{name} = tl.load({t}_ptr + slot.to(tl.int64) * {t}_s0 + q_in * {t}_s1,",
                      f"             mask=(slot >= 0) & (slot < {t}_n0) & (q_in < {t}_n1), other=0)"]
        return lines + ["return (kv_in >= lo) & (kv_in < hi)"]
    tiles = f"{prefix}{lookup.tables[0]}"
    zero_expr = "0" if lookup.zero.op == "const" else f"{prefix}p{lookup.zero.args[0]}"
    return lines + [
        f"tile = tl.load({tiles}_ptr + slot.to(tl.int64) * {tiles}_s0 + q_in * {tiles}_s1 + kv_in * {tiles}_s2,",
        f"               mask=(slot >= 0) & (slot < {tiles}_n0) & (q_in < {tiles}_n1) & (kv_in < {tiles}_n2),"
        " other=0)",
        f"return tile != {zero_expr}",
    ]


# ---- mod functions -------------------------------------------------------------------

def buffer_params(graph: Graph | None, prefix: str) -> list[str]:
    """Kernel parameter names for a graph's captured tensors (pointer, strides, sizes),
    then its params (`{prefix}p{slot}`)."""
    if graph is None:
        return []
    out = []
    for slot, t in enumerate(graph.buffers):
        out.append(f"{prefix}{slot}_ptr")
        out += [f"{prefix}{slot}_s{d}" for d in range(t.dim())]
        out += [f"{prefix}{slot}_n{d}" for d in range(t.dim())]
    return out + param_names(graph, prefix)


def param_names(graph: Graph | None, prefix: str) -> list[str]:
    return [] if graph is None else [f"{prefix}p{slot}" for slot in range(len(graph.params))]


def buffer_args(graph: Graph | None, buffers=None) -> list:
    """Launch arguments matching `buffer_params` (same order); `buffers` replaces the
    graph's captured tensors (same slots) when given."""
    if graph is None:
        return []
    out = []
    for t in (graph.buffers if buffers is None else buffers):
        out.append(t)
        out += list(t.stride())
        out += list(t.shape)
    return out + list(graph.params)


INDEX_INPUTS = {"score": "score", "b": "off_z", "h": "off_h", "q_idx": "q_idx", "kv_idx": "kv_idx"}


def mod_function(name: str, graph: Graph | None, kind: str, prefix: str, small_indices: bool = False,
                 slot_per_row: bool = False, fast_tanh: bool = False) -> str:
    """`@triton.jit def name(score, off_z, off_h, q_idx, kv_idx, *bufs)` for a score mod
    (returns the new score, float32) or `name(off_z, off_h, q_idx, kv_idx, *bufs)` for a mask
    mod (returns a bool tile or scalar). graph None: identity score / all-true mask.
    small_indices, fast_tanh: see TritonPrinter; slot_per_row: see _tile_table_body."""
    params = (["score"] if kind == "score" else []) + ["off_z", "off_h", "q_idx", "kv_idx"]
    params += buffer_params(graph, prefix)
    lines = ["@triton.jit", f"def {name}({', '.join(params)}):"]
    if graph is None:
        lines.append("    return score" if kind == "score" else "    return True")
        return "\n".join(lines) + "\n"
    pr = TritonPrinter(graph, INDEX_INPUTS, prefix, small_indices, fast_tanh)
    (out,) = pr.print_nodes([graph.output])
    body = pr.lines
    if kind == "score":
        if not graph.uses("score"):  # the result must still be a full tile
            body.append(f"return tl.zeros_like(score) + {out}")
        else:
            body.append(f"return {out}.to(tl.float32)")
    else:
        body.append(f"return {out}")
        lookup = tile_table_lookup(graph)
        if lookup is not None:  # the kernels' own form of the lookup where a kv tile fits a kv block
            body = ([f"if kv_idx.numel <= {lookup.kvb}:"]
                    + ["    " + ln for ln in _tile_table_body(lookup, prefix, slot_per_row)]
                    + ["else:"] + ["    " + ln for ln in body])
    lines += ["    " + ln for ln in body]
    # the traced graph as a comment, without the lines on captured shapes and param values:
    # the source must depend only on the structure (it keys Triton's compile cache)
    lines.append(f"# {graph.kind}_mod {graph.fn_name}:")
    lines += ["#   " + ln for ln in str(graph).splitlines() if not ln.lstrip().startswith(("# buf", "# param"))]
    return "\n".join(lines) + "\n"


def mod_backward_function(name: str, graph: Graph | None, prefix: str, grad_bufs: list[int],
                          small_indices: bool = False, fast_tanh: bool = False) -> str:
    """`@triton.jit def name(score, grad, valid, off_z, off_h, q_idx, kv_idx, *bufs, *grad_bufs,
    Q_AXIS, ACCUM)`: returns d(score_mod)/d(score) * grad, and atomically adds the gradient of every
    load of a captured float tensor in `grad_bufs` (slots) into `gb<slot>_ptr` (float32, same
    shape/strides as the contiguous buffer) by the template's `_grad_atomic_add(ptr, value,
    mask)`. `valid` masks positions that take no part.
    Q_AXIS (constexpr) is the tile axis that q_idx runs along: sums over the other axis
    happen before the atomics when an index does not depend on it. ACCUM (constexpr) False
    skips the buffer gradients (only one of the backward kernels adds them); FIXED_POINT
    accumulates them as int64 fixed point (bitwise deterministic). small_indices, fast_tanh: see
    TritonPrinter."""
    from .autodiff import differentiate

    params = ["score", "grad", "valid", "off_z", "off_h", "q_idx", "kv_idx"] + buffer_params(graph, prefix)
    params += [f"g{prefix}{s}_ptr" for s in grad_bufs] + ["Q_AXIS: tl.constexpr", "ACCUM: tl.constexpr",
                                                          "FIXED_POINT: tl.constexpr"]
    lines = ["@triton.jit", f"def {name}({', '.join(params)}):"]
    if graph is None:
        lines.append("    return grad")
        return "\n".join(lines) + "\n"
    d = differentiate(graph, grad_bufs)
    pr = TritonPrinter(d.graph, INDEX_INPUTS, prefix, small_indices, fast_tanh)
    index_nodes = [i for load, _ in d.load_grads for i in load.args[1:]]
    outs = pr.print_nodes([d.dscore] + [g for _, g in d.load_grads] + index_nodes)
    lines += ["    " + ln for ln in pr.lines]
    for (load, gnode), gexpr in zip(d.load_grads, outs[1:]):
        slot = load.args[0].args[0]
        idx_exprs = [pr.names[id(i)] for i in load.args[1:]]
        deps = set()
        for i in load.args[1:]:
            deps |= d.depends(i)
        lines.append("    if ACCUM:")
        body = []
        row = None
        if load.op == "vload":  # one element of the row per step (see the module docstring)
            row, length, row_body, (gexpr,) = pr.row_loop([gnode], vload=load)
            body += row_body
        body.append(f"gv = tl.where(valid, grad * ({gexpr}), 0.0)")
        # reduce over tile axes the index does not vary along (one atomic per distinct address)
        if "q_idx" not in deps and "kv_idx" not in deps:
            body.append("gv = tl.sum(tl.sum(gv, 1), 0)")
        elif "q_idx" not in deps:
            body.append("gv = tl.sum(gv, Q_AXIS, keep_dims=True)")
        elif "kv_idx" not in deps:
            body.append("gv = tl.sum(gv, 1 - Q_AXIS, keep_dims=True)")
        offs, ok = index_terms(f"{prefix}{slot}", load.args[1:], idx_exprs)
        if row is not None:
            offs.append(f"tl.cast({row}, tl.int64) * {prefix}{slot}_s{len(idx_exprs)}")
        ptr = f"g{prefix}{slot}_ptr" + (" + " + " + ".join(offs) if offs else "")
        if "q_idx" in deps and "kv_idx" in deps:
            ok.append("valid")
        # FIXED_POINT (DETERMINISTIC): int64 atomics of round(gv * 2^32) - integer addition is
        # associative, so the sum is bitwise the same in any order (resolution 2^-32, range 2^31)
        body.append("if FIXED_POINT:")
        body.append("    gv = tl.floor(gv * 4294967296.0 + 0.5).to(tl.int64)")
        # the template's own atomic (`_grad_atomic_add`: Triton's, or Gluon's with a layout
        # that holds each address once)
        body.append(f"_grad_atomic_add({ptr}, gv, {' & '.join(ok) if ok else 'None'})")
        if row is not None:
            body = [f"for {row} in range(0, {length}):"] + ["    " + b for b in body]
        lines += ["        " + b for b in body]
    ds = outs[0]
    lines.append(f"    return tl.where(valid, grad * ({ds}), 0.0)")
    return "\n".join(lines) + "\n"
