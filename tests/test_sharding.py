"""fwdlap under data parallelism: jax.jit over NamedSharding batches, and shard_map.

tests/conftest.py sets `--xla_force_host_platform_device_count=4` before JAX starts, so
these run on four simulated CPU devices. Sharded results must equal the unsharded ones
(up to floating-point reassociation) and the `jax.hessian` reference.
"""

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fwdlap

try:  # JAX >= 0.7 exports shard_map at the top level; older: jax.experimental.
    from jax import shard_map
except ImportError:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]

NUM_DEVICES = 4
BATCH = 8
DIM = 6  # two particles in 3-D

RNG = np.random.default_rng(7)
W1 = jnp.asarray(RNG.normal(size=(8, DIM)) / np.sqrt(DIM))
W2 = jnp.asarray(RNG.normal(size=(16, 8)) / np.sqrt(8))
XS = jnp.asarray(RNG.normal(size=(BATCH, DIM)))


def log_psi(x: jax.Array) -> jax.Array:
    """A tiny wavefunction: an MLP feeding a 4x4 determinant, and an envelope."""
    radius = jnp.sqrt(jnp.sum(x**2) + 1.0)
    h = jnp.tanh(W1 @ jnp.concatenate([x[:4], radius[None], x[5:]]))
    orbitals = (W2 @ h).reshape(4, 4) + 2 * jnp.eye(4)
    _, logdet = jnp.linalg.slogdet(orbitals)
    return logdet - 0.5 * radius


def lap_via_lap(x: jax.Array) -> jax.Array:
    _, _, lap = fwdlap.lap(log_psi, (x,), (jnp.eye(DIM),), (jnp.zeros(DIM),))
    return lap


TRANSFORMS = {
    "lap": lap_via_lap,
    "laplacian": fwdlap.laplacian(log_psi),
    "laplacian-chunked": fwdlap.laplacian(log_psi, chunk_size=4),
    "laplacian-weighted": fwdlap.laplacian(log_psi, weights=jnp.arange(1.0, 7.0)),
    "value_grad_and_laplacian": fwdlap.value_grad_and_laplacian(log_psi),
    "value_grad_and_laplacian-chunked": fwdlap.value_grad_and_laplacian(
        log_psi, chunk_size=4
    ),
}


def reference(name: str) -> Any:
    """Per-sample references from jax.grad / jax.hessian (no fwdlap)."""
    if name.startswith("value_grad"):
        return _reference("value_grad_and_laplacian")
    return _reference("laplacian-weighted" if "weighted" in name else "laplacian")


@functools.cache
def _reference(name: str) -> Any:

    def one(x: jax.Array) -> Any:
        hess = jax.hessian(log_psi)(x)
        if name == "laplacian-weighted":
            return jnp.sum(jnp.diag(hess) * jnp.arange(1.0, 7.0))
        if name.startswith("value_grad"):
            value, grad = jax.value_and_grad(log_psi)(x)
            return value, grad, jnp.trace(hess)
        return jnp.trace(hess)

    return jax.jit(jax.vmap(one))(XS)


def make_mesh(kind: str) -> Mesh:
    devices = np.array(jax.devices()[:NUM_DEVICES])
    if kind == "explicit" and hasattr(jax.sharding, "AxisType"):
        explicit = jax.sharding.AxisType.Explicit
        return Mesh(devices, ("batch",), axis_types=(explicit,))
    return Mesh(devices, ("batch",))


def assert_tree_close(got: Any, want: Any, rtol: float = 1e-12, atol: float = 1e-12):
    for g, w in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def test_four_devices():
    assert len(jax.devices()) >= NUM_DEVICES


@pytest.mark.parametrize(
    ("name", "mesh_kind"),
    [
        ("lap", "auto"),
        ("laplacian", "explicit"),
        ("laplacian-chunked", "auto"),
        ("laplacian-weighted", "explicit"),
        ("value_grad_and_laplacian-chunked", "explicit"),
    ],
)
def test_jit_over_named_sharding(name: str, mesh_kind: str):
    fn = jax.jit(jax.vmap(TRANSFORMS[name]))
    unsharded = fn(XS)
    mesh = make_mesh(mesh_kind)
    xs = jax.device_put(XS, NamedSharding(mesh, PartitionSpec("batch")))
    # Explicitly sharded axes need the mesh in context (as for any JAX transform).
    with jax.set_mesh(mesh) if mesh_kind == "explicit" else contextlib.nullcontext():
        sharded = fn(xs)
    for leaf in jax.tree_util.tree_leaves(sharded):
        assert isinstance(leaf.sharding, NamedSharding)
        assert leaf.sharding.spec[0] == "batch"
        assert len(leaf.sharding.device_set) == NUM_DEVICES
    assert_tree_close(sharded, unsharded)
    assert_tree_close(sharded, reference(name), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["lap", "laplacian-chunked"])
