"""The generic rule: jvp twice, vmapped over the directions and summed.

It works for every primitive with a JVP rule. For a function f with inputs x_i,
jacobians J_i and laplacians L_i it computes, per direction k,

    first_k  = f'(x)[J_k]            (the output jacobian)
    second_k = f''(x)[J_k, J_k]      (jvp of the jvp along the same direction)

and returns `sum_k second_k + f'(x)[L]`. Symbolic zeros are passed through to JAX's
JVP rules, so inputs without tangents cost nothing.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .. import _jax
from ..zeros import (
    add,
    instantiate,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)

# jvp_fn(primals, tangents) -> (primals_out, tangents_out), both lists; tangents may be
# `Zero` on the way in and out.
JvpFn = Callable[[Sequence[Any], Sequence[Any]], tuple[list[Any], list[Any]]]


def jvp_keep_zeros(
    fun: Callable[..., Sequence[Any]], primals: Sequence[Any], tangents: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """`jax.jvp` of a flat function that accepts and returns symbolic zeros."""
    with _jax.take_current_trace() as parent:
        trace = _jax.JVPTrace(parent, _jax.TraceTag())
        ins = [
            p if is_zero(t) else _jax.JVPTracer(trace, p, t)
            for p, t in zip(primals, tangents, strict=True)
        ]
        with _jax.set_current_trace(trace):
            outs = fun(*ins)
        pairs = [trace.to_primal_tangent_pair(o) for o in outs]
        del trace, ins
    return [p for p, _ in pairs], [t for _, t in pairs]


def primitive_jvp_fn(primitive: Any, params: dict[str, Any]) -> JvpFn:
    """The JVP of a primitive as a `JvpFn` (lists in, lists out)."""
    jvp = _jax.primitive_jvps.get(primitive)
    if jvp is None:
        raise NotImplementedError(
            f"fwdlap has no forward-Laplacian rule for the primitive "
            f"'{primitive}', and JAX defines no JVP rule for it either. Register one "
            "with fwdlap.register_rule, or keep this operation outside the function "
            "passed to fwdlap."
        )

    def jvp_fn(primals: Sequence[Any], tangents: Sequence[Any]):
        if all(is_zero(t) for t in tangents):
            # JAX never calls a JVP rule with only zero tangents (its JVPTrace binds
            # the primitive instead), and many rules (svd, eigh, reduce_prod,
            # cumlogsumexp, ...) fail on them. Do the same.
            out = primitive.bind(*primals, **params)
            outs = list(out) if primitive.multiple_results else [out]
            return outs, [zero_laplacian(o) for o in outs]
        out, tangent_out = jvp(list(primals), list(tangents), **params)
        if primitive.multiple_results:
            return list(out), list(tangent_out)
        return [out], [tangent_out]

    return jvp_fn


def jvp_rows(jvp_fn: Any, primals: Sequence[Any], col: Sequence[Any]) -> list[Any]:
    """`jvp_fn`'s output tangents along every row of `col`, vmapped over the rows.

    `col` holds one stack of rows per input (jacobian directions, or Taylor
    coefficients), or a symbolic zero. Returns one stack per output, None where the
    tangent is a symbolic zero.
    """
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


def laplacian_from_jvp(
    jvp_fn: JvpFn,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
) -> tuple[list[Any], list[Any], list[Any]]:
    """Forward-Laplacian outputs of a function given only its (first-order) JVP."""
    jac_nz = [i for i, j in enumerate(jacobians) if not is_zero(j)]
    lap_nz = [i for i, lp in enumerate(laplacians) if not is_zero(lp)]
    if lap_nz:
        primals_out, lap_term = jvp_fn(primals, laplacians)
    else:
        primals_out, lap_term = jvp_fn(primals, [zero_laplacian(p) for p in primals])
    if not jac_nz:
        zero_jacs = [_zero_jac_like(p, jacobians) for p in primals_out]
        return primals_out, zero_jacs, lap_term

    flags: dict[str, list[bool]] = {}

    def one_direction(*v_nz: Any) -> tuple[list[Any], list[Any]]:
        vs: list[Any] = [zero_laplacian(p) for p in primals]
        for i, v in zip(jac_nz, v_nz, strict=False):
            vs[i] = v

        def first_order(*x_nz: Any) -> list[Any]:
            xs = list(primals)
            for i, x in zip(jac_nz, x_nz, strict=False):
                xs[i] = x
            _, tangents = jvp_fn(xs, vs)
            flags["first_zero"] = [is_zero(t) for t in tangents]
            return [instantiate(t) for t in tangents]

        firsts, seconds = jvp_keep_zeros(
            first_order, [primals[i] for i in jac_nz], v_nz
        )
        flags["second_zero"] = [is_zero(s) for s in seconds]
        return firsts, [instantiate(s) for s in seconds]

    firsts, seconds = jax.vmap(one_direction)(*[jacobians[i] for i in jac_nz])
    jac_out, lap_out = [], []
    for p, f, s, lt, f0, s0 in zip(
        primals_out,
        firsts,
        seconds,
        lap_term,
        flags["first_zero"],
        flags["second_zero"],
        strict=False,
    ):
        jac_out.append(_zero_jac_like(p, jacobians) if f0 else f)
        second = zero_laplacian(p) if s0 else s.sum(0)
        lap_out.append(add(second, lt))
    return primals_out, jac_out, lap_out


def _zero_jac_like(primal: Any, jacobians: Sequence[Any]) -> Any:
    return zero_jacobian(primal, num_directions(jacobians))


def generic_rule(
    primitive: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
) -> tuple[Any, Any, Any]:
    """Forward-Laplacian rule for any primitive with a JVP rule."""
    outs, jacs, laps = laplacian_from_jvp(
        primitive_jvp_fn(primitive, params), primals, jacobians, laplacians
    )
    if primitive.multiple_results:
        return outs, jacs, laps
    return outs[0], jacs[0], laps[0]


@functools.cache
def generic_lap_rule(primitive: Any) -> Callable[..., Any]:
    """The generic rule of `primitive`, as a table rule `(ctx, primals, ...)`."""

    def rule(ctx: Any, primals, jacobians, laplacians, **params: Any):
        del ctx
        return generic_rule(primitive, primals, jacobians, laplacians, **params)

    return rule
