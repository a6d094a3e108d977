"""custom_jvp functions (fwdlap differentiates their rule once more) and custom_vjp.

References: `reference_triple` (jax.jacfwd, which also goes through the custom rule).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import (
    assert_matches_reference,
    identity_jacobian,
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])


@jax.custom_jvp
def _smooth_abs(x: jax.Array) -> jax.Array:
    return jnp.sqrt(x**2 + 0.5)


@_smooth_abs.defjvp
def _smooth_abs_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = _smooth_abs(x)
    return y, x / y * t


@jax.custom_jvp
def _two_args(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sin(x) * jnp.exp(y)


@_two_args.defjvp
def _two_args_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, jax.Array]:
    (x, y), (tx, ty) = primals, tangents
    out = _two_args(x, y)
    return out, jnp.cos(x) * jnp.exp(y) * tx + out * ty


# With symbolic_zeros=True the rule sees `SymbolicZero` objects for inputs without
# tangents; it records which ones it saw so the tests can check they were symbolic.
_SEEN_SYMBOLIC: list[tuple[bool, bool]] = []


@jax.custom_jvp
def _sym(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.tanh(x) * y**2


def _sym_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, Any]:
    (x, y), (tx, ty) = primals, tangents
    zero_x = type(tx) is jax.custom_derivatives.SymbolicZero
    zero_y = type(ty) is jax.custom_derivatives.SymbolicZero
    _SEEN_SYMBOLIC.append((zero_x, zero_y))
    out = _sym(x, y)
    t = jnp.zeros_like(out)
    if not zero_x:
        t = t + (1 - jnp.tanh(x) ** 2) * y**2 * tx
    if not zero_y:
        t = t + jnp.tanh(x) * 2 * y * ty
    return out, t


_sym.defjvp(_sym_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _clipped_log(x: jax.Array) -> jax.Array:
    # The rule returns a plain float tangent for an integer-free but nested rule.
    return jnp.log1p(jnp.exp(x))


@_clipped_log.defjvp
def _clipped_log_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    return _clipped_log(x), jax.nn.sigmoid(x) * t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _power_of_sin(x: jax.Array, k: int) -> jax.Array:
    return jnp.sin(x) ** k


@_power_of_sin.defjvp
def _power_of_sin_jvp(k: int, primals: Any, tangents: Any) -> tuple[jax.Array, Any]:
    (x,), (t,) = primals, tangents
    return _power_of_sin(x, k), k * jnp.sin(x) ** (k - 1) * jnp.cos(x) * t


CASES: list[tuple[str, Callable[[jax.Array], Any]]] = [
    ("relu", lambda x: jax.nn.relu(x) * x),
    ("relu6", lambda x: jax.nn.relu6(3 * x) ** 2),
    ("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True)),
    ("gelu_erf", lambda x: jax.nn.gelu(x, approximate=False)),
    ("softplus", jax.nn.softplus),
    ("silu", jax.nn.silu),
    ("logsumexp_custom", lambda x: jax.nn.logsumexp(x * x[0])),
    ("user_unary", lambda x: _smooth_abs(x) * x),
    ("user_two_args", lambda x: _two_args(x, x[::-1] ** 2)),
    ("user_one_arg_constant", lambda x: _two_args(x, jnp.ones(3))),
    ("user_nested_in_rule", lambda x: _clipped_log(_smooth_abs(x))),
    ("user_nondiff_argnums", lambda x: _power_of_sin(x * x[0], 3)),
    ("under_jit", lambda x: jax.jit(lambda v: _smooth_abs(v) * jax.nn.silu(v))(x)),
    (
        "inside_scan",
        lambda x: lax.scan(lambda c, xi: (jax.nn.softplus(c * xi), c), x, x)[0],
    ),
    ("inside_cond", lambda x: lax.cond(x[0] > 0, jax.nn.gelu, _smooth_abs, x)),
]


def _lap_eager(fun: Callable[[jax.Array], Any], x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


_lap_full = jax.jit(_lap_eager, static_argnums=0)


@pytest.mark.parametrize("fun", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_custom_jvp(fun: Callable[[jax.Array], Any]) -> None:
    x = jnp.asarray(X)
    out, jac, lap = _lap_full(fun, x)
    assert_matches_reference((out, jac, lap), fun, x)


def test_custom_jvp_eager() -> None:
    fun = lambda x: _smooth_abs(x) * jax.nn.gelu(x)
    x = jnp.asarray(X)
    out, jac, lap = _lap_eager(fun, x)
    assert_matches_reference((out, jac, lap), fun, x)


def test_custom_jvp_symbolic_zeros() -> None:
    # Only x carries tangents: the rule must see y's tangent as a SymbolicZero, and the
    # result must match the Hessian with respect to x alone.
    x, y = jnp.asarray(X), jnp.array([0.5, -1.5, 2.0])
    fun = lambda x, y: _sym(x, y) * x
    _SEEN_SYMBOLIC.clear()
    out, jac, lap = fwdlap.lap(fun, (x, y), (identity_jacobian(x), None), (None, None))
    assert _SEEN_SYMBOLIC and all(zy and not zx for zx, zy in _SEEN_SYMBOLIC)
    fx = lambda x: fun(x, y)
    assert_matches_reference((out, jac, lap), fx, x)


def test_custom_jvp_symbolic_zeros_both_sides() -> None:
    # Both inputs carry tangents through the same symbolic-zeros rule.
    fun = lambda x: _sym(x, jnp.cos(x))
    x = jnp.asarray(X)
    _SEEN_SYMBOLIC.clear()
    out, jac, lap = _lap_eager(fun, x)
    assert _SEEN_SYMBOLIC and not any(zx or zy for zx, zy in _SEEN_SYMBOLIC)
    assert_matches_reference((out, jac, lap), fun, x)


def test_custom_jvp_rule_is_used() -> None:
    # A rule that deliberately disagrees with the primal function: fwdlap must follow
    # the rule (as jax.jacfwd does), not differentiate the primal implementation.
    @jax.custom_jvp
    def f(x: jax.Array) -> jax.Array:
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, jax.Array]:
        (x,), (t,) = primals, tangents
        return f(x), 2.0 * x * t  # "derivative" of x**2

    x = jnp.asarray(X)
    _, jac, lap = _lap_full(f, x)
    assert tree_allclose(jac, jnp.diag(2.0 * x))
    assert tree_allclose(lap, jnp.full(3, 2.0))


# --- custom_vjp ----------------------------------------------------------------------


@jax.custom_vjp
def _vjp_fun(x: jax.Array) -> jax.Array:
    return jnp.sin(x)


def _vjp_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sin(x), jnp.cos(x)


def _vjp_bwd(res: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (res * g,)


_vjp_fun.defvjp(_vjp_fwd, _vjp_bwd)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_custom_vjp_raises(jit: bool) -> None:
    x = jnp.asarray(X)
    fun = lambda x: _vjp_fun(x) * x
    run = _lap_full if jit else _lap_eager
    with pytest.raises(NotImplementedError) as info:
        run(fun, x)
    message = str(info.value)
    assert "custom_vjp" in message
    assert "custom_jvp" in message


def test_custom_vjp_without_tangents_runs() -> None:
    # A custom_vjp function applied to values without tangents is just evaluated.
    x, y = jnp.asarray(X), jnp.array([0.5, -1.5, 2.0])
    fun = lambda x, y: x**2 * _vjp_fun(y)
    out, jac, lap = fwdlap.lap(fun, (x, y), (identity_jacobian(x), None), (None, None))
    assert tree_allclose(out, fun(x, y))
    assert tree_allclose(jac, jnp.diag(2 * x * jnp.sin(y)))
    assert tree_allclose(lap, 2 * jnp.sin(y))
