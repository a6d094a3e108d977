"""Bilinear rules (mul, dot_general, conv_general_dilated).

For a bilinear f(a, b) the Hessian only couples a with b, so the second-order term is
2 * sum_k f(J_a[k], J_b[k]); each side's first-order term is f applied to one tangent.
The fourth-order pass takes the product of the two series, with `ops` saying how `f`
meets rows of coefficients (`taylor4.rules.BilinearOps`).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import dot_split, registry
from ..registry import DECLINED
from ..taylor4 import rules as taylor4_rules
from ..zeros import (
    add,
    broadcast_operands,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)
from . import sparse_rules
from .families import def_bilinear


def _apply_to_directions(
    primitive: Any, ja: Any, jb: Any, a: Any, b: Any, params: dict[str, Any]
) -> Any:
    """f(J_a[k], b) + f(a, J_b[k]) for every direction k."""
    out = None
    if not is_zero(ja):
        out = jax.vmap(lambda j: primitive.bind(j, b, **params))(ja)
    if not is_zero(jb):
        term = jax.vmap(lambda j: primitive.bind(a, j, **params))(jb)
        out = term if out is None else out + term
    return out


def _first_order(
    primitive: Any, ta: Any, tb: Any, a: Any, b: Any, params: dict[str, Any], zero: Any
) -> Any:
    out = zero
    if not is_zero(ta):
        out = add(out, primitive.bind(ta, b, **params))
    if not is_zero(tb):
        out = add(out, primitive.bind(a, tb, **params))
    return out


def mul_rule(
    ctx: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
):
    # A rank-0 operand broadcasts in the primitive but not in the jacobian algebra.
    primals, jacobians, laplacians = broadcast_operands(primals, jacobians, laplacians)
    (a, b), (ja, jb), (la, lb) = primals, jacobians, laplacians
    out = lax.mul_p.bind(a, b, **params)
    zero = zero_laplacian(out)
    jac_out = zero_jacobian(out, num_directions(jacobians))
    if not is_zero(ja):
        jac_out = ja * b
    if not is_zero(jb):
        jac_out = a * jb if is_zero(ja) else jac_out + a * jb
    lap_out = _first_order(lax.mul_p, la, lb, a, b, params, zero)
    if not is_zero(ja) and not is_zero(jb):
        lap_out = add(lap_out, 2 * jnp.sum(ja * jb, axis=0))
    return out, jac_out, lap_out


def _shifted_dims(dimension_numbers: Any) -> Any:
    """dot_general dimension numbers that also contract the leading direction axes."""
    (lc, rc), (lb, rb) = dimension_numbers
    shift = lambda dims: tuple(d + 1 for d in dims)
    return ((0, *shift(lc)), (0, *shift(rc))), (shift(lb), shift(rb))


def _one_product_pays(a: Any, b: Any, out: Any, ja: Any, jb: Any, params: Any) -> bool:
    """Whether `J_a b + a J_b` is cheaper as one product over a doubled contraction.

    Two products write the output jacobian twice and add them; one product over
    `[J_a, a] . [b, J_b]` writes it once but copies `a` and `b` per direction. That
    pays when the output is larger than the operands (attention scores, say).
    """
    (lc, _), _ = params["dimension_numbers"]
    if is_zero(ja) or is_zero(jb) or not lc:
        return False
    return jnp.size(out) > jnp.size(a) + jnp.size(b)


def _first_order_as_one_product(ja: Any, jb: Any, a: Any, b: Any, params: Any) -> Any:
    """`J_a[k] b + a J_b[k]` for all k as one dot_general over `[J_a, a] . [b, J_b]`."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    n = ja.shape[0]
    lhs = jnp.concatenate(
        [ja, jnp.broadcast_to(a, (n, *jnp.shape(a))).astype(ja.dtype)], axis=lc[0] + 1
    )
    rhs = jnp.concatenate(
        [jnp.broadcast_to(b, (n, *jnp.shape(b))).astype(jb.dtype), jb], axis=rc[0] + 1
    )
    shift = lambda dims: tuple(d + 1 for d in dims)  # noqa: E731
    dims = ((shift(lc), shift(rc)), ((0, *shift(lb)), (0, *shift(rb))))
    return lax.dot_general(
        lhs,
        rhs,
        dims,
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )


