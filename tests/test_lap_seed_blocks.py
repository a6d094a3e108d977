"""The default pass keeps unit seeds' particle blocks until values mix many particles.

With `sparsity=None`, `fwdlap.laplacian`, `fwdlap.value_grad_and_laplacian` and
`fwdlap.lap` with an identity (`np.eye`, or `jnp.eye` inside `jax.jit`) carry the
values of the first, per-particle layers block-sparse, and pair features too when
there are at least four particles, and turn dense where a value depends on more
particles. Results are checked against `jax.hessian` / `jax.grad`; the jaxpr shapes
show that the first layer's jacobian has one block's rows, not all `3N`, and a pair
layer's two blocks' rows; and nothing is reported, since the user asked for no
sparsity. `sparsity=False` is the plain dense pass.
"""

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap
from helpers import reference_laplacian

N, WIDTH = 5, 6  # particles in 3D, first-layer width (no later value has it)
RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.normal(size=3 * N))
W1 = jnp.asarray(RNG.normal(size=(3, WIDTH)) / 2)
W2 = jnp.asarray(RNG.normal(size=(2 * WIDTH, 7)) / 3)
W_FLAT = jnp.asarray(RNG.normal(size=(3 * N, WIDTH)) / 4)


def per_particle_then_mean(x: jax.Array) -> jax.Array:
    """A per-particle layer, then a mean over particles fed back (FermiNet-like)."""
    h = jnp.tanh(x.reshape(N, 3) @ W1)
    mean = jnp.broadcast_to(jnp.mean(h, axis=0), h.shape)
    return jnp.sum(jnp.tanh(jnp.concatenate([h, mean], axis=1) @ W2) ** 2)


def per_particle_then_attention(x: jax.Array) -> jax.Array:
    """A per-particle embedding, then dot-product attention (Psiformer-like)."""
    h = jnp.tanh(x.reshape(N, 3) @ W1)
    weights = jax.nn.softmax(h @ h.T / WIDTH, axis=-1)
    return jnp.sum(jnp.sin(weights @ (h @ W2[:WIDTH])))


def mixes_at_once(x: jax.Array) -> jax.Array:
    """An MLP on the flat coordinates: the first product mixes everything."""
    return jnp.sum(jnp.cos(jnp.tanh(x @ W_FLAT) @ W2[:WIDTH]))


PAIR_WIDTH = 4  # width of the pair stream (no other value has it)
W_PAIR = jnp.asarray(RNG.normal(size=PAIR_WIDTH))
W_OUT = jnp.asarray(RNG.normal(size=(PAIR_WIDTH, 3)) / 2)


def pair_stream(x: jax.Array) -> jax.Array:
    """A layer on pair distances, then a mean over partners (FermiNet's pair stream)."""
    r = x.reshape(-1, 3)
    diff = r[:, None, :] - r[None, :, :]
    dist = jnp.sqrt(jnp.sum(diff**2, axis=-1) + 1.0)
    h2 = jnp.tanh(dist[..., None] * W_PAIR)
    return jnp.sum(jnp.tanh(jnp.mean(h2, axis=1) @ W_OUT) ** 2)


FUNCTIONS = [per_particle_then_mean, per_particle_then_attention, mixes_at_once]
PER_PARTICLE = [per_particle_then_mean, per_particle_then_attention]


def _first_layer_shapes(jaxpr: Any) -> set[tuple[int, ...]]:
    """Shapes `(rows, N, WIDTH)` of the first layer's jacobian products in a jaxpr.

    Only the arithmetic counts (the layer's product and its activation's chain
    rule): the layout moves at the first mixing operation build the dense jacobian
    of the same shape from the blocks.
    """
    shapes = set()
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name in ("dot_general", "mul"):
            shape = tuple(eqn.outvars[0].aval.shape)
            if len(shape) == 3 and shape[1:] == (N, WIDTH):
                shapes.add(shape)
    return shapes


