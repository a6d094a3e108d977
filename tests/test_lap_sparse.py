"""The block-sparse jacobian mode (`sparsity=`) against jax.hessian and the dense mode.

References are `jax.jacfwd` and the trace of `jax.jacfwd(jax.jacfwd(f))` (helpers), or
`jax.grad` and the trace of `jax.hessian`. The only fwdlap-against-fwdlap comparison is
dense against sparse, and every such comparison also checks an independent reference.

Most cases run under `jax.jit`, with the reference and every mode in one compilation:
that is much faster than eager evaluation, which compiles each small operation. A
few cases run eagerly, where values computed from `x` (indices, say) are concrete.
"""

import functools
import logging
import sys
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
from helpers import (
    hessian_trace_weighted,
    jaxpr_shapes,
    reference_triple,
    reference_values,
    tree_allclose,
    window_count,
)
from test_lap_zoo import ZOO, Case

try:
    from benchmarks.models import build
except ModuleNotFoundError:  # pytest started outside the repository root
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from benchmarks.models import build

THIS_FILE = Path(__file__).name
Fun = Callable[[jax.Array], jax.Array]

# --- helpers -------------------------------------------------------------------------


def np_eye(x: Any) -> np.ndarray:
    """A NumPy identity `(x.size, *x.shape)`: a seed that the sparse mode can read."""
    size = int(np.size(x))
    return np.eye(size, dtype=np.dtype(x.dtype)).reshape(size, *np.shape(x))


def lap_of(fun: Callable[..., Any], x: Any, sparsity: Any = None) -> Any:
    """`fwdlap.lap` with the identity seed and a zero input laplacian."""
    return fwdlap.lap(fun, (x,), (np_eye(x),), (None,), sparsity=sparsity)


def hessian_reference(f: Fun, x: jax.Array) -> Any:
    """`(f(x), jax.grad, trace of jax.hessian)` of a scalar function."""
    return f(x), jax.grad(f)(x), jnp.trace(jax.hessian(f)(x))


hessian_reference_jit = jax.jit(hessian_reference, static_argnums=0)


def assert_triple_close(
    got: Any, ref: Any, rtol: float = 1e-8, atol: float = 1e-9, err: str = ""
) -> None:
    """Value, jacobian (or gradient) and laplacian against a reference triple."""
    for name, a, b in zip(("value", "jacobian", "laplacian"), got, ref, strict=True):
        assert tree_allclose(a, b, rtol=rtol, atol=atol), f"{err} {name}"


def events_summary(events: list[fwdlap.Densification]) -> list[tuple[str, str]]:
    return [(e.primitive, e.cause) for e in events]


def wide(block_size: int = 3) -> fwdlap.Sparsity:
    """A threshold so large that no jacobian is ever too wide to stay sparse."""
    return fwdlap.Sparsity(block_size=block_size, threshold=10_000)


# --- 1. the zoo: dense and sparse agree with the reference ---------------------------


