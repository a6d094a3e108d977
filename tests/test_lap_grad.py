"""Differentiating through fwdlap.lap: jax.grad with respect to closed-over parameters,
jax.jvp with respect to another input, and third derivatives in x.

References: the same derivatives of the trace of `jax.hessian` (and of `jax.jacfwd` for
the jacobian part), never of fwdlap.
"""

from collections.abc import Callable
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
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])
PARAMS = {
    "w1": np.array(
        [[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8], [0.4, 0.4, 0.1]]
    ),
    "b1": np.array([0.1, -0.2, 0.05, 0.3]),
    "w2": np.array([0.5, -1.0, 0.7, 0.2]),
}

Model = Callable[[dict[str, jax.Array], jax.Array], jax.Array]


def _mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return p["w2"] @ jnp.tanh(p["w1"] @ x + p["b1"]) + 0.1 * jnp.sum(x**2)


def _with_control_flow(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = jax.nn.softplus(w * c) + jax.checkpoint(jnp.sin)(c)
        return c, jnp.sum(c)

    c, ys = lax.scan(body, x, p["w1"])
    c = lax.cond(x[0] > 0, lambda a: jnp.tanh(a) * p["b1"][0], lambda a: a**2, c)
    return jnp.sum(c * p["w2"][:3]) + jnp.sum(ys) * p["b1"][1]


def _attention_like(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    # Products of two tangent-carrying operands and a softmax.
    q = p["w1"] @ x
    k = jnp.tanh(p["w1"] * x)  # (4, 3)
    a = jax.nn.softmax(k @ x * q)
    return jnp.log(jnp.sum(jnp.exp(a * p["w2"])) + 1.0)


MODELS = [_mlp, _with_control_flow, _attention_like]
IDS = ["mlp", "control_flow", "attention_like"]


def _fwdlap_kinetic(p: dict[str, jax.Array], x: jax.Array, model: Model) -> jax.Array:
    f = lambda x: model(p, x)
    _, jac, lap = fwdlap.lap(f, (x,), (identity_jacobian(x),), (None,))
    return -0.5 * (lap + jnp.sum(jac**2))


def _reference_kinetic(
    p: dict[str, jax.Array], x: jax.Array, model: Model
) -> jax.Array:
    f = lambda x: model(p, x)
    hess = jax.hessian(f)(x)
    grad = jax.jacfwd(f)(x)
    return -0.5 * (jnp.trace(hess) + jnp.sum(grad**2))


def _params() -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in PARAMS.items()}


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_grad_wrt_closed_over_params(model: Model) -> None:
    p, x = _params(), jnp.asarray(X)
    loss = lambda p, kin: jnp.square(kin(p, x, model))
    grad = jax.jit(jax.grad(lambda p: loss(p, _fwdlap_kinetic)))(p)
    ref = jax.jit(jax.grad(lambda p: loss(p, _reference_kinetic)))(p)
    assert tree_allclose(grad, ref)


def test_grad_eager() -> None:
    p, x = _params(), jnp.asarray(X)
    grad = jax.grad(lambda p: _fwdlap_kinetic(p, x, _mlp))(p)
    ref = jax.jit(jax.grad(lambda p: _reference_kinetic(p, x, _mlp)))(p)
    assert tree_allclose(grad, ref)


def test_grad_wrt_batch_mean() -> None:
    # The VMC pattern: mean over a batch of configurations, vmapped inside the loss.
    p = _params()
    xs = jnp.asarray(np.stack([X, -X[::-1], 0.5 * X]))

    def loss(p: dict[str, jax.Array], kin: Callable[..., jax.Array]) -> jax.Array:
        return jnp.mean(jax.vmap(lambda x: kin(p, x, _attention_like))(xs))

    grad = jax.jit(jax.grad(lambda p: loss(p, _fwdlap_kinetic)))(p)
    ref = jax.jit(jax.grad(lambda p: loss(p, _reference_kinetic)))(p)
    assert tree_allclose(grad, ref)


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_jvp_wrt_other_input(model: Model) -> None:
    # Forward mode with respect to the parameters, through the Laplacian in x.
    p, x = _params(), jnp.asarray(X)
    dp = jax.tree_util.tree_map(
        lambda a: jnp.cos(jnp.arange(a.size) + 1.0).reshape(a.shape), p
    )
    run = jax.jit(
        lambda p, dp: jax.jvp(lambda p: _fwdlap_kinetic(p, x, model), (p,), (dp,))
    )
    ref = jax.jit(
        lambda p, dp: jax.jvp(lambda p: _reference_kinetic(p, x, model), (p,), (dp,))
    )
    assert tree_allclose(run(p, dp), ref(p, dp))


def test_grad_wrt_x_third_order() -> None:
    # Gradient of the Laplacian with respect to the point itself.
    p, x = _params(), jnp.asarray(X)

    def lap_of(x: jax.Array) -> jax.Array:
        f = lambda x: _mlp(p, x)
        return fwdlap.lap(f, (x,), (identity_jacobian(x),), (None,))[2]

    grad = jax.jit(jax.grad(lap_of))(x)
    ref = jax.jit(jax.grad(lambda x: jnp.trace(jax.hessian(lambda x: _mlp(p, x))(x))))(
        x
    )
    assert tree_allclose(grad, ref)


def test_lap_of_lap() -> None:
    # The bi-Laplacian: fwdlap nested in fwdlap (two LapTraces at once).
    p = _params()
    f = lambda x: _mlp(p, x)

    def lap_f(x: jax.Array) -> jax.Array:
        return fwdlap.lap(f, (x,), (identity_jacobian(x),), (None,))[2]

    x = jnp.asarray(X)
    _, _, bilap = jax.jit(
        lambda x: fwdlap.lap(lap_f, (x,), (identity_jacobian(x),), (None,))
    )(x)
    lap_ref = lambda x: jnp.trace(jax.hessian(f)(x))
    ref = jax.jit(lambda x: jnp.trace(jax.hessian(lap_ref)(x)))(x)
    assert tree_allclose(bilap, ref)


def test_jacobian_wrt_params_of_jacobian_output() -> None:
    # jax.jacrev through the jacobian output (not only the laplacian).
    p, x = _params(), jnp.asarray(X)

    def jac_of(p: dict[str, jax.Array]) -> Any:
        f = lambda x: jnp.sin(p["w1"] @ x) * p["b1"]
        return fwdlap.lap(f, (x,), (identity_jacobian(x),), (None,))[1]

    def ref_jac_of(p: dict[str, jax.Array]) -> Any:
        f = lambda x: jnp.sin(p["w1"] @ x) * p["b1"]
        return jax.jacfwd(f)(x).T

    got = jax.jit(jax.jacrev(jac_of))(p)
    ref = jax.jit(jax.jacrev(ref_jac_of))(p)
    assert tree_allclose(got, ref)


INNER: list[tuple[str, Callable[[jax.Array], Any]]] = [
    ("jvp", lambda x: jax.jvp(lambda v: jnp.sin(v) * v[0], (x,), (x**2,))[1]),
    ("grad", lambda x: jax.grad(lambda v: jnp.sum(jnp.tanh(v) ** 2 * v[0]))(x)),
    ("vjp", lambda x: jax.vjp(lambda v: jnp.sin(v) * v[1], x)[1](jnp.cos(x))[0]),
    ("linearize", lambda x: jax.linearize(lambda v: jnp.exp(v) * v[2], x)[1](x)),
    (
        "lap_in_vmap",
        lambda x: jax.vmap(
            lambda v: fwdlap.lap(
                lambda u: jnp.sin(u * x[0]) ** 2, (v,), (jnp.eye(3),), (None,)
            )[2]
        )(jnp.stack([x, x**2])),
    ),
]


@pytest.mark.parametrize("fun", [c[1] for c in INNER], ids=[c[0] for c in INNER])
def test_derivatives_inside_fun(fun: Callable[[jax.Array], Any]) -> None:
    # Other JAX transformations (and fwdlap itself) nested inside the function.
    x = jnp.asarray(X)
    out, jac, lap = jax.jit(
        lambda x: fwdlap.lap(fun, (x,), (identity_jacobian(x),), (None,))
    )(x)
    assert_matches_reference((out, jac, lap), fun, x)
