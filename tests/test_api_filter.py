"""`fwdlap.lap_filter`: pytrees with non-array leaves, Equinox modules, static leaves.

References are independent of fwdlap: `jax.hessian` / `jax.jacfwd` of the function with
its static parts closed over, after `eqx.partition` and `ravel_pytree` where the
parameters of a module are the inputs.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fwdlap

N = 3  # tangent directions


class Net(eqx.Module):
    """An MLP with a float field, a static string and a method other than __call__."""

    mlp: eqx.nn.MLP
    scale: float
    name: str = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mlp(x)

    def energy(self, x: jax.Array, *, shift: jax.Array) -> jax.Array:
        return jnp.sum(self.mlp(x) ** 2) * self.scale + jnp.sum(shift * x)


def make_net() -> Net:
    mlp = eqx.nn.MLP(
        3, 2, width_size=4, depth=2, activation=jax.nn.tanh, key=jax.random.key(0)
    )
    mlp = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float64) if eqx.is_inexact_array(p) else p, mlp
    )
    return Net(mlp=mlp, scale=0.5, name="net")


X = jnp.array([0.3, -0.2, 0.5])


def directions(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(N, *shape)))


@eqx.filter_jit
def reference_in_x(
    f: Callable[[jax.Array], Any], x: jax.Array, jac: jax.Array, lap: jax.Array
) -> tuple[Any, Any, Any]:
    """`(f(x), J v_k, sum_k v_k^T H v_k + J lap)` from jax.jacfwd and jax.hessian."""
    j = jax.jacfwd(f)(x)
    h = jax.hessian(f)(x)
    jac_out = jnp.moveaxis(j @ jac.T, -1, 0)
    lap_out = jnp.einsum("...ij,ki,kj->...", h, jac, jac) + j @ lap
    return f(x), jac_out, lap_out


def assert_allclose_tree(actual: Any, expected: Any) -> None:
    a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree, (a_tree, e_tree)
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert jnp.shape(a) == jnp.shape(e)
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-10)


# --- an Equinox model as `fun` --------------------------------------------------------


@pytest.mark.parametrize("as_fun", ["module", "__call__", "method"])
def test_model_as_fun(as_fun: str) -> None:
    net = make_net()
    jac, lap = directions((3,), seed=1), jnp.array([0.1, 0.2, -0.3])
    shift = jnp.array([1.0, 2.0, 3.0])
    kwargs: dict[str, Any] = {}
    if as_fun == "module":
        fun: Callable[..., Any] = net
        ref_fun: Callable[[jax.Array], Any] = net
    elif as_fun == "__call__":
        fun = net.__call__
        ref_fun = net
    else:
        fun, kwargs = net.energy, {"shift": shift}
        ref_fun = lambda x: net.energy(x, shift=shift)
    run = eqx.filter_jit(
        lambda x, j, lp: fwdlap.lap_filter(fun, (x,), (j,), (lp,), **kwargs)
    )
    got = run(X, jac, lap)
    assert_allclose_tree(got, reference_in_x(ref_fun, X, jac, lap))


def test_kwargs_are_not_differentiated() -> None:
    """A keyword argument that is an array is passed to `fun` but gets no tangent."""
    fun = lambda x, *, w: jnp.sum(w * x**2)
    x, w = jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0])
    out, jac, lap = fwdlap.lap_filter(fun, (x,), (jnp.eye(2),), (None,), w=w)
    np.testing.assert_allclose(jac, 2 * w * x)
    np.testing.assert_allclose(lap, 2 * jnp.sum(w))


# --- an Equinox model as a primal -----------------------------------------------------


def test_module_as_primal_perturbs_its_parameters() -> None:
    """Tangents built with eqx.filter(model, eqx.is_inexact_array): the float field
    `scale` and the activation functions have None tangents and are held static."""
    net = make_net()
    params, static = eqx.partition(net, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    rng = np.random.default_rng(2)
    v = jnp.asarray(rng.normal(size=(N, flat.size)))
    lap_in = jnp.asarray(rng.normal(size=flat.size))
    jac_tree = jax.vmap(unravel)(v)  # leaves (N, *param.shape), None elsewhere
    lap_tree = unravel(lap_in)

    def fun(model: Net, x: jax.Array) -> jax.Array:
        return model.energy(x, shift=jnp.zeros(3))

    out, jac, lap = jax.jit(
        lambda j, lp: fwdlap.lap_filter(fun, (net, X), (j, None), (lp, None))
    )(jac_tree, lap_tree)
    in_params = lambda p: fun(eqx.combine(p, static), X)
    expected = reference_in_x(lambda f: in_params(unravel(f)), flat, v, lap_in)
    assert_allclose_tree((out, jac, lap), expected)


def test_module_and_input_together() -> None:
    """Directions that move the parameters and the input at once."""
    net = make_net()
    params, static = eqx.partition(net, eqx.is_inexact_array)
    flat, unravel = ravel_pytree((params, X))
    v = jnp.asarray(np.random.default_rng(3).normal(size=(N, flat.size)))
    jac_params, jac_x = jax.vmap(unravel)(v)
    out, jac, lap = jax.jit(
        lambda jp, jx: fwdlap.lap_filter(
            lambda m, x: m(x), (net, X), (jp, jx), (None, None)
        )
    )(jac_params, jac_x)

    def flat_fun(f: jax.Array) -> jax.Array:
        p, x = unravel(f)
        return eqx.combine(p, static)(x)

    expected = reference_in_x(flat_fun, flat, v, jnp.zeros(flat.size))
    assert_allclose_tree((out, jac, lap), expected)


# --- non-array leaves in and out ------------------------------------------------------


def test_non_array_leaves_in_primals_are_static() -> None:
    """Callables, strings, Python ints and config dicts pass through to `fun`."""
    seen: dict[str, Any] = {}

    def fun(config: dict[str, Any], x: jax.Array) -> jax.Array:
        seen.update(config)
        return config["act"](x) * config["power"]

    config = {"act": jnp.sin, "name": "layer", "power": 3, "flag": True}
    jac = directions((2,), seed=4)
    x = jnp.array([0.4, 0.9])
    out, jac_out, lap_out = fwdlap.lap_filter(
        fun, (config, x), (None, jac), (None, None)
    )
    assert seen == config
    np.testing.assert_allclose(out, 3 * jnp.sin(x))
    np.testing.assert_allclose(jac_out, 3 * jnp.cos(x) * jac)
    np.testing.assert_allclose(lap_out, -3 * jnp.sin(x) * jnp.sum(jac**2, axis=0))


def test_array_leaf_with_none_tangents_is_closed_over() -> None:
    """An array leaf whose jacobian and laplacian are both None is not traced."""
    a, x = jnp.array([2.0, 3.0]), jnp.array([1.0, -1.0])
    received: list[Any] = []

    def fun(a: jax.Array, x: jax.Array) -> jax.Array:
        received.append(a)
        return a * x**2

    out, jac, lap = fwdlap.lap_filter(fun, (a, x), (None, jnp.eye(2)), (None, None))
    assert len(received) == 1 and received[0] is a  # the very array, not a tracer
    np.testing.assert_allclose(jac, jnp.diag(2 * a * x))
    np.testing.assert_allclose(lap, 2 * a)


def test_outputs_that_are_not_arrays_or_have_zero_tangents() -> None:
    """Non-array output leaves come back unchanged; they and outputs with symbolic-zero
    tangents (independent or integer outputs) get None tangents."""

    def fun(x: jax.Array, label: str) -> dict[str, Any]:
        return {
            "y": jnp.exp(x),
            "label": label,
            "n": 7,
            "act": jnp.tanh,
            "const": jnp.ones(2),
            "index": jnp.argmax(x),
        }

    x = jnp.array([0.1, 0.5])
    out, jac, lap = fwdlap.lap_filter(
        fun, (x, "hello"), (jnp.eye(2), None), (None, None)
    )
    assert out["label"] == "hello" and out["n"] == 7 and out["act"] is jnp.tanh
    for key in ("label", "n", "act", "const", "index"):
        assert jac[key] is None and lap[key] is None, key
    np.testing.assert_allclose(jac["y"], jnp.diag(jnp.exp(x)))
    np.testing.assert_allclose(lap["y"], jnp.exp(x))


def test_integer_primal_with_float0_tangent() -> None:
    fun = lambda k, x: x**k
    x = jnp.array([1.5, 2.0])
    k = jnp.array(3)
    out, jac, lap = fwdlap.lap_filter(
        fun,
        (k, x),
        (np.zeros((2,), jax.dtypes.float0), jnp.eye(2)),
        (np.zeros((), jax.dtypes.float0), None),
    )
    np.testing.assert_allclose(jac, jnp.diag(3 * x**2))
    np.testing.assert_allclose(lap, 6 * x)


# --- transformations around lap_filter ------------------------------------------------


def test_vmap_around_lap_filter_on_a_model() -> None:
    net = make_net()
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)))
    eye = jnp.eye(3)

    @jax.jit
    @jax.vmap
    def laplacian(x: jax.Array) -> Any:
        return fwdlap.lap_filter(net, (x,), (eye,), (None,))

    out, jac, lap = laplacian(xs)
    assert lap.shape == (4, 2) and jac.shape == (4, 3, 2)
    for i in range(2):
        expected = reference_in_x(net, xs[i], eye, jnp.zeros(3))
        assert_allclose_tree((out[i], jac[i], lap[i]), expected)
