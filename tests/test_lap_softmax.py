"""`jax.nn.softmax` through fwdlap: the dedicated rule of its custom_jvp.

The dense trace runs the function with `jax_softmax_custom_jvp` on, so `softmax` is a
custom_jvp call that `rules.custom.softmax_rule` handles with two applications of its
own first-order rule. References: `reference_triple` (jax.jacfwd and the trace of
jax.jacfwd(jax.jacfwd(f))), `jax.hessian` and `jax.jacfwd`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap
from helpers import assert_matches_reference, hessian_trace_weighted, identity_jacobian

X = jnp.asarray(np.random.default_rng(0).normal(size=12))
MASK = jnp.arange(12).reshape(3, 4) % 5 != 0


def last_axis(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(jax.nn.softmax(jnp.tanh(x.reshape(3, 4)) * 2.0)) ** 2)


def first_axis(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x.reshape(3, 4) * x[0], axis=0)


def both_axes(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(jnp.cos(x).reshape(3, 4), axis=(0, 1))


def masked(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x.reshape(3, 4) ** 2, axis=-1, where=MASK)


def attention(x: jax.Array) -> jax.Array:
    h = jnp.tanh(x.reshape(4, 3))
    weights = jax.nn.softmax(h @ h.T / np.sqrt(3.0), axis=-1)
    return jnp.sum((weights @ h) ** 2)


def vmapped_rows(x: jax.Array) -> jax.Array:
    # Under vmap the rule's output is laid out with the batch axis first while its
    # input keeps it second: the rule must bring the tangents into the output's layout.
    soft = jax.vmap(jax.nn.softmax, in_axes=1, out_axes=0)
    return jnp.sin(soft(x.reshape(3, 4) * x[1]))


def vmapped_square(x: jax.Array) -> jax.Array:
    # As above with equal axis sizes, where a wrong layout would not raise.
    soft = jax.vmap(lambda r: jax.nn.softmax(r * r[0]), in_axes=1, out_axes=1)
    return jnp.cos(soft(x[:9].reshape(3, 3)))


def vmapped_heads(x: jax.Array) -> jax.Array:
    # Scores (query, head, key) with softmax over keys, vmapped over the heads.
    h = jnp.tanh(x.reshape(2, 2, 3))
    scores = jnp.einsum("qhd,khd->qhk", h, h)
    weights = jax.vmap(jax.nn.softmax, in_axes=1, out_axes=1)(scores)
    return jnp.einsum("qhk,khd->qhd", weights, h) ** 2


FUNCTIONS = [
    last_axis,
    first_axis,
    both_axes,
    masked,
    attention,
    vmapped_rows,
    vmapped_square,
    vmapped_heads,
]


def _lap(fun: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


@pytest.mark.parametrize("fun", FUNCTIONS, ids=[f.__name__ for f in FUNCTIONS])
def test_matches_reference(fun: Any, softmax_rule_calls: list[int]) -> None:
    assert_matches_reference(jax.jit(lambda x: _lap(fun, x))(X), fun, X)
    assert softmax_rule_calls, "the dedicated rule was not used"


@pytest.mark.parametrize("flag", [False, True])
def test_users_flag_is_left_as_it_was(flag: bool) -> None:
    with jax.softmax_custom_jvp(flag):
        assert_matches_reference(_lap(last_axis, X), last_axis, X)
        assert jax.softmax_custom_jvp.value is flag


def test_input_laplacian_and_fewer_directions() -> None:
    # Two directions and a non-zero input laplacian: sum_k v_k^T H v_k + J lap_in.
    v = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12)))
    lap_in = jnp.asarray(np.random.default_rng(2).normal(size=12))
    _, jac, lap = fwdlap.lap(attention, (X,), (v,), (lap_in,))
    grad = jax.grad(attention)(X)
    np.testing.assert_allclose(jac, v @ grad, rtol=1e-10)
    want = hessian_trace_weighted(attention, X, v) + grad @ lap_in
    np.testing.assert_allclose(lap, want, rtol=1e-9)


def test_laplacian_transform_under_vmap() -> None:
    xs = jnp.stack([X, 0.5 * X, -X])
    got = jax.jit(jax.vmap(fwdlap.laplacian(attention)))(xs)
    want = jax.vmap(lambda x: jnp.trace(jax.hessian(attention)(x)))(xs)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_sparse_mode_keeps_per_particle_softmax_sparse(
    softmax_rule_calls: list[int],
) -> None:
    # Softmax over each particle's own features: the rule runs on the block-sparse
    # data, and only the final sum over particles is dense.
    def per_particle(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.nn.softmax(jnp.tanh(x.reshape(4, 3)), axis=-1) ** 3)

    with fwdlap.record_densifications() as events:
        got = jax.jit(fwdlap.laplacian(per_particle, sparsity=True))(X)
    np.testing.assert_allclose(got, jnp.trace(jax.hessian(per_particle)(X)), rtol=1e-9)
    assert softmax_rule_calls
    assert [e.primitive for e in events] == ["reduce_sum"]


def _softmax_keys(s: jax.Array) -> jax.Array:
    return jax.nn.softmax(s, axis=-1)


def _softmax_keys_vmapped(s: jax.Array) -> jax.Array:
    # vmapped over the queries: the rule's output has them first, its input second.
    return jax.vmap(jax.nn.softmax, in_axes=1, out_axes=1)(s)


@pytest.mark.parametrize("softmax", [_softmax_keys, _softmax_keys_vmapped])
@pytest.mark.parametrize("chunk_size", [None, 12, 16])
def test_float32_heads_in_blocks(
    chunk_size: int | None, softmax: Callable[[jax.Array], jax.Array]
) -> None:
    # Attention weights (heads, queries, keys) in float32 with blocks of directions:
    # jaxlib 0.10.2's CPU backend miscompiles softmax's own JVP expression
    # `y * (t - sum(y * t, keepdims=True))` on such tangents (from the 9th row on),
    # which the rule avoids. Checked against float64 forward-over-forward JVPs along
    # each direction (the Hessian itself would take terabytes).
    rng = np.random.default_rng(0)
    s64 = rng.normal(size=(4, 32, 32))
    j64 = rng.normal(size=(24, 4, 32, 32))

    def fun(s: jax.Array) -> jax.Array:
        return jnp.sum(softmax(s) ** 2, axis=-1)

    s32, j32 = jnp.asarray(s64, jnp.float32), jnp.asarray(j64, jnp.float32)
    _, jac, lap = fwdlap.lap(fun, (s32,), (j32,), (None,), chunk_size=chunk_size)
    s, j = jnp.asarray(s64), jnp.asarray(j64)

    def along(t: jax.Array) -> tuple[jax.Array, jax.Array]:
        def first(u: jax.Array) -> jax.Array:
            return jax.jvp(fun, (u,), (t,))[1]

        return first(s), jax.jvp(first, (s,), (t,))[1]

    want_jac, second = jax.vmap(along)(j)
    want_lap = jnp.sum(second, axis=0)
    np.testing.assert_allclose(jac, want_jac, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(lap, want_lap, rtol=2e-4, atol=5e-5)


def test_dot_product_attention() -> None:
    # `jax.nn.dot_product_attention` vmaps its softmax and moves the batch axis; it
    # computes the scores in float32 whatever its inputs, hence the tolerance.
    def fun(x: jax.Array) -> jax.Array:
        h = jnp.tanh(x.reshape(1, 4, 1, 3)) * jnp.arange(1.0, 3.0)[:, None]
        out = jax.nn.dot_product_attention(h, h * 0.5, h**2)
        return jnp.sum(jnp.sin(out) * jnp.arange(24.0).reshape(out.shape))

    want = jnp.trace(jax.hessian(fun)(X))
    for sparsity in (False, True):
        got = jax.jit(fwdlap.laplacian(fun, sparsity=sparsity))(X)
        np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_sparse_mode_follows_a_moved_softmax_layout(
    chunk_size: int | None, softmax_rule_calls: list[int]
) -> None:
    # A per-particle softmax vmapped over axis 1, whose output has the batch axis
    # first: the rule finds the blocks in the output's layout and stays sparse.
    def moved(x: jax.Array) -> jax.Array:
        h = jnp.tanh(x.reshape(4, 3))
        soft = jax.vmap(jax.nn.softmax, in_axes=1, out_axes=0)(h.T * h[:, :1].T)
        return jnp.sum(jnp.cos(soft) * jnp.arange(12.0).reshape(4, 3))

    lap_fn = fwdlap.laplacian(moved, sparsity=True, chunk_size=chunk_size)
    with fwdlap.record_densifications() as events:
        got = jax.jit(lap_fn)(X)
    np.testing.assert_allclose(got, jnp.trace(jax.hessian(moved)(X)), rtol=1e-10)
    assert softmax_rule_calls
    assert [e.primitive for e in events] == ["reduce_sum"]
