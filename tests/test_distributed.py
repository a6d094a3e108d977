"""Two processes of JAX's multi-controller runtime compute kinetic energies together.

`examples/distributed_kinetic_energy.py` starts two processes on localhost, connected by
`jax.distributed.initialize` (a coordinator on a free port, gloo CPU collectives),
with one CPU device each. They shard a batch of walkers across both devices, compute
the kinetic energies with `fwdlap.value_grad_and_laplacian` under `jax.jit`, and
process 0 saves what `process_allgather` collected. This test checks those energies
against the same computation in this one process and against `jax.hessian`. The
launcher stops both processes on any failure or timeout.
"""

import importlib.util
import os
import subprocess
import time
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLE = (
    Path(__file__).resolve().parents[1] / "examples" / "distributed_kinetic_energy.py"
)


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distributed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(150)
def test_two_processes_match_one(tmp_path: Path) -> None:
    example = _example()
    out = tmp_path / "energies.npy"
    start = time.monotonic()
    example.launch(2, out, timeout_s=120.0)
    elapsed = time.monotonic() - start
    gathered = np.load(out)
    assert gathered.shape == (example.WALKERS,)

    walkers = jnp.asarray(example.walkers())
    single = np.asarray(jax.jit(jax.vmap(example.kinetic_energy))(walkers))
    np.testing.assert_allclose(gathered, single, rtol=1e-12, atol=1e-12)

    def reference(x: jax.Array) -> jax.Array:
        grad = jax.grad(example.log_psi)(x)
        hess = jax.hessian(example.log_psi)(x)
        return -0.5 * (jnp.trace(hess) + jnp.sum(grad**2))

    exact = np.asarray(jax.jit(jax.vmap(reference))(walkers))
    np.testing.assert_allclose(gathered, exact, rtol=1e-10, atol=1e-10)
    print(f"two processes: {elapsed:.1f} s")


def test_launcher_stops_its_processes_on_timeout(tmp_path: Path) -> None:
    """Workers that cannot finish in time (a second is not enough to start JAX) are
    killed and reaped before `launch` raises."""
    example = _example()
    with pytest.raises(subprocess.TimeoutExpired):
        example.launch(2, tmp_path / "never.npy", timeout_s=1.0)
    assert len(example.launched) == 2
    for pid in example.launched:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no such process: killed and reaped
