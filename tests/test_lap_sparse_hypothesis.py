"""Random many-particle programs in the block-sparse mode, against jax.jacfwd.

A program starts from a per-particle embedding of `N` particles in 3D and applies a few
steps from a menu: per-particle maps (which keep the jacobians block-sparse), maps that
mix particles (means, attention, pair terms, permutations, sums over particles, loops
and conditionals over them) and products of two earlier values, then reduces to a
scalar. Each program runs in the sparse mode with one window, with windows of particles,
and with a low threshold, and in the default pass (which keeps particle blocks and
pairs of them until values mix more particles), and is compared with `jax.jacfwd`
and the trace of `jax.jacfwd(jax.jacfwd(f))` (which handles `while_loop` too).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import fwdlap

N, F = 5, 4
_RNG = np.random.default_rng(123)
W_EMBED = _RNG.normal(size=(3, F)) / 2
W_FEAT = _RNG.normal(size=(F, F)) / 2
PERMUTATION = np.array([2, 0, 4, 1, 3])

Step = Callable[[jax.Array], jax.Array]


def _scan_over_particles(h: jax.Array) -> jax.Array:
    def step(c: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        return c + jnp.tanh(r), c * r

    return lax.scan(step, jnp.zeros(F), h)[1]


def _while_with_means(h: jax.Array) -> jax.Array:
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return c[0] + 1, jnp.tanh(c[1]) + 0.1 * jnp.mean(c[1], axis=0)

    return lax.while_loop(lambda c: c[0] < 2, body, (jnp.asarray(0), h))[1]


def _vmapped_while_per_particle(h: jax.Array) -> jax.Array:
    # The trip count depends on the particle: vmap gives the loop an array predicate.
    def per(r: jax.Array) -> jax.Array:
        def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            return jnp.tanh(c[0] @ W_FEAT), c[1] + 1

        steps = 1 + (r[0] > 0)
        return lax.while_loop(lambda c: c[1] < steps, body, (r, jnp.asarray(0)))[0]

    return jax.vmap(per)(h)


UNARY: dict[str, Step] = {
    # per particle
    "vmap_while_per_particle": _vmapped_while_per_particle,
    "tanh": jnp.tanh,
    "square": lambda h: h**2,
    "features": lambda h: h @ W_FEAT,
    "softmax_features": lambda h: jax.nn.softmax(h, axis=1),
    "where": lambda h: jnp.where(h > 0, h**2, jnp.sin(h)),
    "fori_per_particle": lambda h: lax.fori_loop(
        0, 2, lambda i, c: jnp.tanh(c @ W_FEAT), h
    ),
    # across particles
    "vmap_times_first_particle": lambda h: jax.vmap(
        lambda col: jnp.tanh(col) * col[0], in_axes=1, out_axes=1
    )(h),
    "mean": lambda h: h + jnp.mean(h, axis=0),
    "spin_means": lambda h: jnp.concatenate(
        [h[:2] + jnp.mean(h[:2], axis=0), h[2:] + jnp.mean(h[2:], axis=0)]
    ),
    "softmax_particles": lambda h: jax.nn.softmax(h, axis=0),
    "vmap_softmax_particles": lambda h: (
        jax.vmap(jax.nn.softmax, in_axes=1, out_axes=0)(h).T
    ),
    "attention": lambda h: jax.nn.softmax(h @ h.T, axis=-1) @ h,
    "pair_means": lambda h: jnp.mean(jnp.tanh(h[:, None] - h[None]), axis=1),
    "cumsum": lambda h: jnp.cumsum(h, axis=0),
    "permute": lambda h: h[PERMUTATION],
    "max_over_particles": lambda h: h * jnp.max(h, axis=0),
    "scatter_add": lambda h: jnp.zeros_like(h).at[jnp.array([0, 1, 1, 3, 4])].add(h),
    "scan": _scan_over_particles,
    "while": _while_with_means,
    "cond": lambda h: lax.cond(h[0, 0] > 0, jnp.sin, lambda a: a * jnp.mean(a), h),
    "slogdet_scale": lambda h: (
        h * jnp.linalg.slogdet(jnp.eye(N) + 0.3 * h @ W_FEAT @ h.T)[1]
    ),
}

BINARY: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "pair_product": lambda a, b: jnp.tanh(a @ b.T) @ a,
    "concat_features": lambda a, b: (
        jnp.concatenate([a, b], axis=1) @ jnp.concatenate([W_FEAT, W_FEAT.T])
    ),
}

OUTPUT: dict[str, Step] = {
    "sum_squares": lambda h: jnp.sum(h**2),
    "logsumexp": jax.nn.logsumexp,
    "slogdet": lambda h: jnp.linalg.slogdet(jnp.eye(N) + 0.5 * h @ h.T)[1],
    "det": lambda h: jnp.linalg.det(jnp.eye(N) + 0.3 * h @ W_FEAT @ h.T),
}

MODES: dict[str, dict[str, Any]] = {
    "one_window": {"sparsity": True, "chunk_size": None},
    "windows": {"sparsity": True, "chunk_size": 6},
    "low_threshold_windows": {
        "sparsity": fwdlap.Sparsity(threshold=3),
        "chunk_size": 3,
    },
    # The default pass: particle blocks, and pairs of them, until values mix more.
    "default": {},
}


@st.composite
def programs(draw: st.DrawFn) -> tuple[list[tuple], str]:
    steps: list[tuple] = []
    for _ in range(draw(st.integers(1, 4))):
        known = len(steps) + 1
        if draw(st.booleans()) and draw(st.booleans()):
            name = draw(st.sampled_from(sorted(BINARY)))
            a, b = draw(st.integers(0, known - 1)), draw(st.integers(0, known - 1))
            steps.append((name, a, b))
        else:
            steps.append(
                (draw(st.sampled_from(sorted(UNARY))), draw(st.integers(0, known - 1)))
            )
    return steps, draw(st.sampled_from(sorted(OUTPUT)))


def _as_function(program: tuple[list[tuple], str]) -> Callable[[jax.Array], jax.Array]:
    steps, output = program

    def fun(x: jax.Array) -> jax.Array:
        values = [jnp.tanh(x.reshape(N, 3) @ W_EMBED)]
        for step in steps:
            if len(step) == 3:
                values.append(BINARY[step[0]](values[step[1]], values[step[2]]))
            else:
                values.append(UNARY[step[0]](values[step[1]]))
        return OUTPUT[output](values[-1])

    return fun


@pytest.mark.parametrize("mode", sorted(MODES))
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(program=programs(), seed=st.integers(0, 2**16))
def test_random_particle_programs(mode: str, program: Any, seed: int) -> None:
    fun = _as_function(program)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=3 * N))
    want_lap = jnp.trace(jax.jacfwd(jax.jacfwd(fun))(x))
    want_grad = jax.jacfwd(fun)(x)
    value, grad, lap = jax.jit(fwdlap.value_grad_and_laplacian(fun, **MODES[mode]))(x)
    np.testing.assert_allclose(value, fun(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(lap, want_lap, rtol=1e-7, atol=1e-8)
