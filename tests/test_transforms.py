"""fwdlap.laplacian, value_grad_and_laplacian and hessian_diagonal against jax.hessian.

Every expected value comes from `jax.hessian` / `jax.grad` of the same function (or a
closed form), never from fwdlap itself.
"""

from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=5))
W = jnp.asarray(RNG.normal(size=(4, 5)))


def mlp(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(W @ x) ** 2) + jnp.sin(x[0] * x[1])


def array_out(x: jax.Array) -> jax.Array:
    return jnp.tanh(W @ x) * x[:4]


def tree_out(x: jax.Array) -> dict[str, Any]:
    return {"a": jnp.exp(0.3 * x).reshape(5), "b": (jnp.sum(x**3), jnp.cos(x[:2]))}


def flat_hessian(f: Any, args: tuple[Any, ...], argnums: Any) -> Any:
    """jax.hessian w.r.t. the ravelled `argnums` arguments: leaves (*out, d, d)."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    sel = tuple(args[i] for i in nums)
    flat, unravel = jax.flatten_util.ravel_pytree(sel)

    def g(v: jax.Array) -> Any:
        new = list(args)
        for i, value in zip(nums, unravel(v), strict=True):
            new[i] = value
        return f(*new)

    return jax.jit(jax.hessian(g))(flat), flat.size


def ref_laplacian(f: Any, args: tuple[Any, ...], argnums: Any = 0, a: Any = None):
    hess, d = flat_hessian(f, args, argnums)
    weight = jnp.eye(d) if a is None else (jnp.diag(a) if jnp.ndim(a) == 1 else a)
    return jax.tree_util.tree_map(
        lambda h: jnp.einsum("...ij,ji->...", h, weight), hess
    )


def assert_tree_close(got: Any, want: Any, rtol: float = 1e-10, atol: float = 1e-10):
    leaves_got, tree_got = jax.tree_util.tree_flatten(got)
    leaves_want, tree_want = jax.tree_util.tree_flatten(want)
    assert tree_got == tree_want
    for g, w in zip(leaves_got, leaves_want, strict=True):
        assert np.shape(g) == np.shape(w)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# --- laplacian ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fun", "chunk_size"),
    [
        (mlp, None),
        (mlp, 1),
        (mlp, 2),  # 5 directions: the last block is padded
        (mlp, 9),  # larger than the number of directions
        (array_out, None),
        (array_out, 3),
        (tree_out, None),
        (tree_out, 2),
    ],
)
def test_laplacian_matches_hessian_trace(fun: Any, chunk_size: int | None):
    got = jax.jit(fwdlap.laplacian(fun, chunk_size=chunk_size))(X)
    assert_tree_close(got, ref_laplacian(fun, (X,)))


def two_args(p: dict[str, jax.Array], y: jax.Array, scale: float = 1.0) -> jax.Array:
    return scale * (
        jnp.sum(jnp.tanh(p["w"] @ y) ** 2) + jnp.sum(jnp.exp(p["b"]) * y[:2] ** 2)
    )


PARAMS = {"w": jnp.asarray(RNG.normal(size=(3, 4))), "b": jnp.asarray([0.2, -0.3])}
Y = jnp.asarray(RNG.normal(size=4))


@pytest.mark.parametrize(
    ("argnums", "chunk_size"),
    [(0, None), (1, 3), ((0, 1), None), ((1, 0), 4), (-1, None)],
)
def test_laplacian_argnums_and_pytrees(argnums: Any, chunk_size: int | None):
    lap_fn = fwdlap.laplacian(two_args, argnums=argnums, chunk_size=chunk_size)
    got = jax.jit(lambda p, y: lap_fn(p, y, scale=2.0))(PARAMS, Y)
    nums = argnums % 2 if isinstance(argnums, int) else argnums
    want = ref_laplacian(lambda p, y: two_args(p, y, scale=2.0), (PARAMS, Y), nums)
    assert_tree_close(got, want)


def test_laplacian_keeps_signature():
    lap_fn = fwdlap.laplacian(mlp)
    assert lap_fn.__name__ == "mlp"
    assert lap_fn.__wrapped__ is mlp  # type: ignore[attr-defined]


# --- weights -----------------------------------------------------------------------

W_VEC = jnp.asarray([1.5, -2.0, 0.0, 0.5, -0.25])
A_SYM = jnp.asarray(RNG.normal(size=(5, 5)))
A_INDEF = A_SYM + A_SYM.T
A_PSD = A_SYM @ A_SYM.T
A_LOWRANK = jnp.outer(X, X) - 2 * jnp.outer(W[0], W[0])


@pytest.mark.parametrize(
    ("weights", "traced", "chunk_size"),
    [
        (W_VEC, False, None),
        (W_VEC, True, 2),
        (jnp.abs(W_VEC), False, 2),
        (jnp.abs(W_VEC), True, None),
        (A_INDEF, False, 2),
        (A_INDEF, True, None),
        (A_PSD, False, None),
        (A_LOWRANK, False, 2),
        (A_LOWRANK, True, 3),
        (jnp.zeros(5), False, None),
    ],
    ids=[
        "vec-signed",
        "vec-signed-traced-chunked",
        "vec-nonneg-chunked",
        "vec-nonneg-traced",
        "indefinite-chunked",
        "indefinite-traced",
        "psd",
        "lowrank-chunked",
        "lowrank-traced-chunked",
        "zero",
    ],
)
def test_weighted_laplacian(weights: Any, traced: bool, chunk_size: int | None):
    want = ref_laplacian(array_out, (X,), a=weights)
    if traced:
        got = jax.jit(
            lambda x, w: fwdlap.laplacian(array_out, weights=w, chunk_size=chunk_size)(
                x
            )
        )(X, weights)
    else:
        got = jax.jit(
            fwdlap.laplacian(
                array_out, weights=np.asarray(weights), chunk_size=chunk_size
            )
        )(X)
    assert_tree_close(got, want)


def test_weight_matrix_uses_symmetric_part():
    # tr(A H) only sees (A + A^T) / 2, because the Hessian is symmetric.
    got = jax.jit(fwdlap.laplacian(mlp, weights=A_SYM))(X)
    want = ref_laplacian(mlp, (X,), a=A_SYM)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_weights_over_pytree_argument_in_ravel_order():
    weights = jnp.arange(1.0, 15.0)  # 2 + 12 coordinates of PARAMS, ravel order
    got = jax.jit(fwdlap.laplacian(two_args, weights=weights))(PARAMS, Y)
    np.testing.assert_allclose(got, ref_laplacian(two_args, (PARAMS, Y), a=weights))


@pytest.mark.parametrize("shape", [(4,), (5, 4), (5, 5, 1), (25,)])
def test_weights_with_wrong_shape_raise(shape: tuple[int, ...]):
    with pytest.raises(ValueError, match=r"`weights` must have shape \(5,\)"):
        fwdlap.laplacian(mlp, weights=jnp.ones(shape))(X)


# --- memory of chunked evaluation --------------------------------------------------


def _temp_bytes(fun: Any, x: jax.Array) -> int:
    stats = jax.jit(fun).lower(x).compile().memory_analysis()
    assert stats is not None
    return int(stats.temp_size_in_bytes)


def test_chunked_temporary_memory_does_not_grow_with_dimension():
    hidden = 2048

    def make(d: int) -> Any:
        w = jnp.asarray(np.random.default_rng(d).normal(size=(hidden, d)) / d)
        return lambda x: jnp.sum(jnp.tanh(w @ x))

    temps: dict[tuple[int, Any], int] = {}
    for d in (30, 240):
        f, x = make(d), jnp.ones(d)
        for chunk in (None, 8):
            temps[d, chunk] = _temp_bytes(fwdlap.laplacian(f, chunk_size=chunk), x)
    # Unchunked: the (d, hidden) jacobian of the hidden layer grows with d (8x here).
    assert temps[240, None] > 4 * temps[30, None]
    # Chunked: only (chunk, hidden) blocks; what grows is the (chunk, d) input block.
    assert temps[240, 8] < 1.5 * temps[30, 8]
    assert temps[240, 8] < temps[240, None] / 4


# --- value_grad_and_laplacian ------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_value_grad_and_laplacian(chunk_size: int | None):
    value, grad, lap = jax.jit(
        fwdlap.value_grad_and_laplacian(mlp, chunk_size=chunk_size)
    )(X)
    want_value, want_grad = jax.value_and_grad(mlp)(X)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lap, ref_laplacian(mlp, (X,)), rtol=1e-10)


@pytest.mark.parametrize("argnums", [0, (0, 1)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_value_grad_and_laplacian_pytree(argnums: Any, chunk_size: int | None):
    vgl = fwdlap.value_grad_and_laplacian(two_args, argnums, chunk_size=chunk_size)
    value, grad, lap = jax.jit(vgl)(PARAMS, Y)
    want_value, want_grad = jax.jit(jax.value_and_grad(two_args, argnums))(PARAMS, Y)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    assert_tree_close(grad, want_grad)
    assert_tree_close(lap, ref_laplacian(two_args, (PARAMS, Y), argnums))


def test_value_grad_and_laplacian_float32_grad_dtype():
    x32 = X.astype(jnp.float32)
    _, grad, _ = fwdlap.value_grad_and_laplacian(lambda x: jnp.sum(x**2))(x32)
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, 2 * x32, rtol=1e-6)


@pytest.mark.parametrize("fun", [array_out, tree_out, lambda x: (x**2).sum() > 0])
def test_value_grad_and_laplacian_needs_real_scalar(fun: Any):
    with pytest.raises(TypeError, match="must return a real floating-point scalar"):
        fwdlap.value_grad_and_laplacian(fun)(X)


# --- hessian_diagonal --------------------------------------------------------------


@pytest.mark.parametrize("fun", [mlp, array_out, tree_out], ids=lambda f: f.__name__)
def test_hessian_diagonal_matches_jax_hessian(fun: Any):
    got = jax.jit(fwdlap.hessian_diagonal(fun))(X)
    want = jax.tree_util.tree_map(
        lambda h: jnp.diagonal(h, axis1=-2, axis2=-1), jax.jit(jax.hessian(fun))(X)
    )
    assert_tree_close(got, want)


def test_hessian_diagonal_of_scalar_is_shaped_like_argument():
    x = X.reshape(1, 5)
    got = jax.jit(fwdlap.hessian_diagonal(lambda x: jnp.sum(jnp.sin(x) ** 3)))(x)
    # Closed form: d^2/dx^2 sin^3 = 6 sin cos^2 - 3 sin^3.
    s, c = jnp.sin(x), jnp.cos(x)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, 6 * s * c**2 - 3 * s**3, rtol=1e-12)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_hessian_diagonal_pytree(argnums: Any):
    got = jax.jit(fwdlap.hessian_diagonal(two_args, argnums))(PARAMS, Y)
    hess, _ = flat_hessian(two_args, (PARAMS, Y), argnums)
    nums = (argnums,) if isinstance(argnums, int) else argnums
    sel = tuple((PARAMS, Y)[i] for i in nums)
    _, unravel = jax.flatten_util.ravel_pytree(sel)
    want = unravel(jnp.diagonal(hess))
    assert_tree_close(got, want if isinstance(argnums, tuple) else want[0])


# --- stochastic estimator ----------------------------------------------------------

M_QUAD = A_INDEF + 3 * jnp.eye(5)


def quadratic(x: jax.Array) -> jax.Array:
    return 0.5 * x @ M_QUAD @ x  # Hessian M_QUAD, Laplacian tr(M_QUAD)


def _estimates(fun: Any, num_keys: int, **kwargs: Any) -> np.ndarray:
    keys = jax.random.split(jax.random.key(1), num_keys)
    est = jax.jit(jax.vmap(lambda k: fwdlap.laplacian(fun, key=k, **kwargs)(X)))(keys)
    return np.asarray(est)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_stochastic_laplacian_is_unbiased(distribution: str):
    fun = mlp
    num_keys = 2000
    est = _estimates(fun, num_keys, probes=3, probe_distribution=distribution)
    exact = float(ref_laplacian(fun, (X,)))
    stderr = est.std(ddof=1) / np.sqrt(num_keys)
    assert stderr > 0
    assert abs(est.mean() - exact) < 4 * stderr


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_stochastic_laplacian_variance_matches_documented_formula(distribution: str):
    probes, num_keys = 2, 4000
    est = _estimates(
        quadratic, num_keys, probes=probes, probe_distribution=distribution
    )
    m = np.asarray(M_QUAD)
    frob = np.sum(m**2)
    if distribution == "rademacher":
        variance = 2 / probes * (frob - np.sum(np.diag(m) ** 2))
    else:
        variance = 2 / probes * frob
    # The sample variance of 4000 draws is within ~10% of the true one.
    np.testing.assert_allclose(est.var(ddof=1), variance, rtol=0.15)


def test_rademacher_is_exact_for_diagonal_hessian():
    # z_i^2 = 1, so a separable function's estimate is exact for every key.
    def separable(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(x) * x**2)

    est = _estimates(separable, 5, probes=3, chunk_size=2)
    np.testing.assert_allclose(est, ref_laplacian(separable, (X,)), rtol=1e-10)


@pytest.mark.parametrize("weights", [W_VEC, A_INDEF], ids=["vec", "indefinite"])
def test_stochastic_weighted_laplacian_is_unbiased(weights: Any):
    num_keys = 2000
    est = _estimates(mlp, num_keys, probes=2, weights=weights, chunk_size=1)
    exact = float(ref_laplacian(mlp, (X,), a=weights))
    stderr = est.std(ddof=1) / np.sqrt(num_keys)
    assert abs(est.mean() - exact) < 4 * stderr


# --- calling-convention errors -----------------------------------------------------


def test_probes_need_a_key():
    with pytest.raises(TypeError, match="needs a random key"):
        fwdlap.laplacian(mlp, probes=4)
    with pytest.raises(TypeError, match="without `probes`"):
        fwdlap.laplacian(mlp, key=jax.random.key(0))
    with pytest.raises(ValueError, match="probe_distribution"):
        fwdlap.laplacian(mlp, probes=2, key=jax.random.key(0), probe_distribution="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_chunk_size_and_probes(bad: Any):
    with pytest.raises(ValueError, match="chunk_size"):
        fwdlap.laplacian(mlp, chunk_size=bad)
    with pytest.raises(ValueError, match="probes"):
        fwdlap.laplacian(mlp, probes=bad, key=jax.random.key(0))


@pytest.mark.parametrize("argnums", ["0", 1.0, (), (0, 0), [True]])
def test_bad_argnums(argnums: Any):
    with pytest.raises((TypeError, ValueError), match="argnums"):
        fwdlap.laplacian(mlp, argnums=argnums)


@pytest.mark.parametrize(
    "transform",
    [fwdlap.laplacian, fwdlap.value_grad_and_laplacian, fwdlap.hessian_diagonal],
)
def test_argnums_out_of_range_and_integer_arguments(transform: Any):
    with pytest.raises(TypeError, match="argnums=2 refers to positional argument 2"):
        transform(two_args, argnums=2)(PARAMS, Y)
    with pytest.raises(TypeError, match=r"path \['k'\] with dtype int"):
        transform(lambda p: jnp.sum(p["x"] ** 2))({"x": X, "k": jnp.arange(3)})


# --- NaN and infinite weights ------------------------------------------------------


def quadratic_form(x: jax.Array) -> dict[str, Any]:
    """Hessian [[2, 0, 1, 0], [0, -2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]] everywhere,
    with zeros on and off the diagonal; two output leaves of different signs."""
    f = x[0] ** 2 - x[1] ** 2 + x[0] * x[2] + x[3]
    return {"f": f, "pair": jnp.stack([f, -3.0 * f])}


NAN, INF = float("nan"), float("inf")
X4 = jnp.array([0.3, -0.7, 1.1, 0.5])


def _vector(**entries: float) -> np.ndarray:
    w = np.ones(4)
    for index, value in entries.items():
        w[int(index[1:])] = value
    return w


def _matrix(*entries: tuple[int, int, float]) -> np.ndarray:
    a = np.eye(4) + 0.25
    for i, j, value in entries:
        a[i, j] = value
    return a


NONFINITE_WEIGHTS = {
    "vec-nan": _vector(i1=NAN),  # NaN whatever the Hessian
    "vec-inf-positive-curvature": _vector(i0=INF),  # +inf * 2
    "vec-inf-negative-curvature": _vector(i1=INF),  # +inf * -2
    "vec-minus-inf": _vector(i1=-INF),  # -inf * -2
    "vec-inf-zero-curvature": _vector(i2=INF),  # inf * 0: NaN
    "vec-inf-opposite-signs": _vector(i0=INF, i1=INF),  # inf - inf: NaN
    "mat-nan-diagonal": _matrix((1, 1, NAN)),
    "mat-inf-off-diagonal": _matrix((0, 2, INF)),  # inf * H_02 = inf * 1
    "mat-minus-inf-symmetric": _matrix((0, 2, -INF), (2, 0, -INF)),
    "mat-inf-zero-entry": _matrix((0, 1, INF)),  # inf * H_01 = inf * 0: NaN
}


NONFINITE_CALLS = [
    (case, mode) for case in sorted(NONFINITE_WEIGHTS) for mode in ("closed", "traced")
] + [
    (case, mode)
    for case in ("vec-nan", "mat-inf-off-diagonal")
    for mode in ("eager", "chunked")
]


@pytest.mark.parametrize(("case", "mode"), NONFINITE_CALLS)
def test_nonfinite_weights_propagate_as_in_the_trace(case: str, mode: str):
    """NaN and inf weights give what tr(A H) gives, for concrete and traced weights."""
    weights = NONFINITE_WEIGHTS[case]
    hess = jax.hessian(quadratic_form)(X4)
    a = jnp.diag(weights) if weights.ndim == 1 else jnp.asarray(weights)
    want = jax.tree_util.tree_map(lambda h: jnp.einsum("...ij,ji->...", h, a), hess)
    if weights.ndim == 1:  # the issue's own reference for a vector
        np.testing.assert_array_equal(want["f"], jnp.sum(weights * jnp.diag(hess["f"])))
    if mode == "eager":
        got = fwdlap.laplacian(quadratic_form, weights=weights)(X4)
    elif mode == "closed":  # concrete weights, under jit
        got = jax.jit(fwdlap.laplacian(quadratic_form, weights=jnp.asarray(weights)))(
            X4
        )
    elif mode == "traced":
        run = lambda x, w: fwdlap.laplacian(quadratic_form, weights=w)(x)
        got = jax.jit(run)(X4, jnp.asarray(weights))
    else:
        got = fwdlap.laplacian(quadratic_form, weights=weights, chunk_size=1)(X4)
    assert not np.all(np.isfinite(want["f"]))
    assert_tree_close(got, want)


def test_nonfinite_weights_with_probes_give_nan():
    weights = _vector(i1=NAN)
    key = jax.random.key(0)
    got = fwdlap.laplacian(quadratic_form, weights=weights, probes=3, key=key)(X4)
    assert np.all(np.isnan(jax.tree_util.tree_leaves(got)[0]))


def test_finite_traced_weights_skip_the_nonfinite_passes():
    # Finite weights: the result is the plain weighted Laplacian (no NaN from the
    # branch that is not taken), here in a vmap over points as in a batch of walkers.
    weights = _vector(i0=2.0, i1=-1.0)
    run = jax.jit(
        jax.vmap(lambda x, w: fwdlap.laplacian(quadratic_form, weights=w)(x), (0, None))
    )
    got = run(jnp.stack([X4, 2 * X4]), jnp.asarray(weights))
    want = jnp.sum(weights * jnp.diag(jax.hessian(quadratic_form)(X4)["f"]))
    np.testing.assert_allclose(got["f"], jnp.stack([want, want]), rtol=1e-12)


# --- an argument without coordinates -----------------------------------------------


def empty_fun(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(x**2) * y[0] + jnp.sin(y[0]) + jnp.sum(jnp.tanh(x))


EMPTY = jnp.zeros((0,))
Y2 = jnp.array([0.4, 1.0])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"chunk_size": None},
        {"chunk_size": 1},
        {"chunk_size": 3},
        {"sparsity": True},
        {"weights": np.zeros(0)},
        {"weights": np.zeros((0, 0))},
    ],
    ids=["auto", "one-pass", "chunk-1", "chunk-3", "sparse", "vector", "matrix"],
)
def test_empty_argument_gives_zero_laplacian(options: dict[str, Any], jit: bool):
    lap = fwdlap.laplacian(empty_fun, **options)
    got = (jax.jit(lap) if jit else lap)(EMPTY, Y2)
    assert got.shape == () and got == 0.0
    vgl_options = {k: v for k, v in options.items() if k != "weights"}
    vgl = fwdlap.value_grad_and_laplacian(empty_fun, **vgl_options)
    value, grad, lap_value = (jax.jit(vgl) if jit else vgl)(EMPTY, Y2)
    np.testing.assert_allclose(value, empty_fun(EMPTY, Y2))
    assert grad.shape == (0,) and lap_value == 0.0


def test_empty_argument_with_traced_weights_and_pytrees():
    run = jax.jit(lambda w, x: fwdlap.laplacian(tree_out_empty, weights=w)(x))
    got = run(jnp.zeros(0), {"a": jnp.zeros((0, 2)), "b": jnp.zeros(0)})
    assert_tree_close(got, {"s": jnp.zeros(()), "v": jnp.zeros(3)})


@pytest.mark.parametrize("sparsity", [None, True], ids=["dense", "sparse"])
def test_lap_with_no_directions(sparsity: Any):
    """n = 0 directions: the output, jacobians with no rows, zero laplacians."""
    fun = lambda x: (jnp.sum(x**2), jnp.ones(2) * jnp.sum(jnp.sin(x)))
    out, jac, lap = fwdlap.lap(
        fun, (X,), (np.zeros((0, 5)),), (None,), sparsity=sparsity
    )
    assert_tree_close(out, fun(X))
    assert jac[0].shape == (0,) and jac[1].shape == (0, 2)
    assert_tree_close(lap, (jnp.zeros(()), jnp.zeros(2)))


def tree_out_empty(p: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"s": jnp.sum(p["a"] ** 2) + 1.0, "v": jnp.ones(3) * jnp.sum(p["b"])}


# --- integer options of any integer type --------------------------------------------


@pytest.mark.parametrize(
    "size",
    [np.int64(2), np.int32(2), jnp.int32(2), jnp.asarray(2, dtype=jnp.int64)],
    ids=["np.int64", "np.int32", "jnp.int32", "jax-int64-array"],
)
def test_chunk_size_and_probes_accept_any_integer(size: Any):
    want = ref_laplacian(mlp, (X,))
    got = jax.jit(fwdlap.laplacian(mlp, chunk_size=size))(X)
    np.testing.assert_allclose(got, want)
    # Rademacher probes are exact for a diagonal Hessian.
    diagonal = lambda x: jnp.sum(jnp.sin(x))
    est = jax.jit(fwdlap.laplacian(diagonal, probes=size, key=jax.random.key(1)))(X)
    np.testing.assert_allclose(est, -jnp.sum(jnp.sin(X)), rtol=1e-12)


def test_chunk_size_of_numpy_integer_type_in_lap_and_value_grad_and_laplacian():
    want = ref_laplacian(mlp, (X,))
    vgl = fwdlap.value_grad_and_laplacian(mlp, chunk_size=np.int64(2))
    np.testing.assert_allclose(jax.jit(vgl)(X)[2], want)
    run = lambda x: fwdlap.lap(
        mlp, (x,), (jnp.eye(5),), (None,), chunk_size=np.int64(2)
    )
    np.testing.assert_allclose(jax.jit(run)(X)[2], want)


# --- hessian_diagonal in blocks -------------------------------------------------------


@pytest.mark.parametrize(
    ("fun", "chunk_size"),
    [(mlp, 2), (mlp, None), (mlp, "auto"), (array_out, 3), (tree_out, 1)],
    ids=["mlp-2", "mlp-one-vmap", "mlp-auto", "array_out-3", "tree_out-1"],
)
def test_hessian_diagonal_chunk_size(fun: Any, chunk_size: Any):
    want = jax.tree_util.tree_map(
        lambda h: jnp.diagonal(h, axis1=-2, axis2=-1), jax.hessian(fun)(X)
    )
    got = jax.jit(fwdlap.hessian_diagonal(fun, chunk_size=chunk_size))(X)
    assert_tree_close(got, want)


def test_hessian_diagonal_chunked_with_integer_output():
    fun = lambda x: (jnp.sum(jnp.sin(x) * x[0]), jnp.argmax(x))
    got, int_part = jax.jit(fwdlap.hessian_diagonal(fun, chunk_size=2))(X)
    want = jnp.diag(jax.jit(jax.hessian(lambda x: fun(x)[0]))(X))
    np.testing.assert_allclose(got, want)
    assert int_part.dtype == jax.dtypes.float0 and int_part.shape == X.shape


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_hessian_diagonal_bad_chunk_size(bad: Any):
    with pytest.raises(ValueError, match=r"fwdlap\.hessian_diagonal: `chunk_size`"):
        fwdlap.hessian_diagonal(mlp, chunk_size=bad)


# --- integer outputs: float0 tangents, as jax.jvp ----------------------------------


def test_integer_output_tangents_are_float0_as_in_jax_jvp():
    fun = lambda x: (jnp.argmax(x), x > 0.0, jnp.sum(x**2))
    _, jvp_tangents = jax.jvp(fun, (X,), (jnp.ones_like(X),))
    out, jac, lap = fwdlap.lap(fun, (X,), (jnp.eye(5),), (None,))
    for i in (0, 1):
        assert jvp_tangents[i].dtype == jax.dtypes.float0
        assert jac[i].dtype == lap[i].dtype == jax.dtypes.float0
        assert jac[i].shape == (5, *np.shape(out[i])) and lap[i].shape == np.shape(
            out[i]
        )
    np.testing.assert_allclose(lap[2], 2.0 * 5)
    assert fwdlap.laplacian(fun)(X)[0].dtype == jax.dtypes.float0
    doc = fwdlap.lap.__doc__ or ""
    assert "float0" in doc and "jax.jvp" in doc