@pytest.mark.parametrize("f", FUNCTIONS)
@pytest.mark.parametrize("jit", [False, True])
def test_laplacian_default_matches_hessian(f: Callable[..., Any], jit: bool) -> None:
    lap_fn = fwdlap.laplacian(f)
    lap = (jax.jit(lap_fn) if jit else lap_fn)(X)
    np.testing.assert_allclose(lap, reference_laplacian(f, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("f", FUNCTIONS)
def test_value_grad_and_laplacian_default(f: Callable[..., Any]) -> None:
    value, grad, lap = jax.jit(fwdlap.value_grad_and_laplacian(f))(X)
    np.testing.assert_allclose(value, f(X), rtol=1e-6)
    np.testing.assert_allclose(grad, jax.grad(f)(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lap, reference_laplacian(f, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("f", PER_PARTICLE)
def test_default_keeps_first_layer_blocks(f: Callable[..., Any]) -> None:
    blocked = _first_layer_shapes(jax.make_jaxpr(fwdlap.laplacian(f))(X))
    dense = _first_layer_shapes(jax.make_jaxpr(fwdlap.laplacian(f, sparsity=False))(X))
    assert (3 * N, N, WIDTH) in dense
    assert (3, N, WIDTH) in blocked
    assert (3 * N, N, WIDTH) not in blocked


@pytest.mark.parametrize("f", PER_PARTICLE)
def test_lap_with_jnp_eye_under_jit_keeps_blocks(f: Callable[..., Any]) -> None:
    def lap_fn(x: jax.Array) -> jax.Array:
        eye = jnp.eye(x.size, dtype=x.dtype)
        zero = fwdlap.zero_tangent_from_primal(x)
        return fwdlap.lap(f, (x,), (eye,), (zero,))[2]

    assert (3, N, WIDTH) in _first_layer_shapes(jax.make_jaxpr(lap_fn)(X))
    lap = jax.jit(jax.vmap(lap_fn))(jnp.stack([X, 2 * X]))
    expected = [reference_laplacian(f, X), reference_laplacian(f, 2 * X)]
    np.testing.assert_allclose(lap, jnp.stack(expected), rtol=1e-5, atol=1e-6)


def test_lap_with_dense_directions_is_dense() -> None:
    f = per_particle_then_mean
    dirs = jnp.asarray(RNG.normal(size=(4, 3 * N)))
    zero = fwdlap.zero_tangent_from_primal(X)
    jaxpr = jax.make_jaxpr(lambda x: fwdlap.lap(f, (x,), (dirs,), (zero,)))(X)
    assert (4, N, WIDTH) in _first_layer_shapes(jaxpr)
    _, _, lap = fwdlap.lap(f, (X,), (dirs,), (zero,))
    expected = jnp.einsum("ki,ij,kj->", dirs, jax.hessian(f)(X), dirs)
    np.testing.assert_allclose(lap, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("f", [*FUNCTIONS, pair_stream])
def test_default_reports_nothing(f: Callable[..., Any]) -> None:
    with (
        warnings.catch_warnings(),
        fwdlap.record_densifications() as events,
    ):
        warnings.simplefilter("error")
        fwdlap.laplacian(f)(X)
        fwdlap.value_grad_and_laplacian(f)(X)
    assert events == []


@pytest.mark.parametrize("f", PER_PARTICLE)
def test_grad_through_default_laplacian(f: Callable[..., Any]) -> None:
    def loss(w: jax.Array, lap_of: Callable[..., Any]) -> jax.Array:
        return lap_of(lambda x: f(x * w))(X)

    def hessian_lap(g: Callable[..., Any]) -> Callable[..., Any]:
        return lambda x: jnp.trace(jax.hessian(g)(x))

    w = jnp.asarray(1.0 + 0.1 * RNG.normal(size=3 * N))
    grad = jax.grad(loss)(w, fwdlap.laplacian)
    expected = jax.grad(loss)(w, hessian_lap)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_one_particle_is_dense() -> None:
    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(x @ W1) ** 2)

    x = X[:3]
    np.testing.assert_allclose(
        fwdlap.laplacian(f)(x), reference_laplacian(f, x), rtol=1e-5, atol=1e-6
    )


def _pair_layer_rows(jaxpr: Any, n: int) -> set[int]:
    """Row counts of the pair layer's jacobian products `(rows, n, n, PAIR_WIDTH)`."""
    rows = set()
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name in ("dot_general", "mul"):
            shape = tuple(eqn.outvars[0].aval.shape)
            if len(shape) == 4 and shape[1:] == (n, n, PAIR_WIDTH):
                rows.add(shape[0])
    return rows


@pytest.mark.parametrize("jit", [False, True])
def test_pair_stream_matches_hessian(jit: bool) -> None:
    lap_fn = fwdlap.laplacian(pair_stream)
    lap = (jax.jit(lap_fn) if jit else lap_fn)(X)
    expected = reference_laplacian(pair_stream, X)
    np.testing.assert_allclose(lap, expected, rtol=1e-5, atol=1e-6)
    _, grad, lap = jax.jit(fwdlap.value_grad_and_laplacian(pair_stream))(X)
    np.testing.assert_allclose(grad, jax.grad(pair_stream)(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lap, expected, rtol=1e-5, atol=1e-6)


def test_default_keeps_pairs_in_two_blocks() -> None:
    blocked = _pair_layer_rows(jax.make_jaxpr(fwdlap.laplacian(pair_stream))(X), N)
    dense = jax.make_jaxpr(fwdlap.laplacian(pair_stream, sparsity=False))(X)
    assert _pair_layer_rows(dense, N) == {3 * N}
    assert blocked == {2 * 3}


def test_three_particles_make_pairs_dense() -> None:
    # With three particles two blocks are most of the rows: pairs are carried dense.
    x = X[:9]
    rows = _pair_layer_rows(jax.make_jaxpr(fwdlap.laplacian(pair_stream))(x), 3)
    assert rows == {9}
    np.testing.assert_allclose(
        fwdlap.laplacian(pair_stream)(x),
        reference_laplacian(pair_stream, x),
        rtol=1e-5,
        atol=1e-6,
    )
