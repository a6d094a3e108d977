r"""Rules of the collapsed fourth-order Taylor pass, in one table.

A rule has the signature

    rule(ctx, primals, series, **params) -> (out, series_out)

where `series[i] = (x1, x2, x3, X4)` holds the Taylor coefficients of `primals[i]`
(`x1`-`x3` with a leading axis of `ctx.n` directions, `X4` collapsed: summed over the
directions with `ctx.signs`), any of them possibly a symbolic zero. For primitives with
`multiple_results`, `out` and `series_out` are lists. Rules run under the parent trace.

Coefficients are normalised as in a Taylor series, $x(t) = \sum_m x_m t^m$, so the
product of two series is their convolution, $c_m = \sum_{i+j=m} a_i b_j$, and for an
elementwise $y = \varphi(x)$ with $\varphi_m = \varphi^{(m)}(x_0)$ (Faà di Bruno):

$$
\begin{aligned}
y_1 &= \varphi_1 x_1, \qquad y_2 = \varphi_1 x_2 + \tfrac12 \varphi_2 x_1^2, \qquad
y_3 = \varphi_1 x_3 + \varphi_2 x_1 x_2 + \tfrac16 \varphi_3 x_1^3, \\
Y_4 &= \varphi_1 X_4
+ \varphi_2 \textstyle\sum_k s_k \big(x_1 x_3 + \tfrac12 x_2^2\big)_k
+ \tfrac12 \varphi_3 \sum_k s_k \big(x_1^2 x_2\big)_k
+ \tfrac1{24} \varphi_4 \sum_k s_k \big(x_1^4\big)_k .
\end{aligned}
$$

The table is filled through `def_linear` (apply the primitive to every coefficient),
`def_linear_jvp` (linear in several operands: JAX's own JVP rule, per coefficient),
`def_zero` (piecewise constant), `def_elementwise(prim, derivs)` (the four
derivatives) and `def_bilinear(prim, ops)` (products: cross terms only). These mirror
the forward-Laplacian registry's `def_*` helpers, so that folding this table into the
consolidated `primitive -> rule` table (one entry per primitive, one field per pass)
is mechanical. Primitives without an entry take `generic_rule`: nested `jax.jvp`s of
the primitive along each direction's polynomial path, correct for anything JAX can
differentiate four times.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..rules.custom import trace_jvp_rule
from ..rules.generic import primitive_jvp_fn
from ..zeros import Zero, instantiate, is_zero, zero_laplacian
from . import moments
from .trace import Context, Series, zero_coefficient, zero_series

Rule = Callable[..., tuple[Any, Any]]

RULES: dict[Any, Rule] = {}
"""primitive -> rule(ctx, primals, series, **params)."""


def def_rule(primitive: Any, rule: Rule) -> None:
    """Register `rule` for `primitive` (a primitive missing from `lax` is skipped)."""
    if primitive is not None:
        RULES[primitive] = rule


# --- None-aware arithmetic: None stands for a symbolic zero inside the rules ---------


def _opt(t: Any) -> Any:
    return None if is_zero(t) else t


_mul = moments.mul_all
_sum = moments.sum_present


def _neg(x: Any) -> Any:
    return None if x is None else -x


def _scale(c: Any, x: Any) -> Any:
    return None if x is None else c * x


def _collapse(ctx: Context, x: Any) -> Any:
    return None if x is None else ctx.collapse(x)


def _series_out(ctx: Context, out: Any, coefs: Sequence[Any]) -> Series:
    return tuple(  # type: ignore[return-value]
        zero_coefficient(out, k, ctx) if c is None else c for k, c in enumerate(coefs)
    )


def _is_float(x: Any) -> bool:
    return bool(jnp.issubdtype(jax.typeof(x).dtype, jnp.inexact))


def _broadcast(
    primals: Sequence[Any], series: Sequence[Sequence[Any]]
) -> tuple[list[Any], list[list[Any]]]:
    """Broadcast elementwise operands (rank-0 or size-1 axes) to the output shape.

    The rows of a coefficient carry a leading axis of directions, so they do not
    broadcast the way their primal does. Symbolic zeros stay `None`.
    """
    shapes = [tuple(jnp.shape(p)) for p in primals]
    shape = tuple(jnp.broadcast_shapes(*shapes))
    ps: list[Any] = []
    ss: list[list[Any]] = []
    for p, s, sh in zip(primals, series, shapes, strict=True):
        coefs = [_opt(t) for t in s]
        if sh != shape:
            p = jnp.broadcast_to(p, shape)
            pad = (1,) * (len(shape) - len(sh))
            coefs = [
                None
                if c is None
                else (
                    jnp.broadcast_to(
                        c.reshape((c.shape[0], *pad, *sh)), (c.shape[0], *shape)
                    )
                    if k < 3
                    else jnp.broadcast_to(c, shape)
                )
                for k, c in enumerate(coefs)
            ]
        ps.append(p)
        ss.append(coefs)
    return ps, ss


# --- linear and piecewise-constant primitives ----------------------------------------


def def_linear(primitive: Any) -> None:
    """A primitive linear in its one operand: apply it to every coefficient."""
    if primitive is None:
        return

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        (x,), (s,) = primals, series
        out = primitive.bind(x, **params)

        def f(v: Any) -> Any:
            return primitive.bind(v, **params)

        coefs = [
            None if is_zero(t) else (jax.vmap(f)(t) if k < 3 else f(t))
            for k, t in enumerate(s)
        ]
        return out, _series_out(ctx, out, coefs)

    def_rule(primitive, rule)


def def_linear_jvp(primitive: Any) -> None:
    """A primitive linear in its differentiable operands (others may be integers):
    JAX's JVP rule, which is the linear map itself, applied to every coefficient."""
    if primitive is None:
        return

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        jvp_fn = primitive_jvp_fn(primitive, params)
        outs, top = jvp_fn(primals, [s[3] for s in series])
        columns = [jvp_rows(jvp_fn, primals, [s[k] for s in series]) for k in range(3)]
        series_out = [
            _series_out(ctx, o, [columns[0][j], columns[1][j], columns[2][j], _opt(t)])
            for j, (o, t) in enumerate(zip(outs, top, strict=True))
        ]
        if primitive.multiple_results:
            return outs, series_out
        return outs[0], series_out[0]

    def_rule(primitive, rule)


