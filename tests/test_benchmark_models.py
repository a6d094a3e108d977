"""The published-architecture benchmark models are wavefunctions, and fwdlap gets them.

`benchmarks/faithful.py` writes FermiNet and Psiformer from the papers. These checks
keep them honest, in seconds: `log|psi|` is finite at the published sizes, the sign
of `psi` flips and `log|psi|` stays when two same-spin electrons swap, and fwdlap's
Laplacian (dense and sparse) matches the trace of `jax.hessian` in float64 on
reduced widths.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap

try:
    from benchmarks import faithful
except ModuleNotFoundError:  # pytest started outside the repository root
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from benchmarks import faithful

SMALL = {
    "ferminet_paper": {"layers": 2, "width1": 16, "width2": 8, "n_det": 2},
    "psiformer_paper": {
        "layers": 1,
        "width": 16,
        "heads": 2,
        "head_dim": 8,
        "mlp_width": 16,
        "n_det": 2,
    },
}
"""Reduced sizes of each model for the float64 checks."""


def small_model(name: str, system: str, signed: bool = False):
    """The model ``name`` on ``system`` at reduced width, in float64."""
    sys_ = faithful.SYSTEMS[system]
    build = faithful.BUILDERS[name]
    return build(
        sys_.n,
        jax.random.key(0),
        jnp.float64,
        system=sys_,
        signed=signed,
        **SMALL[name],
    )


def walker(model, seed: int = 1) -> jax.Array:
    """One float64 configuration of ``model``."""
    return model.sample(jax.random.key(seed), 1)[0].astype(jnp.float64)


def swap(x: jax.Array, n: int, i: int, j: int) -> jax.Array:
    """``x`` with electrons ``i`` and ``j`` exchanged."""
    r = x.reshape(n, 3)
    return r.at[jnp.array([i, j])].set(r[jnp.array([j, i])]).reshape(-1)


@pytest.mark.parametrize("name", sorted(faithful.BUILDERS))
def test_published_size_is_finite(name: str) -> None:
    """At the papers' sizes, in float32, on O2 (two nuclei): finite ``log|psi|``."""
    model = faithful.BUILDERS[name](16, jax.random.key(0), jnp.float32)
    xs = model.sample(jax.random.key(1), 2)
    values = jax.jit(jax.vmap(model.fn))(xs)
    assert values.shape == (2,)
    assert np.all(np.isfinite(np.asarray(values)))


@pytest.mark.parametrize("name", sorted(faithful.BUILDERS))
def test_antisymmetric(name: str) -> None:
    """Swapping two up or two down electrons flips the sign and keeps ``log|psi|``.

    On O2: two nuclei, and both spins hold several electrons.
    """
    model = small_model(name, "O2", signed=True)
    sys_ = faithful.SYSTEMS["O2"]
    x = walker(model)
    fn = jax.jit(model.fn)
    sign, logabs = fn(x)
    assert np.isfinite(float(logabs))
    up_pair = (0, sys_.n_up - 1)
    down_pair = (sys_.n_up, sys_.n - 1)
    for i, j in (up_pair, down_pair):
        sign_s, logabs_s = fn(swap(x, sys_.n, i, j))
        assert float(sign_s) == -float(sign)
        np.testing.assert_allclose(float(logabs_s), float(logabs), rtol=1e-10)
    # Swapping an up with a down electron is no symmetry of psi.
    _, logabs_mixed = fn(swap(x, sys_.n, 0, sys_.n - 1))
    assert abs(float(logabs_mixed) - float(logabs)) > 1e-6


@pytest.mark.parametrize("name", sorted(faithful.BUILDERS))
def test_fwdlap_matches_hessian(name: str) -> None:
    """fwdlap's Laplacian of the N atom's ``log|psi|`` against ``tr(jax.hessian)``.

    The dense default and the sparse mode, compiled together with the reference in
    one program (one XLA compilation instead of three).
    """
    model = small_model(name, "N")
    x = walker(model)

    def all_three(x: jax.Array):
        return (
            jnp.trace(jax.hessian(model.fn)(x)),
            fwdlap.laplacian(model.fn)(x),
            fwdlap.laplacian(model.fn, sparsity=True)(x),
        )

    expected, dense, sparse = jax.jit(all_three)(x)
    np.testing.assert_allclose(float(dense), float(expected), rtol=1e-9)
    np.testing.assert_allclose(float(sparse), float(expected), rtol=1e-9)


