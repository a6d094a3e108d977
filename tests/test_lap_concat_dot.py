"""Products of concatenated and broadcast operands, computed part by part.

`concatenate([h, broadcast(mean)]) @ w` is computed as `h @ w1 + broadcast(mean @ w2)`
inside the trace (FermiNet's layer inputs). References: `reference_triple` (jax.jacfwd
and the trace of jax.jacfwd(jax.jacfwd(f))), `jax.hessian` and `jax.grad`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import assert_matches_reference, identity_jacobian

N, F, OUT = 4, 3, 5
RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(4 * F, OUT)))
X = jnp.asarray(RNG.normal(size=N * F))


def _lap(fun: Callable[[jax.Array], Any], x: jax.Array, **kwargs: Any) -> Any:
    # The dense pass whose products are under test, without the default's particle
    # blocks before the first mixing operation.
    kwargs.setdefault("sparsity", False)
    return fwdlap.lap(
        fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),), **kwargs
    )


def _features(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-particle features `(N, F)` and their means over the particles `(F,)`."""
    h = jnp.tanh(x.reshape(N, F) * jnp.arange(1.0, F + 1))
    return h, jnp.mean(h, axis=0)


def ferminet_layer(x: jax.Array) -> jax.Array:
    """Concatenated per-particle features and broadcast means, then a dense layer."""
    h, m = _features(x)
    spread = jnp.broadcast_to(m, h.shape)
    squares = jnp.broadcast_to(jnp.sum(h**2, axis=0), h.shape)
    g = jnp.concatenate([h, spread, squares, h**2], axis=-1)
    return jnp.sum(jnp.tanh(g @ W)) + jnp.sum(g[:, :F] ** 3)


def weights_on_the_left(x: jax.Array) -> jax.Array:
    """The concatenation as the right operand, contracted over its first axis."""
    h, m = _features(x)
    g = jnp.concatenate([h.T, jnp.broadcast_to(m[:, None], (F, N))], axis=0)
    return jnp.sum(jnp.sin(W[: 2 * F].T @ g))


def expanded_unit_axis(x: jax.Array) -> jax.Array:
    """A broadcast that expands a size-1 axis (keepdims means)."""
    h = jnp.tanh(x.reshape(N, F))
    m = jnp.mean(h, axis=0, keepdims=True)
    g = jnp.concatenate([h, lax.broadcast_in_dim(m, (N, F), (0, 1))], axis=1)
    return jnp.sum(jnp.cos(g @ W[: 2 * F]))


def broadcast_along_contraction(x: jax.Array) -> jax.Array:
    """The contracted axis is the broadcast one: nothing to split, still exact."""
    h, m = _features(x)
    g = jnp.broadcast_to(m[:, None], (F, N))
    return jnp.sum(jnp.tanh(g @ h))


def concatenated_free_axis(x: jax.Array) -> jax.Array:
    """Concatenated along an axis that is not contracted: nothing to split."""
    h, m = _features(x)
    g = jnp.concatenate([h, jnp.broadcast_to(m, (2, F))], axis=0)
    return jnp.sum(jnp.tanh(g @ W[:F]))


def batched_product(x: jax.Array) -> jax.Array:
    """A product with batch dimensions: left as one product."""
    h, m = _features(x)
    g = jnp.concatenate([h, jnp.broadcast_to(m, h.shape)], axis=-1)
    return jnp.sum(jnp.einsum("nf,nf->n", g, jnp.tanh(g)) ** 2)


def weights_from_x(x: jax.Array) -> jax.Array:
    """Both operands depend on `x`: the slices of the weights carry tangents too."""
    h, m = _features(x)
    g = jnp.concatenate([h, jnp.broadcast_to(m, h.shape)], axis=-1)
    w = jnp.sin(jnp.outer(jnp.arange(2.0 * F), x[:OUT]))
    return jnp.sum(jnp.tanh(g @ w))


def _spread(m: jax.Array, how: str) -> jax.Array:
    """The means `(F,)` copied to every particle `(N, F)`, in one of the usual ways."""
    row = m[None]
    if how == "tile":
        return jnp.tile(row, (N, 1))
    if how == "tile_of_vector":
        return jnp.tile(m, (N, 1))
    if how == "repeat":
        return jnp.repeat(row, N, axis=0)
    if how == "broadcast_to":
        return jnp.broadcast_to(m, (N, F))
    if how == "expand_dims_concatenate":
        return jnp.concatenate([jnp.expand_dims(m, 0)] * N, axis=0)
    if how == "index_array":
        return row[jnp.zeros(N, jnp.int32)]
    if how == "ones_times":
        return jnp.ones((N, 1)) * row
    raise ValueError(how)


SPREADS = [
    "tile",
    "tile_of_vector",
    "repeat",
    "broadcast_to",
    "expand_dims_concatenate",
    "index_array",
    "ones_times",
]


def spread_layer(how: str) -> Callable[[jax.Array], jax.Array]:
    """FermiNet's layer input, the means copied to the particles in the way `how`."""

    def fun(x: jax.Array) -> jax.Array:
        h, m = _features(x)
        g = jnp.concatenate([h, _spread(m, how), _spread(m**2, how)], axis=-1)
        return jnp.sum(jnp.tanh(g @ W[: 3 * F]))

    fun.__name__ = f"spread_{how}"
    return fun


