"""jax.jit around fwdlap.lap, around the function, and symbolic zeros through jit.

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f))).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap
from helpers import (
    assert_matches_reference,
    identity_jacobian,
    jaxpr_shapes,
    reference_triple,
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])
W = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8], [0.4, 0.4, 0.1]])


def _f(x: jax.Array) -> jax.Array:
    h = jnp.tanh(W @ x)
    return jnp.sum(jnp.sin(h) * h[0]) + jnp.prod(jnp.cos(x)) / (1 + x[1] ** 2)


def _g(x: jax.Array) -> dict[str, jax.Array]:
    return {"v": jnp.exp(-(x**2)) * x[2], "m": jnp.outer(x, jnp.tanh(x))}


def _lap(fun: Any, x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


@pytest.mark.parametrize("fun", [_f, _g], ids=["scalar", "pytree"])
def test_jit_around_lap(fun: Any) -> None:
    x = jnp.asarray(X)
    out, jac, lap = jax.jit(lambda x: _lap(fun, x))(x)
    assert_matches_reference((out, jac, lap), fun, x)


@pytest.mark.parametrize("fun", [_f, _g], ids=["scalar", "pytree"])
def test_eager_lap(fun: Any) -> None:
    x = jnp.asarray(X)
    out, jac, lap = _lap(fun, x)
    assert_matches_reference((out, jac, lap), fun, x)


@pytest.mark.parametrize("fun", [_f, _g], ids=["scalar", "pytree"])
def test_jit_around_fun(fun: Any) -> None:
    # The whole function is one jit primitive inside lap's trace.
    x = jnp.asarray(X)
    out, jac, lap = _lap(jax.jit(fun), x)
    assert_matches_reference((out, jac, lap), fun, x)


def test_jit_around_both() -> None:
    x = jnp.asarray(X)
    out, jac, lap = jax.jit(lambda x: _lap(jax.jit(_f), x))(x)
    assert_matches_reference((out, jac, lap), _f, x)


def test_jit_lap_as_static_function() -> None:
    # jax.jit(fwdlap.lap, static_argnums=0): the tangents are ordinary jit arguments.
    x = jnp.asarray(X)
    run = jax.jit(fwdlap.lap, static_argnums=0)
    lap_in = jnp.array([0.2, -0.4, 0.9])
    out, jac, lap = run(_f, (x,), (identity_jacobian(x),), (lap_in,))
    ref_out, ref_jac, ref_lap = reference_triple(_f, x)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap + ref_jac @ lap_in)


def test_jit_traces_once() -> None:
    traces = []

    @jax.jit
    def run(x: jax.Array) -> Any:
        traces.append(None)
        return _lap(_f, x)

    x = jnp.asarray(X)
    for scale in (1.0, 0.5, -2.0):
        _, jac, lap = run(scale * x)
        _, ref_jac, ref_lap = reference_triple(_f, scale * x)
        assert tree_allclose(jac, ref_jac)
        assert tree_allclose(lap, ref_lap)
    assert len(traces) == 1


def _two(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.tanh(W @ x) * jnp.sum(y**2) + jnp.sin(y[:4] * x[0])


@pytest.mark.parametrize("kind", ["zero_tangent_from_primal", "None"])
def test_symbolic_zeros_as_jit_arguments(kind: str) -> None:
    # Symbolic zeros (and None) are pytrees without leaves: they pass through jax.jit as
    # arguments and stay symbolic on the other side.
    x, y = jnp.asarray(X), jnp.linspace(-1.0, 1.0, 5)
    if kind == "None":
        jac_y, lap_y = None, None
    else:
        jac_y = fwdlap.zero_tangent_from_primal(y, x.size)
        lap_y = fwdlap.zero_tangent_from_primal(y)

    @jax.jit
    def run(x: jax.Array, y: jax.Array, jac_y: Any, lap_y: Any) -> Any:
        return fwdlap.lap(_two, (x, y), (identity_jacobian(x), jac_y), (None, lap_y))

    out, jac, lap = run(x, y, jac_y, lap_y)
    fx = lambda x: _two(x, y)
    assert_matches_reference((out, jac, lap), fx, x)
    # Only x's jacobian is an input of the compiled program: no (3, 5) zeros for y.
    jaxpr = jax.make_jaxpr(run)(x, y, jac_y, lap_y)
    assert [tuple(v.aval.shape) for v in jaxpr.jaxpr.invars] == [(3,), (5,)]
    assert (x.size, *y.shape) not in jaxpr_shapes(jaxpr)
