"""Loops and branches in the collapsed Taylor pass: `scan`, `while`, `cond`.

Each rule turns the body (or branches) into a collapsed-Taylor jaxpr
(`taylor4_jaxpr`) that takes and returns only the non-zero coefficients, interleaved
after their primal. Loops find which carries have non-zero coefficients by a
fixpoint, as JAX's JVP does. (`jit` and `remat` bodies, and a `cond` whose index is
known while tracing, are inlined by the trace itself.) Importing this module adds the
rules to the entries of the forward-Laplacian control-flow rules (`registry`), so it is
imported after those.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .. import _jax, registry
from ..zeros import is_zero
from .series import Context, nonzero_mask
from .trace import Mask, deinterleave, interleave, taylor4_jaxpr

_NONE: Mask = (False, False, False, False)


def _masks(series: Sequence[Any]) -> list[Mask]:
    return [nonzero_mask(s) for s in series]  # type: ignore[misc]


def _union(a: Sequence[Mask], b: Sequence[Mask]) -> list[Mask]:
    return [
        tuple(x or y for x, y in zip(m, n, strict=True))  # type: ignore[misc]
        for m, n in zip(a, b, strict=True)
    ]


def _fixpoint(
    body: Any, ctx: Context, before: list[Mask], carry: list[Mask], after: list[Mask]
) -> list[Mask]:
    """Grow the carries' masks until the body's carry outputs are within them."""
    num_carry = len(carry)
    for _ in range(4 * num_carry + 2):
        _, out = taylor4_jaxpr(body, ctx, [*before, *carry, *after])
        new = _union(carry, out[:num_carry])
        if new == carry:
            break
        carry = new
    return carry


def scan_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    """`scan`: the body over interleaved coefficients, scanned ones moved to axis 1."""
    num_consts, num_carry = params["num_consts"], params["num_carry"]
    body = params["jaxpr"]
    masks = _masks(series)
    c_m = masks[:num_consts]
    k_m = masks[num_consts : num_consts + num_carry]
    x_m = masks[num_consts + num_carry :]
    k_m = _fixpoint(body, ctx, c_m, k_m, x_m)
    _, probe = taylor4_jaxpr(body, ctx, [*c_m, *k_m, *x_m])
    y_m = probe[num_carry:]
    new_body, _ = taylor4_jaxpr(body, ctx, [*c_m, *k_m, *x_m], [*k_m, *y_m])
    # Scanned coefficients are (n, length, ...); scan slices the leading axis.
    xs_series = [
        tuple(
            t if is_zero(t) or k == 3 else jnp.moveaxis(t, 0, 1)
            for k, t in enumerate(s)
        )
        for s in series[num_consts + num_carry :]
    ]
    consts = interleave(primals[:num_consts], series[:num_consts], c_m)
    carry = interleave(
        primals[num_consts : num_consts + num_carry],
        series[num_consts : num_consts + num_carry],
        k_m,
    )
    xs = interleave(primals[num_consts + num_carry :], xs_series, x_m)
    args = [*consts, *carry, *xs]
    new_params = dict(
        params, jaxpr=new_body, num_consts=len(consts), num_carry=len(carry)
    )
    if "linear" in params:  # JAX < 0.10
        new_params["linear"] = (False,) * len(args)
    outs = _jax.scan_p.bind(*args, **new_params)
    k_out, k_series = deinterleave(outs[: len(carry)], k_m, ctx)
    y_out, y_series = deinterleave(outs[len(carry) :], y_m, ctx)
    y_series = [
        tuple(
            t if is_zero(t) or k == 3 else jnp.moveaxis(t, 1, 0)
            for k, t in enumerate(s)
        )
        for s in y_series
    ]
    return [*k_out, *y_out], [*k_series, *y_series]


def while_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    """`while`: the body over interleaved carries; the condition reads the primals."""
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    masks = _masks(series)
    cc_p = list(primals[:cond_nconsts])
    split = cond_nconsts + body_nconsts
    bc_m, k_m = masks[cond_nconsts:split], masks[split:]
    k_m = _fixpoint(body_jaxpr, ctx, bc_m, k_m, [])
    new_body, _ = taylor4_jaxpr(body_jaxpr, ctx, [*bc_m, *k_m], k_m)
    body_consts = interleave(
        primals[cond_nconsts:split], series[cond_nconsts:split], bc_m
    )
    carry = interleave(primals[split:], series[split:], k_m)
    carry_avals = [jax.typeof(c) for c in carry]
    new_cond = _cond_on_primals(cond_jaxpr, cond_nconsts, k_m, carry_avals)
    outs = _jax.while_p.bind(
        *cc_p,
        *body_consts,
        *carry,
        **dict(
            params,
            cond_jaxpr=new_cond,
            body_jaxpr=new_body,
            body_nconsts=len(body_consts),
        ),
    )
    return deinterleave(outs, k_m, ctx)


def _cond_on_primals(
    cond_jaxpr: Any, num_consts: int, carry_masks: Sequence[Mask], carry_avals: Any
) -> Any:
    """The loop condition over interleaved carries (it reads only the primals)."""
    fun = _jax.jaxpr_as_fun(cond_jaxpr)
    avals = [*cond_jaxpr.in_avals[:num_consts], *carry_avals]

    def cond(*args: Any) -> Any:
        consts, rest = args[:num_consts], args[num_consts:]
        it = iter(rest)
        primal_carries = []
        for m in carry_masks:
            primal_carries.append(next(it))
            for _ in range(sum(m)):
                next(it)
        return fun(*consts, *primal_carries)

    dbg = cond_jaxpr.jaxpr.debug_info.with_unknown_names()
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
        _jax.wrap_init(cond, debug_info=dbg), avals
    )
    return _jax.ClosedJaxpr(jaxpr, consts)


def cond_rule(ctx: Context, primals: Any, series: Any, **params: Any):
    """`cond` with a traced index: every branch returns the union of their masks."""
    branches = params["branches"]
    index, *ops = primals
    op_series = list(series[1:])
    op_m = _masks(op_series)
    out_m = [_NONE] * len(branches[0].out_avals)
    for br in branches:
        out_m = _union(out_m, taylor4_jaxpr(br, ctx, op_m)[1])
    new_branches = tuple(taylor4_jaxpr(br, ctx, op_m, out_m)[0] for br in branches)
    args = interleave(ops, op_series, op_m)
    outs = _jax.cond_p.bind(index, *args, **dict(params, branches=new_branches))
    return deinterleave(outs, out_m, ctx)


registry.set_pass_rule(_jax.scan_p, taylor4=scan_rule)
registry.set_pass_rule(_jax.while_p, taylor4=while_rule)
registry.set_pass_rule(_jax.cond_p, taylor4=cond_rule)
