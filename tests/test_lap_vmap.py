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
    reference_laplacian,
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


# --- transformations inside the function, in every mode of `fwdlap.laplacian` ------

N_INNER = 5
W_INNER = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)))


def _inner_mlp(r: jax.Array) -> jax.Array:
    return jnp.tanh(r @ W_INNER)


def vmap_moved_axes(x: jax.Array) -> jax.Array:
    coords = x.reshape(N_INNER, 3).T  # (3, N): vmapped over axis 1, out on axis 1
    h = jax.vmap(_inner_mlp, in_axes=1, out_axes=1)(coords)
    return jnp.sum(jnp.sin(h) * jnp.arange(4.0 * N_INNER).reshape(4, N_INNER))


def vmap_softmax_moved_axes(x: jax.Array) -> jax.Array:
    h = jax.vmap(_inner_mlp)(x.reshape(N_INNER, 3))  # (N, 4)
    soft = jax.vmap(jax.nn.softmax, in_axes=1, out_axes=0)(h * h[0])  # (4, N)
    return jnp.sum(jnp.cos(soft) * jnp.arange(4.0 * N_INNER).reshape(4, N_INNER))


def vmap_logsumexp_and_log_softmax(x: jax.Array) -> jax.Array:
    h = jax.vmap(_inner_mlp)(x.reshape(N_INNER, 3))
    lse = jax.vmap(jax.nn.logsumexp, in_axes=1)(h * h[1])
    logp = jax.vmap(jax.nn.log_softmax, in_axes=1, out_axes=1)(h)
    return jnp.sum(jnp.sin(lse)) + jnp.sum(logp * jnp.arange(4.0))


def vmap_slogdet_rows(x: jax.Array) -> jax.Array:
    r = x.reshape(N_INNER, 3)
    scale = jnp.arange(1.0, N_INNER + 1.0)
    orbitals = jax.vmap(lambda ri: jnp.tanh(jnp.sum(ri) * scale + ri[0]))(r)
    return jnp.linalg.slogdet(orbitals + 2.0 * jnp.eye(N_INNER))[1]


def vmap_det_batch_last(x: jax.Array) -> jax.Array:
    mats = jnp.tanh(x[:12].reshape(2, 2, 3)) + 2.0 * jnp.eye(2)[..., None]
    return jnp.sum(jnp.sin(jax.vmap(jnp.linalg.det, in_axes=2)(mats)))


def vmap_scan_per_particle(x: jax.Array) -> jax.Array:
    mix = W_INNER @ W_INNER.T * 0.3

    def per(r: jax.Array) -> jax.Array:
        step = lambda c, _: (jnp.tanh(c @ mix) + c, None)  # noqa: E731
        return lax.scan(step, r, None, length=3)[0]

    return jnp.sum(jax.vmap(per)(x.reshape(N_INNER, 3)) ** 2)


def vmap_while_batched_predicate(x: jax.Array) -> jax.Array:
    # The trip count depends on the particle: vmap gives the loop an array predicate.
    def per(r: jax.Array) -> jax.Array:
        def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            return jnp.tanh(c[0] * 1.3 + r), c[1] + 1

        steps = 2 + (r[0] > 0)
        return lax.while_loop(lambda c: c[1] < steps, body, (r, jnp.asarray(0)))[0]

    return jnp.sum(jax.vmap(per)(x.reshape(N_INNER, 3)) ** 2)


def vmap_custom_jvp_moved_axes(x: jax.Array) -> jax.Array:
    @jax.custom_jvp
    def u_sin_u(u: jax.Array) -> jax.Array:
        return jnp.sin(u) * u

    @u_sin_u.defjvp
    def _(primals: Any, tangents: Any) -> Any:
        (u,), (t,) = primals, tangents
        return u_sin_u(u), (jnp.cos(u) * u + jnp.sin(u)) * t

    out = jax.vmap(u_sin_u, in_axes=1, out_axes=0)(x.reshape(N_INNER, 3))
    return jnp.sum(out * jnp.arange(3.0 * N_INNER).reshape(3, N_INNER))


def grad_and_checkpoint_inside(x: jax.Array) -> jax.Array:
    def energy(y: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(y) ** 2 * jnp.arange(y.size))

    feats = jax.checkpoint(lambda y: jnp.tanh(y.reshape(N_INNER, 3) @ W_INNER))(x)
    return jnp.sum(jax.grad(energy)(x) ** 2) + jnp.sum(feats**2)


def jvp_hessian_and_map_inside(x: jax.Array) -> jax.Array:
    def inner(y: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(y[:3]) * y[3:6] ** 2)

    along = jax.jvp(lambda y: jnp.sum(jnp.exp(jnp.sin(y))), (x,), (jnp.cos(x),))[1]
    curvature = jnp.trace(jax.hessian(inner)(x))
    mapped = lax.map(lambda r: jnp.prod(jnp.tanh(r)), x.reshape(N_INNER, 3))
    return along + curvature * jnp.sum(x**2) + jnp.sum(mapped)


def equinox_attention(x: jax.Array) -> jax.Array:
    import equinox as eqx

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    embed = eqx.nn.Linear(3, 8, key=keys[0], dtype=jnp.float64)
    attention = eqx.nn.MultiheadAttention(2, 8, key=keys[1], dtype=jnp.float64)
    mlp = eqx.nn.MLP(
        8, 1, 16, 2, activation=jax.nn.gelu, key=keys[2], dtype=jnp.float64
    )
    h = jax.vmap(embed)(x.reshape(N_INNER, 3))
    h = jax.vmap(eqx.nn.LayerNorm(8, dtype=jnp.float64))(h + attention(h, h, h))
    return jnp.sum(jax.vmap(mlp)(h))


INNER = [
    vmap_moved_axes,
    vmap_softmax_moved_axes,
    vmap_logsumexp_and_log_softmax,
    vmap_slogdet_rows,
    vmap_det_batch_last,
    vmap_scan_per_particle,
    vmap_while_batched_predicate,
    vmap_custom_jvp_moved_axes,
    grad_and_checkpoint_inside,
    jvp_hessian_and_map_inside,
    equinox_attention,
]
MODES = {
    "dense": {},
    "chunked": {"chunk_size": 4},
    "sparse": {"sparsity": True},
    "sparse_windows": {"sparsity": True, "chunk_size": 6},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fun", INNER, ids=[f.__name__ for f in INNER])
def test_transforms_inside_fun(fun: Any, mode: str) -> None:
    # vmap may move the batch axis between a primitive's input and output (the
    # softmax rule used to assume one layout), so the functions vmap over axis 1.
    x = jnp.asarray(np.random.default_rng(4).normal(size=3 * N_INNER))
    got = jax.jit(fwdlap.laplacian(fun, **MODES[mode]))(x)
    want = reference_laplacian(fun, x)  # forward-over-forward: jax.hessian has no while
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
