"""fwdlap.lap_partial: the primal now, the tangents later, in blocks of directions.

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f))).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import (
    assert_matches_reference,
    identity_jacobian,
    reference_triple,
    tree_allclose,
)

N = 7  # coordinates; 7 = 2 * 3 + 1 does not divide into blocks of 3
X = np.linspace(-0.9, 1.2, N)
W = np.cos(np.arange(4 * N, dtype=np.float64).reshape(4, N))


def _f(x: jax.Array) -> jax.Array:
    h = jnp.tanh(W @ x)
    return jnp.sum(h**2) * jnp.exp(-0.1 * jnp.sum(x**2)) + jnp.prod(jnp.cos(x[:3]))


def _g(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sin(W @ x) * x[0], jnp.sum(x**3)


@pytest.mark.parametrize("fun", [_f, _g], ids=["scalar", "tuple"])
def test_lap_partial_matches_reference(fun: Any) -> None:
    x = jnp.asarray(X)
    eye = identity_jacobian(x)

    @jax.jit
    def run(x: jax.Array) -> Any:
        out, lap_pe = fwdlap.lap_partial(fun, (x,), (eye,), (jnp.zeros_like(x),))
        jac, lap = lap_pe((eye,), (jnp.zeros_like(x),))
        return out, jac, lap

    out, jac, lap = run(x)
    assert_matches_reference((out, jac, lap), fun, x)


def test_lap_partial_eager_and_input_laplacian() -> None:
    x = jnp.asarray(X)
    eye = identity_jacobian(x)
    lap_in = jnp.asarray(np.sin(np.arange(N) + 0.5))
    out, lap_pe = fwdlap.lap_partial(_f, (x,), (eye,), (lap_in,))
    jac, lap = lap_pe((eye,), (lap_in,))
    ref_out, ref_jac, ref_lap = reference_triple(_f, x)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap + ref_jac @ lap_in)


def test_lap_pe_through_jit() -> None:
    # lap_pe is a jax.tree_util.Partial: a pytree that a jitted function can take.
    x = jnp.asarray(X)
    eye = identity_jacobian(x)
    out, lap_pe = fwdlap.lap_partial(_f, (x,), (eye,), (None,))
    assert isinstance(lap_pe, jax.tree_util.Partial)
    jac, lap = jax.jit(lambda pe, j: pe((j,), (None,)))(lap_pe, eye)
    assert_matches_reference((out, jac, lap), _f, x)


def test_lap_pe_with_other_directions() -> None:
    # The partial evaluation is linear in the seeds: other directions of the same
    # count give sum_k v_k^T H v_k.
    x = jnp.asarray(X)
    out, lap_pe = fwdlap.lap_partial(_f, (x,), (jnp.zeros((2, N)),), (None,))
    v = jnp.asarray(np.cos(np.arange(2 * N).reshape(2, N) * 0.7))
    jac, lap = lap_pe((v,), (None,))
    hess = jax.hessian(_f)(x)
    assert tree_allclose(jac, v @ jax.grad(_f)(x))
    assert tree_allclose(lap, jnp.einsum("ki,ij,kj->", v, hess, v))


def _chunked_laplacian(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """The Laplacian in blocks of `block` directions: a fori_loop over the full blocks,
    then one remainder block (the user's job when `block` does not divide N)."""
    n = x.size
    num_full, rem = divmod(n, block)
    eye = jnp.eye(n, dtype=x.dtype)
    _, lap_pe = fwdlap.lap_partial(_f, (x,), (eye[:block],), (None,))

    def body(i: jax.Array, acc: tuple[jax.Array, jax.Array]) -> Any:
        dirs = lax.dynamic_slice_in_dim(eye, i * block, block)
        jac, lap = lap_pe((dirs,), (None,))
        grad = lax.dynamic_update_slice_in_dim(acc[1], jac, i * block, 0)
        return acc[0] + lap, grad

    lap, grad = lax.fori_loop(0, num_full, body, (jnp.zeros(()), jnp.zeros(n)))
    if rem:
        _, rem_pe = fwdlap.lap_partial(_f, (x,), (eye[:rem],), (None,))
        jac, rem_lap = rem_pe((eye[num_full * block :],), (None,))
        lap = lap + rem_lap
        grad = grad.at[num_full * block :].set(jac)
    return lap, grad


@pytest.mark.parametrize("block", [1, 3, 7])
def test_chunked_directions(block: int) -> None:
    x = jnp.asarray(X)
    lap, grad = jax.jit(_chunked_laplacian, static_argnums=1)(x, block)
    _, ref_jac, ref_lap = reference_triple(_f, x)
    assert tree_allclose(lap, ref_lap)
    assert tree_allclose(grad, ref_jac)


def test_lap_partial_multiple_arguments() -> None:
    # y carries no tangents (None); its example tangents fix that once and for all.
    x, y = jnp.asarray(X[:3]), jnp.asarray(W[:, :3])
    fun = lambda x, y: {"a": jnp.tanh(y @ x), "b": jnp.sum(y) * 2.0}
    eye = identity_jacobian(x)
    out, lap_pe = fwdlap.lap_partial(fun, (x, y), (eye, None), (None, None))
    jac, lap = jax.jit(lambda pe: pe((eye, None), (None, None)))(lap_pe)
    assert_matches_reference((out, jac, lap), lambda x: fun(x, y), x)
    # The output independent of x comes back as dense zeros.
    assert jac["b"].shape == (3,) and lap["b"].shape == ()


def test_lap_partial_with_control_flow() -> None:
    def fun(x: jax.Array) -> jax.Array:
        c, _ = lax.scan(lambda c, w: (jnp.tanh(c * w) + c, None), x, jnp.asarray(W))
        return lax.cond(x[0] > 0, jnp.sum, lambda v: jnp.sum(v**2), c)

    x = jnp.asarray(X)
    eye = identity_jacobian(x)
    out, lap_pe = jax.jit(lambda x: fwdlap.lap_partial(fun, (x,), (eye,), (None,)))(x)
    jac, lap = jax.jit(lambda pe: pe((eye,), (None,)))(lap_pe)
    assert_matches_reference((out, jac, lap), fun, x)


_LAYER = jax.jit(lambda h: jnp.tanh(W[:, :4] @ h))


def _layers_in_jit_and_loop(x: jax.Array) -> jax.Array:
    h = _LAYER(jnp.sin(W @ x))  # the layer's input has a laplacian
    h = lax.fori_loop(0, 2, lambda i, h: _LAYER(h) * 0.5, h)
    return jnp.sum(_LAYER(h) ** 2)


def test_lap_partial_after_a_full_pass_of_the_same_bodies() -> None:
    # A full pass multiplies value and laplacian by the weights together; the jit
    # and loop bodies it traced must not be reused by lap_partial, whose value may
    # not depend on a tangent.
    x = jnp.asarray(X)
    eye = identity_jacobian(x)
    full = fwdlap.lap(_layers_in_jit_and_loop, (x,), (eye,), (None,))
    assert_matches_reference(full, _layers_in_jit_and_loop, x)
    out, lap_pe = fwdlap.lap_partial(_layers_in_jit_and_loop, (x,), (eye,), (None,))
    jac, lap = lap_pe((eye,), (None,))
    assert_matches_reference((out, jac, lap), _layers_in_jit_and_loop, x)
