"""Dtypes: float64 and float32, complex outputs and inputs, integer arguments.

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f))),
the holomorphic variant for complex inputs, and jax.jvp for the tangent dtypes.
"""

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
    reference_triple,
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])
W = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8], [0.4, 0.4, 0.1]])


def _lap(fun: Any, x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


_jit_lap = jax.jit(_lap, static_argnums=0)


def _real_fun(x: jax.Array) -> jax.Array:
    h = jnp.tanh(jnp.asarray(W, x.dtype) @ x)
    return jnp.sum(jnp.sin(h) * jnp.exp(-(x**2)).sum()) + jnp.log1p(x[0] ** 2)


def test_x64_is_enabled() -> None:
    # The tight float64 tolerances of this suite rely on conftest.py.
    assert jax.config.read("jax_enable_x64")
    assert jnp.asarray(X).dtype == jnp.float64


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"),
    [(jnp.float64, 1e-10, 1e-12), (jnp.float32, 2e-5, 1e-5)],
    ids=["float64", "float32"],
)
def test_float_dtypes(dtype: Any, rtol: float, atol: float) -> None:
    x = jnp.asarray(X, dtype)
    out, jac, lap = _jit_lap(_real_fun, x)
    assert out.dtype == jac.dtype == lap.dtype == dtype
    # The reference runs in float64 for float32 inputs too.
    assert_matches_reference(
        (out, jac, lap), _real_fun, jnp.asarray(X), rtol=rtol, atol=atol
    )


def test_float32_eager() -> None:
    x = jnp.asarray(X, jnp.float32)
    out, jac, lap = _lap(_real_fun, x)
    assert out.dtype == jac.dtype == lap.dtype == jnp.float32
    _, ref_jac, ref_lap = reference_triple(_real_fun, jnp.asarray(X))
    assert tree_allclose(jac, ref_jac, rtol=2e-5, atol=1e-5)
    assert tree_allclose(lap, ref_lap, rtol=2e-5, atol=1e-5)


COMPLEX_OUT: list[tuple[str, Callable[[jax.Array], Any]]] = [
    ("exp_i", lambda x: jnp.exp(1j * x) * x[0]),
    ("plane_waves", lambda x: jnp.exp(1j * (jnp.asarray(W) @ x)) / (1.0 + x[1] ** 2)),
    ("complex_scalar", lambda x: jnp.sum(jnp.exp(1j * x)) * jnp.sin(x[2] + 1j * x[0])),
    ("abs_of_complex", lambda x: jnp.abs(jnp.sum(jnp.exp(1j * x * x[1]))) ** 2),
    (
        "real_imag",
        lambda x: jnp.real(jnp.exp((1 + 2j) * x)) * jnp.imag(jnp.cos(1j + x)),
    ),
    ("complex_tanh_log", lambda x: jnp.log(jnp.tanh(x + 1j) + 2.0)),
    ("complex_matmul", lambda x: ((jnp.asarray(W) + 1j) @ jnp.exp(1j * x)) * x[0]),
]


@pytest.mark.parametrize(
    "fun", [c[1] for c in COMPLEX_OUT], ids=[c[0] for c in COMPLEX_OUT]
)
def test_complex_outputs(fun: Callable[[jax.Array], Any]) -> None:
    # Real input, complex intermediates and outputs: jacfwd handles this directly.
    x = jnp.asarray(X)
    out, jac, lap = _jit_lap(fun, x)
    ref_out, ref_jac, ref_lap = reference_triple(fun, x)
    assert jnp.result_type(lap) == jnp.result_type(ref_lap)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap)


def _holomorphic_reference(fun: Callable[[jax.Array], jax.Array], z: jax.Array) -> Any:
    # Directions are the real unit vectors e_k (complex dtype): jvp along e_k of a
    # holomorphic f is its complex derivative, and the "Laplacian" is sum_k d^2f/dz_k^2.
    jac = jax.jacfwd(fun, holomorphic=True)(z)
    hess = jax.jacfwd(jax.jacfwd(fun, holomorphic=True), holomorphic=True)(z)
    return jnp.moveaxis(jac, -1, 0), jnp.trace(hess, axis1=-2, axis2=-1)


HOLOMORPHIC: list[tuple[str, Callable[[jax.Array], jax.Array]]] = [
    ("exp_sin", lambda z: jnp.exp(z) * jnp.sin(z[::-1])),
    ("tanh_matmul", lambda z: jnp.tanh(jnp.asarray(W, z.dtype) @ z)),
    ("scalar_chain", lambda z: jnp.sin(z[0]) * jnp.exp(z[1]) ** 2 / (z[2] + 3.0)),
    ("sum_of_squares", lambda z: jnp.sum(jnp.cos(z) ** 2) * z[0]),
    ("log_sqrt", lambda z: jnp.log(jnp.sqrt(z + 2.0)) * z),
]


@pytest.mark.parametrize(
    "fun", [c[1] for c in HOLOMORPHIC], ids=[c[0] for c in HOLOMORPHIC]
)
def test_complex_inputs_holomorphic(fun: Callable[[jax.Array], jax.Array]) -> None:
    z = jnp.asarray(X + 1j * np.array([0.2, 0.5, -0.4]))
    out, jac, lap = _jit_lap(fun, z)
    ref_jac, ref_lap = jax.jit(_holomorphic_reference, static_argnums=0)(fun, z)
    assert tree_allclose(out, fun(z))
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap)


def _with_int(x: jax.Array, k: jax.Array) -> jax.Array:
    # k is an integer array used as an exponent, an index and a loop bound.
    y = x ** k[0] + jnp.sin(x) * k[1]
    y = y * x[k[2]]
    return lax.fori_loop(0, k[0], lambda i, c: jnp.tanh(c) + y, y)


@pytest.mark.parametrize("tangent", ["None", "float0"])
def test_integer_argument(tangent: str) -> None:
    x, k = jnp.asarray(X), jnp.array([2, 3, 1])
    n = x.size
    if tangent == "None":
        jac_k, lap_k = None, None
    else:
        jac_k = np.zeros((n, *k.shape), jax.dtypes.float0)
        lap_k = np.zeros(k.shape, jax.dtypes.float0)
    out, jac, lap = jax.jit(
        lambda x, k, jk, lk: fwdlap.lap(
            _with_int, (x, k), (identity_jacobian(x), jk), (None, lk)
        )
    )(x, k, jac_k, lap_k)
    assert_matches_reference((out, jac, lap), lambda x: _with_int(x, k), x)


def test_integer_output_has_float0_tangents() -> None:
    # As with jax.jvp, an integer output's tangents are float0.
    fun = lambda x: (jnp.argmax(x), jnp.sin(x))
    x = jnp.asarray(X)
    out, jac, lap = _lap(fun, x)
    _, jvp_tangent = jax.jvp(fun, (x,), (jnp.ones_like(x),))
    assert jvp_tangent[0].dtype == jax.dtypes.float0
    assert out[0] == 2
    assert jac[0].dtype == lap[0].dtype == jax.dtypes.float0
    assert jac[0].shape == (x.size,) and lap[0].shape == ()
    ref_out, ref_jac, ref_lap = reference_triple(jnp.sin, x)
    assert tree_allclose(jac[1], ref_jac)
    assert tree_allclose(lap[1], ref_lap)
