"""Local kinetic energies of a small FermiNet-shaped wavefunction with fwdlap.

The local kinetic energy of a wavefunction psi at electron positions x is

    E_kin(x) = -1/2 (nabla^2 log|psi| + |nabla log|psi||^2).

`fwdlap.lap` gives log|psi|, its gradient (the jacobian for identity seeds) and its
Laplacian in one forward pass. This script checks the energies of a batch of
configurations against `jax.hessian` in float64, reports the float32 errors of both
methods (of the Laplacian, and of the energy relative to the size of its two terms),
and prints a small timing table.

Run it with `make demo`.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fwdlap  # noqa: E402

# float64 is on for the correctness check; the timed runs are float32.
jax.config.update("jax_enable_x64", True)

N_UP, N_DOWN = 3, 3
NUCLEI = jnp.array([[0.0, 0.0, -0.7], [0.0, 0.0, 0.7]], dtype=jnp.float32)
HIDDEN = 32


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """Random parameters of a one-layer, FermiNet-shaped wavefunction."""
    n_elec = N_UP + N_DOWN
    k1, k2, k3, k4 = jax.random.split(key, 4)
    n_feat = 4 * len(NUCLEI) + 4  # electron-nucleus features + mean pair features
    return {
        "w1": jax.random.normal(k1, (n_feat, HIDDEN)) / jnp.sqrt(n_feat),
        "w_orb": jax.random.normal(k2, (HIDDEN, n_elec)) / jnp.sqrt(HIDDEN),
        "sigma": 1.0 + 0.1 * jax.random.uniform(k3, (len(NUCLEI), n_elec)),
        "pi": 1.0 + 0.1 * jax.random.uniform(k4, (len(NUCLEI), n_elec)),
    }


def log_psi(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """log|psi| for flat electron coordinates `x` of shape (3 * n_electrons,)."""
    r = x.reshape(-1, 3)
    n_elec = r.shape[0]
    # One-electron stream: displacements from, and distances to, each nucleus.
    r_en = r[:, None, :] - NUCLEI[None, :, :]
    d_en = jnp.sqrt(jnp.sum(r_en**2, axis=-1, keepdims=True))
    one = jnp.concatenate([r_en, d_en], axis=-1).reshape(n_elec, -1)
    # Two-electron stream, averaged over partners (a smooth norm avoids the diagonal).
    r_ee = r[:, None, :] - r[None, :, :]
    d_ee = jnp.sqrt(jnp.sum(r_ee**2, axis=-1, keepdims=True) + 1e-2)
    two = jnp.concatenate([r_ee, d_ee], axis=-1).mean(axis=1)
    h = jnp.tanh(jnp.concatenate([one, two], axis=-1) @ params["w1"])
    # Orbitals with exponential envelopes, then one determinant per spin block.
    envelope = jnp.sum(
        params["pi"][None] * jnp.exp(-params["sigma"][None] * d_en), axis=1
    )
    orbitals = (h @ params["w_orb"]) * envelope
    up = orbitals[:N_UP, :N_UP]
    down = orbitals[N_UP:, N_UP:]
    return jnp.linalg.slogdet(up)[1] + jnp.linalg.slogdet(down)[1]


def laplacian_terms_fwdlap(
    params: dict[str, jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The Laplacian and |grad|^2 of log|psi|, in one forward-Laplacian pass."""
    eye = jnp.eye(x.size, dtype=x.dtype)
    zero = fwdlap.zero_tangent_from_primal(x)
    _, grad, lap = fwdlap.lap(lambda y: log_psi(params, y), (x,), (eye,), (zero,))
    return lap, jnp.sum(grad**2)


