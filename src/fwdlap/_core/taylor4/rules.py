r"""Fourth-order rules of the families: what `rules.families` registers beside the
forward-Laplacian rules.

A rule of the collapsed fourth-order Taylor pass has the signature

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

The rules live in the one rule table (`registry.rules`, field `taylor4`), put there by
the family helpers together with the forward-Laplacian rules: `linear_rule` (apply the
primitive to every coefficient) and `linear_jvp_rule` (several operands: JAX's own JVP
rule per coefficient) by `def_linear`, `zero_rule` by `def_zero`, `elementwise_rule`
(from the primitive's one derivative table) by `def_elementwise`, `bilinear_rule`
(cross terms only) by `def_bilinear`. Primitives without one take
`generic.generic_rule`.
"""

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..rules.generic import primitive_jvp_fn
from ..zeros import is_zero
from . import moments
from .generic import generic_rule, jvp_rows
from .series import ORDER, Context, is_float, opt, series_out, zero_series

Rule = Callable[..., tuple[Any, Any]]

_mul = moments.mul_all
_sum = moments.sum_present


def _neg(x: Any) -> Any:
    return None if x is None else -x


def _scale(c: Any, x: Any) -> Any:
    return None if x is None else c * x


def _collapse(ctx: Context, x: Any) -> Any:
    return None if x is None else ctx.collapse(x)


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
        coefs = [opt(t) for t in s]
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


def linear_rule(primitive: Any) -> Rule:
    """A primitive linear in its one operand: apply it to every coefficient."""

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        (x,), (s,) = primals, series
        out = primitive.bind(x, **params)

        def f(v: Any) -> Any:
            return primitive.bind(v, **params)

        coefs = [
            None if is_zero(t) else (jax.vmap(f)(t) if k < 3 else f(t))
            for k, t in enumerate(s)
        ]
        return out, series_out(ctx, out, coefs)

    return rule


def linear_jvp_rule(primitive: Any) -> Rule:
    """A primitive linear in its differentiable operands (others may be integers):
    JAX's JVP rule, which is the linear map itself, applied to every coefficient."""

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        jvp_fn = primitive_jvp_fn(primitive, params)
        outs, top = jvp_fn(primals, [s[3] for s in series])
        columns = [jvp_rows(jvp_fn, primals, [s[k] for s in series]) for k in range(3)]
        out_series = [
            series_out(ctx, o, [columns[0][j], columns[1][j], columns[2][j], opt(t)])
            for j, (o, t) in enumerate(zip(outs, top, strict=True))
        ]
        if primitive.multiple_results:
            return outs, out_series
        return outs[0], out_series[0]

    return rule


def zero_rule(primitive: Any) -> Rule:
    """A piecewise-constant primitive: every coefficient of the output is zero."""

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        del series
        out = primitive.bind(*primals, **params)
        outs = out if primitive.multiple_results else [out]
        zeros = [zero_series(o, ctx) for o in outs]
        return (outs, zeros) if primitive.multiple_results else (out, zeros[0])

    return rule


# --- elementwise unary functions -----------------------------------------------------


def elementwise_rule(
    primitive: Any,
    derivatives: Callable[[Any, Any, dict[str, Any]], Iterable[Any]],
    real_only: bool = False,
) -> Rule:
    """The rule of an elementwise unary primitive (Faà di Bruno to order four).

    `derivatives(x, y, params)` is the primitive's derivative table (see
    `rules.families.Derivatives`): its first four entries are used.
    """

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        (x,), (s,) = primals, series
        if real_only and jnp.iscomplexobj(x):
            return generic_rule(ctx, primitive, primals, series, **params)
        y = primitive.bind(x, **params)
        ds = tuple(itertools.islice(derivatives(x, y, params), ORDER))
        x1, x2, x3, x4 = (opt(t) for t in s)
        if ctx.moments:
            coefs = moments.elementwise(ctx.n, ds, x1, x2, x3, x4)
        else:
            coefs = _faa_di_bruno(ctx, ds, x1, x2, x3, x4)
        return y, series_out(ctx, y, coefs)

    return rule


def _faa_di_bruno(
    ctx: Context, ds: Sequence[Any], x1: Any, x2: Any, x3: Any, x4: Any
) -> list[Any]:
    """`y_1` to `y_3` and the collapsed `Y_4` of `phi(x)` (the formulas above)."""
    d1, d2, d3, d4 = ds
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
    return [y1, y2, y3, y4]


# --- products ------------------------------------------------------------------------


class BilinearOps:
    """How a bilinear primitive `f(a, b)` meets the directions.

    - `rows_left(A, b)`: `f(A[k], b)` for every row `k` of `A`;
    - `rows_right(a, B)`: `f(a, B[k])`;
    - `pairs(A, B)`: `f(A[k], B[k])` per direction;
    - `pairs_collapsed(ctx, A, B)`: `sum_k s_k f(A[k], B[k])`.

    `broadcast`: the operands broadcast as an elementwise primitive's do (`mul`).
    """

    broadcast = False

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


class MulOps(BilinearOps):
    """`mul`: products of rows are plain broadcasting products."""

    broadcast = True

    def rows_left(self, rows: Any, b: Any, params: Any) -> Any:
        return rows * b

    def rows_right(self, a: Any, rows: Any, params: Any) -> Any:
        return a * rows

    def pairs(self, x: Any, y: Any, params: Any) -> Any:
        return x * y


_MUL_OPS = MulOps(lax.mul_p)


def _shift(dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(d + 1 for d in dims)


class DotOps(BilinearOps):
    """`dot_general`: pairs of rows as one product batched over the directions."""

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


def bilinear_rule(ops: BilinearOps) -> Rule:
    """A bilinear primitive: the output's coefficients are the series product
    `c_m = sum_{i+j=m} f(a_i, b_j)`, with the fourth collapsed over directions."""

    def rule(ctx: Context, primals: Any, series: Any, **params: Any):
        if ops.broadcast:
            primals, coefs = _broadcast(primals, series)
        else:
            coefs = [[opt(t) for t in s] for s in series]
        (a, b), (sa, sb) = primals, coefs
        if ctx.moments:
            out, mcoefs = moments.bilinear(ctx.n, ops, params, a, b, sa, sb, _stacked)
            return out, series_out(ctx, out, mcoefs)
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
        return out, series_out(ctx, out, [c1, c2, c3, c4])

    return rule


def div_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    """`q = a / b`: `q_m = (a_m - sum_{j=1}^m b_j q_{m-j}) / b`, the 4th collapsed."""
    primals, coefs = _broadcast(primals, series)
    (a, b), (sa, sb) = primals, coefs
    q0 = lax.div_p.bind(a, b, **params)
    if not is_float(q0):
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
    return q0, series_out(ctx, q0, [q1, q2, q3, q4])


def _moments_div(ctx: Context, a: Any, b: Any, sa: Any, sb: Any, q0: Any):
    """`a / b` in the moments layout: `a * (1 / b)`, the reciprocal elementwise."""
    r = 1 / b
    if all(t is None for t in sb):
        coefs = [None if t is None else t * r for t in sa]
        return q0, series_out(ctx, q0, coefs)
    sr = moments.elementwise(ctx.n, moments.reciprocal_derivs(r), *sb)
    _, coefs = moments.bilinear(ctx.n, _MUL_OPS, {}, a, r, sa, sr, _stacked)
    return q0, series_out(ctx, q0, coefs)