def jvp_rows(jvp_fn: Any, primals: Sequence[Any], col: Sequence[Any]) -> list[Any]:
    """The JVP applied to every row of the coefficients `col` (one per input), vmapped;
    one entry per output, None where it is zero."""
    nz = [i for i, t in enumerate(col) if not is_zero(t)]
    if not nz:
        out = jax.eval_shape(
            lambda: jvp_fn(primals, [zero_laplacian(p) for p in primals])
        )
        return [None] * len(out[0])
    flags: list[bool] = []

    def one(*rows: Any) -> list[Any]:
        vs = [zero_laplacian(p) for p in primals]
        for i, r in zip(nz, rows, strict=True):
            vs[i] = r
        _, ts = jvp_fn(primals, vs)
        flags[:] = [is_zero(t) for t in ts]
        return [instantiate(t) for t in ts]

    res = jax.vmap(one)(*[col[i] for i in nz])
    return [None if z else r for r, z in zip(res, flags, strict=True)]


def def_zero(primitive: Any) -> None:
    """A piecewise-constant primitive: every coefficient of the output is zero."""
    if primitive is None:
        return

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        del series
        out = primitive.bind(*primals, **params)
        outs = out if primitive.multiple_results else [out]
        zeros = [zero_series(o, ctx) for o in outs]
        return (outs, zeros) if primitive.multiple_results else (out, zeros[0])

    def_rule(primitive, rule)


# --- elementwise unary functions -----------------------------------------------------

Derivs = Callable[[Any, Any], tuple[Any, Any, Any, Any]]
"""`derivs(x, y) -> (f', f'', f''', f'''')` at `x`, given `y = f(x)`."""


def def_elementwise(primitive: Any, derivs: Derivs, real_only: bool = False) -> None:
    """An elementwise unary primitive from its first four derivatives."""
    if primitive is not None:
        def_rule(primitive, elementwise_rule(primitive, derivs, real_only))


