"""A zoo of functions: fwdlap's value, jacobian and Laplacian against jax.jacfwd.

Every case is compared with `reference_triple` (value, `jax.jacfwd`, and the trace of
`jax.jacfwd(jax.jacfwd(f))`), never with fwdlap's own output.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import (
    assert_matches_reference,
    hessian_trace_weighted,
    identity_jacobian,
    reference_triple,
    tree_allclose,
)

# Inputs on the domains the functions need; all float64 (conftest enables x64).
ANY = np.array([0.3, -0.7, 1.1])
POS = np.array([0.5, 1.2, 2.0])
UNIT = np.array([0.3, -0.6, 0.45])
ABOVE_ONE = np.array([1.3, 2.2, 1.7])
MAT = np.array([[0.9, 0.2, -0.3], [0.1, 1.4, 0.25], [-0.2, 0.35, 1.1]])
GRID = np.array([[0.3, -0.5, 0.8], [1.2, 0.1, -0.9]])
MAT4 = np.cos(np.arange(16.0)).reshape(4, 4) + 3 * np.eye(4)

A = np.array([[1.0, -0.5, 0.25], [0.3, 0.8, -1.2], [-0.7, 0.4, 0.6], [0.2, 0.1, 0.9]])
IDX = np.array([2, 0, 2, 1])


class Case(NamedTuple):
    name: str
    fun: Callable[[jax.Array], Any]
    x: np.ndarray


def _conv_const_kernel(x: jax.Array) -> jax.Array:
    lhs = jnp.sin(x).reshape(1, 1, -1)  # (batch, channel, width)
    rhs = jnp.array([[[0.5, -1.0, 0.25]], [[0.2, 0.3, -0.4]]])  # (out, in, width)
    out = lax.conv_general_dilated(lhs, rhs, (1,), [(1, 1)])
    return jnp.tanh(out)


def _conv_tangent_kernel(x: jax.Array) -> jax.Array:
    lhs = jnp.cos(x).reshape(1, 1, -1)
    rhs = (x[:2] ** 2).reshape(1, 1, 2)
    return lax.conv_general_dilated(lhs, rhs, (1,), [(0, 1)], rhs_dilation=(2,))


def _conv_2d(x: jax.Array) -> jax.Array:
    img = jnp.outer(x, jnp.sin(x)).reshape(1, 1, 3, 3)
    kernel = (jnp.array([[1.0, -0.5], [0.25, 0.75]]) * x[0]).reshape(1, 1, 2, 2)
    return lax.conv_general_dilated(img, kernel, (1, 1), "SAME")


def _batch_of_two(x: jax.Array) -> jax.Array:
    m = x.reshape(4, 4)
    return jnp.stack([m, m.T**2 + jnp.eye(4)])


def _sym4(x: jax.Array) -> jax.Array:
    m = x.reshape(4, 4)
    return m + m.T


def _spd(x: jax.Array) -> jax.Array:
    m = x.reshape(3, 3)
    return m @ m.T + jnp.eye(3)


def _attention_scores(x: jax.Array) -> jax.Array:
    q = x.reshape(3, 1, 1) * jnp.ones((3, 2, 1))
    k = jnp.cos(x).reshape(3, 1, 1) * jnp.arange(1.0, 3.0).reshape(1, 2, 1)
    return jnp.einsum("ihd,jhd->hij", q, k)


ZOO = [
    # --- elementwise math ---
    Case("exp", jnp.exp, ANY),
    Case("exp2", jnp.exp2, ANY),
    Case("expm1", jnp.expm1, ANY),
    Case("log", jnp.log, POS),
    Case("log1p", jnp.log1p, POS),
    Case("sin", jnp.sin, ANY),
    Case("cos", jnp.cos, ANY),
    Case("tan", jnp.tan, UNIT),
    Case("sinh_cosh", lambda x: jnp.sinh(x) * jnp.cosh(x[::-1]), ANY),
    Case("tanh", jnp.tanh, ANY),
    Case("logistic", jax.nn.sigmoid, ANY),
    Case("sqrt", jnp.sqrt, POS),
    Case("rsqrt", lax.rsqrt, POS),
    Case("cbrt", jnp.cbrt, np.array([0.5, -1.2, 2.0])),
    Case("pow_both_traced", lambda x: jnp.power(x, x[::-1]), POS),
    Case("pow_const_exponent", lambda x: x**2.5, POS),
    Case("integer_pow_3", lambda x: x**3, ANY),
    Case("integer_pow_neg2", lambda x: x**-2, ANY),
    Case("square", jnp.square, ANY),
    Case("abs", lambda x: jnp.abs(x) * x, ANY),
    Case("erf", jsp.special.erf, ANY),
    Case("erfc", jsp.special.erfc, ANY),
    Case("erfinv", jsp.special.erfinv, UNIT),
    Case("lgamma", jsp.special.gammaln, POS),
    Case("digamma", jsp.special.digamma, POS),
    Case("atan2", lambda x: jnp.arctan2(x, x[::-1] + 2.0), ANY),
    Case("atan", jnp.arctan, ANY),
    Case("asin_acos", lambda x: jnp.arcsin(x) * jnp.arccos(x[::-1]), UNIT),
    Case("asinh", jnp.arcsinh, ANY),
    Case("acosh", jnp.arccosh, ABOVE_ONE),
    Case("atanh", jnp.arctanh, UNIT),
    Case("logaddexp", lambda x: jnp.logaddexp(x, 2 * x[::-1]), ANY),
    Case(
        "maximum_minimum", lambda x: jnp.maximum(x, x[::-1]) * jnp.minimum(x, 0.5), ANY
    ),
    Case("clamp", lambda x: jnp.clip(x, -0.5, 0.5) * x, ANY),
    Case("rem", lambda x: jnp.remainder(x**2, 0.7), ANY),
    Case("sign_floor_round", lambda x: jnp.sign(x) * jnp.floor(3 * x) * x**2, ANY),
    Case("stop_gradient", lambda x: lax.stop_gradient(x) * x**2, ANY),
    # --- division ---
    Case("div", lambda x: x / (1.0 + x[::-1] ** 2), ANY),
    Case("reciprocal", lambda x: 1.0 / x, ANY),
    Case("div_self", lambda x: jnp.sin(x) / x, ANY),
    # lax binary ops broadcast a rank-0 operand implicitly (`mul a:f[3] b:f[]`).
    Case("mul_by_traced_scalar", lambda x: jnp.tanh(x) * x[0], ANY),
    Case("scalar_mul_by_vector", lambda x: jnp.sum(x**2) * jnp.sin(x), ANY),
    Case("div_by_traced_scalar", lambda x: jnp.sin(x) / (1.0 + x[1] ** 2), ANY),
    Case("scalar_div_by_vector", lambda x: jnp.sum(x) / (2.0 + jnp.cos(x)), ANY),
    # --- reductions ---
    Case("sum", lambda x: jnp.sum(jnp.sin(x) * x), ANY),
    Case("prod", jnp.prod, ANY),
    Case("max", lambda x: jnp.max(jnp.sin(x)), ANY),
    Case("min", lambda x: jnp.min(x**2), ANY),
    Case("mean", lambda x: jnp.mean(jnp.exp(x)), ANY),
    Case("var", jnp.var, ANY),
    Case("norm", jnp.linalg.norm, ANY),
    Case("argmax_gather", lambda x: x[jnp.argmax(x)] * x, ANY),
    Case("reduce_axis", lambda x: jnp.sum(jnp.cos(x) ** 2, axis=0), GRID),
    # --- indexing ---
    Case("gather", lambda x: x[IDX] ** 2 * x[IDX[::-1]], ANY),
    Case("slice", lambda x: x[1:] * x[:-1], ANY),
    Case(
        "take_along_axis", lambda x: jnp.take_along_axis(x, jnp.argsort(x), 0) ** 3, ANY
    ),
    Case("scatter_set", lambda x: x.at[1].set(x[0] ** 2) * x, ANY),
    Case("scatter_add", lambda x: jnp.sin(x).at[IDX[:3]].add(x**2), ANY),
    Case(
        "scatter_mul",
        # JAX differentiates scatter_mul only with unique indices.
        lambda x: jnp.cos(x).at[IDX[:2]].mul(x[:2] ** 2, unique_indices=True),
        ANY,
    ),
    Case("scatter_max", lambda x: jnp.zeros(3).at[IDX[:3]].max(x**2), ANY),
    Case("dynamic_slice", lambda x: lax.dynamic_slice(x**2, (1,), (2,)) * x[0], ANY),
    Case(
        "dynamic_update_slice",
        lambda x: lax.dynamic_update_slice(jnp.sin(x), x[:2] ** 2, (1,)) * x,
        ANY,
    ),
    Case("concatenate", lambda x: jnp.concatenate([x, x**2, jnp.sin(x)]) ** 2, ANY),
    Case("pad", lambda x: jnp.pad(x**2, (1, 2)) * 2.0, ANY),
    Case("lax_pad_interior", lambda x: lax.pad(x**3, 0.5, [(-1, 1, 2)]), ANY),
    Case("reshape_transpose", lambda x: jnp.tanh(x.T.reshape(-1)) * x.sum(), GRID),
    Case("broadcast", lambda x: jnp.tanh(x[:, None] * x[None, :]), ANY),
    Case("roll_flip", lambda x: jnp.roll(x, 1) * jnp.flip(x) ** 2, ANY),
    # --- sort and scans ---
    Case("sort", lambda x: jnp.sort(x) * jnp.arange(1.0, 4.0) * x, ANY),
    Case("cumsum", lambda x: jnp.cumsum(x**2) * x, ANY),
    Case("cumprod", jnp.cumprod, ANY),
    Case("cummax", lambda x: lax.cummax(jnp.sin(x)) * x, ANY),
    # --- softmax family ---
    Case("softmax", jax.nn.softmax, ANY),
    Case("log_softmax", jax.nn.log_softmax, ANY),
    Case("logsumexp", jsp.special.logsumexp, ANY),
    # --- linear algebra (x is a flattened 3x3 matrix) ---
    Case("slogdet", lambda x: jnp.linalg.slogdet(x.reshape(3, 3))[1], MAT.ravel()),
    Case("det", lambda x: jnp.linalg.det(x.reshape(3, 3)), MAT.ravel()),
    Case(
        "solve",
        lambda x: jnp.linalg.solve(x.reshape(3, 3), jnp.sin(x[:3])),
        MAT.ravel(),
    ),
    Case("inv", lambda x: jnp.linalg.inv(x.reshape(3, 3)), MAT.ravel()),
    Case("cholesky", lambda x: jnp.linalg.cholesky(_spd(x)), MAT.ravel()),
    Case("eigh", lambda x: jnp.linalg.eigvalsh(_spd(x)), MAT.ravel()),
    Case(
        "triangular_solve",
        lambda x: jsp.linalg.solve_triangular(
            jnp.tril(x.reshape(3, 3)) + 2 * jnp.eye(3), x[:3], lower=True
        ),
        MAT.ravel(),
    ),
    Case("slogdet_4x4", lambda x: jnp.linalg.slogdet(x.reshape(4, 4))[1], MAT4.ravel()),
    Case("det_4x4", lambda x: jnp.linalg.det(x.reshape(4, 4)), MAT4.ravel()),
    Case(
        "slogdet_batched",
        lambda x: jnp.linalg.slogdet(_batch_of_two(x))[1],
        MAT4.ravel(),
    ),
    # The next ones go through JAX's JVP rules on the generic path; several of those
    # rules fail when called with only symbolic-zero tangents.
    Case(
        "eigh_vectors", lambda x: jnp.linalg.eigh(_sym4(x))[1][:, 0] ** 2, MAT4.ravel()
    ),
    Case(
        "svd_values",
        lambda x: jnp.linalg.svd(x.reshape(4, 4), compute_uv=False),
        MAT4.ravel(),
    ),
    Case("norm_ord2", lambda x: jnp.linalg.norm(x.reshape(4, 4), ord=2), MAT4.ravel()),
    Case("qr", lambda x: jnp.linalg.qr(x.reshape(4, 4))[1], MAT4.ravel()),
    Case("pinv", lambda x: jnp.linalg.pinv(x.reshape(4, 4)), MAT4.ravel()),
    Case("expm", lambda x: jsp.linalg.expm(0.3 * x.reshape(4, 4)), MAT4.ravel()),
    Case("prod_axis", lambda x: jnp.prod(x.reshape(4, 4), axis=1), MAT4.ravel()),
    Case("cumlogsumexp", lambda x: lax.cumlogsumexp(x**2), ANY),
    Case("top_k", lambda x: lax.top_k(jnp.sin(x), 2)[0] * x[0], ANY),
    Case(
        "max_pool",
        lambda x: lax.reduce_window(
            jnp.sin(x.reshape(4, 4)), -jnp.inf, lax.max, (2, 2), (1, 1), "VALID"
        ),
        MAT4.ravel(),
    ),
    Case("fft", lambda x: jnp.abs(jnp.fft.fft(x**2)) ** 2, ANY),
    Case("polygamma", lambda x: jsp.special.polygamma(1, 1.0 + x**2), ANY),
    Case("gammainc", lambda x: jsp.special.gammainc(2.0, 1.0 + x**2), ANY),
    # Binary primitives on the generic path with a rank-0 operand.
    Case("pow_scalar_exponent", lambda x: jnp.power(1.0 + x**2, x[0]), ANY),
    Case("atan2_scalar", lambda x: jnp.arctan2(x, 1.0 + x[0] ** 2), ANY),
    Case("maximum_scalar", lambda x: jnp.maximum(x, x[0]) * x, ANY),
    Case(
        "select_n_three",
        lambda x: lax.select_n(IDX[:3], x**2, jnp.sin(x), x * x[0]),
        ANY,
    ),
    # --- matmul ---
    Case("matmul_const", lambda x: A @ jnp.tanh(x), ANY),
    Case("matmul_const_left", lambda x: jnp.sin(x) @ A.T, ANY),
    Case("matmul_both_traced", lambda x: jnp.outer(x, x) @ jnp.sin(x), ANY),
    Case("einsum_batched", lambda x: jnp.einsum("ij,ik->ijk", x, x**2), GRID),
    Case("dot_self", lambda x: jnp.dot(x, x), ANY),
    # Output larger than both operands: the first order is one product over [J_a, a].
    Case("matmul_outer_both_traced", lambda x: x[:, None] @ jnp.sin(x)[None, :], ANY),
    Case("attention_scores", _attention_scores, ANY),
    # --- convolution ---
    Case("conv_const_kernel", _conv_const_kernel, ANY),
    Case("conv_tangent_kernel", _conv_tangent_kernel, ANY),
    Case("conv_2d", _conv_2d, ANY),
    # --- select ---
    Case("where", lambda x: jnp.where(x > 0, x**2, jnp.sin(x)), ANY),
    Case("select_n", lambda x: lax.select_n(x > 0.5, jnp.exp(x), x**3), ANY),
    # --- composite ---
    Case(
        "mlp",
        lambda x: jnp.sum(jnp.tanh(A @ jnp.tanh(A.T @ (A @ x)))),
        ANY,
    ),
    Case("gaussian", lambda x: jnp.exp(-jnp.sum(x**2)), ANY),
    Case("coulomb", lambda x: 1.0 / jnp.sqrt(jnp.sum(x**2) + 0.1), ANY),
]


def _lap_eager(fun: Callable[[jax.Array], Any], x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


# Most tests run under jit: one compilation instead of many eager dispatches. The eager
# path has its own tests (`test_zoo_eager` here, and test_lap_jit.py).
_lap_full = jax.jit(_lap_eager, static_argnums=0)
_lap = jax.jit(fwdlap.lap, static_argnums=0)


def test_zoo_is_large() -> None:
    assert len(ZOO) >= 40
    assert len({c.name for c in ZOO}) == len(ZOO)


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo(case: Case) -> None:
    x = jnp.asarray(case.x)
    out, jac, lap = _lap_full(case.fun, x)
    ref_out, ref_jac, ref_lap = reference_triple(case.fun, x)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap, rtol=1e-6, atol=1e-7)


EAGER = ["exp", "mul_by_traced_scalar", "gather", "scatter_add", "softmax", "det"]


@pytest.mark.parametrize("name", EAGER)
def test_zoo_eager(name: str) -> None:
    case = next(c for c in ZOO if c.name == name)
    x = jnp.asarray(case.x)
    out, jac, lap = _lap_eager(case.fun, x)
    ref_out, ref_jac, ref_lap = reference_triple(case.fun, x)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap, rtol=1e-6, atol=1e-7)


# --- shapes, seeds and pytrees -------------------------------------------------------


def _matrix_fun(x: jax.Array) -> jax.Array:
    # (2, 3) -> (3, 2): mixes rows and columns, so every jacobian block is non-trivial.
    return jnp.tanh(x.T @ x @ x.T) + jnp.sin(x).T * x[0, 0]


def test_matrix_input_and_output() -> None:
    x = jnp.asarray(GRID)
    out, jac, lap = _lap_full(_matrix_fun, x)
    assert jac.shape == (x.size, 3, 2)
    assert lap.shape == (3, 2)
    assert_matches_reference((out, jac, lap), _matrix_fun, x)


def _scalar_fun(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(A @ x) ** 2) + jnp.prod(jnp.cos(x))


def _vector_fun(x: jax.Array) -> jax.Array:
    return jnp.sin(A @ x) * jnp.exp(-jnp.sum(x**2))


@pytest.mark.parametrize("fun", [_scalar_fun, _vector_fun], ids=["scalar", "vector"])
@pytest.mark.parametrize("num_dirs", [1, 5])
def test_non_identity_seed(
    fun: Callable[[jax.Array], jax.Array], num_dirs: int
) -> None:
    # Random directions V: the Laplacian becomes sum_k v_k^T H v_k, the jacobian J V^T.
    x = jnp.asarray(ANY)
    v = jax.random.normal(jax.random.key(num_dirs), (num_dirs, 3), dtype=x.dtype)
    out, jac, lap = _lap(fun, (x,), (v,), (None,))
    expected_jac = jnp.einsum("...i,ki->k...", jax.jacfwd(fun)(x), v)
    assert tree_allclose(out, fun(x))
    assert tree_allclose(jac, expected_jac)
    assert tree_allclose(lap, hessian_trace_weighted(fun, x, v))


@pytest.mark.parametrize("fun", [_scalar_fun, _vector_fun], ids=["scalar", "vector"])
def test_input_laplacian_term(fun: Callable[[jax.Array], jax.Array]) -> None:
    # An intermediate value's own laplacian feeds in through the jacobian: J . lap_in.
    x = jnp.asarray(ANY)
    lap_in = jnp.array([0.7, -1.3, 0.4])
    _, jac, lap = _lap(fun, (x,), (identity_jacobian(x),), (lap_in,))
    _, ref_jac, ref_lap = reference_triple(fun, x)
    expected = ref_lap + jax.jacfwd(fun)(x) @ lap_in
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, expected)


def _inner(x: jax.Array) -> jax.Array:
    return jnp.stack([jnp.sin(x[0]) * x[1], jnp.exp(x[2]), x[0] * x[2] ** 2])


def _outer(y: jax.Array) -> jax.Array:
    return jnp.tanh(A @ y)


def test_input_laplacian_matches_chain_rule() -> None:
    # lap of f(g(x)) equals lap of f at g(x) seeded with g's jacobian and laplacian.
    x = jnp.asarray(ANY)
    y, jac_y, lap_y = _lap_full(_inner, x)
    _, jac, lap = _lap(_outer, (y,), (jac_y,), (lap_y,))
    _, ref_jac, ref_lap = reference_triple(lambda x: _outer(_inner(x)), x)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap)


def _tree_fun(x: jax.Array) -> dict[str, Any]:
    return {
        "scalar": jnp.sum(jnp.sin(x) ** 2),
        "pair": (jnp.exp(x) * x[0], jnp.outer(x, jnp.tanh(x))),
        "list": [x**3],
    }


def test_pytree_outputs() -> None:
    x = jnp.asarray(ANY)
    out, jac, lap = _lap_full(_tree_fun, x)
    assert_matches_reference((out, jac, lap), _tree_fun, x)


def _pair_fun(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sin(x), jnp.sum(x**2) * x[1]


def test_tuple_output_eager() -> None:
    x = jnp.asarray(ANY)
    out, jac, lap = _lap_eager(_pair_fun, x)
    assert isinstance(out, tuple) and isinstance(jac, tuple) and isinstance(lap, tuple)
    assert_matches_reference((out, jac, lap), _pair_fun, x)


def _dict_fun(p: dict[str, jax.Array]) -> jax.Array:
    return jnp.tanh(p["b"] @ p["a"]) * jnp.sum(p["a"] ** 2)


def test_pytree_inputs() -> None:
    # A dict of arrays as one argument; its jacobians and laplacians are dicts too.
    params = {"a": jnp.asarray(ANY), "b": jnp.asarray(GRID)}
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jacs = jax.vmap(unravel)(identity_jacobian(flat))
    laps = jax.tree_util.tree_map(jnp.zeros_like, params)
    out, jac, lap = _lap(_dict_fun, (params,), (jacs,), (laps,))
    assert_matches_reference((out, jac, lap), lambda v: _dict_fun(unravel(v)), flat)
