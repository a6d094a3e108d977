"""Drop-in compatibility with code written for the original single-file fwdlap.

Each test reproduces a call pattern found in public code that uses the original tracer
(QMC kinetic energies, NetKet-style local energies, the original's own test suite), runs
it unchanged against this package, and compares with `jax.hessian` / `jax.jacfwd`:

1. `zero = fwdlap.Zero.from_value(flat_x)`: the older spelling of a symbolic zero.
2. `fwdlap.lap(f, (flat_x,), (eye,), (zero,))` with `eye = jnp.eye(n) *
   jnp.sqrt(inverse_mass)`: kinetic energies with per-coordinate masses.
3. `fwdlap.lap_partial(f, (flat_x,), (eye[0],), (zero,))`, then `lax.fori_loop` over
   blocks `eye[i]` of shape `(inner_size, n)`, inside `jax.vmap` over walkers and
   `lax.map` over batch chunks.
4. `jax.jit(functools.partial(fwdlap.lap, net_fn))((x,), (eye,), (zero,))` with `eye`
   shaped `(x.size, *x.shape)`: output jacobians carry the direction axis first.

The networks are the kinds users run: a `jax.example_libraries.stax` CNN, a small
attention block and a two-determinant wavefunction whose nuclei move with finite masses.
The examples of docs/migrating.md are run by tests/test_docs.py.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.example_libraries import stax
from jax.interpreters import ad

import fwdlap
from helpers import reference_jacobian

# --------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------


def make_cnn() -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """A small stax CNN on one 6x6 single-channel image: output shape (1, 3)."""
    init, apply = stax.serial(
        stax.Conv(4, (3, 3), padding="SAME"),
        stax.Relu,
        stax.MaxPool((2, 2)),
        stax.Flatten,
        stax.Dense(8),
        stax.Softplus,
        stax.Dense(3),
        stax.Softplus,
    )
    in_shape = (1, 6, 6, 1)
    _, params = init(jax.random.PRNGKey(0), in_shape)
    x = jax.random.normal(jax.random.PRNGKey(1), in_shape)
    return functools.partial(apply, params), x


def make_attention() -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """One pre-norm self-attention block with a GELU MLP on 4 tokens of width 3."""
    tokens, width, hidden = 4, 3, 6
    keys = jax.random.split(jax.random.PRNGKey(2), 7)
    scale = 1.0 / np.sqrt(width)
    wq, wk, wv, wo = (scale * jax.random.normal(k, (width, width)) for k in keys[:4])
    w1 = scale * jax.random.normal(keys[4], (width, hidden))
    w2 = jax.random.normal(keys[5], (hidden, width)) / np.sqrt(hidden)

    def layer_norm(h: jax.Array) -> jax.Array:
        h = h - h.mean(-1, keepdims=True)
        return h / jnp.sqrt((h**2).mean(-1, keepdims=True) + 1e-5)

    def block(x: jax.Array) -> jax.Array:
        h = layer_norm(x)
        q, k, v = h @ wq, h @ wk, h @ wv
        weights = jax.nn.softmax(q @ k.T * scale, axis=-1)
        x = x + (weights @ v) @ wo
        return x + jax.nn.gelu(layer_norm(x) @ w1) @ w2

    return block, jax.random.normal(keys[6], (tokens, width))


# Two nuclei (toy masses, small enough that their terms are not lost next to the
# electrons' in a float64 comparison) and two spin-up plus two spin-down electrons.
NUCLEAR_MASSES = (3.0, 5.0)
N_UP = N_DOWN = 2


def make_wavefunction() -> tuple[
    Callable[[jax.Array], jax.Array], jax.Array, jax.Array
]:
    """log|psi| of a two-determinant wavefunction of nuclei and electrons.

    Returns the function of the flat coordinates (nuclei first, then electrons, 3 each),
    a configuration, and the per-coordinate inverse masses (electrons have mass 1).
    """
    n_elec, hidden = N_UP + N_DOWN, 5
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    w_in = jax.random.normal(keys[0], (7, hidden)) / np.sqrt(7)
    w_orb = jax.random.normal(keys[1], (hidden, n_elec)) / np.sqrt(hidden)
    sigma = 1.0 + 0.2 * jax.random.uniform(keys[2], (2, n_elec))
    pi = 1.0 + 0.2 * jax.random.uniform(keys[3], (2, n_elec))

    def smooth_norm(d: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.sum(d**2, axis=-1) + 1e-3)

    def log_psi(flat_x: jax.Array) -> jax.Array:
        pos = flat_x.reshape(-1, 3)
        nuclei, elec = pos[:2], pos[2:]
        r_en = elec[:, None, :] - nuclei[None, :, :]  # (electrons, nuclei, 3)
        d_en = smooth_norm(r_en)
        features = jnp.concatenate(
            [r_en.reshape(n_elec, 6), d_en.mean(-1)[:, None]], -1
        )
        h = jnp.tanh(features @ w_in)
        envelope = jnp.sum(pi[None] * jnp.exp(-sigma[None] * d_en[:, :, None]), axis=1)
        orbitals = (h @ w_orb) * envelope
        _, log_up = jnp.linalg.slogdet(orbitals[:N_UP, :N_UP])
        _, log_down = jnp.linalg.slogdet(orbitals[N_UP:, N_UP:])
        d_ee = smooth_norm(elec[:, None, :] - elec[None, :, :])
        jastrow = jnp.sum(jnp.triu(d_ee / (1.0 + d_ee), k=1))
        d_nn = smooth_norm(nuclei[0] - nuclei[1])
        return log_up + log_down + 0.5 * jastrow - (d_nn - 1.4) ** 2

    masses = jnp.array([*NUCLEAR_MASSES] + [1.0] * n_elec)
    inverse_mass = jnp.repeat(1.0 / masses, 3)
    nuclei = jnp.array([[0.0, 0.0, -0.7], [0.0, 0.0, 0.7]])
    elec = jax.random.normal(keys[4], (n_elec, 3))
    flat_x = jnp.concatenate([nuclei, elec]).reshape(-1)
    return log_psi, flat_x, inverse_mass


def attention_log_psi() -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """A scalar, log|psi|-like readout of the attention block on flat coordinates."""
    block, x = make_attention()

    def log_psi(flat_x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(block(flat_x.reshape(x.shape))))

    return log_psi, x.reshape(-1)


# --------------------------------------------------------------------------------------
# References: jax.hessian and jax.jacfwd only
# --------------------------------------------------------------------------------------


def hessian_laplacian(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """The trace of `jax.hessian(f)(x)` over the input coordinates, per output."""
    hess = jax.jit(jax.hessian(f))(x)
    out_shape = hess.shape[: hess.ndim - 2 * x.ndim]
    return jnp.trace(hess.reshape(*out_shape, x.size, x.size), axis1=-2, axis2=-1)


def weighted_kinetic_reference(
    log_psi: Callable[[jax.Array], jax.Array],
    flat_x: jax.Array,
    inverse_mass: jax.Array,
) -> jax.Array:
    """The kinetic energy from `jax.hessian`: f = log|psi|, masses m_i per coordinate.

    $-\\frac12 \\sum_i m_i^{-1} (\\partial_i^2 f + (\\partial_i f)^2)$
    """
    hess_diag = jnp.diagonal(jax.hessian(log_psi)(flat_x))
    grad = jax.grad(log_psi)(flat_x)
    return -0.5 * jnp.sum(inverse_mass * (hess_diag + grad**2))


NETS = {"stax_cnn": make_cnn, "attention": make_attention}


@functools.cache
def net_references(name: str) -> dict[str, Any]:
    """A network, its input and its jax.jacfwd / jax.hessian references (built once)."""
    net, x = NETS[name]()
    return {
        "name": name,
        "net": net,
        "x": x,
        "out": net(x),
        "jacfwd": jax.jit(jax.jacfwd(net))(x),
        "lap": hessian_laplacian(net, x),
    }


@pytest.fixture(params=list(NETS))
def net_case(request: pytest.FixtureRequest) -> dict[str, Any]:
    return net_references(request.param)


@pytest.fixture(scope="module")
def wavefunction_case() -> dict[str, Any]:
    """The mass-weighted wavefunction and four walkers with their reference energies."""
    log_psi, flat_x, inverse_mass = make_wavefunction()
    noise = 0.3 * jax.random.normal(jax.random.PRNGKey(4), (4, flat_x.size))
    walkers = flat_x + noise
    ref = jax.jit(
        jax.vmap(lambda x: weighted_kinetic_reference(log_psi, x, inverse_mass))
    )
    return {
        "log_psi": log_psi,
        "walkers": walkers,
        "inverse_mass": inverse_mass,
        "energies": ref(walkers),
    }


def zero_like(x: jax.Array, symbolic: bool) -> Any:
    """The zero laplacian seed, spelled as the original's users spell it."""
    return fwdlap.Zero.from_value(x) if symbolic else jnp.zeros_like(x)