def _times(b: Any, side: int, params: dict[str, Any]) -> Callable[[Any], Any]:
    """`r -> r . b` (`side` 0) or `r -> b . r` (`side` 1), mapped over rows of `r`."""
    if side == 0:
        return jax.vmap(lambda r: lax.dot_general_p.bind(r, b, **params))
    return jax.vmap(lambda r: lax.dot_general_p.bind(b, r, **params))


def _stacked_product(a: Any, ja: Any, la: Any, b: Any, side: int, params) -> Any:
    """`(a, J_a, L_a) . b` (or `b . (...)`) where only `a` carries tangents.

    The laplacian is multiplied by the constant operand (the weights) together with
    the value, as one product of two rows, and the jacobian on its own: no copy of the
    large jacobian is made. A linearised pass (`lap_partial`, the windows of the
    sparse mode) needs the value computed without the tangents, so there the
    laplacian goes with the jacobian instead, as one product over the rows
    `[L_a, J_a]`.
    """
    times = _times(b, side, params)
    if not is_zero(la) and not registry.is_linearizing():
        value_and_lap = times(jnp.stack([a, la.astype(a.dtype)]))
        return value_and_lap[0], times(ja), value_and_lap[1]
    out = lax.dot_general_p.bind(*((a, b) if side == 0 else (b, a)), **params)
    if is_zero(la):
        return out, times(ja), zero_laplacian(out)
    prod = times(jnp.concatenate([la[None].astype(ja.dtype), ja], axis=0))
    return out, prod[1:], prod[0]


def dot_general_rule(
    ctx: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
):
    (a, b), (ja, jb), (la, lb) = primals, jacobians, laplacians
    prim = lax.dot_general_p
    if is_zero(jb) and is_zero(lb) and not is_zero(ja):
        return _stacked_product(a, ja, la, b, 0, params)
    if is_zero(ja) and is_zero(la) and not is_zero(jb):
        return _stacked_product(b, jb, lb, a, 1, params)
    out = prim.bind(a, b, **params)
    zero = zero_laplacian(out)
    if _one_product_pays(a, b, out, ja, jb, params):
        jac_out = _first_order_as_one_product(ja, jb, a, b, params)
    else:
        jac_out = _apply_to_directions(prim, ja, jb, a, b, params)
    if jac_out is None:
        jac_out = zero_jacobian(out, num_directions(jacobians))
    lap_out = _first_order(prim, la, lb, a, b, params, zero)
    if not is_zero(ja) and not is_zero(jb):
        cross = prim.bind(
            ja,
            jb,
            **dict(
                params, dimension_numbers=_shifted_dims(params["dimension_numbers"])
            ),
        )
        lap_out = add(lap_out, 2 * cross)
    return out, jac_out, lap_out


def conv_rule(
    ctx: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
):
    (a, b), (ja, jb), (la, lb) = primals, jacobians, laplacians
    prim = lax.conv_general_dilated_p
    out = prim.bind(a, b, **params)
    zero = zero_laplacian(out)
    jac_out = _apply_to_directions(prim, ja, jb, a, b, params)
    if jac_out is None:
        jac_out = zero_jacobian(out, num_directions(jacobians))
    lap_out = _first_order(prim, la, lb, a, b, params, zero)
    if not is_zero(ja) and not is_zero(jb):
        cross = jax.vmap(lambda x, y: prim.bind(x, y, **params))(ja, jb).sum(0)
        lap_out = add(lap_out, 2 * cross)
    return out, jac_out, lap_out


def _split_dot(trace: Any, tracers, primals, jacobians, laplacians, params) -> Any:
    """A `dot_general` of an expanded operand, done on the smaller value."""
    out = dot_split.split_dot(trace, trace.origins, tracers, params)
    return DECLINED if out is None else out


def _register() -> None:
    mul_ops = taylor4_rules.MulOps(lax.mul_p)
    def_bilinear(lax.mul_p, mul_rule, sparse="elementwise", ops=mul_ops)
    sparse_dot = sparse_rules.bind(sparse_rules.dot_general_rule, lax.dot_general_p)
    def_bilinear(
        lax.dot_general_p,
        dot_general_rule,
        sparse=sparse_dot,
        rewrite=_split_dot,
        ops=taylor4_rules.DotOps(lax.dot_general_p),
    )
    def_bilinear(lax.conv_general_dilated_p, conv_rule, sparse=None)


_register()