def zoo_block_size(n: int) -> int:
    """A block size that splits `n` directions into at least two blocks (else 1)."""
    return next((b for b in (3, 4, 2) if n % b == 0 and n // b >= 2), 1)


def _zoo_all_modes(case: Case, x: jax.Array) -> Any:
    """Reference, dense, sparse with no threshold, sparse with a one-block threshold."""
    n = x.size
    b = zoo_block_size(n)

    def run(sparsity: Any) -> Any:
        return lap_of(case.fun, x, sparsity)

    return (
        reference_values(case.fun, x),
        run(None),
        {
            "wide": run(fwdlap.Sparsity(block_size=b, threshold=n)),
            "tight": run(fwdlap.Sparsity(block_size=b, threshold=b)),
        },
    )


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_sparse_matches_dense_and_reference(case: Case) -> None:
    x = jnp.asarray(case.x)
    ref, dense, sparse = jax.jit(functools.partial(_zoo_all_modes, case))(x)
    assert_triple_close(dense, ref, rtol=1e-6, atol=1e-7, err="dense")
    for mode, got in sparse.items():
        assert_triple_close(got, ref, rtol=1e-6, atol=1e-7, err=mode)
        assert_triple_close(got, dense, rtol=1e-9, atol=1e-10, err=mode)


# Concrete primals: indices computed from x (argmax, argsort) are known to the rules.
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
        assert_triple_close(got, ref, rtol=1e-6, atol=1e-7, err=str(threshold))


# --- 2. many-particle functions ------------------------------------------------------

N = 4  # particles
N_UP = 2
WIDTH = 5
RNG = np.random.default_rng(7)
X = RNG.normal(size=3 * N)  # one flat configuration of N particles in 3D

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
    """A per-particle two-layer MLP `(n, 3) -> (n, WIDTH)`: row i sees particle i."""
    h = jnp.tanh(r @ W1 + B1)
    return jnp.tanh(h @ W2) + h


def pair_features(r: jax.Array) -> jax.Array:
    """`(r_i - r_j, |r_i - r_j|)`, `(n, n, 4)`, with the eye trick on the diagonal."""
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
    picked = h[PERM]  # a gather with static indices, one row taken twice
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


SEGMENTS = np.array([0, 1, 0, 1])  # two particles per group
TARGETS = np.array([2, 0, 2, 9])  # rows 2 twice, 9 out of bounds (dropped)


def scatter_add_collisions(x: jax.Array) -> jax.Array:
    # Several particles summed into one element: the element keeps their union.
    h = embed(particles(x))
    groups = jax.ops.segment_sum(h, SEGMENTS, num_segments=2)
    rows = jnp.zeros((3, WIDTH)).at[TARGETS].add(h**2, mode="drop")
    return jnp.tanh(groups[SEGMENTS] * h) + rows[SEGMENTS[::-1] + 1] ** 2


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
    return jax.nn.softmax(scores, axis=-1) @ v + h


def attention_manual_softmax(x: jax.Array) -> jax.Array:
    h = embed(particles(x))
    scores = jnp.einsum("id,jd->ij", h @ W_Q, h @ W_K)
    e = jnp.exp(scores - 1.0)
    return (e / jnp.sum(e, axis=-1, keepdims=True)) @ (h @ W_V)


def dot_general_const(x: jax.Array) -> jax.Array:
    r = particles(x)
    a = jnp.einsum("nc,bcw->bnw", r, W_BATCH)  # a constant batch of weights
    return jnp.tanh(a) @ W2 + jnp.einsum("nc,nc->n", r, r)[None, :, None]


def orbitals(x: jax.Array) -> jax.Array:
    """Orbitals with an envelope, `(N, 2N)`: row i depends on electron i only."""
    r = particles(x)
    env = jnp.exp(-jnp.sqrt(jnp.sum(r**2, axis=-1, keepdims=True) + 0.1))
    return (embed(r) @ W_ORB) * env + 0.3 * jnp.eye(N, 2 * N)


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
    # One determinant per spin block.
    phi = orbitals(x)
    up = jnp.linalg.slogdet(phi[:N_UP, :N_UP])[1]
    down = jnp.linalg.slogdet(phi[N_UP:, N_UP : 2 * N_UP])[1]
    return up + down


def stacked_softmax(x: jax.Array) -> jax.Array:
    # jnp.stack (a primitive in newer JAX) and softmax's stop_gradient, per particle.
    h = embed(particles(x))
    s = jnp.stack([h, jax.nn.softmax(h, axis=-1), jax.nn.relu(h)], axis=1)
    return jax.nn.logsumexp(s, axis=(1, 2))


class ParticleCase(NamedTuple):
    name: str
    fun: Fun


PARTICLE_CASES = [
    ParticleCase(f.__name__, f)
    for f in (
        particle_mlp_sum,
        particle_features,
        pair_stream,
        pair_stream_sum_j,
        pair_energy,
        spin_means,
        structural,
        transposes,
        dynamic_slice_concrete,
        dynamic_slice_traced,
        scatter_add_collisions,
        where_select,
        cumsum_particles,
        sort_features,
        max_reductions,
        attention,
        attention_manual_softmax,
        dot_general_const,
        slater_slogdet,
        slater_det,
        slater_batched,
        slater_spin_blocks,
        stacked_softmax,
    )
]
PARTICLE_IDS = [c.name for c in PARTICLE_CASES]

SPARSITIES: dict[str, Any] = {
    "default": True,  # block 3, threshold N / 2 particles
    "wide": wide(),
    "int_3": 3,  # one block: densifies as soon as two particles meet
}
# Block size 1 (one direction per block) for a few cases: more, smaller blocks.
BLOCK_1_CASES = {"pair_stream", "structural", "attention", "slater_batched"}


def _particle_all_modes(case: ParticleCase, x: jax.Array) -> Any:
    modes = dict(SPARSITIES)
    if case.name in BLOCK_1_CASES:
        modes["block_1"] = fwdlap.Sparsity(block_size=1, threshold=x.size)
    sparse = {mode: lap_of(case.fun, x, s) for mode, s in modes.items()}
    if jax.eval_shape(case.fun, x).shape == ():
        vgl = fwdlap.value_grad_and_laplacian(case.fun, sparsity=True)
        sparse["value_grad_and_laplacian"] = vgl(x)
    return reference_values(case.fun, x), lap_of(case.fun, x, None), sparse


@pytest.mark.parametrize("case", PARTICLE_CASES, ids=PARTICLE_IDS)
def test_particle_functions(case: ParticleCase) -> None:
    # Under jit, indices computed from x are traced (dynamic_slice_traced). One
    # compilation holds the reference, the dense pass and every sparse mode.
    x = jnp.asarray(X)
    ref, dense, sparse = jax.jit(functools.partial(_particle_all_modes, case))(x)
    assert_triple_close(dense, ref, err="dense")
    for mode, got in sparse.items():
        assert_triple_close(got, ref, err=mode)
        assert_triple_close(got, dense, rtol=1e-10, atol=1e-12, err=mode)


def test_particle_mlp_eager() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = lap_of(particle_mlp_sum, x, True)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert_triple_close(got, reference_triple(particle_mlp_sum, x))


def test_dynamic_slice_start_traced_under_jit_and_concrete_eagerly() -> None:
    # A concrete start copies the blocks of the sliced rows exactly; a traced one must
    # allow for every row (here more particles than the default threshold).
    x = jnp.asarray(X)
    run = functools.partial(lap_of, dynamic_slice_traced, sparsity=True)
    with fwdlap.record_densifications() as eager_events:
        eager = run(x)
    with fwdlap.record_densifications() as jit_events:
        jitted = jax.jit(run)(x)
    assert eager_events == []
    assert events_summary(jit_events) == [("dynamic_slice", "threshold")]
    ref = reference_triple(dynamic_slice_traced, x)
    assert_triple_close(eager, ref, err="eager")
    assert_triple_close(jitted, ref, err="jit")


# The benchmark models in float64, kept small.
MODELS = [("particle_mlp", 6), ("ferminet", 4), ("psiformer", 4)]


@pytest.mark.parametrize(("name", "n"), MODELS, ids=[m for m, _ in MODELS])
def test_benchmark_models(name: str, n: int) -> None:
    model = build(name, n, seed=0, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(n).normal(size=model.dim))

    def run(x: jax.Array) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(model.fn, sparsity=True)
        return vgl(x), hessian_reference(model.fn, x)

    with fwdlap.record_densifications() as events:
        got, ref = jax.jit(run)(x)
    assert_triple_close(got, ref, rtol=1e-7, atol=1e-9)
    assert events, "every model ends in sums over all electrons"
    assert all(e.cause == "threshold" for e in events), events_summary(events)


def test_int_threshold_counts_directions() -> None:
    # sparsity=t allows t // block_size blocks: pair elements need two particles.
    x = jnp.asarray(X)
    for threshold, densifies in ((3, True), (5, True), (6, False)):
        with fwdlap.record_densifications() as events:
            got = jax.jit(functools.partial(lap_of, pair_stream, sparsity=threshold))(x)
        assert bool(events) == densifies, threshold
        assert all(e.cause == "threshold" for e in events)
        assert all(e.blocks == 2 for e in events if e.blocks)
        assert_triple_close(got, reference_triple(pair_stream, x))


def test_two_arguments_with_split_identity() -> None:
    # Two positional arguments whose seeds are the two halves of one identity.
    x = jnp.asarray(X)
    eye = np.eye(x.size)

    def g(a: jax.Array, b: jax.Array) -> jax.Array:
        return pair_stream(jnp.concatenate([a, b]))

    def run(x: jax.Array) -> Any:
        seeds = (eye[:, :6], eye[:, 6:])
        return fwdlap.lap(g, (x[:6], x[6:]), seeds, (None, None), sparsity=True)

    with fwdlap.record_densifications() as events:
        got = jax.jit(run)(x)
    assert events == []
    assert_triple_close(got, reference_triple(pair_stream, x))


def test_block_diagonal_seed_and_input_laplacian() -> None:
    # A non-identity seed with a block-diagonal zero pattern stays sparse; the input
    # laplacian enters through the jacobian.
    x = jnp.asarray(X)
    mix = np.random.default_rng(5).normal(size=(N, 3, 3))
    v = np.zeros((3 * N, 3 * N))
    for i in range(N):
        v[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] = mix[i]
    lap_in = jnp.asarray(np.random.default_rng(6).normal(size=3 * N))
    sparsity = fwdlap.Sparsity(block_size=3)

    def run(x: jax.Array) -> Any:
        got = fwdlap.lap(pair_stream, (x,), (v,), (lap_in,), sparsity=sparsity)
        jac_ref = jax.jacfwd(pair_stream)(x)
        ref = (
            pair_stream(x),
            jnp.einsum("...i,ki->k...", jac_ref, v),
            hessian_trace_weighted(pair_stream, x, jnp.asarray(v))
            + jnp.einsum("...i,i->...", jac_ref, lap_in),
        )
        return got, ref

    with fwdlap.record_densifications() as events:
        got, ref = jax.jit(run)(x)
    assert events == []
    assert_triple_close(got, ref)


@pytest.mark.parametrize("sparsity", [None, True], ids=["dense", "sparse"])
def test_numpy_input_laplacian(sparsity: Any) -> None:
    # NumPy laplacians are accepted like NumPy jacobians.
    x = jnp.asarray(X)
    lap_in = np.random.default_rng(6).normal(size=3 * N)
    _, jac, lap = fwdlap.lap(
        particle_features, (x,), (np_eye(x),), (lap_in,), sparsity=sparsity
    )
    _, ref_jac, ref_lap = reference_triple(particle_features, x)
    np.testing.assert_allclose(jac, ref_jac, rtol=1e-9, atol=1e-12)
    expected = ref_lap + jnp.einsum("k...,k->...", ref_jac, lap_in)
    np.testing.assert_allclose(lap, expected, rtol=1e-9, atol=1e-12)


def test_directions_of_some_particles_only() -> None:
    # Seeds for particles 1 and 3 only: the Laplacian over their coordinates.
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

    def run(x: jax.Array) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(f, sparsity=True)
        return vgl(x), hessian_reference(f, x)

    got, ref = jax.jit(run)(x)
    assert_triple_close(got, ref)


# --- 3. jit, vmap and grad -----------------------------------------------------------

BATCH = np.random.default_rng(11).normal(size=(3, 3 * N))


@pytest.mark.parametrize(
    "fun", [particle_mlp_sum, slater_slogdet], ids=lambda f: f.__name__
)
def test_laplacian_jit_vmap(fun: Fun) -> None:
    xs = jnp.asarray(BATCH)

    def run(xs: jax.Array) -> Any:
        lap = jax.vmap(fwdlap.laplacian(fun, sparsity=True))(xs)
        vgl = jax.vmap(fwdlap.value_grad_and_laplacian(fun, sparsity=True))(xs)
        return lap, vgl, jax.vmap(functools.partial(hessian_reference, fun))(xs)

    with fwdlap.record_densifications() as events:
        lap, vgl, ref = jax.jit(run)(xs)
    assert lap.shape == (BATCH.shape[0],)
    np.testing.assert_allclose(lap, ref[2], rtol=1e-9)
    assert_triple_close(vgl, ref)
    # vmap does not hide the identity's zero pattern: no rule-caused densification.
    assert all(e.cause == "threshold" for e in events), events_summary(events)


def test_laplacian_of_array_output_jit() -> None:
    x = jnp.asarray(X)
    got = jax.jit(fwdlap.laplacian(pair_stream_sum_j, sparsity=True))(x)
    ref = reference_triple(pair_stream_sum_j, x)[2]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


PARAMS = {"w1": W1, "b1": B1, "w2": W_PAIR, "out": W_OUT}


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

    def run(p: dict[str, jax.Array]) -> Any:
        return tuple(jax.grad(f)(p) for f in (sparse_loss, dense_loss, reference_loss))

    params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
    sparse, dense, ref = jax.jit(run)(params)
    assert tree_allclose(sparse, ref, rtol=1e-8, atol=1e-10)
    assert tree_allclose(dense, ref, rtol=1e-8, atol=1e-10)
    assert tree_allclose(sparse, dense, rtol=1e-10, atol=1e-12)


def test_pytree_argument_and_argnums() -> None:
    # Up and down electrons as two leaves of a dict: the identity is split across them.
    x = jnp.asarray(X)
    tree = {"up": x[: 3 * N_UP], "down": x[3 * N_UP :]}

    def f(t: dict[str, jax.Array], scale: float) -> jax.Array:
        return scale * slater_slogdet(jnp.concatenate([t["up"], t["down"]]))

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


# --- 4. observability ----------------------------------------------------------------


@jax.custom_jvp
def soft_norm(h: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(h**2, axis=-1) + 0.5)


@soft_norm.defjvp
def _soft_norm_jvp(primals: Any, tangents: Any) -> Any:
    (h,), (t,) = primals, tangents
    norm = soft_norm(h)
    return norm, jnp.sum(h * t, axis=-1) / norm  # not elementwise


def per_particle_custom_jvp(x: jax.Array) -> jax.Array:
    return soft_norm(embed(particles(x)))


def per_particle_while(x: jax.Array) -> jax.Array:
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(c[0]) + c[0], c[1] + 1

    init = (embed(particles(x)), jnp.asarray(0))
    h, _ = lax.while_loop(lambda c: c[1] < 2, body, init)
    return h


def per_particle_scan(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(c * w), None

    h, _ = lax.scan(body, embed(particles(x)), jnp.asarray([0.5, 1.5]))
    return h


def per_particle_cond(x: jax.Array) -> jax.Array:
    # The predicate is traced under jit only (eagerly the branch is inlined).
    return lax.cond(x[0] > 0, jnp.sin, jnp.cos, embed(particles(x)))


def per_particle_traced_gather(x: jax.Array) -> jax.Array:
    # Under jit the order is traced, so which rows the gather copies is unknown.
    order = jnp.argsort(lax.stop_gradient(particles(x)[:, 0]))
    return embed(particles(x))[order]


RULE_CASES = [
    (per_particle_custom_jvp, "soft_norm", False),
    (per_particle_custom_jvp, "soft_norm", True),
    (per_particle_traced_gather, "gather", True),
]


@pytest.mark.parametrize(
    ("fun", "primitive", "jit"),
    RULE_CASES,
    ids=[f"{p}-{'jit' if j else 'eager'}" for _, p, j in RULE_CASES],
)
def test_rule_densification_is_recorded(fun: Fun, primitive: str, jit: bool) -> None:
    x = jnp.asarray(X)
    run = functools.partial(lap_of, fun, sparsity=True)
    with fwdlap.record_densifications() as events:
        got = (jax.jit(run) if jit else run)(x)
    assert events_summary(events) == [(primitive, "rule")]
    (event,) = events
    assert THIS_FILE in event.source and fun.__name__ in event.source
    assert event.shape == (N, WIDTH)
    assert primitive in str(event) and "(rule)" in str(event) and event.reason
    assert_triple_close(got, reference_triple(fun, x))


def test_cond_with_concrete_predicate_stays_sparse() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = lap_of(per_particle_cond, x, True)
    assert events == []
    assert_triple_close(got, reference_triple(per_particle_cond, x))


def test_threshold_densification_is_recorded() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        lap = fwdlap.laplacian(particle_mlp_sum, sparsity=True)(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    (event,) = events
    assert THIS_FILE in event.source and "particle_mlp_sum" in event.source
    assert event.blocks == N
    assert event.shape == (N,)
    np.testing.assert_allclose(lap, hessian_reference_jit(particle_mlp_sum, x)[2])


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
        lap_of(per_particle_custom_jvp, x, True)
    assert events_summary(inner) == [("reduce_sum", "threshold")]
    assert events_summary(outer) == [
        ("reduce_sum", "threshold"),
        ("soft_norm", "rule"),
    ]


def test_on_densify_warn_for_rule_events() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="warn")
    with pytest.warns(fwdlap.DensificationWarning, match="soft_norm") as record:
        got = lap_of(per_particle_custom_jvp, x, sparsity)
    assert len(record) == 1
    assert_triple_close(got, reference_triple(per_particle_custom_jvp, x))


def test_missing_rule_warns_by_default_once_per_line() -> None:
    # The same custom_jvp call on one source line, twice in one trace: one warning.
    def twice(x: jax.Array) -> jax.Array:
        return soft_norm(embed(particles(x))) + soft_norm(embed(particles(2 * x)))

    x = jnp.asarray(X)
    with pytest.warns(fwdlap.DensificationWarning, match="soft_norm") as record:
        got = jax.jit(lambda x: lap_of(twice, x, True))(x)
    assert len([r for r in record if "soft_norm" in str(r.message)]) == 1
    assert_triple_close(got, reference_triple(twice, x))


def test_threshold_densification_does_not_warn_by_default() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events, warnings.catch_warnings():
        warnings.simplefilter("error", fwdlap.DensificationWarning)
        got = lap_of(particle_mlp_sum, x, True)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert_triple_close(got, reference_triple(particle_mlp_sum, x))


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
    with pytest.raises(fwdlap.DensificationError, match="gather"):
        run = functools.partial(lap_of, per_particle_traced_gather, sparsity=sparsity)
        jax.jit(run)(x)
    with pytest.raises(fwdlap.DensificationError, match="soft_norm"):
        jax.jit(fwdlap.laplacian(per_particle_custom_jvp, sparsity=sparsity))(x)
    # Threshold events do not raise.
    got = lap_of(particle_mlp_sum, x, sparsity)
    assert_triple_close(got, reference_triple(particle_mlp_sum, x))


def test_on_densify_ignore_is_silent_and_correct() -> None:
    x = jnp.asarray(X)
    sparsity = fwdlap.Sparsity(on_densify="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lap_of(per_particle_custom_jvp, x, sparsity)
    assert_triple_close(got, reference_triple(per_particle_custom_jvp, x))


def test_densifications_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fwdlap.sparse")
    x = jnp.asarray(X)
    lap_of(particle_mlp_sum, x, True)
    lap_of(per_particle_custom_jvp, x, True)
    records = [r for r in caplog.records if r.name == "fwdlap.sparse"]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG]
    first, second = (r.getMessage() for r in records)
    assert "reduce_sum" in first and "threshold" in first
    assert "soft_norm" in second and "rule" in second and THIS_FILE in second


# --- 5. sparsity is kept -------------------------------------------------------------


# Loops: every carry keeps one block layout for all iterations.


def layers_fori(x: jax.Array) -> jax.Array:
    # A per-particle residual layer applied three times: fori_loop lowers to scan.
    return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ W2) + h, embed(particles(x)))


def scan_with_outputs(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(c * w), c**2  # the stacked outputs are per-particle too

    h, ys = lax.scan(body, embed(particles(x)), jnp.asarray([0.5, 1.5]))
    return h + jnp.sum(jnp.sin(ys), axis=0)


def carry_gains_tangent(x: jax.Array) -> jax.Array:
    # The carry starts as a constant and takes each particle's tangent in the loop.
    h = embed(particles(x))
    return lax.fori_loop(0, 2, lambda i, c: 0.5 * c + jnp.sin(h), jnp.zeros(h.shape))


def nested_loops(x: jax.Array) -> jax.Array:
    def outer(i: Any, h: jax.Array) -> jax.Array:
        inner = lax.fori_loop(0, 2, lambda j, g: 0.5 * jnp.sin(g @ W2) + g, h)
        return 0.9 * inner

    return lax.fori_loop(0, 2, outer, embed(particles(x)))


def while_on_values(x: jax.Array) -> jax.Array:
    # The trip count depends on the values (the condition sees primals only).
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return 1.3 * c[0] + 0.1 * jnp.tanh(c[0]), c[1] + 1

    h, k = lax.while_loop(
        lambda c: jnp.max(jnp.abs(c[0])) < 3.0,
        body,
        (embed(particles(x)), jnp.asarray(0)),
    )
    return h * k


def reverse_scan(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return c * w + jnp.sin(c), jnp.cos(c)

    h, ys = lax.scan(body, embed(particles(x)), jnp.arange(1.0, 4.0), reverse=True)
    return h + ys[0] ** 2


def neighbour_loop(x: jax.Array) -> jax.Array:
    # Each iteration mixes a particle with its neighbour: the layout grows every round.
    h = embed(particles(x))
    return lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c + jnp.roll(c, 1, axis=0)), h)


def scan_over_particles(x: jax.Array) -> jax.Array:
    # Scanning over the particles: every slice is a different particle, and the carry
    # sums them all.
    h = embed(particles(x))

    def body(acc: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
        return acc + jnp.sin(hi), hi * acc

    acc, ys = lax.scan(body, jnp.zeros(WIDTH), h)
    return jnp.concatenate([acc[None], ys])


def control_flow_output_shapes(closed: Any) -> list[tuple[int, ...]]:
    """Shapes of the outputs of every scan, while and cond in a jaxpr."""
    jaxpr = getattr(closed, "jaxpr", closed)
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while", "cond"):
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            if hasattr(param, "eqns") or hasattr(getattr(param, "jaxpr", None), "eqns"):
                shapes += control_flow_output_shapes(param)
    return shapes


CONTROL_FLOW_CASES = [
    layers_fori,
    per_particle_while,
    per_particle_scan,
    scan_with_outputs,
    carry_gains_tangent,
    nested_loops,
    while_on_values,
    reverse_scan,
    per_particle_cond,
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fun", CONTROL_FLOW_CASES, ids=lambda f: f.__name__)
def test_control_flow_stays_sparse(fun: Fun, jit: bool) -> None:
    x = jnp.asarray(X)
    run = functools.partial(lap_of, fun, sparsity=True)
    with fwdlap.record_densifications() as events:
        got = (jax.jit(run) if jit else run)(x)
    assert events == [], events_summary(events)
    assert_triple_close(got, reference_triple(fun, x))
    # The carried jacobians hold one particle's 3 directions, not all 3N.
    carried = control_flow_output_shapes(jax.make_jaxpr(run)(x))
    assert (3, N, WIDTH) in carried
    assert (3 * N, N, WIDTH) not in carried


def while_up_to_a_particle_value(x: jax.Array) -> jax.Array:
    # The condition's constant `limit` has a block-sparse jacobian.
    h = embed(particles(x))
    limit = 3.0 + jnp.abs(h[0, 0])

    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return 1.3 * c[0] + 0.1 * jnp.tanh(c[0]), c[1] + 1

    h, k = lax.while_loop(
        lambda c: jnp.max(jnp.abs(c[0])) < limit, body, (h, jnp.asarray(0))
    )
    return h * k


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_while_condition_constants_densify_nothing(jit: bool) -> None:
    # The condition sees primals only, so its constants' jacobians are not needed.
    x = jnp.asarray(X)
    run = functools.partial(lap_of, while_up_to_a_particle_value, sparsity=True)
    with fwdlap.record_densifications() as events:
        got = (jax.jit(run) if jit else run)(x)
    assert events == [], events_summary(events)
    assert_triple_close(got, reference_triple(while_up_to_a_particle_value, x))


def test_loop_layout_grows_to_a_fixpoint() -> None:
    x = jnp.asarray(X)
    ref = reference_triple(neighbour_loop, x)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, neighbour_loop, sparsity=wide()))(x)
    assert events == [], events_summary(events)
    assert_triple_close(got, ref)
    # Past the default threshold (2 of 4 particles) the carry is dense, and says so.
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, neighbour_loop, sparsity=True))(x)
    assert events_summary(events) == [("scan", "threshold")]
    assert "carry" in events[0].reason
    assert_triple_close(got, ref)


