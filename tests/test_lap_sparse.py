"""The block-sparse jacobian mode (`sparsity=`) against jax.hessian and the dense mode.

References are `jax.jacfwd` / the trace of `jax.jacfwd(jax.jacfwd(f))` (helpers) and
`jax.grad` / the trace of `jax.hessian`. The only fwdlap-against-fwdlap comparison is
dense against sparse, and every such comparison also checks an independent reference.
"""

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from benchmarks.models import build
from helpers import (
    hessian_trace_weighted,
    jaxpr_shapes,
    reference_triple,
    reference_values,
    tree_allclose,
)
from test_lap_zoo import ZOO, Case

THIS_FILE = Path(__file__).name

# --- helpers -----------------------------------------------------------------------


def np_eye(x: Any) -> np.ndarray:
    """A NumPy identity seed `(x.size, *x.shape)`: concrete, as the sparse mode needs."""
    size = int(np.size(x))
    return np.eye(size, dtype=np.dtype(x.dtype)).reshape(size, *np.shape(x))


def lap_of(fun: Callable[..., Any], x: Any, sparsity: Any = None) -> Any:
    """`fwdlap.lap` with the identity seed and a zero input laplacian."""
    return fwdlap.lap(fun, (x,), (np_eye(x),), (None,), sparsity=sparsity)