def elementwise_rule(primitive: Any, derivs: Derivs, real_only: bool = False) -> Rule:
    """The rule of an elementwise unary primitive (Faà di Bruno to order four)."""

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        (x,), (s,) = primals, series
        if real_only and jnp.iscomplexobj(x):
            return generic_rule(ctx, primitive, primals, series, **params)
        y = primitive.bind(x, **params)
        x1, x2, x3, x4 = (_opt(t) for t in s)
        if ctx.moments:
            coefs = moments.elementwise(ctx.n, derivs(x, y), x1, x2, x3, x4)
            return y, _series_out(ctx, y, coefs)
        d1, d2, d3, d4 = derivs(x, y)
        sq = _mul(x1, x1)
        y1 = _mul(d1, x1)
        y2 = _sum(_mul(d1, x2), _mul(0.5 * d2, sq))
        y3 = _sum(_mul(d1, x3), _mul(d2, x1, x2), _mul(d3 / 6, sq, x1))
        inner = _sum(_mul(x1, x3), _scale(0.5, _mul(x2, x2)))
        y4 = _sum(
            _mul(d1, x4),
            _mul(d2, _collapse(ctx, inner)),
            _mul(0.5 * d3, _collapse(ctx, _mul(sq, x2))),
            _mul(d4 / 24, _collapse(ctx, _mul(sq, sq))),
        )
        return y, _series_out(ctx, y, [y1, y2, y3, y4])

    return rule


def _power_derivs(k: int) -> Derivs:
    """Derivatives of `x ** k` (integer `k`); falling factorials that vanish are 0."""

    def derivs(x: Any, y: Any) -> tuple[Any, Any, Any, Any]:
        del y
        out = []
        for m in range(1, 5):
            c = math.prod(k - i for i in range(m))
            if c == 0:
                out.append(jnp.zeros_like(x))
            elif k - m == 0:
                out.append(jnp.full_like(x, c))
            else:
                out.append(c * lax.integer_pow(x, k - m))
        return out[0], out[1], out[2], out[3]

    return derivs


_POWER_RULES: dict[int, Rule] = {}


def _integer_pow_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    k = params["y"]
    if k not in _POWER_RULES:
        _POWER_RULES[k] = elementwise_rule(lax.integer_pow_p, _power_derivs(k))
    return _POWER_RULES[k](ctx, primals, series, **params)


def _tanh(x: Any, y: Any):
    s = 1 - y * y
    return s, -2 * y * s, s * (6 * y * y - 2), 8 * y * s * (2 - 3 * y * y)


def _logistic(x: Any, y: Any):
    s = y * (1 - y)
    u = 1 - 2 * y
    v = y * y - y  # -s
    return s, s * u, s * (1 + 6 * v), s * u * (1 + 12 * v)


def _sqrt(x: Any, y: Any):
    inv = 1 / y
    inv2 = inv * inv
    d1 = 0.5 * inv
    d2 = -0.5 * d1 * inv2
    d3 = -1.5 * d2 * inv2
    return d1, d2, d3, -2.5 * d3 * inv2


def _rsqrt(x: Any, y: Any):
    y2 = y * y
    d1 = -0.5 * y * y2
    d2 = -1.5 * d1 * y2
    d3 = -2.5 * d2 * y2
    return d1, d2, d3, -3.5 * d3 * y2


def _log(x: Any, y: Any):
    inv = 1 / x
    d1 = inv
    d2 = -d1 * inv
    d3 = -2 * d2 * inv
    return d1, d2, d3, -3 * d3 * inv


def _log1p(x: Any, y: Any):
    return _log(1 + x, y)


def _sin(x: Any, y: Any):
    c = jnp.cos(x)
    return c, -y, -c, y


def _cos(x: Any, y: Any):
    s = jnp.sin(x)
    return -s, -y, s, y


def _sinh(x: Any, y: Any):
    c = jnp.cosh(x)
    return c, y, c, y


def _cosh(x: Any, y: Any):
    s = jnp.sinh(x)
    return s, y, s, y


def _exp(x: Any, y: Any):
    return y, y, y, y


def _exp2(x: Any, y: Any):
    ln2 = math.log(2.0)
    return ln2 * y, ln2**2 * y, ln2**3 * y, ln2**4 * y


def _expm1(x: Any, y: Any):
    e = y + 1
    return e, e, e, e