def neighbours_either_side(x: jax.Array) -> jax.Array:
    # Each branch pairs a particle with one neighbour, the two branches with different
    # ones: together the output depends on three particles.
    h = embed(particles(x))
    return lax.cond(
        x[0] > 0,
        lambda h: h * jnp.roll(h, 1, axis=0),
        lambda h: h * jnp.roll(h, -1, axis=0),
        h,
    )


def test_cond_output_takes_the_union_of_the_branches() -> None:
    x = jnp.asarray(X)
    ref = reference_triple(neighbours_either_side, x)
    run = functools.partial(lap_of, neighbours_either_side)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(run, sparsity=wide()))(x)
    assert events == [], events_summary(events)
    assert_triple_close(got, ref)
    carried = [
        tuple(v.aval.shape)
        for eqn in jax.make_jaxpr(functools.partial(run, sparsity=wide()))(x).eqns
        if eqn.primitive.name == "cond"
        for v in eqn.outvars
    ]
    assert (9, N, WIDTH) in carried  # three particles' blocks of 3
    # Each branch alone fits two particles; their union does not.
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(run, sparsity=True))(x)
    assert events_summary(events) == [("cond", "threshold")]
    assert_triple_close(got, ref)


def test_scan_over_particles_densifies_slices_and_carry() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, scan_over_particles, sparsity=True))(x)
    assert events_summary(events) == [("scan", "threshold"), ("scan", "threshold")]
    assert "scanned input" in events[0].reason and "carry" in events[1].reason
    assert_triple_close(got, reference_triple(scan_over_particles, x))


