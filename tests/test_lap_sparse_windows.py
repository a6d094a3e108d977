"""The block-sparse mode with its dense jacobians in windows of particles.

`chunk_size` in the sparse mode bounds the dense jacobians (those of values that
depend on most particles) to windows of whole particles, evaluated in a `lax.scan`,
while the primal and the block-sparse jacobians are computed once, before it. Every
result is checked against `jax.hessian`/`jax.jacfwd` references.
"""

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import reference_laplacian, tree_allclose, window_count, window_scans
from test_lap_sparse import (
    X,
    assert_triple_close,
    attention,
    embed,
    hessian_reference,
    pair_stream,
    particles,
    per_particle_while,
    slater_det,
    slater_slogdet,
    spin_means,
)

jax.config.update("jax_enable_x64", True)


def _count(jaxpr: Any, name: str) -> int:
    return sum(eqn.primitive.name == name for eqn in jaxpr.eqns)


def sparse_plus_dense(x: jax.Array) -> jax.Array:
    # h is block-sparse with a laplacian of its own; the mean depends on every
    # particle. Their sum is dense, and h's laplacian must count once over windows.
    h = jnp.tanh(embed(particles(x)))
    return jnp.sum(jnp.sin(h + jnp.mean(h**2, axis=0)))


def pair_means(x: jax.Array) -> jax.Array:
    # FermiNet's two-electron stream: block-sparse pairs, means over one index dense.
    return jnp.sum(jnp.tanh(jnp.mean(pair_stream(x), axis=1)) ** 2)


def spin_means_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(spin_means(x) ** 2)


def attention_softmax(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(attention(x)))


def dense_attention(x: jax.Array) -> jax.Array:
    # The logits depend on every particle (through the mean): a dense softmax input.
    h = jnp.tanh(embed(particles(x)))
    h = h + jnp.mean(h, axis=0)
    weights = jax.nn.softmax(h @ h.T, axis=-1)
    return jnp.sum(jnp.tanh(weights @ h))


FUNS = [
    sparse_plus_dense,
    pair_means,
    spin_means_sum,
    attention_softmax,
    dense_attention,
    # log|det| depends on every particle; det's laplacian adds the square of that
    # dense jacobian, which each window holds only part of.
    slater_det,
    slater_slogdet,
]