def repeated_rows(x: jax.Array) -> jax.Array:
    """Rows concatenated along a free axis, some of them the same value."""
    h, m = _features(x)
    row = m[None]
    g = jnp.concatenate([row, h[:1], row, row], axis=0)
    return jnp.sum(jnp.tanh(g @ W[:F]))


def scaled_by_a_traced_column(x: jax.Array) -> jax.Array:
    """`c * m` with a tangent-carrying `c` constant along the contracted axis."""
    h, m = _features(x)
    c = jnp.sin(x[:N])[:, None]
    return jnp.sum(jnp.tanh((c * m[None]) @ W[:F]) * h[:, :1])


FUNCTIONS = [
    ferminet_layer,
    weights_on_the_left,
    expanded_unit_axis,
    broadcast_along_contraction,
    concatenated_free_axis,
    batched_product,
    weights_from_x,
    *(spread_layer(how) for how in SPREADS),
    repeated_rows,
    scaled_by_a_traced_column,
]


@pytest.mark.parametrize("fun", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_matches_reference(fun: Callable[[jax.Array], jax.Array]) -> None:
    assert_matches_reference(jax.jit(lambda x: _lap(fun, x))(X), fun, X)


def _dot_lhs_shapes(fun: Callable[[jax.Array], Any]) -> list[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(lambda x: _lap(fun, x))(X)
    return [
        tuple(eqn.invars[0].aval.shape)
        for eqn in jaxpr.eqns
        if eqn.primitive is lax.dot_general_p
    ]


def _rows(shapes: list[tuple[int, ...]], *value_shape: int) -> list[int]:
    """How many rows each product of a value had (sorted).

    A product with constant weights takes the value and its laplacian as one stack
    of 2 rows and its `n` directions as another (`n + 1` rows with the laplacian
    under `lap_partial`).
    """
    k = len(value_shape)
    return sorted(s[0] for s in shapes if len(s) == k + 1 and s[1:] == value_shape)


def test_broadcast_means_are_multiplied_before_broadcasting() -> None:
    shapes = _dot_lhs_shapes(ferminet_layer)
    n = X.size
    # The means (F,) are multiplied with their jacobian's n rows (and laplacian) ...
    assert any(n <= r <= n + 2 for r in _rows(shapes, F)), shapes
    # ... and no product sees the whole concatenation of 4F features.
    assert not any(s[-1] == 4 * F for s in shapes), shapes


@pytest.mark.parametrize("how", SPREADS)
def test_every_way_of_copying_means_is_multiplied_before_copying(how: str) -> None:
    shapes = _dot_lhs_shapes(spread_layer(how))
    n = X.size
    means = _rows(shapes, F) + _rows(shapes, 1, F)
    assert any(n <= r <= n + 2 for r in means), shapes
    # No product sees the means copied to every particle: only the per-particle
    # features `h` are multiplied at full size: value and laplacian, then directions.
    assert not any(s[-1] == 3 * F for s in shapes), shapes
    assert _rows(shapes, N, F) == [2, n], shapes


def test_no_split_without_a_cheap_broadcast() -> None:
    def plain(x: jax.Array) -> jax.Array:
        h, _ = _features(x)
        return jnp.sum(jnp.tanh(jnp.concatenate([h, h**2], axis=-1) @ W[: 2 * F]))

    assert all(s[-1] == 2 * F for s in _dot_lhs_shapes(plain))
    assert_matches_reference(_lap(plain, X), plain, X)


def test_user_jit_is_not_inlined() -> None:
    # Only jnp's `jit(inline=True)` helpers are inlined; a user's jit stays a call.
    inner = jax.jit(lambda x: jnp.tanh(x) @ W[:F])

    def fun(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(inner(x.reshape(N, F))))

    jaxpr = jax.make_jaxpr(lambda x: _lap(fun, x))(X)
    assert any(eqn.primitive.name in ("pjit", "jit") for eqn in jaxpr.eqns)
    assert_matches_reference(_lap(fun, X), fun, X)


def test_sparse_mode_matches_hessian() -> None:
    x = np.asarray(X)

    def run(x: jax.Array) -> Any:
        got = fwdlap.value_grad_and_laplacian(ferminet_layer, sparsity=True)(x)
        want = (
            ferminet_layer(x),
            jax.grad(ferminet_layer)(x),
            jnp.trace(jax.hessian(ferminet_layer)(x)),
        )
        return got, want

    got, want = jax.jit(run)(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_and_grad_with_respect_to_weights() -> None:
    def model(w: jax.Array, x: jax.Array) -> jax.Array:
        h, m = _features(x)
        g = jnp.concatenate([h, jnp.broadcast_to(m, h.shape)], axis=-1)
        return jnp.sum(jnp.tanh(g @ w))

    def kinetic(w: jax.Array, xs: jax.Array) -> jax.Array:
        laps = jax.vmap(lambda x: fwdlap.laplacian(lambda x: model(w, x))(x))(xs)
        return jnp.sum(laps)

    def reference(w: jax.Array, xs: jax.Array) -> jax.Array:
        return jnp.sum(
            jax.vmap(lambda x: jnp.trace(jax.hessian(lambda x: model(w, x))(x)))(xs)
        )

    xs = jnp.stack([X, 0.5 * X])
    w = W[: 2 * F]
    np.testing.assert_allclose(
        jax.jit(jax.grad(kinetic))(w, xs), jax.grad(reference)(w, xs), rtol=1e-9
    )
