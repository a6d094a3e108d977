"""fwdlap.register_rule for primitives and jax.custom_jvp functions.

Rules are checked by their results (against `jax.hessian` or a closed form) and by
whether they ran (call counters): a rule that is silently skipped would still give
correct results through the generic path.
"""

from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

import fwdlap

X = jnp.asarray([0.3, -0.7, 1.1, 0.4])


def trace_of_hessian(f: Any, x: jax.Array) -> jax.Array:
    return jnp.trace(jax.jit(jax.hessian(f))(x))


# --- primitives ----------------------------------------------------------------------


def make_cube_primitive(name: str) -> Any:
    """x -> x**3 as a primitive with no JVP rule of its own."""
    prim = jax.extend.core.Primitive(name)
    prim.def_impl(lambda x: x**3)
    prim.def_abstract_eval(lambda aval: aval)
    mlir.register_lowering(prim, mlir.lower_fun(lambda x: x**3, multiple_results=False))
    return prim


def test_primitive_rule():
    cube_p = make_cube_primitive("fwdlap_test_cube")

    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(cube_p.bind(jnp.sin(x)) * x)

    def f_ref(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(x) ** 3 * x)

    with pytest.raises(NotImplementedError, match="fwdlap_test_cube"):
        fwdlap.laplacian(f)(X)

    calls: list[int] = []

    def cube_rule(primals: Any, jacobians: Any, laplacians: Any, **params: Any) -> Any:
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        assert params == {}
        assert jac.shape == (X.size, *x.shape)
        calls.append(1)
        lap_out = 6 * x * jnp.sum(jac**2, axis=0)
        if not isinstance(lap, fwdlap.Zero):
            lap_out = lap_out + 3 * x**2 * lap
        return cube_p.bind(x), 3 * x**2 * jac, lap_out

    fwdlap.register_rule(cube_p, cube_rule)
    got = jax.jit(fwdlap.laplacian(f))(X)
    assert calls
    np.testing.assert_allclose(got, trace_of_hessian(f_ref, X), rtol=1e-12)


def test_registering_again_replaces_the_rule():
    cube_p = make_cube_primitive("fwdlap_test_cube_twice")

    def first_rule(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        raise AssertionError("the first rule was replaced")

    def second_rule(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        (x,), (jac,) = primals, jacobians
        return cube_p.bind(x), 3 * x**2 * jac, 6 * x * jnp.sum(jac**2, axis=0)

    fwdlap.register_rule(cube_p, first_rule)
    fwdlap.register_rule(cube_p, second_rule)
    got = fwdlap.laplacian(lambda x: jnp.sum(cube_p.bind(x)))(X)
    np.testing.assert_allclose(got, jnp.sum(6 * X), rtol=1e-12)


# --- custom_jvp functions ----------------------------------------------------------


def make_softplus() -> Any:
    @jax.custom_jvp
    def softplus(x: jax.Array) -> jax.Array:
        return jnp.logaddexp(x, 0.0)

    softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))
    return softplus