LOOP_PARAMS = {"w1": W1, "b1": B1, "w2": W2, "out": W_OUT}


def loop_param_model(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jnp.tanh(particles(x) @ p["w1"] + p["b1"])
    h = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["w2"]) + h, h)
    return jnp.sum(h @ p["out"])


def test_sparse_loops_under_vmap_and_grad() -> None:
    xs = jnp.asarray(BATCH)
    params = jax.tree_util.tree_map(jnp.asarray, LOOP_PARAMS)

    def sparse_loss(p: dict[str, jax.Array]) -> jax.Array:
        lap = fwdlap.laplacian(loop_param_model, argnums=1, sparsity=True)
        return jnp.sum(jax.vmap(functools.partial(lap, p))(xs))

    def reference_loss(p: dict[str, jax.Array]) -> jax.Array:
        def one(x: jax.Array) -> jax.Array:
            return jnp.trace(jax.hessian(lambda y: loop_param_model(p, y))(x))

        return jnp.sum(jax.vmap(one)(xs))

    def run(p: dict[str, jax.Array]) -> Any:
        return jax.value_and_grad(sparse_loss)(p), jax.value_and_grad(reference_loss)(p)

    with fwdlap.record_densifications() as events:
        got, ref = jax.jit(run)(params)
    assert all(e.primitive != "scan" for e in events), events_summary(events)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-9)
    assert tree_allclose(got[1], ref[1], rtol=1e-8, atol=1e-10)


