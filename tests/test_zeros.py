"""Symbolic zeros: inputs without tangents, outputs without dependence, and checks that
zeros stay symbolic inside the trace (no dense zero jacobians are ever built).

References: jax.hessian / jax.jacfwd with respect to the differentiated argument only.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from fwdlap._core import LapTracer
from helpers import (
    assert_matches_reference,
    identity_jacobian,
    jaxpr_shapes,
    reference_triple,
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])
Y = np.array([[0.5, -1.5, 2.0, 0.1], [0.2, 0.4, -0.3, 0.9], [1.1, -0.2, 0.6, 0.3],
              [0.7, 0.8, -0.9, 0.05], [0.25, -0.35, 0.45, -0.55]])  # fmt: skip
W = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8], [0.4, 0.4, 0.1]])


def _two_arg(x: jax.Array, y: jax.Array) -> jax.Array:
    """(3,), (5, 4) -> (5,): y enters through many primitives, several of them
    bilinear with x-dependent values and inside control flow."""
    h = jnp.tanh(y @ (W @ x))  # (5,)
    h = h * jnp.sum(jnp.sin(y), axis=1) + jnp.exp(-(y[:, 0] ** 2)) / (1 + x[0] ** 2)
    h = jax.jit(lambda a, b: a * jnp.cos(b[:, 1]))(h, y)
    h = lax.cond(x[1] < 0, lambda a, b: a + b[:, 2] * a, lambda a, b: a, h, y)
    h, _ = lax.scan(lambda c, row: (c * jnp.tanh(row[0]) + c**2 * 0.1, None), h, y.T)
    return h


@pytest.mark.parametrize("zero", ["none", "zero_tangent_from_primal"])
def test_argument_without_tangents(zero: str) -> None:
    x, y = jnp.asarray(X), jnp.asarray(Y)
    if zero == "none":
        jac_y, lap_y = None, None
    else:
        jac_y = fwdlap.zero_tangent_from_primal(y, 3)
        lap_y = fwdlap.zero_tangent_from_primal(y)
    run = jax.jit(
        lambda x, y, jy, ly: fwdlap.lap(
            _two_arg, (x, y), (identity_jacobian(x), jy), (jnp.zeros(3), ly)
        )
    )
    out, jac, lap = run(x, y, jac_y, lap_y)
    # The reference differentiates with respect to x only: jax.hessian of x -> f(x, y).
    fx = lambda x: _two_arg(x, y)
    hess = jax.jit(jax.hessian(fx))(x)
    assert tree_allclose(out, _two_arg(x, y))
    assert tree_allclose(jac, jax.jacfwd(fx)(x).T)
    assert tree_allclose(lap, jnp.trace(hess, axis1=-2, axis2=-1))


def test_symbolic_zeros_are_never_instantiated() -> None:
    # y has a symbolic-zero jacobian. Were it ever made dense inside the trace, some
    # value of shape (n, *y.shape) = (3, 5, 4) would appear in the jaxpr.
    x, y = jnp.asarray(X), jnp.asarray(Y)
    n = x.size

    def run(x: jax.Array, y: jax.Array) -> Any:
        return fwdlap.lap(_two_arg, (x, y), (identity_jacobian(x), None), (None, None))

    jaxpr = jax.make_jaxpr(run)(x, y)
    shapes = jaxpr_shapes(jaxpr)
    assert (n, *y.shape) not in shapes
    assert (n, *y.T.shape) not in shapes
    # ... while the same program with tangents for y does build them (the check bites).
    seeded = lambda x, y: fwdlap.lap(
        _two_arg, (x, y), (identity_jacobian(x), jnp.zeros((n, *y.shape))), (None, None)
    )
    assert (n, *y.shape) in jaxpr_shapes(jax.make_jaxpr(seeded)(x, y))


def test_no_tracer_for_values_without_tangents() -> None:
    # A value whose jacobian and laplacian are both symbolic zeros is not wrapped in a
    # tracer, and neither is anything computed from it alone.
    seen: dict[str, type] = {}

    def fun(x: jax.Array, y: jax.Array) -> jax.Array:
        z = jnp.sin(y) @ jnp.ones(4)
        seen["x"], seen["y"], seen["z"] = type(x), type(y), type(z)
        return jnp.tanh(x) * z[:3]

    x, y = jnp.asarray(X), jnp.asarray(Y)
    out, jac, lap = fwdlap.lap(fun, (x, y), (identity_jacobian(x), None), (None, None))
    assert issubclass(seen["x"], LapTracer)
    assert not issubclass(seen["y"], LapTracer)
    assert not issubclass(seen["z"], LapTracer)
    fx = lambda x: fun(x, y)
    assert_matches_reference((out, jac, lap), fx, x)


_OUTPUT_CASES: list[tuple[str, Callable[[jax.Array, jax.Array], Any]]] = [
    ("constant", lambda x, y: jnp.ones((2, 3))),
    ("only_y", lambda x, y: jnp.sin(y)),
    ("stop_gradient", lambda x, y: lax.stop_gradient(x) ** 2),
    ("jit_constant", lambda x, y: jax.jit(lambda a: jnp.zeros(4) + a[0, 0])(y)),
    ("scan_constant", lambda x, y: lax.scan(lambda c, r: (c + r, r), y[0], y)[0]),
    ("integer_argmax", lambda x, y: (jnp.argmax(x) + 1.0) * jnp.ones(2)),
    ("python_float", lambda x, y: 2.5),
]


@pytest.mark.parametrize(
    "fun", [c[1] for c in _OUTPUT_CASES], ids=[c[0] for c in _OUTPUT_CASES]
)
def test_independent_outputs_are_dense_zeros(
    fun: Callable[[jax.Array, jax.Array], Any],
) -> None:
    x, y = jnp.asarray(X), jnp.asarray(Y)
    n = x.size
    out, jac, lap = fwdlap.lap(fun, (x, y), (identity_jacobian(x), None), (None, None))
    shape = jnp.shape(fun(x, y))
    assert isinstance(jac, jax.Array) and isinstance(lap, jax.Array)
    assert jac.shape == (n, *shape)
    assert lap.shape == shape
    assert not jnp.any(jac) and not jnp.any(lap)
    assert tree_allclose(out, fun(x, y))


def test_mixed_outputs_dense_zeros_in_pytree() -> None:
    # One output depends on x, the other does not: both come back dense.
    fun = lambda x: {"dep": jnp.sin(x) * x[0], "const": jnp.arange(4.0)}
    x = jnp.asarray(X)
    out, jac, lap = jax.jit(
        lambda x: fwdlap.lap(fun, (x,), (identity_jacobian(x),), (None,))
    )(x)
    assert_matches_reference((out, jac, lap), fun, x)
    assert jac["const"].shape == (3, 4)


def test_laplacian_only_argument() -> None:
    # y has a laplacian but no jacobian: it contributes only J_y . lap_y.
    x, y = jnp.asarray(X), jnp.asarray(Y)
    lap_y = jnp.asarray(np.linspace(-1.0, 1.0, y.size).reshape(y.shape))
    out, jac, lap = jax.jit(
        lambda x, y, ly: fwdlap.lap(
            _two_arg, (x, y), (identity_jacobian(x), None), (None, ly)
        )
    )(x, y, lap_y)
    fx = lambda x: _two_arg(x, y)
    ref_out, ref_jac, ref_lap = reference_triple(fx, x)
    jac_y = jax.jacfwd(lambda y: _two_arg(x, y))(y)  # (5, 5, 4)
    expected = ref_lap + jnp.einsum("oij,ij->o", jac_y, lap_y)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, expected)


def test_hessian_cross_terms_with_two_seeded_arguments() -> None:
    # Both arguments seeded: the directions are the concatenation of x's and y's
    # coordinates, so the result is the full Laplacian in (x, y).
    x, y = jnp.asarray(X), jnp.asarray(Y[:2])
    small = lambda x, y: jnp.tanh(y @ (W[:, :3] @ x)[:4]) * jnp.sum(x**2 * y[:, :3])
    n = x.size + y.size
    eye = jnp.eye(n)
    jx, jy = eye[:, : x.size], eye[:, x.size :].reshape(n, *y.shape)
    out, jac, lap = jax.jit(
        lambda x, y: fwdlap.lap(small, (x, y), (jx, jy), (None, None))
    )(x, y)
    flat = jnp.concatenate([x, y.ravel()])
    ff = lambda v: small(v[:3], v[3:].reshape(y.shape))
    assert_matches_reference((out, jac, lap), ff, flat)