def test_shard_map(name: str):
    mesh = make_mesh("auto")
    spec = PartitionSpec("batch")
    fn = jax.jit(
        shard_map(jax.vmap(TRANSFORMS[name]), mesh=mesh, in_specs=spec, out_specs=spec)
    )
    sharded = fn(jax.device_put(XS, NamedSharding(mesh, spec)))
    assert_tree_close(sharded, jax.jit(jax.vmap(TRANSFORMS[name]))(XS))
    assert_tree_close(sharded, reference(name), rtol=1e-9, atol=1e-10)


def test_shard_map_mean_kinetic_energy_with_psum():
    mesh = make_mesh("auto")
    spec = PartitionSpec("batch")
    vgl = jax.vmap(fwdlap.value_grad_and_laplacian(log_psi))

    def local_mean_energy(xs: jax.Array) -> jax.Array:
        _, grad, lap = vgl(xs)
        kinetic = -0.5 * (lap + jnp.sum(grad**2, axis=-1))
        return jax.lax.psum(jnp.sum(kinetic), "batch") / BATCH

    fn = jax.jit(
        shard_map(
            local_mean_energy, mesh=mesh, in_specs=spec, out_specs=PartitionSpec()
        )
    )
    got = fn(jax.device_put(XS, NamedSharding(mesh, spec)))
    _, grads, laps = reference("value_grad_and_laplacian")
    want = jnp.mean(-0.5 * (laps + jnp.sum(grads**2, axis=-1)))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_shard_map_lap_partial_blocks_in_fori_loop():
    """The original fwdlap's chunked pattern inside shard_map: `lap_pe` gets seeds
    built from `jnp.eye` (not device-varying) although it was traced for jacobians
    that vary like the sharded primal."""
    mesh = make_mesh("auto")
    spec = PartitionSpec("batch")
    block = 2

    def one(x: jax.Array) -> jax.Array:
        eye = jnp.eye(DIM)
        zero = fwdlap.zero_tangent_from_primal(x)
        _, lap_pe = fwdlap.lap_partial(log_psi, (x,), (eye[:block],), (zero,))

        def body(i: Any, acc: jax.Array) -> jax.Array:
            rows = jax.lax.dynamic_slice_in_dim(eye, i * block, block)
            _, lap = lap_pe((rows,), (zero,))
            return acc + lap

        return jax.lax.fori_loop(0, DIM // block, body, jnp.zeros_like(x[0]))

    fn = jax.jit(shard_map(jax.vmap(one), mesh=mesh, in_specs=spec, out_specs=spec))
    sharded = fn(jax.device_put(XS, NamedSharding(mesh, spec)))
    assert_tree_close(sharded, reference("laplacian"), rtol=1e-9, atol=1e-10)


N_PARTICLES = 4
NUCLEI = jnp.asarray(RNG.normal(size=(2, 3)))
W_FEATURES = jnp.asarray(RNG.normal(size=(4, 8)) / 2.0)
W_ORBITALS = jnp.asarray(RNG.normal(size=(8, N_PARTICLES)) / np.sqrt(8))
WALKERS = jnp.asarray(RNG.normal(size=(BATCH, 3 * N_PARTICLES)))


def log_psi_particles(x: jax.Array) -> jax.Array:
    """Per-particle features joined with per-particle distances, then a determinant.

    The concatenation joins a slice of the input (whose jacobian comes from the
    seeds, the same for every walker) with distances (different per walker): the
    particle-block layout must combine the two under an explicitly sharded `vmap`.
    """
    r = x.reshape(N_PARTICLES, 3)
    dist = jnp.linalg.norm(r[:, None, :] - NUCLEI[None], axis=-1)
    features = jnp.concatenate([r[:, :2], dist], axis=-1)
    orbitals = jnp.tanh(features @ W_FEATURES) @ W_ORBITALS
    orbitals = orbitals * jnp.exp(-jnp.sum(dist, axis=-1, keepdims=True))
    return jnp.linalg.slogdet(orbitals)[1]


@pytest.mark.parametrize(
    ("sparsity", "chunk_size"),
    # None: the default's particle blocks; an int chunk_size: windows of particles.
    [(None, None), (True, None), (3, None), (True, 6)],
)
@pytest.mark.parametrize("mesh_kind", ["explicit", "auto"])
def test_particle_blocks_under_a_mesh(sparsity: Any, chunk_size: Any, mesh_kind: str):
    lap = fwdlap.laplacian(log_psi_particles, sparsity=sparsity, chunk_size=chunk_size)
    fn = jax.jit(jax.vmap(lap))
    mesh = make_mesh(mesh_kind)
    walkers = jax.device_put(WALKERS, NamedSharding(mesh, PartitionSpec("batch")))
    with jax.set_mesh(mesh) if mesh_kind == "explicit" else contextlib.nullcontext():
        sharded = fn(walkers)
    assert sharded.sharding.spec[0] == "batch"
    want = jax.vmap(lambda x: jnp.trace(jax.hessian(log_psi_particles)(x)))(WALKERS)
    assert_tree_close(sharded, want, rtol=1e-9, atol=1e-10)
