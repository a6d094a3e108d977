"""A `jax.custom_jvp` function in the fourth-order pass: its JVP rule differentiated."""

from collections.abc import Sequence
from typing import Any

import jax

from ..rules.custom import trace_jvp_rule
from ..zeros import is_zero, zero_laplacian
from .generic import taylor_from_jvp
from .series import Context, Series, is_float


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
        is_float(p) and any(not is_zero(t) for t in s)
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
