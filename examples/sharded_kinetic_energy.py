"""Data-parallel kinetic energies over a device mesh.

The local kinetic energy of a wavefunction $\\psi$ at electron positions $x$ is

    E_kin(x) = -1/2 (lap psi)(x) / psi(x) = -1/2 (lap log|psi| + |grad log|psi||^2),

and `fwdlap.value_grad_and_laplacian` gives both terms in one forward pass. A batch of
walkers is sharded over all devices with `jax.sharding.NamedSharding`; `jax.jit` then
runs every device on its own slice of the batch, with no communication but the final
mean. The same code runs on one device, on several GPUs of one machine, and on many
machines:

- Run standalone on a CPU, this script simulates four devices (the `XLA_FLAGS` line
  below must run before JAX is imported).
- On several hosts, call `jax.distributed.initialize()` first on every process (with
  the coordinator address, or let the cluster environment supply it). `jax.devices()`
  then lists the devices of all hosts, `jax.make_mesh` builds a global mesh over them,
  and each process feeds its own part of the batch, for example with
  `jax.make_array_from_process_local_data(sharding, local_walkers)`. Nothing else
  changes: fwdlap's transforms are ordinary JAX functions that `jax.jit` partitions.

Run with `python examples/sharded_kinetic_energy.py`.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
# Avoids a jaxlib 0.10 CPU-backend hang on larger vmapped programs (see the
# installation page of the documentation, docs/installation.md).
if "concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import fwdlap  # noqa: E402

# Double precision keeps the sharded-versus-unsharded check below tight: near the nodes
# of psi the two terms of the kinetic energy cancel. float32 runs the same way.
jax.config.update("jax_enable_x64", True)

N_ELECTRONS = 4
DIM = 3 * N_ELECTRONS
HIDDEN = 32
WALKERS_PER_DEVICE = 16


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (HIDDEN, 4)) / 2.0,
        "w2": jax.random.normal(k2, (N_ELECTRONS, HIDDEN)) / np.sqrt(HIDDEN),
        "nuclei": jax.random.normal(k3, (2, 3)),
    }


def log_psi(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """log|psi| of a toy Slater-determinant wavefunction with electron features."""
    r = x.reshape(N_ELECTRONS, 3)
    dist = jnp.linalg.norm(r[:, None, :] - params["nuclei"][None], axis=-1)  # (N, 2)
    features = jnp.concatenate([r[:, :2], dist], axis=-1)  # (N, 4)
    h = jnp.tanh(features @ params["w1"].T)  # (N, HIDDEN)
    orbitals = (h @ params["w2"].T) * jnp.exp(-jnp.sum(dist, axis=-1, keepdims=True))
    _, logdet = jnp.linalg.slogdet(orbitals)  # (N, N)
    return logdet


def local_kinetic_energy(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    _, grad, lap = fwdlap.value_grad_and_laplacian(log_psi, argnums=1)(params, x)
    return -0.5 * (lap + jnp.sum(grad**2))


@jax.jit
def kinetic_energies(params: dict[str, jax.Array], walkers: jax.Array) -> jax.Array:
    return jax.vmap(local_kinetic_energy, in_axes=(None, 0))(params, walkers)


def main() -> None:
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("walkers",))
    batch = WALKERS_PER_DEVICE * len(devices)
    params = jax.tree.map(np.asarray, init_params(jax.random.key(0)))
    walkers = np.asarray(jax.random.normal(jax.random.key(1), (batch, DIM)))

    # Shard the walkers over the mesh; the parameters are replicated.
    sharded = jax.device_put(walkers, NamedSharding(mesh, PartitionSpec("walkers")))
    replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    start = time.perf_counter()
    # `jax.make_mesh` gives explicitly sharded axes: JAX wants the mesh in context.
    with jax.set_mesh(mesh):
        energies = kinetic_energies(replicated, sharded).block_until_ready()
    elapsed = time.perf_counter() - start
    print(f"{len(devices)} devices, {batch} walkers: {elapsed:.2f} s (with compile)")
    print("output sharding:", energies.sharding.spec)
    print("mean kinetic energy:", float(jnp.mean(energies)))

    # The same computation on one device gives the same numbers.
    unsharded = np.asarray(kinetic_energies(params, walkers))
    difference = float(np.max(np.abs(np.asarray(energies) - unsharded)))
    print("max |sharded - unsharded|:", difference)
    assert difference <= 1e-9 * float(np.max(np.abs(unsharded)))


if __name__ == "__main__":
    main()