def _erf(x: Any, y: Any):
    e = (2 / math.sqrt(math.pi)) * jnp.exp(-x * x)
    x2 = x * x
    return e, -2 * x * e, (4 * x2 - 2) * e, x * (12 - 8 * x2) * e


def _square(x: Any, y: Any):
    z = jnp.zeros_like(x)
    return 2 * x, jnp.full_like(x, 2), z, z


def _abs(x: Any, y: Any):
    z = jnp.zeros_like(x)
    return jnp.sign(x), z, z, z


# --- products ------------------------------------------------------------------------


class BilinearOps:
    """How a bilinear primitive `f(a, b)` meets the directions.

    - `rows_left(A, b)`: `f(A[k], b)` for every row `k` of `A`;
    - `rows_right(a, B)`: `f(a, B[k])`;
    - `pairs(A, B)`: `f(A[k], B[k])` per direction;
    - `pairs_collapsed(ctx, A, B)`: `sum_k s_k f(A[k], B[k])`.
    """

    def __init__(self, primitive: Any):
        self.primitive = primitive

    def plain(self, a: Any, b: Any, params: Any) -> Any:
        return self.primitive.bind(a, b, **params)

    def rows_left(self, rows: Any, b: Any, params: Any) -> Any:
        return jax.vmap(lambda r: self.primitive.bind(r, b, **params))(rows)

    def rows_right(self, a: Any, rows: Any, params: Any) -> Any:
        return jax.vmap(lambda r: self.primitive.bind(a, r, **params))(rows)

    def pairs(self, x: Any, y: Any, params: Any) -> Any:
        return jax.vmap(lambda u, v: self.primitive.bind(u, v, **params))(x, y)

    def pairs_sum(self, x: Any, y: Any, params: Any) -> Any:
        """`sum_k f(x[k], y[k])`."""
        return jnp.sum(self.pairs(x, y, params), axis=0)

    def pairs_collapsed(self, ctx: Context, x: Any, y: Any, params: Any) -> Any:
        return self.pairs_sum(ctx.signed(x), y, params)


class _MulOps(BilinearOps):
    def rows_left(self, rows: Any, b: Any, params: Any) -> Any:
        return rows * b

    def rows_right(self, a: Any, rows: Any, params: Any) -> Any:
        return a * rows

    def pairs(self, x: Any, y: Any, params: Any) -> Any:
        return x * y


_MUL_OPS = _MulOps(lax.mul_p)