def softplus_rule(calls: list[int]) -> Any:
    def rule(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        calls.append(1)
        s = jax.nn.sigmoid(x)
        lap_out = s * (1 - s) * jnp.sum(jac**2, axis=0)
        if not isinstance(lap, fwdlap.Zero):
            lap_out = lap_out + s * lap
        return [jnp.logaddexp(x, 0.0)], [s * jac], [lap_out]

    return rule


def softplus_ref(x: jax.Array) -> jax.Array:
    return jnp.logaddexp(x, 0.0)


@pytest.mark.parametrize("where", ["direct", "inner-jit", "outer-jit", "vmap-outside"])
def test_custom_jvp_rule_is_used(where: str):
    softplus = make_softplus()
    calls: list[int] = []
    fwdlap.register_rule(softplus, softplus_rule(calls))

    def make(sp: Any) -> Any:
        inner = jax.jit(sp) if where == "inner-jit" else sp
        return lambda x: jnp.sum(inner(jnp.tanh(x) * x) ** 2)

    f, f_ref = make(softplus), make(softplus_ref)
    lap_fn = fwdlap.laplacian(f)
    if where == "vmap-outside":
        xs = jnp.stack([X, 2 * X])
        got = jax.vmap(lap_fn)(xs)
        want = jax.vmap(lambda x: trace_of_hessian(f_ref, x))(xs)
    else:
        got = jax.jit(lap_fn)(X) if where == "outer-jit" else lap_fn(X)
        want = trace_of_hessian(f_ref, X)
    assert calls
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_custom_jvp_rule_with_several_outputs():
    @jax.custom_jvp
    def sincos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(x), jnp.cos(x)

    sincos.defjvp(
        lambda p, t: (sincos(p[0]), (jnp.cos(p[0]) * t[0], -jnp.sin(p[0]) * t[0]))
    )
    calls: list[int] = []

    def rule(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        (x,), (jac,) = primals, jacobians
        calls.append(1)
        s, c = jnp.sin(x), jnp.cos(x)
        sq = jnp.sum(jac**2, axis=0)
        return [s, c], [c * jac, -s * jac], [-s * sq, -c * sq]

    fwdlap.register_rule(sincos, rule)
    f = lambda x: jnp.stack(sincos(x * x[::-1]))  # noqa: E731
    f_ref = lambda x: jnp.stack((jnp.sin(x * x[::-1]), jnp.cos(x * x[::-1])))  # noqa: E731
    got = jax.jit(fwdlap.laplacian(f))(X)
    hess = jax.hessian(f_ref)(X)
    assert calls
    np.testing.assert_allclose(got, jnp.trace(hess, axis1=-2, axis2=-1), rtol=1e-12)


def test_custom_jvp_rewritten_by_inner_vmap_falls_back():
    softplus = make_softplus()
    calls: list[int] = []
    fwdlap.register_rule(softplus, softplus_rule(calls))

    def make(sp: Any) -> Any:
        # vmap over the last axis: the staged call computes something else than
        # `softplus` of its inputs, so the rule must not be applied to it.
        return lambda x: jnp.sum(jax.vmap(sp, in_axes=1)(jnp.outer(x, x)) ** 2)

    got = jax.jit(fwdlap.laplacian(make(softplus)))(X)
    assert not calls
    np.testing.assert_allclose(got, trace_of_hessian(make(softplus_ref), X), rtol=1e-12)


def test_custom_jvp_rule_may_decline():
    softplus = make_softplus()
    calls: list[int] = []

    def declining(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        calls.append(1)
        return NotImplemented

    fwdlap.register_rule(softplus, declining)
    f = lambda x: jnp.sum(softplus(x) ** 3)  # noqa: E731
    f_ref = lambda x: jnp.sum(softplus_ref(x) ** 3)  # noqa: E731
    for lap_fn in (fwdlap.laplacian(f), jax.jit(fwdlap.laplacian(f))):
        calls.clear()
        np.testing.assert_allclose(lap_fn(X), trace_of_hessian(f_ref, X), rtol=1e-12)
        assert calls


def test_custom_jvp_rule_with_wrong_shapes_is_reported():
    softplus = make_softplus()

    def bad_rule(primals: Any, jacobians: Any, laplacians: Any) -> Any:
        (x,), (jac,) = primals, jacobians
        return [x], [jac[0]], [x]  # jacobian without the direction axis

    fwdlap.register_rule(softplus, bad_rule)
    with pytest.raises(ValueError, match="registered with fwdlap.register_rule"):
        fwdlap.laplacian(lambda x: jnp.sum(softplus(x)))(X)


# --- errors --------------------------------------------------------------------------


def test_register_rule_rejects_other_callables():
    with pytest.raises(TypeError, match="Primitive or a function decorated with"):
        fwdlap.register_rule(jnp.sin, lambda *a: a)
    with pytest.raises(TypeError, match="`rule` must be a callable"):
        fwdlap.register_rule(make_softplus(), "not a rule")  # type: ignore[arg-type]


def test_register_rule_rejects_nondiff_argnums_and_missing_jvp():
    f = jax.custom_jvp(lambda n, x: x**n, nondiff_argnums=(0,))
    with pytest.raises(ValueError, match="nondiff_argnums"):
        fwdlap.register_rule(f, lambda *a: a)
    g = jax.custom_jvp(lambda x: x)
    with pytest.raises(ValueError, match="defjvp"):
        fwdlap.register_rule(g, lambda *a: a)


def test_rule_registered_after_tracing_takes_effect():
    """A function traced with one rule (its jit body cached) picks up a later rule."""
    cube_p = make_cube_primitive("fwdlap_test_late_cube")
    inner = jax.jit(lambda x: jnp.sum(cube_p.bind(x)))

    def f(x: jax.Array) -> jax.Array:
        return jnp.sin(inner(x))

    def cube_rule(scale: float) -> Any:
        def rule(primals: Any, jacobians: Any, laplacians: Any, **params: Any) -> Any:
            (x,), (jac,), (lap,) = primals, jacobians, laplacians
            lap_out = scale * 6 * x * jnp.sum(jac**2, axis=0)
            if not isinstance(lap, fwdlap.Zero):
                lap_out = lap_out + 3 * x**2 * lap
            return cube_p.bind(x), 3 * x**2 * jac, lap_out

        return rule

    expected = trace_of_hessian(lambda x: jnp.sin(jnp.sum(x**3)), X)
    fwdlap.register_rule(cube_p, cube_rule(0.0))  # a deliberately wrong rule first
    assert not np.allclose(fwdlap.laplacian(f)(X), expected, rtol=1e-6)
    fwdlap.register_rule(cube_p, cube_rule(1.0))
    assert np.allclose(fwdlap.laplacian(f)(X), expected, rtol=1e-6)