@pytest.mark.parametrize("method", ["fwdlap", "fwdlap_plain"])
def test_benchmark_methods_match_hessian(method: str) -> None:
    """The runner's fwdlap rows, as it calls them, against ``tr(jax.hessian)``."""
    from benchmarks import methods

    model = small_model("psiformer_paper", "N")
    x = walker(model)
    lap_fn = methods.make_laplacian(method, model.fn)
    expected, got = jax.jit(lambda x: (jnp.trace(jax.hessian(model.fn)(x)), lap_fn(x)))(
        x
    )
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-9)


def test_ferminet_floor_is_the_same_function() -> None:
    """The floor's FermiNet (layer products split) computes the same ``log|psi|``."""
    model = small_model("ferminet_paper", "O2")
    assert model.floor_fn is not None
    x = walker(model)
    np.testing.assert_allclose(
        float(jax.jit(model.floor_fn)(x)), float(jax.jit(model.fn)(x)), rtol=1e-12
    )


def test_electrons_sit_by_charge() -> None:
    """O2's electrons are spread over both nuclei; Ge's all around its one."""
    o2 = faithful.electron_sites(faithful.SYSTEMS["O2"])
    assert len(o2) == 16
    assert sorted(np.bincount(o2).tolist()) == [8, 8]
    assert faithful.electron_sites(faithful.SYSTEMS["Ge"]).tolist() == [0] * 32
    assert [faithful.system_for(n).name for n in faithful.SIZES] == [
        "N",
        "Ne",
        "O2",
        "Ge",
    ]


def test_startup_parses_methods_and_the_network() -> None:
    from benchmarks import startup

    args = startup.parse_args(["--methods", "fwdlap_dense,network,folx_t6"])
    assert args.methods == ["fwdlap", "network", "folx_sparse"]


def test_startup_measures_a_compile() -> None:
    from benchmarks import startup

    row = startup.measure("ferminet_paper", "Li", "network", batch=2)
    assert row["trace_s"] > 0 and row["compile_s"] > 0
    # The compiled network holds at least its own operations.
    assert row["instructions"] > row["fusions"] > 0


@pytest.mark.parametrize("relative", [0.0, 2.0**-24, 1e-3])
def test_perturbed_weights_stay_within_their_bound(relative: float) -> None:
    weights = {"w": np.linspace(-2.0, 3.0, 101), "b": np.ones(7)}
    with faithful.perturbed_weights(relative, seed=3):
        cast = faithful.cast(weights, jnp.float64)
    for name, exact in weights.items():
        change = np.abs(np.asarray(cast[name]) - exact)
        assert np.all(change <= relative * np.abs(exact) * (1 + 1e-12))
        assert np.any(change > 0) == (relative > 0)
    # Outside the context the weights are cast unchanged.
    plain = faithful.cast(weights, jnp.float64)
    assert all(np.array_equal(plain[k], weights[k]) for k in weights)


def test_perturbed_network_moves_a_little() -> None:
    name = "ferminet_paper"
    model = small_model(name, "Li")
    with faithful.perturbed_weights(1e-6, seed=0):
        perturbed = small_model(name, "Li")
    x = walker(model)
    exact, moved = float(model.fn(x)), float(perturbed.fn(x))
    assert exact != moved
    assert abs(moved - exact) <= 1e-4 * abs(exact)


def test_accuracy_summary_per_batch() -> None:
    from benchmarks import accuracy

    ref = np.array([1.0, -2.0, 4.0, 0.5])
    lap = ref * np.array([1.0 + 1e-3, 1.0, 1.0 - 4e-3, 1.0 + 2e-3])
    errors = accuracy.relative_errors(lap, ref)
    np.testing.assert_allclose(errors, [1e-3, 0.0, 4e-3, 2e-3], rtol=1e-9, atol=1e-15)
    row = accuracy.summary(errors, batch=2)
    np.testing.assert_allclose(row["per_batch"], [1e-3, 4e-3], rtol=1e-9)
    assert row["max"] == pytest.approx(4e-3)
    assert row["rms"] == pytest.approx(np.sqrt((1 + 16 + 4) / 4) * 1e-3)
    assert row["median"] == pytest.approx(1.5e-3)


def test_accuracy_parses_methods() -> None:
    from benchmarks import accuracy

    args = accuracy.parse_args(["--methods", "fwdlap_dense,loop", "--system", "N"])
    assert args.methods == ["fwdlap", "ferminet_loop"]
    assert args.system == ["N"] and args.walkers == 64


def test_weight_noise_is_refused_for_other_models(tmp_path: Path) -> None:
    from benchmarks import cell

    args = cell.parse_args(
        ["reference", "--model", "mlp", "--n", "4", "--out", str(tmp_path / "r.npz")]
        + ["--weight-noise", "1e-7"]
    )
    with pytest.raises(SystemExit, match="faithful"):
        cell.run_reference(args)