N_BIG = 8
X_BIG = np.random.default_rng(3).normal(size=3 * N_BIG)


def test_particle_mlp_stays_sparse_until_the_sum() -> None:
    x = jnp.asarray(X_BIG)
    sparse = fwdlap.laplacian(particle_mlp_sum, sparsity=True)
    with fwdlap.record_densifications() as events:
        jaxpr_sparse = jax.make_jaxpr(sparse)(x)
    assert events_summary(events) == [("reduce_sum", "threshold")]
    assert events[0].blocks == N_BIG
    # The dense pass holds (3N, N, WIDTH) hidden-layer jacobians; the sparse one
    # (3, N, WIDTH): one particle's block per element.
    jaxpr_dense = jax.make_jaxpr(fwdlap.laplacian(particle_mlp_sum, sparsity=False))(x)
    full = (3 * N_BIG, N_BIG, WIDTH)
    assert full in jaxpr_shapes(jaxpr_dense)
    assert full not in jaxpr_shapes(jaxpr_sparse)
    assert (3, N_BIG, WIDTH) in jaxpr_shapes(jaxpr_sparse)
    got, ref = jax.jit(lambda x: (sparse(x), hessian_reference(particle_mlp_sum, x)))(x)
    np.testing.assert_allclose(got, ref[2], rtol=1e-9)


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
    assert (6, N_BIG, N_BIG, WIDTH) in jaxpr_shapes(jaxpr)  # two blocks per element