def hessian_reference(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> Any:
    """`(f(x), jax.grad, trace of jax.hessian)` of a scalar function."""
    return f(x), jax.grad(f)(x), jnp.trace(jax.hessian(f)(x))


hessian_reference_jit = jax.jit(hessian_reference, static_argnums=0)


def assert_triple_close(
    got: Any, ref: Any, rtol: float = 1e-8, atol: float = 1e-9, err: str = ""
) -> None:
    """Value, jacobian and laplacian against a reference triple."""
    for name, a, b in zip(("value", "jacobian", "laplacian"), got, ref, strict=True):
        assert tree_allclose(a, b, rtol=rtol, atol=atol), f"{err} {name}"


def events_summary(events: list[fwdlap.Densification]) -> list[tuple[str, str]]:
    return [(e.primitive, e.cause) for e in events]


def wide(block_size: int = 3) -> fwdlap.Sparsity:
    """A threshold so large that no jacobian is densified for its number of blocks."""
    return fwdlap.Sparsity(block_size=block_size, threshold=10_000)


# --- 1. the zoo: dense and sparse agree with the reference ---------------------------


def zoo_block_size(n: int) -> int:
    """A block size dividing `n` into at least two blocks (1 if none does)."""
    return next((b for b in (3, 4, 2) if n % b == 0 and n // b >= 2), 1)


def _zoo_all_modes(case: Case, x: jax.Array) -> Any:
    """Reference, dense, sparse without densification, sparse with a tiny threshold."""
    n = x.size
    b = zoo_block_size(n)
    eye = np_eye(x)

    def run(sparsity: Any) -> Any:
        return fwdlap.lap(case.fun, (x,), (eye,), (None,), sparsity=sparsity)

    return (
        reference_values(case.fun, x),
        run(None),
        run(fwdlap.Sparsity(block_size=b, threshold=n)),
        run(fwdlap.Sparsity(block_size=b, threshold=b)),
    )


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_sparse_matches_dense_and_reference(case: Case) -> None:
    # One compilation per case holds the reference and the three modes.
    x = jnp.asarray(case.x)
    ref, dense, sparse_wide, sparse_tight = jax.jit(
        functools.partial(_zoo_all_modes, case)
    )(x)
    for mode, got in (("dense", dense), ("wide", sparse_wide), ("tight", sparse_tight)):
        out, jac, lap = got
        assert tree_allclose(out, ref[0]), mode
        assert tree_allclose(jac, ref[1]), mode
        assert tree_allclose(lap, ref[2], rtol=1e-6, atol=1e-7), mode
    for mode, got in (("wide", sparse_wide), ("tight", sparse_tight)):
        for a, b in zip(got, dense, strict=True):
            assert tree_allclose(a, b, rtol=1e-9, atol=1e-10), mode


# Eager evaluation: concrete primals, so indices computed from x (argmax, argsort) are
# known to the sparse rules, unlike under jit.
ZOO_EAGER = [
    "argmax_gather",
    "take_along_axis",
    "scatter_set",
    "dynamic_update_slice",
    "sort",
    "slogdet",
]


@pytest.mark.parametrize("name", ZOO_EAGER)
def test_zoo_sparse_eager(name: str) -> None:
    case = next(c for c in ZOO if c.name == name)
    x = jnp.asarray(case.x)
    b = zoo_block_size(x.size)
    ref = reference_triple(case.fun, x)
    for threshold in (x.size, b):
        got = lap_of(case.fun, x, fwdlap.Sparsity(block_size=b, threshold=threshold))
        out, jac, lap = got
        assert tree_allclose(out, ref[0]), threshold
        assert tree_allclose(jac, ref[1]), threshold
        assert tree_allclose(lap, ref[2], rtol=1e-6, atol=1e-7), threshold


def test_zoo_sparse_eager_names_exist() -> None:
    names = {c.name for c in ZOO}
    assert set(ZOO_EAGER) <= names


# --- 2. many-particle functions ------------------------------------------------------

N = 4  # particles
RNG = np.random.default_rng(7)
R = RNG.normal(size=(N, 3))
X = R.ravel()  # (3N,) flat configuration
N_UP = 2
WIDTH = 5

W1 = RNG.normal(size=(3, WIDTH)) / np.sqrt(3)
B1 = RNG.normal(size=WIDTH) * 0.1
W2 = RNG.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)
W_OUT = RNG.normal(size=WIDTH)
W_PAIR = RNG.normal(size=(4, WIDTH)) / 2
W_SPIN = RNG.normal(size=(3 * WIDTH, WIDTH)) / np.sqrt(3 * WIDTH)
W_Q, W_K, W_V = (RNG.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH) for _ in range(3))
W_ORB = RNG.normal(size=(WIDTH, 2 * N)) / np.sqrt(WIDTH)
W_BATCH = RNG.normal(size=(2, 3, WIDTH))
PERM = np.array([2, 0, 3, 1, 1])


def particles(x: jax.Array) -> jax.Array:
    return x.reshape(-1, 3)


def embed(r: jax.Array) -> jax.Array:
    """A per-particle two-layer MLP: row i depends on particle i only."""
    h = jnp.tanh(r @ W1 + B1)
    return jnp.tanh(h @ W2) + h


def pair_features(r: jax.Array) -> jax.Array:
    """`(r_i - r_j, |r_i - r_j|)`, `(N, N, 4)`, with the eye trick on the diagonal."""
    n = r.shape[0]
    diff = r[:, None, :] - r[None, :, :]
    eye = jnp.eye(n, dtype=r.dtype)
    dist = jnp.sqrt(jnp.sum(diff**2, axis=-1) + eye) * (1.0 - eye)
    return jnp.concatenate([diff, dist[..., None]], axis=-1)


def particle_mlp_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(embed(particles(x)) @ W_OUT)


def particle_features(x: jax.Array) -> jax.Array:
    return embed(particles(x))


def pair_stream(x: jax.Array) -> jax.Array:
    return jnp.tanh(pair_features(particles(x)) @ W_PAIR)


def pair_stream_sum_j(x: jax.Array) -> jax.Array:
    return jnp.sum(pair_stream(x), axis=1)


def pair_energy(x: jax.Array) -> jax.Array:
    r = particles(x)
    dist = pair_features(r)[..., 3]
    return jnp.sum(jnp.triu(1.0 / (dist + 1.0), k=1)) + jnp.sum(r**2)


def spin_means(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    up, down = jnp.split(h, [N_UP], axis=0)
    means = [jnp.broadcast_to(m.mean(axis=0), h.shape) for m in (up, down)]
    return jnp.tanh(jnp.concatenate([h, *means], axis=-1) @ W_SPIN)


def structural(x: jax.Array) -> jax.Array:
    r = particles(x)
    h = jnp.concatenate([r, r**2], axis=-1)  # (N, 6)
    h = jnp.pad(h, ((1, 0), (0, 2)), constant_values=0.5)  # (N + 1, 8)
    picked = h[PERM]  # a gather with static indices, one row repeated
    rev = h[::-1, 1:7]  # reversal and slicing
    return jnp.sin(picked[:4, :6]) * rev[:4] + picked[4:, :6] * rev[:1]


def transposes(x: jax.Array) -> jax.Array:
    r = particles(x)
    return jnp.tanh(r.T @ jnp.ones((N, 2))).reshape(-1) * jnp.sum(r, axis=1)[:1]


def dynamic_slice_concrete(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    return lax.dynamic_slice(h, (1, 2), (2, 3)) ** 2


def dynamic_slice_traced(x: jax.Array) -> jax.Array:
    # The start depends on x: traced under jit, concrete in eager evaluation.
    h = embed(particles(x))
    start = jnp.argmin(particles(x)[:, 0])
    return lax.dynamic_slice(h, (start, 0), (2, WIDTH)) ** 2


def where_select(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    a = jnp.where(h > 0, jnp.sin(h), h**2)
    return lax.select(h < 0.3, a, jnp.exp(h)) + jnp.where(h > 0.1, 1.0, h)


def cumsum_particles(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    return jnp.cumsum(h, axis=0) * jnp.cumsum(h, axis=1)


def sort_features(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    return jnp.sort(h, axis=-1) * jnp.sort(h[:, 0])[:, None]


def max_reductions(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    return jnp.max(h, axis=-1) + jnp.min(h**2, axis=0)[:N] + jnp.max(h)


def attention(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    q, k, v = h @ W_Q, h @ W_K, h @ W_V
    scores = q @ k.T / np.sqrt(WIDTH)  # both operands carry tangents
    weights = jax.nn.softmax(scores, axis=-1)
    return weights @ v + h


def attention_manual_softmax(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    scores = jnp.einsum("id,jd->ij", h @ W_Q, h @ W_K)
    e = jnp.exp(scores - 1.0)
    return (e / jnp.sum(e, axis=-1, keepdims=True)) @ (h @ W_V)


def dot_general_const(x: jax.Array) -> jax.Array:
    r = particles(x)
    a = jnp.einsum("nc,bcw->bnw", r, W_BATCH)  # constant batch of weights
    return jnp.tanh(a) @ W2 + jnp.einsum("nc,nc->n", r, r)[None, :, None]


def orbitals(x: jax.Array) -> jax.Array:
    """Per-electron orbitals with an envelope: row i depends on electron i only."""
    r = particles(x)
    env = jnp.exp(-jnp.sqrt(jnp.sum(r**2, axis=-1, keepdims=True) + 0.1))
    return (embed(r) @ W_ORB) * env + 0.3 * jnp.eye(N, 2 * N)  # (N, 2N)


def slater_slogdet(x: jax.Array) -> jax.Array:
    sign, logdet = jnp.linalg.slogdet(orbitals(x)[:, :N])
    return logdet + 0.1 * sign


def slater_det(x: jax.Array) -> jax.Array:
    return jnp.linalg.det(orbitals(x)[:, N:])


def slater_batched(x: jax.Array) -> jax.Array:
    # (2, N, N): two determinants of the same electrons.
    mats = jnp.transpose(orbitals(x).reshape(N, 2, N), (1, 0, 2))
    sign, logdet = jnp.linalg.slogdet(mats)
    return jnp.sum(logdet) + jnp.sum(jnp.linalg.det(mats) ** 2) + 0.1 * jnp.sum(sign)


def slater_spin_blocks(x: jax.Array) -> jax.Array:
    # One determinant per spin block, each of per-electron rows.
    phi = orbitals(x)
    up = jnp.linalg.slogdet(phi[:N_UP, :N_UP])[1]
    down = jnp.linalg.slogdet(phi[N_UP:, N_UP : 2 * N_UP])[1]
    return up + down


class ParticleCase(NamedTuple):
    name: str
    fun: Callable[[jax.Array], jax.Array]


PARTICLE_CASES = [
    ParticleCase("particle_mlp_sum", particle_mlp_sum),
    ParticleCase("particle_features", particle_features),
    ParticleCase("pair_stream", pair_stream),
    ParticleCase("pair_stream_sum_j", pair_stream_sum_j),
    ParticleCase("pair_energy", pair_energy),
    ParticleCase("spin_means", spin_means),
    ParticleCase("structural", structural),
    ParticleCase("transposes", transposes),
    ParticleCase("dynamic_slice_concrete", dynamic_slice_concrete),
    ParticleCase("dynamic_slice_traced", dynamic_slice_traced),
    ParticleCase("where_select", where_select),
    ParticleCase("cumsum_particles", cumsum_particles),
    ParticleCase("sort_features", sort_features),
    ParticleCase("max_reductions", max_reductions),
    ParticleCase("attention", attention),
    ParticleCase("attention_manual_softmax", attention_manual_softmax),
    ParticleCase("dot_general_const", dot_general_const),
    ParticleCase("slater_slogdet", slater_slogdet),
    ParticleCase("slater_det", slater_det),
    ParticleCase("slater_batched", slater_batched),
    ParticleCase("slater_spin_blocks", slater_spin_blocks),
]
PARTICLE_IDS = [c.name for c in PARTICLE_CASES]

SPARSITIES = {
    "default": True,
    "wide": wide(),
    "threshold_3": 3,  # one block: densifies as soon as two particles meet
    "block_1": fwdlap.Sparsity(block_size=1),
}


def _particle_all_modes(fun: Callable[[jax.Array], jax.Array], x: jax.Array) -> Any:
    sparse = {mode: lap_of(fun, x, s) for mode, s in SPARSITIES.items()}
    return reference_values(fun, x), lap_of(fun, x, None), sparse


@pytest.mark.parametrize("case", PARTICLE_CASES, ids=PARTICLE_IDS)
def test_particle_functions(case: ParticleCase) -> None:
    # Under jit, indices computed from x are traced (dynamic_slice_traced). One
    # compilation holds the reference, the dense pass and every sparse mode.
    x = jnp.asarray(X)
    ref, dense, sparse = jax.jit(functools.partial(_particle_all_modes, case.fun))(x)
    assert_triple_close(dense, ref)
    for mode, got in sparse.items():
        assert_triple_close(got, ref, err=mode)
        assert_triple_close(got, dense, rtol=1e-10, atol=1e-12, err=mode)


PARTICLE_EAGER = [
    "particle_mlp_sum",
    "structural",
    "dynamic_slice_traced",
    "attention",
    "slater_batched",
]


@pytest.mark.parametrize("name", PARTICLE_EAGER)
def test_particle_functions_eager(name: str) -> None:
    # Concrete primals: the dynamic_slice start computed from x is known here.
    case = next(c for c in PARTICLE_CASES if c.name == name)
    x = jnp.asarray(X)
    got = lap_of(case.fun, x, True)
    assert_triple_close(got, reference_triple(case.fun, x))


SCALAR_CASES = [
    particle_mlp_sum,
    pair_energy,
    slater_slogdet,
    slater_det,
    slater_batched,
    slater_spin_blocks,
]


@pytest.mark.parametrize("fun", SCALAR_CASES, ids=[f.__name__ for f in SCALAR_CASES])
def test_value_grad_and_laplacian_particles(fun: Callable[[jax.Array], Any]) -> None:
    x = jnp.asarray(X)
    got = jax.jit(fwdlap.value_grad_and_laplacian(fun, sparsity=True))(x)
    ref = hessian_reference_jit(fun, x)
    assert_triple_close(got, ref)


# The benchmark models in float64, kept small.
MODELS = [("particle_mlp", 6), ("ferminet", 4), ("psiformer", 4)]


@pytest.mark.parametrize(("name", "n"), MODELS, ids=[m for m, _ in MODELS])
def test_benchmark_models(name: str, n: int) -> None:
    model = build(name, n, seed=0, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(n).normal(size=model.dim))
    with fwdlap.record_densifications() as events:
        got = jax.jit(fwdlap.value_grad_and_laplacian(model.fn, sparsity=True))(x)
    ref = hessian_reference_jit(model.fn, x)
    assert_triple_close(got, ref, rtol=1e-7, atol=1e-9)
    assert events, "the models end in sums over all electrons"
    assert all(e.cause == "threshold" for e in events), events_summary(events)


# --- 3. jit, vmap and grad -----------------------------------------------------------

BATCH = np.random.default_rng(11).normal(size=(3, 3 * N))


@pytest.mark.parametrize(
    "fun", [particle_mlp_sum, slater_slogdet], ids=["particle_mlp", "slater"]
)
def test_laplacian_jit_vmap(fun: Callable[[jax.Array], jax.Array]) -> None:
    xs = jnp.asarray(BATCH)

    def run(xs: jax.Array) -> Any:
        lap = jax.vmap(fwdlap.laplacian(fun, sparsity=True))(xs)
        vgl = jax.vmap(fwdlap.value_grad_and_laplacian(fun, sparsity=True))(xs)
        ref = jax.vmap(functools.partial(hessian_reference, fun))(xs)
        return lap, vgl, ref

    lap, vgl, ref = jax.jit(run)(xs)
    assert lap.shape == (BATCH.shape[0],)
    np.testing.assert_allclose(lap, ref[2], rtol=1e-9)
    assert_triple_close(vgl, ref)


def test_laplacian_of_array_output_jit() -> None:
    x = jnp.asarray(X)
    got = jax.jit(fwdlap.laplacian(pair_stream_sum_j, sparsity=True))(x)
    ref = reference_triple(pair_stream_sum_j, x)[2]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


PARAMS = {
    "w1": np.asarray(W1),
    "b1": np.asarray(B1),
    "w2": np.asarray(W_PAIR[:, :WIDTH]),
    "out": np.asarray(W_OUT),
}


def param_model(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    r = particles(x)
    h = jnp.tanh(r @ p["w1"] + p["b1"])
    pair = jnp.tanh(pair_features(r) @ p["w2"])  # (N, N, WIDTH)
    return jnp.sum((h + jnp.mean(pair, axis=1)) @ p["out"])


def test_grad_of_sparse_laplacian_wrt_params() -> None:
    x = jnp.asarray(X)

    def sparse_loss(p: dict[str, jax.Array]) -> jax.Array:
        return fwdlap.laplacian(param_model, argnums=1, sparsity=True)(p, x)

    def dense_loss(p: dict[str, jax.Array]) -> jax.Array:
        return fwdlap.laplacian(param_model, argnums=1)(p, x)

    def reference_loss(p: dict[str, jax.Array]) -> jax.Array:
        return jnp.trace(jax.hessian(lambda y: param_model(p, y))(x))

    params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
    sparse = jax.jit(jax.grad(sparse_loss))(params)
    dense = jax.jit(jax.grad(dense_loss))(params)
    ref = jax.jit(jax.grad(reference_loss))(params)
    assert tree_allclose(sparse, ref, rtol=1e-8, atol=1e-10)
    assert tree_allclose(dense, ref, rtol=1e-8, atol=1e-10)
    assert tree_allclose(sparse, dense, rtol=1e-10, atol=1e-12)


def test_pytree_argument_and_argnums() -> None:
    # Up and down electrons as two leaves of a dict: the identity is split across them.
    x = jnp.asarray(X)
    tree = {"up": x[: 3 * N_UP], "down": x[3 * N_UP :]}

    def f(t: dict[str, jax.Array], scale: jax.Array) -> jax.Array:
        return scale * slater_slogdet(jnp.concatenate([t["up"], t["down"]]))

    # Both arguments at once: the directions of the second follow those of the first.
    def g(a: jax.Array, b: jax.Array) -> jax.Array:
        return pair_energy(jnp.concatenate([a, b]))

    def run(x: jax.Array, tree: dict[str, jax.Array]) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(f, sparsity=True)(tree, 1.5)
        both = fwdlap.laplacian(g, argnums=(0, 1), sparsity=True)(x[:6], x[6:])
        refs = (
            hessian_reference(lambda y: 1.5 * slater_slogdet(y), x),
            hessian_reference(pair_energy, x),
        )
        return vgl, both, refs

    (value, grad, lap), both, (ref_f, ref_g) = jax.jit(run)(x, tree)
    np.testing.assert_allclose(value, ref_f[0], rtol=1e-12)
    np.testing.assert_allclose(lap, ref_f[2], rtol=1e-9)
    flat_grad = jnp.concatenate([grad["up"], grad["down"]])
    np.testing.assert_allclose(flat_grad, ref_f[1], rtol=1e-9)
    np.testing.assert_allclose(both, ref_g[2], rtol=1e-9)


def test_two_arguments_with_split_identity() -> None:
    # lap with two positional arguments whose seeds are the two halves of one identity.
    x = jnp.asarray(X)
    a, b = x[:6], x[6:]
    eye = np.eye(x.size)
    seeds = (eye[:, :6], eye[:, 6:])

    def g(a: jax.Array, b: jax.Array) -> jax.Array:
        return pair_stream(jnp.concatenate([a, b]))

    with fwdlap.record_densifications() as events:
        got = fwdlap.lap(g, (a, b), seeds, (None, None), sparsity=True)
    assert events == []
    assert_triple_close(got, reference_triple(pair_stream, x))


def test_block_diagonal_seed_and_input_laplacian() -> None:
    # A non-identity seed whose zero pattern is block diagonal stays sparse; the
    # input laplacian enters through the jacobian.
    x = jnp.asarray(X)
    mix = np.random.default_rng(5).normal(size=(N, 3, 3))
    v = np.zeros((3 * N, 3 * N))
    for i in range(N):
        v[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] = mix[i]
    lap_in = jnp.asarray(np.random.default_rng(6).normal(size=3 * N))
    with fwdlap.record_densifications() as events:
        out, jac, lap = fwdlap.lap(
            pair_stream, (x,), (v,), (lap_in,), sparsity=fwdlap.Sparsity(block_size=3)
        )
    assert events == []
    jac_ref = jax.jacfwd(pair_stream)(x)
    np.testing.assert_allclose(out, pair_stream(x), rtol=1e-12)
    np.testing.assert_allclose(
        jac, jnp.einsum("...i,ki->k...", jac_ref, v), rtol=1e-9, atol=1e-12
    )
    expected = hessian_trace_weighted(pair_stream, x, jnp.asarray(v)) + jnp.einsum(
        "...i,i->...", jac_ref, lap_in
    )
    np.testing.assert_allclose(lap, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.xfail(
    strict=True,
    reason="src bug: a NumPy laplacian is kept as NumPy by _checks._canonical but the "
    "annotated contract only accepts jax.Array laplacians (TypeError 'bug in fwdlap's "
    "input checks'), in the dense mode as well",
)
@pytest.mark.parametrize("sparsity", [None, True], ids=["dense", "sparse"])
def test_numpy_input_laplacian(sparsity: Any) -> None:
    x = jnp.asarray(X)
    lap_in = np.random.default_rng(6).normal(size=3 * N)
    _, jac, lap = fwdlap.lap(
        particle_features, (x,), (np_eye(x),), (lap_in,), sparsity=sparsity
    )
    _, ref_jac, ref_lap = reference_triple(particle_features, x)
    np.testing.assert_allclose(jac, ref_jac, rtol=1e-9, atol=1e-12)
    expected = ref_lap + jnp.einsum("k...,k->...", ref_jac, lap_in)
    np.testing.assert_allclose(lap, expected, rtol=1e-9, atol=1e-12)


def test_partial_directions_over_some_particles() -> None:
    # Directions for particles 1 and 3 only: the Laplacian over their coordinates.
    x = jnp.asarray(X)
    coords = np.r_[3:6, 9:12]
    v = np.eye(3 * N)[coords]

    def run(x: jax.Array) -> Any:
        got = fwdlap.lap(slater_slogdet, (x,), (v,), (None,), sparsity=True)
        return got, jax.grad(slater_slogdet)(x), jax.hessian(slater_slogdet)(x)

    (_, jac, lap), grad, hess = jax.jit(run)(x)
    np.testing.assert_allclose(lap, jnp.trace(hess[coords][:, coords]), rtol=1e-9)
    np.testing.assert_allclose(jac, grad[coords], rtol=1e-9)


def test_number_of_directions_not_a_multiple_of_three() -> None:
    # The default block size falls back to 1.
    x = jnp.asarray(X[:7])

    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(x[:, None] * x[None, :]) ** 2)

    got = jax.jit(fwdlap.value_grad_and_laplacian(f, sparsity=True))(x)
    assert_triple_close(got, hessian_reference(f, x))


def test_nested_jit_and_checkpoint_stay_sparse() -> None:
    # Inner jit and remat are inlined by the sparse mode, not densified.
    inner = jax.jit(embed)

    @jax.checkpoint
    def block(h: jax.Array) -> jax.Array:
        return jnp.tanh(h @ W2)

    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(block(inner(particles(x))) @ W_OUT)

    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = jax.jit(fwdlap.value_grad_and_laplacian(f, sparsity=True))(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert_triple_close(got, hessian_reference(f, x))


# --- 4. observability ----------------------------------------------------------------


def relu_sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jax.nn.relu(embed(particles(x))) ** 2)


@jax.custom_jvp
def soft_abs(x: jax.Array) -> jax.Array:
    return jnp.sqrt(x**2 + 0.5)


@soft_abs.defjvp
def _soft_abs_jvp(primals: Any, tangents: Any) -> Any:
    (x,), (t,) = primals, tangents
    return soft_abs(x), x / soft_abs(x) * t


def per_particle_custom_jvp(x: jax.Array) -> jax.Array:
    return jnp.sum(soft_abs(embed(particles(x))), axis=1)


def per_particle_while(x: jax.Array) -> jax.Array:
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(c[0]) + c[0], c[1] + 1

    h, _ = lax.while_loop(lambda c: c[1] < 2, body, (embed(particles(x)), 0))
    return h


def per_particle_scan(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(c * w), None

    h, _ = lax.scan(body, embed(particles(x)), jnp.asarray([0.5, 1.5]))
    return h


def per_particle_cond(x: jax.Array) -> jax.Array:
    return lax.cond(x[0] > 0, jnp.sin, jnp.cos, embed(particles(x)))


RULE_CASES = [
    (per_particle_custom_jvp, "soft_abs"),
    (per_particle_while, "while"),
    (per_particle_scan, "scan"),
    (per_particle_cond, "cond"),
]
RULE_IDS = ["custom_jvp", "while", "scan", "cond"]


@pytest.mark.parametrize(("fun", "primitive"), RULE_CASES, ids=RULE_IDS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_rule_densification_is_recorded(
    fun: Callable[[jax.Array], jax.Array], primitive: str, jit: bool
) -> None:
    x = jnp.asarray(X)

    def run(x: jax.Array) -> Any:
        return lap_of(fun, x, True)

    with fwdlap.record_densifications() as events:
        got = (jax.jit(run) if jit else run)(x)
    assert events_summary(events) == [(primitive, "rule")]
    (event,) = events
    assert THIS_FILE in event.source
    assert fun.__name__ in event.source
    assert event.shape == (N, WIDTH)
    assert primitive in str(event) and "rule" in str(event)
    assert_triple_close(got, reference_triple(fun, x))


def test_threshold_densification_is_recorded() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        lap = fwdlap.laplacian(particle_mlp_sum, sparsity=True)(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    (event,) = events
    assert THIS_FILE in event.source and "particle_mlp_sum" in event.source
    assert event.blocks == N
    assert event.shape == (N,)
    np.testing.assert_allclose(lap, hessian_reference(particle_mlp_sum, x)[2])


def test_traced_jacobian_under_jit_is_recorded() -> None:
    x = jnp.asarray(X)

    def run(x: jax.Array, seed: jax.Array) -> Any:
        return fwdlap.lap(particle_features, (x,), (seed,), (None,), sparsity=True)

    with fwdlap.record_densifications() as events:
        got = jax.jit(run)(x, jnp.eye(x.size))
    assert events_summary(events) == [("input 0", "rule")]
    assert THIS_FILE in events[0].source
    assert_triple_close(got, reference_triple(particle_features, x))


def test_dense_mode_records_nothing() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        lap_of(particle_mlp_sum, x, False)
        lap_of(per_particle_while, x, None)
    assert events == []


def test_nested_recorders_both_collect() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as outer:
        with fwdlap.record_densifications() as inner:
            lap_of(particle_mlp_sum, x, True)
        lap_of(per_particle_while, x, True)
    assert events_summary(inner) == [("reduce_sum", "threshold")]
    assert events_summary(outer) == [("reduce_sum", "threshold"), ("while", "rule")]


def test_on_densify_warn_for_rule_events() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="warn")
    with pytest.warns(fwdlap.DensificationWarning, match="while") as record:
        got = lap_of(per_particle_while, x, sparsity)
    assert len(record) == 1
    assert_triple_close(got, reference_triple(per_particle_while, x))


def test_on_densify_warn_not_for_threshold_events() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="warn")
    with fwdlap.record_densifications() as events, warnings.catch_warnings():
        warnings.simplefilter("error", fwdlap.DensificationWarning)
        got = lap_of(particle_mlp_sum, x, sparsity)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert_triple_close(got, reference_triple(particle_mlp_sum, x))


def test_on_densify_raise() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="raise")
    with pytest.raises(fwdlap.DensificationError, match="cond"):
        lap_of(per_particle_cond, x, sparsity)
    with pytest.raises(fwdlap.DensificationError, match="soft_abs"):
        jax.jit(fwdlap.laplacian(per_particle_custom_jvp, sparsity=sparsity))(x)
    # Threshold events do not raise.
    got = lap_of(particle_mlp_sum, x, sparsity)
    assert_triple_close(got, reference_triple(particle_mlp_sum, x))


def test_on_densify_ignore_is_silent_and_correct() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lap_of(per_particle_scan, x, sparsity)
    assert_triple_close(got, reference_triple(per_particle_scan, x))


def test_densifications_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fwdlap.sparse")
    x = jnp.asarray(X)
    lap_of(particle_mlp_sum, x, True)
    lap_of(per_particle_while, x, True)
    records = [r for r in caplog.records if r.name == "fwdlap.sparse"]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG]
    assert "reduce_sum" in records[0].getMessage()
    assert "threshold" in records[0].getMessage()
    assert "while" in records[1].getMessage() and "rule" in records[1].getMessage()
    assert THIS_FILE in records[1].getMessage()


# --- 5. sparsity is kept -------------------------------------------------------------

N_BIG = 8
X_BIG = np.random.default_rng(3).normal(size=3 * N_BIG)


def test_particle_mlp_stays_sparse_until_the_sum() -> None:
    x = jnp.asarray(X_BIG)
    with fwdlap.record_densifications() as events:
        sparse = jax.jit(fwdlap.laplacian(particle_mlp_sum, sparsity=True))
        jaxpr_sparse = jax.make_jaxpr(sparse)(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert events[0].blocks == N_BIG
    # The dense pass holds (3N, N, WIDTH) hidden-layer jacobians; the sparse one only
    # (3, N, WIDTH): one particle's block per element.
    jaxpr_dense = jax.make_jaxpr(fwdlap.laplacian(particle_mlp_sum))(x)
    full = (3 * N_BIG, N_BIG, WIDTH)
    assert full in jaxpr_shapes(jaxpr_dense)
    assert full not in jaxpr_shapes(jaxpr_sparse)
    assert (3, N_BIG, WIDTH) in jaxpr_shapes(jaxpr_sparse)
    np.testing.assert_allclose(
        sparse(x), hessian_reference_jit(particle_mlp_sum, x)[2], rtol=1e-9
    )


def test_pair_stream_stays_sparse_until_the_sum_over_j() -> None:
    x = jnp.asarray(X_BIG)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, pair_stream, sparsity=True))(x)
    assert events == []  # every (i, j) element depends on particles i and j only
    assert_triple_close(got, reference_triple(pair_stream, x))
    with fwdlap.record_densifications() as events:
        jaxpr = jax.make_jaxpr(fwdlap.laplacian(pair_stream_sum_j, sparsity=True))(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert events[0].shape == (N_BIG, N_BIG, WIDTH)
    assert (3 * N_BIG, N_BIG, N_BIG, WIDTH) not in jaxpr_shapes(jaxpr)


def test_slater_determinant_rows_stay_sparse() -> None:
    # The sparse slogdet rule takes the per-electron rows; only scalars become dense.
    x = jnp.asarray(X_BIG)

    def f(x: jax.Array) -> jax.Array:
        r = particles(x)
        phi = jnp.tanh(r @ jnp.asarray(W1[:, :3]) @ np.ones((3, N_BIG)) * 0.3)
        return jnp.linalg.slogdet(phi + jnp.eye(N_BIG))[1]

    with fwdlap.record_densifications() as events:
        got = jax.jit(fwdlap.value_grad_and_laplacian(f, sparsity=True))(x)
    assert all(e.shape == () for e in events), events
    assert_triple_close(got, hessian_reference(f, x))


# --- 6. errors -----------------------------------------------------------------------


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(x**2)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), ("yes", TypeError), (2.5, TypeError)],
)
def test_bad_sparsity_values(value: Any, error: type[Exception]) -> None:
    x = jnp.asarray(X)
    with pytest.raises(error, match="sparsity"):
        lap_of(_sq, x, value)
    with pytest.raises(error, match="sparsity"):
        fwdlap.laplacian(_sq, sparsity=value)
    with pytest.raises(error, match="sparsity"):
        fwdlap.value_grad_and_laplacian(_sq, sparsity=value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"block_size": -3},
        {"block_size": 2.0},
        {"block_size": True},
        {"threshold": 0},
        {"on_densify": "loud"},
    ],
    ids=["block_0", "block_negative", "block_float", "block_bool", "threshold_0", "loud"],
)
def test_bad_sparsity_settings(kwargs: dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        fwdlap.Sparsity(**kwargs)


def test_block_size_must_divide_the_directions() -> None:
    x = jnp.asarray(X)  # 12 directions
    with pytest.raises(ValueError, match="block_size=5"):
        lap_of(_sq, x, fwdlap.Sparsity(block_size=5))
    with pytest.raises(ValueError, match="block_size"):
        fwdlap.laplacian(_sq, sparsity=fwdlap.Sparsity(block_size=8))(x)
    # 4 divides 12: fine.
    np.testing.assert_allclose(
        fwdlap.laplacian(_sq, sparsity=fwdlap.Sparsity(block_size=4))(x), 2.0 * x.size
    )


def test_sparsity_excludes_other_options() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        fwdlap.laplacian(_sq, sparsity=True, chunk_size=2)
    with pytest.raises(ValueError, match="probes"):
        fwdlap.laplacian(_sq, sparsity=True, probes=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="weights"):
        fwdlap.laplacian(_sq, sparsity=True, weights=jnp.ones(X.size))
    with pytest.raises(ValueError, match="chunk_size"):
        fwdlap.value_grad_and_laplacian(_sq, sparsity=True, chunk_size=2)
    # False is the dense mode and combines with anything.
    lap = fwdlap.laplacian(_sq, sparsity=False, chunk_size=5)(jnp.asarray(X))
    np.testing.assert_allclose(lap, 2.0 * X.size)


# --- 7. float32 ----------------------------------------------------------------------

F32_MODELS = [("particle_mlp", 4), ("ferminet", 4)]


@pytest.mark.parametrize(("name", "n"), F32_MODELS, ids=[m for m, _ in F32_MODELS])
def test_float32(name: str, n: int) -> None:
    # The float32 and float64 models share their parameters (drawn in float32).
    model32 = build(name, n, seed=1, dtype=jnp.float32)
    model64 = build(name, n, seed=1, dtype=jnp.float64)
    x32 = jnp.asarray(np.random.default_rng(2).normal(size=model32.dim), jnp.float32)

    def run(x: jax.Array) -> Any:
        return (
            lap_of(model32.fn, x, True),
            fwdlap.value_grad_and_laplacian(model32.fn, sparsity=True)(x),
        )

    (out, jac, lap), vgl = jax.jit(run)(x32)
    assert {a.dtype for a in (out, jac, lap, *vgl)} == {np.dtype(np.float32)}
    ref = hessian_reference_jit(model64.fn, x32.astype(jnp.float64))
    for got in ((out, jac, lap), vgl):
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