@pytest.mark.parametrize("fun", FUNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chunk_size", [3, 6, 9])
def test_windows_match_the_hessian(fun: Any, chunk_size: int) -> None:
    x = jnp.asarray(X)

    def run(y: jax.Array) -> Any:
        vgl = fwdlap.value_grad_and_laplacian(fun, sparsity=True, chunk_size=chunk_size)
        return vgl(y), hessian_reference(fun, y)

    got, ref = jax.jit(run)(x)
    assert_triple_close(got, ref)


def test_windows_under_vmap() -> None:
    xs = jnp.stack([jnp.asarray(X), jnp.asarray(X)[::-1] / 2])
    lap = fwdlap.laplacian(sparse_plus_dense, sparsity=True, chunk_size=6)
    got = jax.jit(jax.vmap(lap))(xs)
    want = jax.vmap(lambda y: hessian_reference(sparse_plus_dense, y)[2])(xs)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_lap_windows_return_every_jacobian_row() -> None:
    x = jnp.asarray(X)
    eye = np.eye(x.size)
    out, jac, lap = fwdlap.lap(
        pair_means, (x,), (eye,), (None,), sparsity=True, chunk_size=3
    )
    value, grad, ref_lap = hessian_reference(pair_means, x)
    np.testing.assert_allclose(out, value, rtol=1e-12)
    np.testing.assert_allclose(jac, grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lap, ref_lap, rtol=1e-9)


def test_sparse_work_runs_once_before_the_windows() -> None:
    # The pair stream's tanh (primal and block-sparse) is outside the scan; inside it
    # there is only dense work.
    lap = fwdlap.laplacian(pair_means, sparsity=True, chunk_size=3)
    single = fwdlap.laplacian(pair_means, sparsity=True, chunk_size=None)
    jaxpr = jax.make_jaxpr(lap)(jnp.asarray(X)).jaxpr
    (scan,) = window_scans(jaxpr)
    assert scan.params["length"] == 4  # 4 particles, one per window
    body = scan.params["jaxpr"].jaxpr
    assert _count(body, "tanh") == 0
    single_jaxpr = jax.make_jaxpr(single)(jnp.asarray(X)).jaxpr
    assert not window_scans(single_jaxpr)
    assert _count(jaxpr, "tanh") == _count(single_jaxpr, "tanh")


LAYER_WEIGHTS = jnp.asarray(np.cos(np.arange(3 * 5 * 5)).reshape(3, 5, 5) / 2)


def scan_over_particles(x: jax.Array) -> jax.Array:
    # The carry sums over particles: dense; so is each scanned particle, together.
    def step(total: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        return total + jnp.sum(jnp.sin(r)) ** 2, jnp.tanh(total * r)

    total, ys = lax.scan(step, jnp.asarray(0.1), particles(x))
    return total + jnp.sum(ys**2)


def scan_over_layers(x: jax.Array) -> jax.Array:
    # FermiNet-style layers in a scan: the carry turns dense in the first iteration.
    def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.tanh(h @ w + jnp.mean(h, axis=0)), jnp.sum(h, axis=0)

    h, sums = lax.scan(layer, jnp.tanh(embed(particles(x))), LAYER_WEIGHTS)
    return jnp.sum(h**2) + jnp.sum(jnp.sin(sums))


def scan_keeping_sparse(x: jax.Array) -> jax.Array:
    # Per-particle layers: the carry stays block-sparse; only the final sum is dense.
    def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(h @ w), None

    h, _ = lax.scan(layer, jnp.tanh(embed(particles(x))), LAYER_WEIGHTS)
    return jnp.sum(h**2)


def while_turning_dense(x: jax.Array) -> jax.Array:
    # A block-sparse carry that a while loop (dynamic trip count) makes dense.
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, i = c
        return jnp.tanh(h) + 0.1 * jnp.mean(h**2), i + 1

    h, _ = lax.while_loop(
        lambda c: c[1] < 3, body, (embed(particles(x)), jnp.asarray(0))
    )
    return jnp.sum(h)


def cond_in_scan(x: jax.Array) -> jax.Array:
    def step(total: jax.Array, r: jax.Array) -> tuple[jax.Array, None]:
        grow = lambda t: t + jnp.sum(jnp.sin(r)) ** 2
        shrink = lambda t: 0.9 * t + jnp.sum(jnp.cos(r))
        return lax.cond(r[0] > 0, grow, shrink, total), None

    return lax.scan(step, jnp.asarray(0.0), particles(x))[0]


def dense_cond(x: jax.Array) -> jax.Array:
    h = jnp.tanh(embed(particles(x)))
    mixed = lambda h: jnp.sum(jnp.sin(h + jnp.mean(h, axis=0)))
    return lax.cond(x[0] > 0, mixed, lambda h: jnp.sum(jnp.cos(h)) ** 2, h)


def while_keeping_sparse(x: jax.Array) -> jax.Array:
    return jnp.sum(per_particle_while(x) ** 2)


LOOPS = [
    scan_over_particles,
    scan_over_layers,
    scan_keeping_sparse,
    while_turning_dense,
    cond_in_scan,
    dense_cond,
    while_keeping_sparse,
]


@pytest.mark.parametrize("fun", LOOPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chunk_size", [3, 6])
def test_windows_through_loops_and_conds(fun: Any, chunk_size: int) -> None:
    # Bodies and branches take the window's start: the dense jacobians inside hold
    # the window's rows, and the laplacians of carries that turn dense count once.
    x = jnp.asarray(X)
    vgl = fwdlap.value_grad_and_laplacian(fun, sparsity=True, chunk_size=chunk_size)
    value, grad, lap = jax.jit(vgl)(x)
    np.testing.assert_allclose(value, fun(x), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.jacfwd(fun)(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lap, reference_laplacian(fun, x), rtol=1e-9)


def test_loops_are_windowed(caplog: pytest.LogCaptureFixture) -> None:
    x = jnp.asarray(X)
    lap = fwdlap.laplacian(scan_over_layers, sparsity=True, chunk_size=3)
    with caplog.at_level(logging.DEBUG, logger="fwdlap.sparse"):
        jaxpr = jax.make_jaxpr(lap)(x).jaxpr
    assert window_count(jaxpr) == 4
    assert not any("one pass" in r.getMessage() for r in caplog.records)


def test_traced_input_jacobian_makes_one_pass() -> None:
    # `lap` with a jacobian known only at run time: no sparse layout, no windows.
    x = jnp.asarray(X)

    @jax.jit
    def run(eye: jax.Array) -> Any:
        return fwdlap.lap(
            pair_means, (x,), (eye,), (None,), sparsity=True, chunk_size=3
        )[2]

    got = run(jnp.eye(x.size))
    np.testing.assert_allclose(got, hessian_reference(pair_means, x)[2], rtol=1e-9)


def test_windows_report_each_densification_once() -> None:
    x = jnp.asarray(X)
    with fwdlap.record_densifications() as single:
        jax.eval_shape(fwdlap.laplacian(pair_means, sparsity=True, chunk_size=None), x)
    with fwdlap.record_densifications() as windowed:
        jax.eval_shape(fwdlap.laplacian(pair_means, sparsity=True, chunk_size=3), x)
    assert single and windowed == single


def test_grad_through_windows_wrt_params() -> None:
    w = jnp.asarray(np.cos(np.arange(3 * 5)).reshape(3, 5))

    def model(w: jax.Array, x: jax.Array) -> jax.Array:
        h = jnp.tanh(particles(x) @ w)
        return jnp.sum(jnp.tanh(h + jnp.mean(h, axis=0)) ** 2)

    x = jnp.asarray(X)

    def windowed(w: jax.Array) -> jax.Array:
        return fwdlap.laplacian(model, argnums=1, sparsity=True, chunk_size=3)(w, x)

    def reference(w: jax.Array) -> jax.Array:
        return jnp.trace(jax.hessian(lambda y: model(w, y))(x))

    got, want = jax.jit(lambda w: (jax.grad(windowed)(w), jax.grad(reference)(w)))(w)
    assert tree_allclose(got, want, rtol=1e-8, atol=1e-10)


# --- the fixes that came with windows ---------------------------------------------


def test_custom_jvp_with_sparse_and_dense_operands() -> None:
    # jnp.logaddexp is a custom_jvp of two operands with an elementwise JVP: one
    # block-sparse, one dense. The dense operand's jacobian must not be dropped.
    def fun(x: jax.Array) -> jax.Array:
        h = jnp.tanh(embed(particles(x)))
        dense = jnp.broadcast_to(jnp.mean(h, axis=0), h.shape)
        return jnp.sum(jnp.logaddexp(h, dense) ** 2)

    x = jnp.asarray(X)
    for chunk_size in (None, 3):
        lap = fwdlap.laplacian(fun, sparsity=True, chunk_size=chunk_size)
        with fwdlap.record_densifications() as events:
            got = lap(x)
        np.testing.assert_allclose(got, hessian_reference(fun, x)[2], rtol=1e-9)
        (event,) = [e for e in events if e.primitive == "logaddexp"]
        assert event.cause == "threshold" and "already dense" in event.reason


def test_sparse_mode_gives_dense_softmax_its_rule(
    softmax_rule_calls: list[int],
) -> None:
    # These logits depend on every particle: the softmax input is dense, and the
    # sparse mode uses the same softmax rule as the dense mode.
    x = jnp.asarray(X)
    for chunk_size in (None, 3):
        lap = fwdlap.laplacian(dense_attention, sparsity=True, chunk_size=chunk_size)
        want = hessian_reference(dense_attention, x)[2]
        np.testing.assert_allclose(jax.jit(lap)(x), want, rtol=1e-9)
    assert len(softmax_rule_calls) == 2


def test_block_sparse_softmax_stays_sparse(softmax_rule_calls: list[int]) -> None:
    # The rule runs on the data of the blocks along the softmax axis.
    def per_particle(x: jax.Array) -> jax.Array:
        h = jnp.tanh(embed(particles(x)))
        return jnp.sum(lax.cos(jax.nn.softmax(h, axis=-1)))

    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = fwdlap.laplacian(per_particle, sparsity=True, chunk_size=3)(x)
    np.testing.assert_allclose(got, hessian_reference(per_particle, x)[2], rtol=1e-9)
    assert [e.primitive for e in events] == ["reduce_sum"]  # the final sum only
    assert softmax_rule_calls


def test_pair_softmax_stays_sparse(softmax_rule_calls: list[int]) -> None:
    # Attention logits of per-particle queries and keys depend on two particles
    # each: a softmax over the keys depends on all of them (dense, the dense rule),
    # one over a feature axis of a pair value on two (sparse).
    def pair(x: jax.Array) -> jax.Array:
        h = jnp.tanh(embed(particles(x)))
        pairs = h[:, None, :] * h[None, :, :]  # (N, N, F): particles i and j
        return jnp.sum(jnp.sin(jax.nn.softmax(pairs, axis=-1)))

    x = jnp.asarray(X)
    with fwdlap.record_densifications() as events:
        got = fwdlap.laplacian(pair, sparsity=True)(x)
    np.testing.assert_allclose(got, hessian_reference(pair, x)[2], rtol=1e-9)
    assert softmax_rule_calls
    assert [e.primitive for e in events] == ["reduce_sum"]
    with fwdlap.record_densifications() as events:
        got = fwdlap.laplacian(attention_softmax, sparsity=True)(x)
    want = hessian_reference(attention_softmax, x)[2]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert "softmax" in [e.primitive for e in events]