def _shift(dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(d + 1 for d in dims)


class _DotOps(BilinearOps):
    def pairs(self, x: Any, y: Any, params: Any) -> Any:
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        dims = ((_shift(lc), _shift(rc)), ((0, *_shift(lb)), (0, *_shift(rb))))
        return self.primitive.bind(x, y, **dict(params, dimension_numbers=dims))

    def pairs_sum(self, x: Any, y: Any, params: Any) -> Any:
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        dims = (((0, *_shift(lc)), (0, *_shift(rc))), (_shift(lb), _shift(rb)))
        return self.primitive.bind(x, y, **dict(params, dimension_numbers=dims))


def _stacked(fn: Callable[[Any], Any], rows: Sequence[Any]) -> list[Any]:
    """`fn` of each non-None entry of `rows`, as one call on their concatenation."""
    live = [r for r in rows if r is not None]
    if not live:
        return [None] * len(rows)
    if len(live) == 1:
        done = [fn(live[0])]
    else:
        sizes = [r.shape[0] for r in live]
        out = fn(jnp.concatenate(live, axis=0))
        done, start = [], 0
        for s in sizes:
            done.append(out[start : start + s])
            start += s
    it = iter(done)
    return [None if r is None else next(it) for r in rows]


def def_bilinear(
    primitive: Any, ops: BilinearOps | None = None, broadcast: bool = False
) -> None:
    """A bilinear primitive: the output's coefficients are the series product
    `c_m = sum_{i+j=m} f(a_i, b_j)`, with the fourth collapsed over directions."""
    if primitive is None:
        return
    ops = ops or BilinearOps(primitive)

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        if broadcast:
            primals, coefs = _broadcast(primals, series)
        else:
            coefs = [[_opt(t) for t in s] for s in series]
        (a, b), (sa, sb) = primals, coefs
        if ctx.moments:
            out, mcoefs = moments.bilinear(ctx.n, ops, params, a, b, sa, sb, _stacked)
            return out, _series_out(ctx, out, mcoefs)
        out = ops.plain(a, b, params)
        left = _stacked(lambda r: ops.rows_left(r, b, params), sa[:3])
        right = _stacked(lambda r: ops.rows_right(a, r, params), sb[:3])
        a1, a2, a3, a4 = sa
        b1, b2, b3, b4 = sb

        def pair(x: Any, y: Any) -> Any:
            return None if x is None or y is None else ops.pairs(x, y, params)

        def pair_c(x: Any, y: Any) -> Any:
            if x is None or y is None:
                return None
            return ops.pairs_collapsed(ctx, x, y, params)

        c1 = _sum(left[0], right[0])
        c2 = _sum(left[1], pair(a1, b1), right[1])
        c3 = _sum(left[2], pair(a2, b1), pair(a1, b2), right[2])
        c4 = _sum(
            None if a4 is None else ops.plain(a4, b, params),
            None if b4 is None else ops.plain(a, b4, params),
            pair_c(a1, b3),
            pair_c(a2, b2),
            pair_c(a3, b1),
        )
        return out, _series_out(ctx, out, [c1, c2, c3, c4])

    def_rule(primitive, rule)


def _div_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    """`q = a / b`: `q_m = (a_m - sum_{j=1}^m b_j q_{m-j}) / b`, the 4th collapsed."""
    primals, coefs = _broadcast(primals, series)
    (a, b), (sa, sb) = primals, coefs
    q0 = lax.div_p.bind(a, b, **params)
    if not _is_float(q0):
        return q0, zero_series(q0, ctx)
    if ctx.moments:
        return _moments_div(ctx, a, b, sa, sb, q0)
    inv = 1 / b
    a1, a2, a3, a4 = sa
    b1, b2, b3, b4 = sb
    q1 = _mul(_sum(a1, _neg(_mul(b1, q0))), inv)
    q2 = _mul(_sum(a2, _neg(_mul(b1, q1)), _neg(_mul(b2, q0))), inv)
    q3 = _mul(_sum(a3, _neg(_mul(b1, q2)), _neg(_mul(b2, q1)), _neg(_mul(b3, q0))), inv)
    cross = _collapse(ctx, _sum(_mul(b1, q3), _mul(b2, q2), _mul(b3, q1)))
    q4 = _mul(_sum(a4, _neg(_mul(b4, q0)), _neg(cross)), inv)
    return q0, _series_out(ctx, q0, [q1, q2, q3, q4])


def _moments_div(ctx: Context, a: Any, b: Any, sa: Any, sb: Any, q0: Any):
    """`a / b` in the moments layout: `a * (1 / b)`, the reciprocal elementwise."""
    r = 1 / b
    if all(t is None for t in sb):
        coefs = [None if t is None else t * r for t in sa]
        return q0, _series_out(ctx, q0, coefs)
    sr = moments.elementwise(ctx.n, moments.reciprocal_derivs(r), *sb)
    _, coefs = moments.bilinear(ctx.n, _MUL_OPS, {}, a, r, sa, sr, _stacked)
    return q0, _series_out(ctx, q0, coefs)


# --- the generic rule: nested JVPs along each direction's path -----------------------


def _derivatives(g: Callable[[Any], list[Any]], t: Any, order: int) -> list[Any]:
    """`[g(t), g'(t), ..., g^(order)(t)]` (each a list) by nested `jax.jvp`s in `t`."""
    if order == 0:
        return [g(t)]

    def lower(s: Any) -> list[Any]:
        return _derivatives(g, s, order - 1)

    primal, tangent = jax.jvp(lower, (t,), (jnp.ones_like(t),))
    return [*primal, tangent[-1]]


def taylor_from_jvp(
    ctx: Context,
    fun: Callable[..., list[Any]],
    linear: Callable[[Sequence[Any], Sequence[Any]], tuple[list[Any], list[Any]]],
    primals: Sequence[Any],
    series: Sequence[Sequence[Any]],
) -> tuple[list[Any], list[Series]]:
    """Collapsed Taylor coefficients of `fun`'s outputs, for any differentiable `fun`.

    `linear(primals, tangents) -> (outs, tangents_out)` is `fun`'s JVP (accepting and
    returning symbolic zeros): the fourth coefficient is `fun'(x)[X4]` plus the fourth
    Taylor coefficient of `t -> fun(x + x1 t + x2 t^2 + x3 t^3)` along each direction,
    which nested `jax.jvp`s in `t` give (vmapped over the directions), collapsed.
    """
    outs, top = linear(primals, [s[3] for s in series])
    active = [
        i
        for i, s in enumerate(series)
        if _is_float(primals[i]) and any(not is_zero(t) for t in s[:3])
    ]
    floats = [_is_float(o) for o in outs]
    if not active or not any(floats):
        return outs, [
            _series_out(ctx, o, [None, None, None, _opt(t) if f else None])
            for o, t, f in zip(outs, top, floats, strict=True)
        ]
    if ctx.moments:
        return _moments_from_jvp(ctx, fun, linear, primals, series, active, floats)
    masks = {i: [not is_zero(t) for t in series[i][:3]] for i in active}
    rows = [
        t for i in active for t, m in zip(series[i][:3], masks[i], strict=True) if m
    ]
    dtype = jax.typeof(primals[active[0]]).dtype

    def one_direction(*rows_k: Any) -> list[Any]:
        it = iter(rows_k)
        coefs = {i: [next(it) if m else None for m in masks[i]] for i in active}

        def path(t: Any) -> list[Any]:
            xs = list(primals)
            for i in active:
                c1, c2, c3 = coefs[i]
                tt = t.astype(jax.typeof(primals[i]).dtype)
                # Horner with gaps: x0 + t (c1 + t (c2 + t c3)).
                poly = _horner(tt, c1, c2, c3)
                xs[i] = xs[i] + tt * poly
            ys = fun(*xs)
            return [y for y, f in zip(ys, floats, strict=True) if f]

        derivs = _derivatives(path, jnp.zeros((), dtype), 4)
        return [[d / math.factorial(m) for d in derivs[m]] for m in range(1, 5)]

    per_order = jax.vmap(one_direction)(*rows)
    float_outs = iter(range(sum(floats)))
    result: list[Series] = []
    for o, t, f in zip(outs, top, floats, strict=True):
        if not f:
            result.append(zero_series(o, ctx))
            continue
        j = next(float_outs)
        y1, y2, y3, y4 = (per_order[m][j] for m in range(4))
        result.append(
            _series_out(ctx, o, [y1, y2, y3, _sum(ctx.collapse(y4), _opt(t))])
        )
    return outs, result


def _moments_from_jvp(
    ctx: Context,
    fun: Callable[..., list[Any]],
    linear: Any,
    primals: Sequence[Any],
    series: Sequence[Sequence[Any]],
    active: list[int],
    floats: list[bool],
) -> tuple[list[Any], list[Series]]:
    outs, top = linear(primals, [s[3] for s in series])
    columns = [jvp_rows(linear, primals, [s[k] for s in series]) for k in range(3)]
    opt = [[_opt(t) for t in s] for s in series]
    extra = iter(
        moments.generic(ctx.n, fun, primals, opt, active, floats, _derivatives)
    )
    result: list[Series] = []
    for j, (o, t, f) in enumerate(zip(outs, top, floats, strict=True)):
        if not f:
            result.append(zero_series(o, ctx))
            continue
        more = next(extra)
        coefs = [columns[k][j] for k in range(3)] + [_opt(t)]
        result.append(
            _series_out(ctx, o, [_sum(x, y) for x, y in zip(coefs, more, strict=True)])
        )
    return outs, result


def _horner(t: Any, c1: Any, c2: Any, c3: Any) -> Any:
    """`c1 + t (c2 + t c3)` with None for zero coefficients (not all None)."""
    acc = None
    for c in (c3, c2, c1):
        if acc is not None:
            acc = acc * t
        acc = _sum(acc, c)
    return acc if acc is not None else jnp.zeros_like(t)


def generic_rule(
    ctx: Context, primitive: Any, primals: Any, series: Any, **params: Any
) -> tuple[Any, Any]:
    """The rule for any primitive with a JVP rule (nested `jax.jvp`s)."""
    jvp_fn = primitive_jvp_fn(primitive, params)

    def fun(*xs: Any) -> list[Any]:
        out = primitive.bind(*xs, **params)
        return list(out) if primitive.multiple_results else [out]

    outs, series_out = taylor_from_jvp(ctx, fun, jvp_fn, primals, series)
    if primitive.multiple_results:
        return outs, series_out
    return outs[0], series_out[0]


# --- custom_jvp ----------------------------------------------------------------------


def custom_jvp_rule(
    ctx: Context,
    primals: Sequence[Any],
    series: Sequence[Series],
    jvp: Any,
    zeros: bool,
) -> tuple[list[Any], list[Series]]:
    """A `jax.custom_jvp` function: differentiate its JVP rule (three more times).

    The rule is traced once to a jaxpr (a `WrappedFun` may be called only once) and
    wrapped in a fresh `jax.custom_jvp`, which the generic nested-JVP rule then
    differentiates: the innermost derivative is the user's rule, the outer ones
    differentiate that rule's code.
    """
    active = [
        _is_float(p) and any(not is_zero(t) for t in s)
        for p, s in zip(primals, series, strict=True)
    ]
    markers = [
        p if a else zero_laplacian(p) for p, a in zip(primals, active, strict=True)
    ]
    zero_laps = [zero_laplacian(p) for p in primals]
    jvp_fn, _ = trace_jvp_rule(primals, markers, zero_laps, jvp, zeros)

    def primal_fn(*xs: Any) -> tuple[Any, ...]:
        return tuple(jvp_fn(list(xs), [zero_laplacian(x) for x in xs])[0])

    fun = jax.custom_jvp(primal_fn)

    def rule(ps: Any, ts: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        outs, touts = jvp_fn(list(ps), list(ts))
        return tuple(outs), tuple(touts)

    fun.defjvp(rule)

    def as_list(*xs: Any) -> list[Any]:
        return list(fun(*xs))

    return taylor_from_jvp(ctx, as_list, jvp_fn, primals, series)


# --- the table -----------------------------------------------------------------------


def _lax(name: str) -> Any:
    return getattr(lax, f"{name}_p", None)


_LINEAR = [
    "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "slice", "rev", "copy", "real", "imag", "conj", "cumsum", "reduce_precision",
    "tile", "reduce_sum",
]  # fmt: skip
_LINEAR_JVP = [
    "add", "sub", "concatenate", "pad", "select_n", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter", "scatter_add", "scatter_sub",
    "complex", "reduce_window_sum", "convert_element_type", "sharding_constraint",
    "device_put", "split", "psum", "all_gather", "ppermute", "all_to_all",
]  # fmt: skip
_ZERO = [
    "sign", "floor", "ceil", "round", "stop_gradient", "is_finite", "nextafter",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "argmax", "argmin",
]  # fmt: skip
_ELEMENTWISE: dict[str, tuple[Derivs, bool]] = {
    "exp": (_exp, False),
    "exp2": (_exp2, False),
    "expm1": (_expm1, False),
    "log": (_log, False),
    "log1p": (_log1p, False),
    "sin": (_sin, False),
    "cos": (_cos, False),
    "sinh": (_sinh, False),
    "cosh": (_cosh, False),
    "tanh": (_tanh, False),
    "logistic": (_logistic, False),
    "sqrt": (_sqrt, False),
    "rsqrt": (_rsqrt, False),
    "square": (_square, False),
    "erf": (_erf, True),
    "abs": (_abs, True),
}


def _register() -> None:
    from .. import _jax

    for name in _LINEAR:
        def_linear(_lax(name))
    for name in _LINEAR_JVP:
        def_linear_jvp(_lax(name))
    def_linear_jvp(getattr(_jax, "add_any_p", None))
    for name in _ZERO:
        def_zero(_lax(name))
    for name, (derivs, real_only) in _ELEMENTWISE.items():
        def_elementwise(_lax(name), derivs, real_only)
    def_rule(lax.integer_pow_p, _integer_pow_rule)
    def_bilinear(lax.mul_p, _MUL_OPS, broadcast=True)
    def_bilinear(lax.dot_general_p, _DotOps(lax.dot_general_p))
    def_bilinear(lax.conv_general_dilated_p)
    def_rule(lax.div_p, _div_rule)


_register()

__all__ = ["RULES", "Zero", "custom_jvp_rule", "generic_rule"]