# --------------------------------------------------------------------------------------
# fwdlap.Zero
# --------------------------------------------------------------------------------------

ZERO_PRIMALS = {
    "float64_vector": lambda: jnp.arange(3.0),
    "float32_matrix": lambda: jnp.ones((2, 3), jnp.float32),
    "python_float": lambda: 1.5,
    "int_vector": lambda: jnp.arange(4),
}


@pytest.mark.parametrize("name", list(ZERO_PRIMALS))
def test_zero_from_value_is_zero_tangent_from_primal(name: str) -> None:
    x = ZERO_PRIMALS[name]()
    old = fwdlap.Zero.from_value(x)
    new = fwdlap.zero_tangent_from_primal(x)
    assert type(old) is ad.Zero
    assert old.aval == new.aval
    assert old.aval == jax.typeof(x).to_tangent_aval()
    assert fwdlap.Zero.from_primal_value(x).aval == new.aval


def test_zero_isinstance_and_construction() -> None:
    x = jnp.ones((2, 3))
    aval = jax.typeof(x).to_tangent_aval()
    assert isinstance(fwdlap.Zero.from_value(x), fwdlap.Zero)
    assert isinstance(ad.Zero(aval), fwdlap.Zero)
    assert issubclass(ad.Zero, fwdlap.Zero)
    assert not isinstance(x, fwdlap.Zero)
    assert not isinstance(None, fwdlap.Zero)
    built = fwdlap.Zero(aval)
    assert type(built) is ad.Zero and built.aval == aval