def laplacian_terms_hessian(
    params: dict[str, jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The same two terms from `jax.hessian` and `jax.grad`: the reference."""
    f = lambda y: log_psi(params, y)
    return jnp.trace(jax.hessian(f)(x)), jnp.sum(jax.grad(f)(x) ** 2)


def kinetic_energy_fwdlap(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """-1/2 (laplacian + |grad|^2) of log|psi|, in one forward-Laplacian pass."""
    lap, grad_squared = laplacian_terms_fwdlap(params, x)
    return -0.5 * (lap + grad_squared)


def kinetic_energy_hessian(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The same energy from `jax.hessian` and `jax.grad`: the reference."""
    lap, grad_squared = laplacian_terms_hessian(params, x)
    return -0.5 * (lap + grad_squared)


def time_call(fn, *args, repeats: int = 10) -> float:
    """Median wall time of a compiled call, in milliseconds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def relative_error(energies: jax.Array, reference: jax.Array) -> float:
    return float(jnp.max(jnp.abs(energies - reference) / (1 + jnp.abs(reference))))


def float32_errors(terms, params, batch, reference) -> tuple[float, float]:
    """Worst float32 errors of the Laplacian and of the energy, against float64.

    Each is relative to the size of what it is computed from: the Laplacian to its
    own size, the energy to the size of its two terms. Near a node of psi both terms
    are large and cancel, so any float32 method's energy is off by about float32's
    precision times the terms, not times the energy itself.
    """
    lap32, grad2_32 = terms(params, batch)
    lap64, grad2_64 = reference
    lap_error = jnp.abs(lap32 - lap64) / (1 + jnp.abs(lap64))
    energy_error = jnp.abs((lap32 + grad2_32) - (lap64 + grad2_64)) / (
        1 + jnp.abs(lap64) + jnp.abs(grad2_64)
    )
    return float(jnp.max(lap_error)), float(jnp.max(energy_error))


def main() -> None:
    key_params, key_x = jax.random.split(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float32), init_params(key_params)
    )
    batch = jax.random.normal(key_x, (16, 3 * (N_UP + N_DOWN)), dtype=jnp.float32)
    params64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    batch64 = batch.astype(jnp.float64)
    energies = jax.jit(jax.vmap(kinetic_energy_fwdlap, in_axes=(None, 0)))
    reference = jax.jit(jax.vmap(kinetic_energy_hessian, in_axes=(None, 0)))
    e_ref = reference(params64, batch64)
    e_fwdlap64 = energies(params64, batch64)
    error64 = relative_error(e_fwdlap64, e_ref)

    print(
        f"Local kinetic energies of {batch.shape[0]} configurations, "
        f"{N_UP + N_DOWN} electrons (float64)"
    )
    for i in range(4):
        got, want = e_fwdlap64[i], e_ref[i]
        print(f"  config {i}: fwdlap {got: .6f}   jax.hessian {want: .6f}")
    print(f"  max relative difference: {error64:.2e}")
    if not error64 < 1e-9:
        raise SystemExit("fwdlap disagrees with jax.hessian")

    # In float32 both methods round. Near a node of psi the kinetic energy is the
    # difference of two terms (the Laplacian and |grad|^2) far larger than itself,
    # so errors are measured against the size of the terms (see float32_errors).
    terms64 = jax.jit(jax.vmap(laplacian_terms_hessian, in_axes=(None, 0)))(
        params64, batch64
    )
    print("float32 errors against float64 (Laplacian; energy, relative to its terms):")
    for name, terms in (
        ("fwdlap", laplacian_terms_fwdlap),
        ("jax.hessian", laplacian_terms_hessian),
    ):
        batched = jax.jit(jax.vmap(terms, in_axes=(None, 0)))
        lap_error, energy_error = float32_errors(batched, params, batch, terms64)
        print(f"  {name:11s} {lap_error:.1e}; {energy_error:.1e}")

    print("\n| method      | ms per batch of 16 |")
    print("|-------------|--------------------|")
    print(f"| fwdlap      | {time_call(energies, params, batch):18.3f} |")
    print(f"| jax.hessian | {time_call(reference, params, batch):18.3f} |")
    print("(both float32, jitted and vmapped)")


if __name__ == "__main__":
    main()
