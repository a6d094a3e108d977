"""Elementwise rules: f'(x) J for the jacobian, f''(x) sum_k J_k^2 for the Laplacian.

Each unary primitive supplies its first and second derivative as functions of the input
`x` and the output `y` (reusing `y` saves recomputing, e.g., `exp` or `tanh`).
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..zeros import (
    add,
    broadcast_operands,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)
from .families import def_elementwise, sum_squares


def _integer_pow(x: Any, y: Any, params: dict[str, Any]) -> tuple[Any, Any]:
    k = params["y"]
    if k == 0:
        zero = jnp.zeros_like(x)
        return zero, zero
    d1 = k * (jnp.ones_like(x) if k == 1 else lax.integer_pow(x, k - 1))
    if k == 1:
        d2 = jnp.zeros_like(x)
    elif k == 2:
        d2 = jnp.full_like(x, 2)
    else:
        d2 = k * (k - 1) * lax.integer_pow(x, k - 2)
    return d1, d2


_LN2 = math.log(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_SQRT_PI_OVER_TWO = math.sqrt(math.pi) / 2.0


def _tanh(x, y, p):
    d1 = 1 - y * y
    return d1, -2 * y * d1


def _logistic(x, y, p):
    d1 = y * (1 - y)
    return d1, d1 * (1 - 2 * y)


def _sqrt(x, y, p):
    d1 = 0.5 / y
    return d1, -0.5 * d1 / x


def _rsqrt(x, y, p):
    y3 = y * y * y
    return -0.5 * y3, 0.75 * y3 * y * y


def _cbrt(x, y, p):
    inv_y2 = 1 / (y * y)
    return inv_y2 / 3, -2 * inv_y2 * inv_y2 / (9 * y)


def _tan(x, y, p):
    d1 = 1 + y * y
    return d1, 2 * y * d1


def _atan(x, y, p):
    d1 = 1 / (1 + x * x)
    return d1, -2 * x * d1 * d1


def _asinh(x, y, p):
    d1 = lax.rsqrt(1 + x * x)
    return d1, -x * d1 * d1 * d1


def _asin(x, y, p):
    d1 = lax.rsqrt(1 - x * x)
    return d1, x * d1 * d1 * d1


def _acos(x, y, p):
    d1, d2 = _asin(x, y, p)
    return -d1, -d2


def _atanh(x, y, p):
    d1 = 1 / (1 - x * x)
    return d1, 2 * x * d1 * d1


def _acosh(x, y, p):
    d1 = lax.rsqrt(x * x - 1)
    return d1, -x * d1 * d1 * d1


def _erf(x, y, p):
    d1 = _TWO_OVER_SQRT_PI * jnp.exp(-x * x)
    return d1, -2 * x * d1


def _erfc(x, y, p):
    d1, d2 = _erf(x, y, p)
    return -d1, -d2


def _erf_inv(x, y, p):
    d1 = _SQRT_PI_OVER_TWO * jnp.exp(y * y)
    return d1, 2 * y * d1 * d1


def _lgamma(x, y, p):
    return jax.scipy.special.digamma(x), jax.scipy.special.polygamma(1, x)


def _digamma(x, y, p):
    return jax.scipy.special.polygamma(1, x), jax.scipy.special.polygamma(2, x)


def div_rule(
    ctx: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
):
    """x / y, using d2/dxdy = -1/y^2 and d2/dy2 = 2x/y^3."""
    del ctx
    # A rank-0 operand broadcasts in the primitive but not in the jacobian algebra.
    primals, jacobians, laplacians = broadcast_operands(primals, jacobians, laplacians)
    (x, y), (jx, jy), (lx, ly) = primals, jacobians, laplacians
    out = lax.div(x, y)
    if jnp.issubdtype(out.dtype, jnp.integer):
        n = num_directions(jacobians)
        return out, zero_jacobian(out, n), zero_laplacian(out)
    inv_y = 1 / y
    zero = zero_laplacian(out)
    # First order: (J_x - out * J_y) / y, with broadcasting over the direction axis.
    num_jac = add(jx, zero if is_zero(jy) else -out * jy)
    jac_out = (
        zero_jacobian(out, num_directions(jacobians))
        if is_zero(num_jac)
        else num_jac * inv_y
    )
    num_lap = add(lx, zero if is_zero(ly) else -out * ly)
    first = zero if is_zero(num_lap) else num_lap * inv_y
    second = zero
    if not is_zero(jy):
        # sum_k (2 out J_y^2 - 2 J_x J_y) / y^2
        cross = out * sum_squares(jy)
        if not is_zero(jx):
            cross = cross - jnp.sum(jx * jy, axis=0)
        second = 2 * cross * inv_y * inv_y
    return out, jac_out, add(first, second)


def _register() -> None:
    """Unary primitives with their derivatives; complex inputs of `real_only` ones
    take the generic rule."""
    def_elementwise(lax.exp_p, lambda x, y, p: (y, y))
    def_elementwise(lax.exp2_p, lambda x, y, p: (_LN2 * y, _LN2 * _LN2 * y))
    def_elementwise(lax.log_p, lambda x, y, p: (1 / x, -1 / (x * x)))
    def_elementwise(
        lax.log1p_p, lambda x, y, p: (1 / (1 + x), -1 / ((1 + x) * (1 + x)))
    )
    def_elementwise(lax.expm1_p, lambda x, y, p: (y + 1, y + 1))
    def_elementwise(lax.sin_p, lambda x, y, p: (jnp.cos(x), -y))
    def_elementwise(lax.cos_p, lambda x, y, p: (-jnp.sin(x), -y))
    def_elementwise(lax.tan_p, _tan)
    def_elementwise(lax.sinh_p, lambda x, y, p: (jnp.cosh(x), y))
    def_elementwise(lax.cosh_p, lambda x, y, p: (jnp.sinh(x), y))
    def_elementwise(lax.tanh_p, _tanh)
    def_elementwise(lax.logistic_p, _logistic)
    def_elementwise(lax.sqrt_p, _sqrt)
    def_elementwise(lax.rsqrt_p, _rsqrt)
    def_elementwise(lax.cbrt_p, _cbrt, real_only=True)
    def_elementwise(lax.square_p, lambda x, y, p: (2 * x, jnp.full_like(x, 2)))
    def_elementwise(lax.integer_pow_p, _integer_pow)
    def_elementwise(
        lax.abs_p, lambda x, y, p: (jnp.sign(x), jnp.zeros_like(x)), real_only=True
    )
    def_elementwise(lax.atan_p, _atan)
    def_elementwise(lax.asin_p, _asin)
    def_elementwise(lax.acos_p, _acos)
    def_elementwise(lax.asinh_p, _asinh)
    def_elementwise(lax.acosh_p, _acosh)
    def_elementwise(lax.atanh_p, _atanh)
    def_elementwise(lax.erf_p, _erf, real_only=True)
    def_elementwise(lax.erfc_p, _erfc, real_only=True)
    def_elementwise(lax.erf_inv_p, _erf_inv, real_only=True)
    def_elementwise(lax.lgamma_p, _lgamma, real_only=True)
    def_elementwise(lax.digamma_p, _digamma, real_only=True)
    # Several operands: the generic rule, except for div.
    def_elementwise(lax.div_p, dense=div_rule)
    for prim in (lax.max_p, lax.min_p, lax.pow_p, lax.atan2_p, lax.rem_p, lax.clamp_p):
        def_elementwise(prim)


_register()