@pytest.mark.parametrize(
    "fun", [slater_slogdet, slater_batched, stacked_softmax], ids=lambda f: f.__name__
)
def test_only_the_final_reductions_densify(fun: Fun) -> None:
    # Determinant rows, jnp.stack, softmax (its stop_gradient) and relu keep the
    # per-particle blocks: the only densifications produce scalars or (N,)-vectors.
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, fun, sparsity=True))(x)
    assert all(e.cause == "threshold" for e in events), events_summary(events)
    assert all(len(e.shape) <= 1 for e in events), [e.shape for e in events]
    assert_triple_close(got, reference_triple(fun, x))


def test_scatter_add_with_collisions_keeps_the_union() -> None:
    # Two particles per group fit the default threshold (half of 4 particles); with a
    # one-particle threshold the sums over groups densify, reported as such.
    x = jnp.asarray(X)
    ref = reference_triple(scatter_add_collisions, x)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, scatter_add_collisions, sparsity=True))(
            x
        )
    assert events == [], events_summary(events)
    assert_triple_close(got, ref)
    tight = functools.partial(lap_of, scatter_add_collisions, sparsity=3)
    with fwdlap.record_densifications() as events:
        got = jax.jit(tight)(x)
    assert ("scatter-add", "threshold") in events_summary(events)
    assert all(e.cause == "threshold" for e in events), events_summary(events)
    assert_triple_close(got, ref)


