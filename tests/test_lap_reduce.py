"""Sums (`reduce_sum`) through fwdlap.lap: short axes summed as slices on the CPU.

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f)))
and, for the vmapped case, `jax.hessian`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap
from fwdlap._core.rules import reduction
from helpers import assert_matches_reference, identity_jacobian


def _lap(fun: Callable[[jax.Array], Any], x: jax.Array) -> tuple[Any, Any, Any]:
    # The dense rules under test: no particle blocks before the first mixing.
    jac, lap = identity_jacobian(x), jnp.zeros_like(x)
    return fwdlap.lap(fun, (x,), (jac,), (lap,), sparsity=False)


def _summed(shape: tuple[int, ...], axis: Any, keepdims: bool = False):
    """A function of a flat `x` that reshapes it to `shape` and sums over `axis`."""

    def fun(x: jax.Array) -> jax.Array:
        h = jnp.tanh(x.reshape(shape) * (1.0 + 0.1 * jnp.arange(x.size).reshape(shape)))
        return jnp.sin(jnp.sum(h**2, axis=axis, keepdims=keepdims))

    return fun


def _x(size: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(size).normal(size=size))


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((4, 3), -1),  # a coordinate axis: sliced
        ((4, 3), 1),
        ((2, 1), 1),  # length one: a squeeze
        ((3, 5), 1),
        ((2, 7), 1),
        ((2, 15), -1),
        ((2, 16), 1),  # the longest sliced axis
        ((2, 17), 1),  # one longer: reduced
        ((5, 2), 0),  # a leading axis
        ((3, 4, 2), 1),  # a middle axis
        ((2, 17, 3), (1, 2)),  # one axis sliced, one reduced
        ((3, 17, 2), (0, 2)),  # sliced axes on both sides of a reduced one
        ((2, 3, 5), (0, 1, 2)),  # everything: a scalar
        ((2, 3, 5), None),
    ],
)
def test_sum_matches_reference(shape: tuple[int, ...], axis: Any) -> None:
    fun = _summed(shape, axis)
    x = _x(int(np.prod(shape)))
    assert_matches_reference(_lap(fun, x), fun, x)


def test_sum_keepdims_and_mean() -> None:
    def fun(x: jax.Array) -> jax.Array:
        h = jnp.cos(x.reshape(2, 3, 2))
        return jnp.mean(h, axis=(0, 2), keepdims=True)[0, :, 0] * jnp.sum(h**3, axis=-1)

    x = _x(12)
    assert_matches_reference(_lap(fun, x), fun, x)


def test_sum_over_empty_axis() -> None:
    # A zero-length axis sums to zeros; the rule keeps the reduction for it.
    def fun(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.exp(x)[:, None] * jnp.ones((1, 0)), axis=1) + x**2

    x = _x(3)
    assert_matches_reference(_lap(fun, x), fun, x)


def test_sum_under_vmap_and_jit() -> None:
    fun = _summed((4, 3), -1)

    def scalar(x: jax.Array) -> jax.Array:
        return jnp.sum(fun(x))

    xs = jnp.stack([_x(12), 2 * _x(12)])
    lap = jax.jit(jax.vmap(lambda x: _lap(scalar, x)[2]))(xs)
    want = jax.vmap(lambda x: jnp.trace(jax.hessian(scalar)(x)))(xs)
    np.testing.assert_allclose(lap, want, rtol=1e-10)


def _reduce_sum_count(fun: Callable[[jax.Array], Any], x: jax.Array) -> int:
    """Reductions in the traced `lap`, not counting the elementwise rules' sums over
    the leading direction axis (`axes == (0,)`)."""
    jaxpr = jax.make_jaxpr(lambda x: _lap(fun, x))(x)
    return sum(
        eqn.primitive is jax.lax.reduce_sum_p and tuple(eqn.params["axes"]) != (0,)
        for eqn in jaxpr.eqns
    )


@pytest.mark.parametrize(
    ("shape", "axis", "tangent_reductions"),
    [((4, 3), -1, 0), ((3, 16), 1, 0), ((2, 17), 1, 2), ((2, 17, 3), (1, 2), 2)],
)
def test_short_axes_are_slices_on_cpu(
    shape: tuple[int, ...], axis: Any, tangent_reductions: int
) -> None:
    # The primal keeps its own reduction; the jacobian's and the laplacian's sums
    # over short axes are slices, those over longer axes stay reductions.
    fun = _summed(shape, axis)
    x = _x(int(np.prod(shape)))
    assert _reduce_sum_count(fun, x) == 1 + tangent_reductions


def test_other_backends_keep_the_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    fun = _summed((4, 3), -1)
    x = _x(12)
    monkeypatch.setattr(reduction.jax, "default_backend", lambda: "gpu")
    assert _reduce_sum_count(fun, x) == 3
    assert_matches_reference(_lap(fun, x), fun, x)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 16])
def test_tree_sum(length: int) -> None:
    x = np.random.default_rng(length).normal(size=(2, length, 3))
    np.testing.assert_allclose(reduction.tree_sum(jnp.asarray(x), 1), x.sum(axis=1))
