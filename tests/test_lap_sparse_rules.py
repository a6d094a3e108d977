"""Sparse rules for tile, pad with a traced padding value, scatter-min/max and solves.

Each function mixes particles only through the primitive under test, so the sparse
mode must keep it block-sparse: no densification may blame a missing rule, and the
results must match the references (`jax.jacfwd` and the trace of
`jax.jacfwd(jax.jacfwd(f))`, from `helpers.reference_values`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import reference_values, tree_allclose

N = 4  # particles in 3D
RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.normal(size=3 * N))
W = jnp.asarray(RNG.normal(size=(3, 5)))


def _features(x: jax.Array) -> jax.Array:
    """Per-particle features `(N, 5)`: row i depends on particle i only."""
    return jnp.tanh(x.reshape(N, 3) @ W)


def tile_rows(x: jax.Array) -> jax.Array:
    h = _features(x)
    return jnp.sin(jnp.tile(h, (2, 3))) * jnp.tile(h[:, :1], (2, 1))


def tile_primitive(x: jax.Array) -> jax.Array:
    h = _features(x)
    return jnp.cos(lax.tile(h[None], (2, 1, 1)))


def pad_with_traced_value(x: jax.Array) -> jax.Array:
    h = _features(x)
    fill = jnp.sum(h[0] ** 2)  # depends on particle 0
    return jnp.tanh(lax.pad(h, fill, ((1, 1, 0), (0, 2, 1))))


def scatter_max(x: jax.Array) -> jax.Array:
    h = _features(x)
    target = jnp.array([0, 0, 2, 3])  # particles 0 and 1 meet in row 0
    return jnp.sin(h.at[target].max(2.0 * h))


def scatter_min(x: jax.Array) -> jax.Array:
    h = _features(x)
    target = jnp.array([1, 3, 3, 0])
    return jnp.exp(h.at[target].min(h[::-1] - 0.5))


def _small_system(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A 3x3 system built from particles 0 and 1 only, and a right-hand side."""
    r = x.reshape(N, 3)
    a = jnp.eye(3) * 3.0 + jnp.outer(r[0], jnp.tanh(r[1]))
    return a, jnp.sin(r[1])


def solve_small_system(x: jax.Array) -> jax.Array:
    a, b = _small_system(x)
    return jnp.tanh(jnp.linalg.solve(a, b)) + _features(x)[2, :3]


def inverse_small_system(x: jax.Array) -> jax.Array:
    a, _ = _small_system(x)
    return jnp.sum(jnp.linalg.inv(a) ** 2, axis=0) * _features(x)[3, :3]


FUNCTIONS = [
    tile_rows,
    tile_primitive,
    pad_with_traced_value,
    scatter_max,
    scatter_min,
    solve_small_system,
    inverse_small_system,
]
SPARSITIES: dict[str, Any] = {
    "default": True,
    "wide": fwdlap.Sparsity(block_size=3, threshold=3 * N),
}


def _lap(fun: Callable[[jax.Array], Any], x: jax.Array, sparsity: Any) -> Any:
    seed = np.eye(x.size, dtype=np.float64)
    return fwdlap.lap(fun, (x,), (seed,), (None,), sparsity=sparsity)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=list(SPARSITIES))
@pytest.mark.parametrize("fun", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_stays_sparse_and_matches_reference(
    fun: Callable[[jax.Array], Any], sparsity: str
) -> None:
    with fwdlap.record_densifications() as events:
        got = jax.jit(lambda x: _lap(fun, x, SPARSITIES[sparsity]))(X)
    missing = [e for e in events if e.cause == "rule"]
    assert not missing, missing
    if sparsity == "wide":
        assert not events, events
    ref = jax.jit(reference_values, static_argnums=0)(fun, X)
    for name, a, b in zip(("value", "jacobian", "laplacian"), got, ref, strict=True):
        assert tree_allclose(a, b, rtol=1e-9, atol=1e-11), name


def test_solve_of_many_particles_densifies_by_threshold() -> None:
    # A system built from every particle: all-to-all, more blocks than the threshold.
    def fun(x: jax.Array) -> jax.Array:
        r = x.reshape(N, 3)
        a = jnp.eye(N) * 4.0 + jnp.tanh(r @ r.T)
        return jnp.linalg.solve(a, jnp.sin(r[:, 0]))

    with fwdlap.record_densifications() as events:
        got = jax.jit(lambda x: _lap(fun, x, True))(X)
    assert [e.cause for e in events if "solve" in e.primitive] == ["threshold"]
    ref = jax.jit(reference_values, static_argnums=0)(fun, X)
    for a, b in zip(got, ref, strict=True):
        assert tree_allclose(a, b, rtol=1e-9, atol=1e-11)