@pytest.mark.parametrize("fun", [slater_slogdet, slater_det], ids=lambda f: f.__name__)
def test_determinant_densification_is_recorded(fun: Fun) -> None:
    # The determinant depends on all N particles, more than the default N / 2, so its
    # jacobian becomes dense; like any other densification that must be reported.
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = jax.jit(functools.partial(lap_of, fun, sparsity=True))(x)
    assert_triple_close(got, reference_triple(fun, x))
    assert events_summary(events), "the determinant's dense jacobian went unreported"
    assert all(e.cause == "threshold" and e.shape == () for e in events)
    assert all(THIS_FILE in e.source for e in events)


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
    ids=[
        "block_0",
        "block_negative",
        "block_float",
        "block_bool",
        "threshold_0",
        "loud",
    ],
)
def test_bad_sparsity_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fwdlap.Sparsity(**kwargs)


def test_block_size_must_divide_the_directions() -> None:
    x = jnp.asarray(X)  # 12 directions
    with pytest.raises(ValueError, match="block_size=5"):
        lap_of(_sq, x, fwdlap.Sparsity(block_size=5))
    with pytest.raises(ValueError, match="block_size"):
        fwdlap.laplacian(_sq, sparsity=fwdlap.Sparsity(block_size=8))(x)
    # 4 divides 12.
    lap = fwdlap.laplacian(_sq, sparsity=fwdlap.Sparsity(block_size=4))(x)
    np.testing.assert_allclose(lap, 2.0 * x.size)


def test_sparsity_excludes_other_options() -> None:
    with pytest.raises(ValueError, match="probes"):
        fwdlap.laplacian(_sq, sparsity=True, probes=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="weights"):
        fwdlap.laplacian(_sq, sparsity=True, weights=jnp.ones(X.size))
    # False is the dense mode and combines with anything.
    lap = fwdlap.laplacian(_sq, sparsity=False, chunk_size=5)(jnp.asarray(X))
    np.testing.assert_allclose(lap, 2.0 * X.size)


# --- 7. sparse and chunked -----------------------------------------------------------


def count_passes(fun: Fun, x: jax.Array, **kwargs: Any) -> int:
    """How many windows `laplacian` evaluates the dense jacobians in.

    The windows are the length of a top-level `scan` over int32 window starts; one
    window has no such scan. The sparse part is traced (and densifies) once.
    """

    def summed(y: jax.Array) -> jax.Array:
        return jnp.sum(per_particle_custom_jvp(y)) + fun(y)

    with fwdlap.record_densifications() as events:
        jaxpr = jax.make_jaxpr(fwdlap.laplacian(summed, **kwargs))(x).jaxpr
    assert sum(e.primitive == "soft_norm" for e in events) == 1
    return window_count(jaxpr)


ROUNDING = [(1, N), (3, N), (4, N), (6, 2), (7, 2), (11, 2), (12, 1), (99, 1)]


