"""jax.vmap outside fwdlap.lap (a batch of configurations) and inside the function.

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f))),
vmapped the same way, and jax.hessian for directional seeds.
"""

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
    reference_values,
    tree_allclose,
)

W = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8], [0.4, 0.4, 0.1]])
BATCH = np.array(
    [[0.3, -0.7, 1.1], [0.9, 0.2, -0.4], [-1.2, 0.5, 0.05], [0.1, 0.1, -0.8]]
)  # (4, 3): a batch of four configurations


def _lap(fun: Any, x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


def _mlp(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(W.T @ jnp.tanh(W @ x)) ** 2)


def _with_loops(x: jax.Array) -> jax.Array:
    # A while loop whose trip count differs across the batch, a cond whose branch
    # differs, and a scan: their batching rules meet fwdlap's tangents.
    def cond(c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jnp.sum(c[1] ** 2) < 20.0

    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return c[0] + 1, c[1] * (1.3 + 0.1 * jnp.sin(x))

    n, v = lax.while_loop(cond, body, (jnp.asarray(0), x + 1.5))
    v = lax.cond(x[0] > 0, lambda a: jnp.tanh(a) * x, lambda a: a**2, v)
    v, _ = lax.scan(lambda c, w: (jnp.sin(c * w) + c, None), v, jnp.asarray(W))
    return v / n


@pytest.mark.parametrize("fun", [_mlp, _with_loops], ids=["mlp", "loops"])
def test_vmap_outside_lap(fun: Any) -> None:
    xs = jnp.asarray(BATCH)
    out, jac, lap = jax.jit(jax.vmap(lambda x: _lap(fun, x)))(xs)
    ref_out, ref_jac, ref_lap = jax.jit(
        jax.vmap(reference_values, (None, 0)), static_argnums=0
    )(fun, xs)
    assert jac.shape == (4, *ref_jac.shape[1:])
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap)


def test_vmap_outside_lap_eager() -> None:
    xs = jnp.asarray(BATCH)
    out, jac, lap = jax.vmap(lambda x: _lap(_mlp, x))(xs)
    for i in range(xs.shape[0]):
        ref_out, ref_jac, ref_lap = reference_triple(_mlp, xs[i])
        assert tree_allclose(out[i], ref_out)
        assert tree_allclose(jac[i], ref_jac)
        assert tree_allclose(lap[i], ref_lap)


def test_vmap_over_some_arguments() -> None:
    # Configurations batched, parameters shared (in_axes None) and carrying no tangent.
    xs, w = jnp.asarray(BATCH), jnp.asarray(W)
    fun = lambda x, w: jnp.sum(jnp.sin(w @ x) * jnp.cos(x[0]))

    def one(x: jax.Array, w: jax.Array) -> Any:
        return fwdlap.lap(fun, (x, w), (identity_jacobian(x), None), (None, None))

    out, jac, lap = jax.jit(jax.vmap(one, in_axes=(0, None)))(xs, w)
    for i in range(xs.shape[0]):
        ref_out, ref_jac, ref_lap = reference_triple(lambda x: fun(x, w), xs[i])
        assert tree_allclose(out[i], ref_out)
        assert tree_allclose(jac[i], ref_jac)
        assert tree_allclose(lap[i], ref_lap)


def _per_particle(x: jax.Array) -> jax.Array:
    # vmap inside the function: a per-particle feature, then a pairwise sum.
    particles = x.reshape(2, 3)
    feats = jax.vmap(lambda p: jnp.tanh(W @ p))(particles)  # (2, 4)
    pair = jax.vmap(lambda a: jax.vmap(lambda b: jnp.sum((a - b) ** 2))(particles))(
        particles
    )
    return jnp.sum(feats[0] * feats[1]) + jnp.sum(jnp.sqrt(pair + 1.0))


def test_vmap_inside_fun() -> None:
    x = jnp.asarray(BATCH[:2].ravel())
    out, jac, lap = jax.jit(lambda x: _lap(_per_particle, x))(x)
    assert_matches_reference((out, jac, lap), _per_particle, x)


def test_vmap_inside_and_outside() -> None:
    xs = jnp.asarray(BATCH.reshape(2, 6))
    out, jac, lap = jax.jit(jax.vmap(lambda x: _lap(_per_particle, x)))(xs)
    for i in range(xs.shape[0]):
        ref_out, ref_jac, ref_lap = reference_triple(_per_particle, xs[i])
        assert tree_allclose(out[i], ref_out)
        assert tree_allclose(jac[i], ref_jac)
        assert tree_allclose(lap[i], ref_lap)


def test_vmap_over_directions() -> None:
    # One direction per vmapped call: each gives v^T H v; the sum over all directions of
    # an orthonormal basis is the Laplacian.
    x = jnp.asarray(BATCH[0])
    vs = jnp.linalg.qr(jnp.asarray(W[:3] + np.eye(3)))[0].T  # orthonormal rows

    def one(v: jax.Array) -> Any:
        return fwdlap.lap(_mlp, (x,), (v[None],), (None,))[2]

    per_dir = jax.jit(jax.vmap(one))(vs)
    hess = jax.hessian(_mlp)(x)
    assert tree_allclose(per_dir, jnp.einsum("ki,ij,kj->k", vs, hess, vs))
    assert tree_allclose(per_dir.sum(), jnp.trace(hess))
