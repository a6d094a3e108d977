"""Kinetic energies of a batch of walkers from two processes with one device each.

This is JAX's multi-controller runtime (`jax.distributed`), the way a run spans several
machines: every process runs this same program, `jax.distributed.initialize` connects
them through a coordinator, `jax.devices()` then lists the devices of all processes,
and a `jax.jit` over arrays sharded across them runs each process on its own part of
the batch. fwdlap needs nothing special: `fwdlap.value_grad_and_laplacian` is an
ordinary JAX function, partitioned like any other.

Here both processes run on this machine, talking to a coordinator on a free localhost
port through CPU collectives (gloo). Started without arguments, the script launches
the two processes itself, waits for them (stopping them if they take too long) and
checks what process 0 gathered against a single-process computation of the same
energies:

    python examples/distributed_kinetic_energy.py

On a cluster, start one process per machine with the coordinator's address instead:

    python examples/distributed_kinetic_energy.py --coordinator HOST:PORT \\
        --num-processes N --process-id I --out energies.npy
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Set before JAX starts: avoids a jaxlib 0.10 CPU-backend hang on small machines (see
# the installation page of the documentation).
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fwdlap  # noqa: E402

jax.config.update("jax_enable_x64", True)

N_ELECTRONS = 3
WALKERS = 8  # in all, split evenly over the processes
TIMEOUT_S = 120.0

launched: list[int] = []
"""Process ids of the workers of the last `launch` (all stopped when it returns)."""


def log_psi(x: jax.Array) -> jax.Array:
    """log|psi| of a small correlated wavefunction of `N_ELECTRONS` electrons."""
    r = x.reshape(N_ELECTRONS, 3)
    nuclear = jnp.sum(jnp.sqrt(jnp.sum(r**2, axis=-1) + 0.5))
    pairs = jnp.sum((r[:, None, :] - r[None, :, :]) ** 2, axis=-1)
    jastrow = jnp.sum(jnp.tanh(pairs)) / 4
    return -nuclear + jastrow + jnp.log(jnp.abs(r[0, 0] - r[1, 1]) + 1.0)


def kinetic_energy(x: jax.Array) -> jax.Array:
    """-1/2 (lap psi) / psi = -1/2 (lap log|psi| + |grad log|psi||^2)."""
    _, grad, lap = fwdlap.value_grad_and_laplacian(log_psi)(x)
    return -0.5 * (lap + jnp.sum(grad**2))


def walkers() -> np.ndarray:
    """The whole batch; every process builds it and keeps its own rows."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(WALKERS, 3 * N_ELECTRONS))


def worker(coordinator: str, num_processes: int, process_id: int, out: Path) -> None:
    """One process of the run: its rows in, all energies out (process 0 saves them)."""
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
    )
    try:
        mesh = Mesh(np.array(jax.devices()), ("walkers",))
        sharding = NamedSharding(mesh, PartitionSpec("walkers"))
        batch = walkers()
        rows = np.array_split(batch, jax.process_count())[jax.process_index()]
        x = jax.make_array_from_process_local_data(sharding, rows, batch.shape)
        energies = jax.jit(jax.vmap(kinetic_energy))(x)
        gathered = np.asarray(multihost_utils.process_allgather(energies, tiled=True))
        if jax.process_index() == 0:
            np.save(out, gathered)
            print(f"{jax.process_count()} processes, {len(jax.devices())} devices")
            print("kinetic energies:", gathered)
    finally:
        jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def launch(num_processes: int, out: Path, timeout_s: float = TIMEOUT_S) -> None:
    """Run `num_processes` workers on this machine; stop them all on any failure."""
    coordinator = f"localhost:{free_port()}"
    env = dict(os.environ)
    # One CPU device per process (drop a simulated device count from the caller).
    flags = env.get("XLA_FLAGS", "").split()
    keep = [f for f in flags if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(keep)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--coordinator",
                coordinator,
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(i),
                "--out",
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(num_processes)
    ]
    launched[:] = [proc.pid for proc in procs]
    deadline = time.monotonic() + timeout_s
    try:
        for i, proc in enumerate(procs):
            left = max(deadline - time.monotonic(), 0.1)
            output, _ = proc.communicate(timeout=left)
            if proc.returncode != 0:
                raise RuntimeError(f"process {i} failed:\n{output}")
            if i == 0:
                print(output, end="")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--out", type=Path, help="where process 0 saves the energies")
    args = parser.parse_args()
    if args.process_id is not None:
        worker(args.coordinator, args.num_processes, args.process_id, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "energies.npy"
        launch(args.num_processes, out)
        gathered = np.load(out)
    # The same energies from one process, and from jax.hessian.
    single = np.asarray(jax.jit(jax.vmap(kinetic_energy))(walkers()))

    def reference(x: jax.Array) -> jax.Array:
        grad, hess = jax.grad(log_psi)(x), jax.hessian(log_psi)(x)
        return -0.5 * (jnp.trace(hess) + jnp.sum(grad**2))

    exact = np.asarray(jax.jit(jax.vmap(reference))(walkers()))
    print("max |two processes - one process|:", np.max(np.abs(gathered - single)))
    np.testing.assert_allclose(gathered, single, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gathered, exact, rtol=1e-10, atol=1e-10)


if __name__ == "__main__":
    main()
