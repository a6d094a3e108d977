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
