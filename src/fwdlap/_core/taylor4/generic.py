"""The generic rule of the fourth-order pass: nested JVPs along each direction's path.

It serves every primitive without a fourth-order rule in the table, as the generic
rule of `rules.generic` does for the forward-Laplacian pass, and every `custom_jvp`
function (`custom`): correct for anything JAX can differentiate four times.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..rules.generic import jvp_rows, primitive_jvp_fn
from ..zeros import is_zero
from . import moments
from .series import Context, Series, is_float, opt, series_out, zero_series

_sum = moments.sum_present


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
        if is_float(primals[i]) and any(not is_zero(t) for t in s[:3])
    ]
    floats = [is_float(o) for o in outs]
    if not active or not any(floats):
        return outs, [
            series_out(ctx, o, [None, None, None, opt(t) if f else None])
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
        result.append(series_out(ctx, o, [y1, y2, y3, _sum(ctx.collapse(y4), opt(t))]))
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
    opts = [[opt(t) for t in s] for s in series]
    extra = iter(
        moments.generic(ctx.n, fun, primals, opts, active, floats, _derivatives)
    )
    result: list[Series] = []
    for j, (o, t, f) in enumerate(zip(outs, top, floats, strict=True)):
        if not f:
            result.append(zero_series(o, ctx))
            continue
        more = next(extra)
        coefs = [columns[k][j] for k in range(3)] + [opt(t)]
        result.append(
            series_out(ctx, o, [_sum(x, y) for x, y in zip(coefs, more, strict=True)])
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

    outs, out_series = taylor_from_jvp(ctx, fun, jvp_fn, primals, series)
    if primitive.multiple_results:
        return outs, out_series
    return outs[0], out_series[0]
