"""Control flow inside the function: scan, while, fori_loop, cond, switch, remat, jit.

Each case is compared with `reference_triple` (jax.jacfwd and the trace of
jax.jacfwd(jax.jacfwd(f)), which handles while_loop as well).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from helpers import (
    assert_matches_reference,
    identity_jacobian,
    reference_values,
    tree_allclose,
)

X = np.array([0.3, -0.7, 1.1])
W = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8]])


class Case(NamedTuple):
    name: str
    fun: Callable[[jax.Array], Any]


# --- scan ----------------------------------------------------------------------------


def _scan_carry(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(W @ c) * x, None

    out, _ = lax.scan(body, x, None, length=4)
    return out


def _scan_xs_depend_on_input(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The scanned-over values carry jacobians: they are a function of x.
    xs = jnp.sin(jnp.outer(jnp.arange(1.0, 5.0), x))  # (4, 3)

    def body(c: jax.Array, xi: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = c * jnp.cos(xi) + xi**2
        return c, jnp.sum(c * xi)

    return lax.scan(body, jnp.ones(3), xs)


def _scan_const_xs(x: jax.Array) -> jax.Array:
    xs = jnp.asarray(W)

    def body(c: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(c + w * x), c[0] * w

    c, ys = lax.scan(body, x**2, xs)
    return c + ys.sum(0)


def _scan_carry_starts_constant(x: jax.Array) -> jax.Array:
    # The carry starts without tangents and picks them up in the body (fixpoint).
    def body(c: tuple[jax.Array, jax.Array], _: Any) -> tuple[Any, jax.Array]:
        a, b = c
        return (a * x + 1.0, b + 1.0), a

    (a, b), ys = lax.scan(body, (jnp.ones(3), jnp.zeros(())), None, length=3)
    return a * b + ys.sum(0)


def _scan_reverse_unroll(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, xi: jax.Array) -> tuple[jax.Array, jax.Array]:
        return c * xi + jnp.sin(c), jnp.exp(-c)

    c, ys = lax.scan(body, x[0], x, reverse=True, unroll=2)
    return ys * c


def _nested_scan(x: jax.Array) -> jax.Array:
    def inner(c: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(c) * x + 0.1, None

    def outer(c: jax.Array, _: Any) -> tuple[jax.Array, None]:
        c, _ = lax.scan(inner, c, None, length=2)
        return c**2, None

    out, _ = lax.scan(outer, x, None, length=2)
    return out


def _cumulative_sum_scan(x: jax.Array) -> jax.Array:
    # ys whose tangents are zero for some outputs (the step counter).
    def body(c: tuple[jax.Array, jax.Array], xi: jax.Array) -> tuple[Any, Any]:
        s, k = c
        s = s + xi**3
        return (s, k + 1), (s * s, k)

    _, (ys, ks) = lax.scan(body, (0.0, jnp.zeros((), jnp.int32)), x)
    return ys * ks


# --- while / fori --------------------------------------------------------------------


def _while(x: jax.Array) -> jax.Array:
    def cond(c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return c[0] < 5

    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, v = c
        return i + 1, jnp.sin(W @ v) + x * v

    _, v = lax.while_loop(cond, body, (jnp.asarray(0), x))
    return v


def _while_data_dependent(x: jax.Array) -> jax.Array:
    # The trip count depends on the primal value only.
    def cond(c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jnp.sum(c[1] ** 2) < 50.0

    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return c[0] + 1, c[1] * (1.5 + 0.1 * jnp.tanh(x))

    n, v = lax.while_loop(cond, body, (jnp.asarray(0), x + 1.0))
    return v * n


def _while_const_only(x: jax.Array) -> jax.Array:
    # Only a closed-over constant carries tangents; the carry starts constant.
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return c[0] + 1, c[1] * jnp.cos(x) + x**2

    _, out = lax.while_loop(lambda c: c[0] < 4, body, (jnp.asarray(0), jnp.ones(3)))
    return out


def _fori_static(x: jax.Array) -> jax.Array:
    # Python-int bounds: fori_loop lowers to scan.
    return lax.fori_loop(0, 3, lambda i, c: jnp.tanh(W @ c) + x * i, x)


def _fori_static_unrolled_body_index(x: jax.Array) -> jax.Array:
    def body(i: jax.Array, c: jax.Array) -> jax.Array:
        return c + jnp.sin(x[i] * c)

    return lax.fori_loop(0, 3, body, x**2)


# --- cond / switch -------------------------------------------------------------------


def _cond(x: jax.Array) -> jax.Array:
    return lax.cond(x[0] > 0, lambda v: jnp.sin(v) * v, lambda v: v**3, x)


def _cond_false_branch(x: jax.Array) -> jax.Array:
    return lax.cond(x[1] > 0, lambda v: jnp.sin(v) * v, lambda v: jnp.exp(v) * v[0], x)


def _cond_one_branch_constant(x: jax.Array) -> jax.Array:
    # One branch ignores the operand: branch tangents must be unified (zeros).
    def taken(v: jax.Array) -> jax.Array:
        return jnp.cos(v) * v[2]

    return lax.cond(x[2] > 0, taken, lambda v: jnp.ones(3), x) * x


def _cond_constant_taken(x: jax.Array) -> jax.Array:
    return lax.cond(x[2] < 0, jnp.cos, lambda v: jnp.ones(3), x) + x**2


def _switch(x: jax.Array) -> jax.Array:
    index = jnp.argmax(x)
    branches = [jnp.sin, lambda v: v**2 * v[0], lambda v: jnp.tanh(W @ v)]
    return lax.switch(index, branches, x)


def _cond_closure(x: jax.Array) -> jax.Array:
    # Branches close over a tangent-carrying value (it becomes an operand).
    y = jnp.exp(x)
    return lax.cond(x[0] > 0, lambda: y * x[1], lambda: -y)


# --- remat / jit ---------------------------------------------------------------------


def _remat(x: jax.Array) -> jax.Array:
    f = jax.checkpoint(lambda v: jnp.sin(W @ v) * jnp.exp(v[0]))
    return f(f(x))


def _remat_policy(x: jax.Array) -> jax.Array:
    policy = jax.checkpoint_policies.nothing_saveable
    f = jax.checkpoint(lambda v: jnp.tanh(v @ W) ** 2, policy=policy)
    return f(x) * x


def _remat_static_arg(x: jax.Array) -> jax.Array:
    f = jax.checkpoint(lambda v, k: jnp.sin(v) ** k, static_argnums=(1,))
    return f(x, 3) + f(x[::-1], 2)


@jax.jit
def _inner_jit(v: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tanh(w @ v) * v


def _nested_jit(x: jax.Array) -> jax.Array:
    outer = jax.jit(lambda v: _inner_jit(jnp.sin(v), jnp.asarray(W)) ** 2)
    return outer(x) + _inner_jit(x, jnp.asarray(W))


def _jit_tangent_in_both(x: jax.Array) -> jax.Array:
    # Both jit arguments carry tangents.
    return _inner_jit(x, jnp.outer(x, x))


def _jit_static_argnums(x: jax.Array) -> jax.Array:
    f = jax.jit(lambda v, p: v**p + jnp.sum(v), static_argnums=1)
    return f(x, 3) * f(x, 2)


def _jit_unused_output(x: jax.Array) -> jax.Array:
    # A jitted function with an output that does not depend on its input.
    f = jax.jit(lambda v: (jnp.sin(v), jnp.arange(3.0)))
    a, b = f(x)
    return a * b


def _everything(x: jax.Array) -> jax.Array:
    def body(c: jax.Array, xi: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = lax.cond(xi > 0, lambda v: jnp.sin(v) * xi, lambda v: v * v, c)
        c = jax.checkpoint(lambda v: jnp.tanh(W @ v))(c)
        return c, lax.fori_loop(0, 2, lambda i, a: a * c[0] + xi, xi)

    c, ys = lax.scan(body, x, x)
    return jax.jit(lambda a, b: a * jnp.sum(b))(c, ys)


CASES = [
    Case("scan_carry", _scan_carry),
    Case("scan_xs_depend_on_input", _scan_xs_depend_on_input),
    Case("scan_const_xs", _scan_const_xs),
    Case("scan_carry_starts_constant", _scan_carry_starts_constant),
    Case("scan_reverse_unroll", _scan_reverse_unroll),
    Case("nested_scan", _nested_scan),
    Case("scan_integer_carry", _cumulative_sum_scan),
    Case("while", _while),
    Case("while_data_dependent", _while_data_dependent),
    Case("while_const_only", _while_const_only),
    Case("fori_static", _fori_static),
    Case("fori_static_index", _fori_static_unrolled_body_index),
    Case("cond", _cond),
    Case("cond_false_branch", _cond_false_branch),
    Case("cond_one_branch_constant", _cond_one_branch_constant),
    Case("cond_constant_branch_taken", _cond_constant_taken),
    Case("switch", _switch),
    Case("cond_closure", _cond_closure),
    Case("remat", _remat),
    Case("remat_policy", _remat_policy),
    Case("remat_static_arg", _remat_static_arg),
    Case("nested_jit", _nested_jit),
    Case("jit_tangent_in_both", _jit_tangent_in_both),
    Case("jit_static_argnums", _jit_static_argnums),
    Case("jit_unused_output", _jit_unused_output),
    Case("everything", _everything),
]


def _lap_eager(fun: Callable[[jax.Array], Any], x: jax.Array) -> tuple[Any, Any, Any]:
    return fwdlap.lap(fun, (x,), (identity_jacobian(x),), (jnp.zeros_like(x),))


_lap_full = jax.jit(_lap_eager, static_argnums=0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_control_flow(case: Case) -> None:
    x = jnp.asarray(X)
    out, jac, lap = _lap_full(case.fun, x)
    assert_matches_reference((out, jac, lap), case.fun, x)


@pytest.mark.parametrize("name", ["scan_xs_depend_on_input", "while", "cond", "remat"])
def test_control_flow_eager(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    x = jnp.asarray(X)
    out, jac, lap = _lap_eager(case.fun, x)
    assert_matches_reference((out, jac, lap), case.fun, x)


def _fori_dynamic(x: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    # Traced bounds: fori_loop lowers to while_loop.
    def body(i: jax.Array, c: jax.Array) -> jax.Array:
        return jnp.tanh(W @ c) + x * i

    return lax.fori_loop(lower, upper, body, x)


@pytest.mark.parametrize("bounds", [(0, 3), (1, 4), (2, 2)])
def test_fori_loop_dynamic_bounds(bounds: tuple[int, int]) -> None:
    x = jnp.asarray(X)
    lower, upper = (jnp.asarray(b, jnp.int32) for b in bounds)

    @jax.jit
    def run(x: jax.Array, lower: jax.Array, upper: jax.Array) -> Any:
        fun = lambda v: _fori_dynamic(v, lower, upper)
        return _lap_eager(fun, x)

    @jax.jit
    def reference(x: jax.Array, lower: jax.Array, upper: jax.Array) -> Any:
        return reference_values(lambda v: _fori_dynamic(v, lower, upper), x)

    jaxpr = jax.make_jaxpr(run)(x, lower, upper)
    assert "while" in str(jaxpr)
    out, jac, lap = run(x, lower, upper)
    ref_out, ref_jac, ref_lap = reference(x, lower, upper)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap)


def test_fori_loop_static_bounds_is_scan() -> None:
    # The two fori_loop tests above cover different primitives; check that they do.
    jaxpr = jax.make_jaxpr(_lap_eager, static_argnums=0)(_fori_static, jnp.asarray(X))
    assert "scan" in str(jaxpr)


def test_loops_keep_forward_laplacian_inside() -> None:
    # The loop body is transformed, not unrolled: one scan/while in, one out, and the
    # body works on (n, 3) jacobians.
    x = jnp.asarray(X)
    for fun, prim in [(_scan_carry, "scan"), (_while, "while")]:
        jaxpr = jax.make_jaxpr(_lap_eager, static_argnums=0)(fun, x)
        eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == prim]
        assert len(eqns) == 1
        out_shapes = [tuple(v.aval.shape) for v in eqns[0].outvars]
        assert (3, 3) in out_shapes  # the carried jacobian


# --- a second argument with its own seeding through control flow ---------------------

Y = np.array([0.5, -0.2, 0.9, 0.4])


def _two_scan(x: jax.Array, y: jax.Array) -> jax.Array:
    def body(c: jax.Array, yi: jax.Array) -> tuple[jax.Array, jax.Array]:
        return c * jnp.tanh(yi + c[0]) + x, c * yi

    c, ys = lax.scan(body, x, y)
    return c * ys.sum(0)


def _two_scan_carry_from_y(x: jax.Array, y: jax.Array) -> jax.Array:
    def body(c: jax.Array, xi: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(c) * xi + c**2, c[0]

    c, ys = lax.scan(body, y[:3], x)
    return c + ys


def _two_while(x: jax.Array, y: jax.Array) -> jax.Array:
    def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, v = c
        return i + 1, jnp.sin(v * y[i]) + x * y[0]

    return lax.while_loop(lambda c: c[0] < 3, body, (jnp.asarray(0), x))[1]


def _two_cond(x: jax.Array, y: jax.Array) -> jax.Array:
    return lax.cond(y[0] > 0, lambda a, b: jnp.sin(a) * b[1], lambda a, b: a, x, y)


def _two_jit_remat(x: jax.Array, y: jax.Array) -> jax.Array:
    a = jax.jit(lambda a, b: jnp.tanh(a * b[:3]) * b[3])(x, y)
    return jax.checkpoint(lambda a, b: a * jnp.exp(b[:3]))(a, y)


TWO_ARG = [_two_scan, _two_scan_carry_from_y, _two_while, _two_cond, _two_jit_remat]


@pytest.mark.parametrize("fun", TWO_ARG, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize("seeding", ["laplacian_only", "both"])
def test_second_argument_seeding(fun: Callable[..., jax.Array], seeding: str) -> None:
    # x is seeded with unit directions and a laplacian; y with a laplacian only, or with
    # its own directions as well. Expected, from forward-mode Hessian blocks:
    #   lap = sum_k [v_k^T H_xx v_k + 2 v_k^T H_xy w_k + w_k^T H_yy w_k]
    #         + J_x L_x + J_y L_y
    x, y = jnp.asarray(X), jnp.asarray(Y)
    v = jnp.eye(3)
    w = jnp.zeros((3, 4))
    if seeding == "both":
        w = jnp.stack([0.2 * jnp.ones(4), jnp.arange(4.0), -jnp.ones(4)])
    lap_x, lap_y = jnp.array([0.1, -0.2, 0.3]), jnp.array([0.3, 0.1, -0.5, 0.8])
    jac_y = w if seeding == "both" else None

    @jax.jit
    def run(x: jax.Array, y: jax.Array) -> Any:
        return fwdlap.lap(fun, (x, y), (v, jac_y), (lap_x, lap_y))

    @jax.jit
    def reference(x: jax.Array, y: jax.Array) -> Any:
        jx, jy = jax.jacfwd(fun, 0)(x, y), jax.jacfwd(fun, 1)(x, y)
        hxx = jax.jacfwd(jax.jacfwd(fun, 0), 0)(x, y)
        hxy = jax.jacfwd(jax.jacfwd(fun, 0), 1)(x, y)
        hyy = jax.jacfwd(jax.jacfwd(fun, 1), 1)(x, y)
        lap = (
            jnp.einsum("ki,oij,kj->o", v, hxx, v)
            + 2 * jnp.einsum("ki,oij,kj->o", v, hxy, w)
            + jnp.einsum("ki,oij,kj->o", w, hyy, w)
            + jx @ lap_x
            + jy @ lap_y
        )
        return fun(x, y), (jx @ v.T + jy @ w.T).T, lap

    got, ref = run(x, y), reference(x, y)
    for a, b in zip(got, ref, strict=True):
        assert tree_allclose(a, b)


# --- call-like primitives ------------------------------------------------------------


CALLS = [
    Case(
        "named_call", lambda x: jax.named_call(lambda v: jnp.sin(v) * v[0], name="f")(x)
    ),
    Case("optimization_barrier", lambda x: lax.optimization_barrier(jnp.sin(x)) * x),
    Case(
        "checkpoint_name",
        lambda x: jax.ad_checkpoint.checkpoint_name(jnp.sin(x), "s") * x,
    ),
    Case(
        "jit_inside_scan",
        lambda x: lax.scan(lambda c, xi: (jax.jit(jnp.sin)(c) * xi, c), x, x)[0],
    ),
]


@pytest.mark.parametrize("case", CALLS, ids=[c.name for c in CALLS])
def test_call_like_primitives(case: Case) -> None:
    x = jnp.asarray(X)
    out, jac, lap = _lap_full(case.fun, x)
    assert_matches_reference((out, jac, lap), case.fun, x)
