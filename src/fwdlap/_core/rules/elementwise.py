"""Elementwise rules: f'(x) J for the jacobian, f''(x) sum_k J_k^2 for the Laplacian.

Each unary primitive supplies one derivative table, its first four derivatives as
functions of the input `x` and the output `y` (reusing `y` saves recomputing, e.g.,
`exp` or `tanh`): the forward Laplacian uses the first two, the fourth-order pass
(`taylor4`) all four.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..taylor4 import rules as taylor4_rules
from ..zeros import (
    add,
    broadcast_operands,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)
from .families import def_elementwise, sum_squares

_LN2 = math.log(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_SQRT_PI_OVER_TWO = math.sqrt(math.pi) / 2.0


# Each table yields f', f'', f''', f'''' in turn, as functions of the input `x`, the
# output `y` and the parameters `p`: the forward Laplacian stops after two, so what a
# later order costs comes after the second `yield`.


def _exp(x, y, p):
    return y, y, y, y


def _exp2(x, y, p):
    yield _LN2 * y
    yield _LN2 * _LN2 * y
    yield _LN2**3 * y
    yield _LN2**4 * y


def _log(x, y, p):
    yield 1 / x
    d2 = -1 / (x * x)
    yield d2
    d3 = -2 * d2 / x
    yield d3
    yield -3 * d3 / x


def _log1p(x, y, p):
    yield 1 / (1 + x)
    d2 = -1 / ((1 + x) * (1 + x))
    yield d2
    d3 = -2 * d2 / (1 + x)
    yield d3
    yield -3 * d3 / (1 + x)


def _expm1(x, y, p):
    e = y + 1
    return e, e, e, e


def _sin(x, y, p):
    c = jnp.cos(x)
    yield c
    yield -y
    yield -c
    yield y


def _cos(x, y, p):
    s = jnp.sin(x)
    yield -s
    yield -y
    yield s
    yield y


def _sinh(x, y, p):
    c = jnp.cosh(x)
    return c, y, c, y


def _cosh(x, y, p):
    s = jnp.sinh(x)
    return s, y, s, y


def _tan(x, y, p):
    d1 = 1 + y * y
    yield d1
    yield 2 * y * d1
    yield 2 * d1 * (1 + 3 * y * y)
    yield 8 * y * d1 * (2 + 3 * y * y)


def _tanh(x, y, p):
    d1 = 1 - y * y
    yield d1
    yield -2 * y * d1
    yield d1 * (6 * y * y - 2)
    yield 8 * y * d1 * (2 - 3 * y * y)


def _logistic(x, y, p):
    d1 = y * (1 - y)
    yield d1
    d2 = d1 * (1 - 2 * y)
    yield d2
    v = y * y - y
    yield d1 * (1 + 6 * v)
    yield d2 * (1 + 12 * v)


def _sqrt(x, y, p):
    d1 = 0.5 / y
    yield d1
    d2 = -0.5 * d1 / x
    yield d2
    d3 = -1.5 * d2 / x
    yield d3
    yield -2.5 * d3 / x


def _rsqrt(x, y, p):
    y3 = y * y * y
    yield -0.5 * y3
    d2 = 0.75 * y3 * y * y
    yield d2
    y2 = y * y  # 1 / x
    d3 = -2.5 * d2 * y2
    yield d3
    yield -3.5 * d3 * y2


def _cbrt(x, y, p):
    inv_y2 = 1 / (y * y)
    yield inv_y2 / 3
    d2 = -2 * inv_y2 * inv_y2 / (9 * y)
    yield d2
    d3 = -5 * d2 / (3 * x)
    yield d3
    yield -8 * d3 / (3 * x)


def _square(x, y, p):
    yield 2 * x
    yield jnp.full_like(x, 2)
    zero = jnp.zeros_like(x)
    yield zero
    yield zero


def _abs(x, y, p):
    yield jnp.sign(x)
    zero = jnp.zeros_like(x)
    yield zero
    yield zero
    yield zero


def _integer_pow(x, y, p):
    k = p["y"]
    if k == 0:
        zero = jnp.zeros_like(x)
        yield from (zero, zero, zero, zero)
        return
    yield k * (jnp.ones_like(x) if k == 1 else lax.integer_pow(x, k - 1))
    if k == 1:
        yield jnp.zeros_like(x)
    elif k == 2:
        yield jnp.full_like(x, 2)
    else:
        yield k * (k - 1) * lax.integer_pow(x, k - 2)
    for m in (3, 4):
        c = math.prod(k - i for i in range(m))  # the falling factorial k (k-1) ...
        if c == 0:
            yield jnp.zeros_like(x)
        elif k == m:
            yield jnp.full_like(x, c)
        else:
            yield c * lax.integer_pow(x, k - m)


def _atan(x, y, p):
    d1 = 1 / (1 + x * x)
    yield d1
    yield -2 * x * d1 * d1
    u2 = d1 * d1
    yield (6 * x * x - 2) * d1 * u2
    yield 24 * x * (1 - x * x) * u2 * u2


def _asin(x, y, p):
    d1 = lax.rsqrt(1 - x * x)
    yield d1
    yield x * d1 * d1 * d1
    r2 = d1 * d1
    r5 = d1 * r2 * r2
    yield (1 + 2 * x * x) * r5
    yield 3 * x * (3 + 2 * x * x) * r5 * r2


def _acos(x, y, p):
    for d in _asin(x, y, p):
        yield -d


def _asinh(x, y, p):
    d1 = lax.rsqrt(1 + x * x)
    yield d1
    yield -x * d1 * d1 * d1
    r2 = d1 * d1
    r5 = d1 * r2 * r2
    yield (2 * x * x - 1) * r5
    yield 3 * x * (3 - 2 * x * x) * r5 * r2


def _acosh(x, y, p):
    d1 = lax.rsqrt(x * x - 1)
    yield d1
    yield -x * d1 * d1 * d1
    r2 = d1 * d1
    r5 = d1 * r2 * r2
    yield (2 * x * x + 1) * r5
    yield -3 * x * (2 * x * x + 3) * r5 * r2


def _atanh(x, y, p):
    d1 = 1 / (1 - x * x)
    yield d1
    yield 2 * x * d1 * d1
    u2 = d1 * d1
    yield (2 + 6 * x * x) * d1 * u2
    yield 24 * x * (1 + x * x) * u2 * u2


def _erf(x, y, p):
    d1 = _TWO_OVER_SQRT_PI * jnp.exp(-x * x)
    yield d1
    yield -2 * x * d1
    yield (4 * x * x - 2) * d1
    yield x * (12 - 8 * x * x) * d1


def _erfc(x, y, p):
    for d in _erf(x, y, p):
        yield -d


def _erf_inv(x, y, p):
    d1 = _SQRT_PI_OVER_TWO * jnp.exp(y * y)
    yield d1
    yield 2 * y * d1 * d1
    d1_2 = d1 * d1
    yield (2 + 8 * y * y) * d1 * d1_2
    yield 4 * y * (7 + 12 * y * y) * d1_2 * d1_2


def _lgamma(x, y, p):
    yield jax.scipy.special.digamma(x)
    for m in (1, 2, 3):
        yield jax.scipy.special.polygamma(m, x)


def _digamma(x, y, p):
    for m in (1, 2, 3, 4):
        yield jax.scipy.special.polygamma(m, x)


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
    """Unary primitives with their derivative tables; complex inputs of `real_only`
    ones take the generic rules."""
    for prim, derivatives in [
        (lax.exp_p, _exp),
        (lax.exp2_p, _exp2),
        (lax.log_p, _log),
        (lax.log1p_p, _log1p),
        (lax.expm1_p, _expm1),
        (lax.sin_p, _sin),
        (lax.cos_p, _cos),
        (lax.tan_p, _tan),
        (lax.sinh_p, _sinh),
        (lax.cosh_p, _cosh),
        (lax.tanh_p, _tanh),
        (lax.logistic_p, _logistic),
        (lax.sqrt_p, _sqrt),
        (lax.rsqrt_p, _rsqrt),
        (lax.square_p, _square),
        (lax.integer_pow_p, _integer_pow),
        (lax.atan_p, _atan),
        (lax.asin_p, _asin),
        (lax.acos_p, _acos),
        (lax.asinh_p, _asinh),
        (lax.acosh_p, _acosh),
        (lax.atanh_p, _atanh),
    ]:
        def_elementwise(prim, derivatives)
    for prim, derivatives in [
        (lax.cbrt_p, _cbrt),
        (lax.abs_p, _abs),
        (lax.erf_p, _erf),
        (lax.erfc_p, _erfc),
        (lax.erf_inv_p, _erf_inv),
        (lax.lgamma_p, _lgamma),
        (lax.digamma_p, _digamma),
    ]:
        def_elementwise(prim, derivatives, real_only=True)
    # Several operands: the generic rules, except for div.
    def_elementwise(lax.div_p, dense=div_rule, taylor4=taylor4_rules.div_rule)
    for prim in (lax.max_p, lax.min_p, lax.pow_p, lax.atan2_p, lax.rem_p, lax.clamp_p):
        def_elementwise(prim)


_register()