@pytest.mark.parametrize(("chunk_size", "passes"), ROUNDING)
def test_chunk_size_rounds_to_whole_particles(chunk_size: int, passes: int) -> None:
    # 12 coordinates in blocks of 3: a window holds chunk_size // 3 particles (at
    # least one), so every particle's coordinates stay in one window.
    x = jnp.asarray(X)
    got = count_passes(_sq, x, sparsity=True, chunk_size=chunk_size)
    assert got == passes


def test_chunk_size_with_block_size_one() -> None:
    # Blocks of 1: 12 coordinates make windows of 5, 5 and 2 directions; 10 make
    # windows of 4, 4 and 2 in the check against the reference.
    assert count_passes(_sq, jnp.asarray(X), sparsity=wide(1), chunk_size=5) == 3
    x = jnp.asarray(X[:10])
    settings = fwdlap.Sparsity(block_size=1)
    f = pair_energy_flat10

    def run(y: jax.Array) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(f, sparsity=settings, chunk_size=4)
        return vgl(y), hessian_reference(f, y)

    got, ref = jax.jit(run)(x)
    assert_triple_close(got, ref)


def pair_energy_flat10(x: jax.Array) -> jax.Array:
    """A function of 10 coordinates (no particle structure) mixing neighbours."""
    return jnp.sum(jnp.sin(x[1:] * x[:-1])) + jnp.sum(jnp.tanh(x) ** 3)


def attention_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(attention(x)))


CHUNK_FUNS = [particle_mlp_sum, pair_energy, slater_slogdet, attention_sum]


@pytest.mark.parametrize("fun", CHUNK_FUNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chunk_size", [3, 6, 9])
def test_sparse_chunked_particle_functions(fun: Fun, chunk_size: int) -> None:
    x = jnp.asarray(X)

    def run(y: jax.Array) -> Any:
        lap = fwdlap.laplacian(fun, sparsity=True, chunk_size=chunk_size)(y)
        vgl = fwdlap.value_grad_and_laplacian(
            fun, sparsity=True, chunk_size=chunk_size
        )(y)
        return lap, vgl, hessian_reference(fun, y)

    lap, vgl, ref = jax.jit(run)(x)
    np.testing.assert_allclose(lap, ref[2], rtol=1e-9, atol=1e-12)
    assert_triple_close(vgl, ref)


@pytest.mark.parametrize(("name", "n"), MODELS, ids=[m for m, _ in MODELS])
def test_sparse_chunked_benchmark_models(name: str, n: int) -> None:
    model = build(name, n, seed=0, dtype=jnp.float64)
    xs = jnp.asarray(np.random.default_rng(n + 1).normal(size=(2, model.dim)))

    def run(xs: jax.Array) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(model.fn, sparsity=True, chunk_size=6)
        ref = functools.partial(hessian_reference, model.fn)
        return jax.vmap(vgl)(xs), jax.vmap(ref)(xs)

    got, ref = jax.jit(run)(xs)
    assert_triple_close(got, ref, rtol=1e-7, atol=1e-9)


def test_grad_of_sparse_chunked_laplacian_wrt_params() -> None:
    x = jnp.asarray(X)

    def chunked_loss(p: dict[str, jax.Array]) -> jax.Array:
        lap = fwdlap.laplacian(param_model, argnums=1, sparsity=True, chunk_size=6)
        return lap(p, x)

    def reference_loss(p: dict[str, jax.Array]) -> jax.Array:
        return jnp.trace(jax.hessian(lambda y: param_model(p, y))(x))

    def run(p: dict[str, jax.Array]) -> Any:
        return jax.grad(chunked_loss)(p), jax.grad(reference_loss)(p)

    params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
    got, ref = jax.jit(run)(params)
    assert tree_allclose(got, ref, rtol=1e-8, atol=1e-10)


def test_sparse_chunks_across_pytree_leaves() -> None:
    # Passes of 9 coordinates: the first covers all of `up` (6) and 3 of `down`.
    x = jnp.asarray(X)
    tree = {"up": x[:6], "down": x[6:]}

    def f(t: dict[str, jax.Array]) -> jax.Array:
        return pair_energy(jnp.concatenate([t["up"], t["down"]]))

    def run(t: dict[str, jax.Array]) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(f, sparsity=True, chunk_size=9)
        return vgl(t), hessian_reference(pair_energy, x)

    (value, grad, lap), ref = jax.jit(run)(tree)
    np.testing.assert_allclose(value, ref[0], rtol=1e-12)
    np.testing.assert_allclose(lap, ref[2], rtol=1e-9)
    flat_grad = jnp.concatenate([grad["up"], grad["down"]])
    np.testing.assert_allclose(flat_grad, ref[1], rtol=1e-9)


def test_sparse_chunked_array_output() -> None:
    x = jnp.asarray(X)
    got = jax.jit(fwdlap.laplacian(pair_stream_sum_j, sparsity=True, chunk_size=6))(x)
    ref = reference_triple(pair_stream_sum_j, x)[2]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


# --- 8. float32 ----------------------------------------------------------------------

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
            hessian_reference(model64.fn, x.astype(jnp.float64)),
        )

    got_lap, got_vgl, ref = jax.jit(run)(x32)
    assert {a.dtype for a in (*got_lap, *got_vgl)} == {np.dtype(np.float32)}
    assert_triple_close(got_lap, ref, rtol=1e-4, atol=1e-4, err="lap")
    assert_triple_close(got_vgl, ref, rtol=1e-4, atol=1e-4, err="vgl")