def test_zero_is_documented_as_kept_for_compatibility() -> None:
    doc = fwdlap.Zero.__doc__ or ""
    assert "compatibility" in doc and "zero_tangent_from_primal" in doc
    assert "compatibility" in (fwdlap.Zero.from_value.__doc__ or "")
    assert "Zero" in fwdlap.__all__


def test_zero_from_value_skips_the_laplacian_term() -> None:
    # A symbolic zero laplacian seed adds nothing: lap_out = sum_k v_k^T H v_k.
    f = lambda x: jnp.sum(jnp.sin(x) * x[::-1])
    x = jnp.linspace(-1.0, 1.0, 5)
    _, _, lap = fwdlap.lap(f, (x,), (jnp.eye(5),), (fwdlap.Zero.from_value(x),))
    np.testing.assert_allclose(lap, jnp.trace(jax.jit(jax.hessian(f))(x)), rtol=1e-12)


# --------------------------------------------------------------------------------------
# Pattern 4: jax.jit(partial(fwdlap.lap, net_fn))((x,), (eye,), (zero,))
# --------------------------------------------------------------------------------------


def check_net_outputs(case: dict[str, Any], out: Any, jac: Any, lap: Any) -> None:
    x, ref_out = case["x"], case["out"]
    # The direction axis comes first: jac has shape (x.size, *out.shape).
    assert jac.shape == (x.size, *ref_out.shape)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    directions_first = jnp.moveaxis(
        case["jacfwd"].reshape(*ref_out.shape, x.size), -1, 0
    )
    np.testing.assert_allclose(jac, directions_first, rtol=1e-10, atol=1e-12)
    # Back to jax.jacfwd's layout (*out.shape, *x.shape): the direction axis goes last.
    back = jnp.moveaxis(jac, 0, -1).reshape(*ref_out.shape, *x.shape)
    np.testing.assert_allclose(back, case["jacfwd"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lap, case["lap"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("symbolic_zero", [True, False], ids=["symbolic", "dense"])
@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_lap_of_net(
    net_case: dict[str, Any], symbolic_zero: bool, use_jit: bool
) -> None:
    # As in the original's own tests, the network itself is wrapped in jax.jit.
    net_fn = jax.jit(case_net(net_case))
    x = net_case["x"]
    eye = jnp.eye(x.size).reshape(x.size, *x.shape)
    zero = zero_like(x, symbolic_zero)
    flap_fn = functools.partial(fwdlap.lap, net_fn)
    if use_jit:
        flap_fn = jax.jit(flap_fn)
    out, jac, lap = flap_fn((x,), (eye,), (zero,))
    check_net_outputs(net_case, out, jac, lap)


def test_lap_of_unjitted_net(net_case: dict[str, Any]) -> None:
    # The original needed the network under jax.jit ("mysterious error if no jit").
    x = net_case["x"]
    eye = jnp.eye(x.size).reshape(x.size, *x.shape)
    flap_fn = jax.jit(functools.partial(fwdlap.lap, case_net(net_case)))
    out, jac, lap = flap_fn((x,), (eye,), (fwdlap.Zero.from_value(x),))
    check_net_outputs(net_case, out, jac, lap)


def case_net(case: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    return case["net"]


@pytest.mark.parametrize(
    ("use_jit", "symbolic_zero"),
    [(True, True), (False, False)],
    ids=["jit-symbolic", "eager-dense"],
)
def test_lap_partial_of_net(
    net_case: dict[str, Any], symbolic_zero: bool, use_jit: bool
) -> None:
    net_fn = jax.jit(case_net(net_case))
    x = net_case["x"]
    eye = jnp.eye(x.size).reshape(x.size, *x.shape)
    zero = zero_like(x, symbolic_zero)
    out, lap_pe = fwdlap.lap_partial(net_fn, (x,), (eye,), (zero,))
    lap_fn = jax.jit(lap_pe) if use_jit else lap_pe
    jac, lap = lap_fn((eye,), (zero,))
    check_net_outputs(net_case, out, jac, lap)


@pytest.mark.parametrize("symbolic_zero", [True, False], ids=["symbolic", "dense"])
def test_stax_cnn_original_jacobian_reshape(symbolic_zero: bool) -> None:
    # The original's users reshape with moveaxis(jac, -1, 0). Their network's output
    # is (1, k), so the direction axis, first in jac (x.size, 1, k), lands in the right
    # place; this checks that exact line against jax.jacfwd.
    case = net_references("stax_cnn")
    net_fn, x = jax.jit(case_net(case)), case["x"]
    eye = jnp.eye(x.size).reshape(x.size, *x.shape)
    zero = zero_like(x, symbolic_zero)
    out, jac, lap = jax.jit(functools.partial(fwdlap.lap, net_fn))(
        (x,), (eye,), (zero,)
    )
    assert out.shape[0] == 1
    jac = jnp.moveaxis(jac, -1, 0).reshape(*out.shape, *x.shape)
    np.testing.assert_allclose(jac, case["jacfwd"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lap, case["lap"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("use_jit", "symbolic_zero"),
    [(True, True), (False, False)],
    ids=["jit-symbolic", "eager-dense"],
)
def test_lap_of_vmapped_net(
    net_case: dict[str, Any], symbolic_zero: bool, use_jit: bool
) -> None:
    # The original's vmapped test: one seed over all coordinates of a stacked batch.
    vnet_fn = jax.vmap(jax.jit(case_net(net_case)), in_axes=0, out_axes=0)
    x0 = net_case["x"]
    x = jnp.stack([x0, 0.5 * x0])
    eye = jnp.eye(x.size).reshape(x.size, *x.shape)
    zero = zero_like(x, symbolic_zero)
    flap_fn = functools.partial(fwdlap.lap, vnet_fn)
    if use_jit:
        flap_fn = jax.jit(flap_fn)
    out, jac, lap = flap_fn((x,), (eye,), (zero,))
    ref_lap = jnp.stack([net_case["lap"], hessian_laplacian(net_case["net"], 0.5 * x0)])
    np.testing.assert_allclose(lap, ref_lap, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out, vnet_fn(x), rtol=1e-12, atol=1e-12)
    assert jac.shape == (x.size, *out.shape)
    np.testing.assert_allclose(
        jac, reference_jacobian(vnet_fn, x), rtol=1e-10, atol=1e-12
    )


# --------------------------------------------------------------------------------------
# Patterns 1-3: kinetic energies with per-coordinate masses
# --------------------------------------------------------------------------------------


def kinetic_energy_lap(
    log_psi: Callable[[jax.Array], jax.Array],
    flat_x: jax.Array,
    inverse_mass: jax.Array,
    symbolic_zero: bool,
) -> jax.Array:
    """Pattern 2: one `fwdlap.lap` call with mass-scaled unit seeds."""
    n = flat_x.size
    eye = jnp.eye(n) * jnp.sqrt(inverse_mass)
    zero = fwdlap.Zero.from_value(flat_x) if symbolic_zero else jnp.zeros_like(flat_x)
    _, jac, lap = fwdlap.lap(log_psi, (flat_x,), (eye,), (zero,))
    return -0.5 * ((jac**2).sum() + lap)


def kinetic_energy_blocked(
    log_psi: Callable[[jax.Array], jax.Array],
    walkers: jax.Array,
    inverse_mass: jax.Array,
    inner_size: int,
    batch_size: int,
    symbolic_zero: bool,
) -> jax.Array:
    """Pattern 3: `lap_partial` and a `fori_loop` over seed blocks, per walker."""

    def local(flat_x: jax.Array) -> jax.Array:
        n = flat_x.size
        eye = jnp.eye(n) * jnp.sqrt(inverse_mass)
        eye = eye.reshape(n // inner_size, inner_size, n)
        if symbolic_zero:
            zero = fwdlap.Zero.from_value(flat_x)
        else:
            zero = jnp.zeros_like(flat_x)
        _, f_lap_pe = fwdlap.lap_partial(log_psi, (flat_x,), (eye[0],), (zero,))

        def loop_fn(i: Any, val: jax.Array) -> jax.Array:
            jac, lap = f_lap_pe((eye[i],), (zero,))
            return val + (jac**2).sum() + lap

        return -0.5 * lax.fori_loop(0, n // inner_size, loop_fn, 0.0)

    chunks = walkers.reshape(-1, batch_size, walkers.shape[-1])
    return lax.map(jax.vmap(local), chunks).reshape(-1)


@pytest.mark.parametrize("symbolic_zero", [True, False], ids=["symbolic", "dense"])
def test_kinetic_energy_with_masses(
    wavefunction_case: dict[str, Any], symbolic_zero: bool
) -> None:
    # Jitted and vmapped over walkers, as QMC codes run it (eager runs are covered by
    # the network tests and by the blocked variant below).
    case = wavefunction_case
    fn = functools.partial(
        kinetic_energy_lap,
        case["log_psi"],
        inverse_mass=case["inverse_mass"],
        symbolic_zero=symbolic_zero,
    )
    energies = jax.jit(jax.vmap(fn))(case["walkers"])
    np.testing.assert_allclose(energies, case["energies"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("inner_size", "use_jit", "symbolic_zero"),
    [(3, True, True), (9, True, True), (6, False, False)],
    ids=["inner3-jit-symbolic", "inner9-jit-symbolic", "inner6-eager-dense"],
)
def test_kinetic_energy_blocked_lap_partial(
    wavefunction_case: dict[str, Any],
    symbolic_zero: bool,
    use_jit: bool,
    inner_size: int,
) -> None:
    case = wavefunction_case
    fn = functools.partial(
        kinetic_energy_blocked,
        case["log_psi"],
        inverse_mass=case["inverse_mass"],
        inner_size=inner_size,
        batch_size=2,
        symbolic_zero=symbolic_zero,
    )
    if use_jit:
        fn = jax.jit(fn)
    energies = fn(case["walkers"])
    np.testing.assert_allclose(energies, case["energies"], rtol=1e-9, atol=1e-10)


def test_attention_kinetic_energy_blocked() -> None:
    log_psi, flat_x = attention_log_psi()
    walkers = jnp.stack([flat_x, -flat_x, 0.5 * flat_x, flat_x[::-1]])
    inverse_mass = jnp.ones(flat_x.size)
    fn = jax.jit(
        functools.partial(
            kinetic_energy_blocked,
            log_psi,
            inverse_mass=inverse_mass,
            inner_size=4,
            batch_size=2,
            symbolic_zero=True,
        )
    )
    ref = jax.jit(
        jax.vmap(lambda x: weighted_kinetic_reference(log_psi, x, inverse_mass))
    )
    np.testing.assert_allclose(fn(walkers), ref(walkers), rtol=1e-9, atol=1e-10)


def test_custom_jvp_with_symbolic_zeros() -> None:
    # The original raised NotImplementedError for custom_jvp(symbolic_zeros=True).
    @jax.custom_jvp
    def scaled_sin(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sin(x) * y

    def scaled_sin_jvp(primals: Any, tangents: Any) -> tuple[jax.Array, jax.Array]:
        x, y = primals
        tx, ty = tangents
        out = scaled_sin(x, y)
        t_out = jnp.zeros_like(out)
        if not isinstance(tx, jax.custom_derivatives.SymbolicZero):
            t_out = t_out + jnp.cos(x) * y * tx
        if not isinstance(ty, jax.custom_derivatives.SymbolicZero):
            t_out = t_out + jnp.sin(x) * ty
        return out, t_out

    scaled_sin.defjvp(scaled_sin_jvp, symbolic_zeros=True)
    y = jnp.array([2.0, -1.0, 0.5])
    f = lambda x: jnp.sum(scaled_sin(x, y) * x)
    x = jnp.linspace(0.1, 1.0, 3)
    zero = fwdlap.Zero.from_value(x)
    _, jac, lap = fwdlap.lap(f, (x,), (jnp.eye(3),), (zero,))
    np.testing.assert_allclose(jac, jax.jit(jax.grad(f))(x), rtol=1e-12)
    np.testing.assert_allclose(lap, jnp.trace(jax.jit(jax.hessian(f))(x)), rtol=1e-12)
