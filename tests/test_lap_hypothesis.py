"""Random small programs built from a menu of primitives, checked against jax.jacfwd.

A program is a list of steps; each step applies a unary or binary operation to values
computed earlier (the input is value 0) and appends the result. The output is the last
value, or a tuple of the last two. References: `reference_triple` (jax.jacfwd and the
trace of jax.jacfwd(jax.jacfwd(f))), and its Hessian for random seeds.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fwdlap
from helpers import (
    hessian_trace_weighted,
    identity_jacobian,
    reference_triple,
    tree_allclose,
)

M = np.array([[0.6, -0.4, 0.3], [0.2, 0.5, -0.7], [-0.3, 0.1, 0.8]])

UNARY: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sin": jnp.sin,
    "tanh": jnp.tanh,
    "exp_scaled": lambda v: jnp.exp(0.3 * v),
    "square": lambda v: v**2,
    "cube": lambda v: v**3,
    "log1p_sq": lambda v: jnp.log1p(v**2),
    "sqrt_1p_sq": lambda v: jnp.sqrt(1.0 + v**2),
    "matmul": lambda v: jnp.asarray(M) @ v,
    "times_first": lambda v: v * v[0],  # a rank-0 operand broadcast in `mul`
    "sum_broadcast": lambda v: jnp.sum(v) * jnp.ones(3),
    "cumsum": jnp.cumsum,
    "flip": lambda v: v[::-1],
    "softplus": jax.nn.softplus,  # a custom_jvp
    "logistic": jax.nn.sigmoid,
    "softmax": jax.nn.softmax,
    # Under vmap over axis 1 the softmax rule's output has the batch axis first.
    "vmap_softmax_cols": lambda v: jnp.sum(
        jax.vmap(jax.nn.softmax, in_axes=1, out_axes=0)(jnp.outer(v, v[::-1] + 1.0))
        * jnp.asarray(M),
        axis=0,
    ),
    "vmap_cols": lambda v: jax.vmap(lambda c: jnp.tanh(c) @ jnp.asarray(M[0]), 1)(
        jnp.outer(v, jnp.arange(1.0, 4.0))
    ),
    # A trip count that depends on the element: vmap gives an array predicate.
    "vmap_while": jax.vmap(
        lambda e: jax.lax.while_loop(
            lambda c: c[1] < 1 + (e > 0),
            lambda c: (jnp.sin(c[0]) + e, c[1] + 1),
            (e, jnp.asarray(0)),
        )[0]
    ),
}

BINARY: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (1.0 + b**2),
    "outer_matmul": lambda a, b: jnp.outer(a, b) @ jnp.tanh(a),
    "where": lambda a, b: jnp.where(a > b, a * b, jnp.sin(b)),
    "maximum": jnp.maximum,
}

_OPS = sorted(UNARY) + sorted(BINARY)


@st.composite
def programs(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    steps = []
    for k in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(_OPS))
        i = draw(st.integers(0, k))
        j = draw(st.integers(0, k))
        steps.append((name, i, j))
    return steps


def build(steps: list[tuple[str, int, int]], two_outputs: bool) -> Callable[..., Any]:
    def fun(x: jax.Array) -> Any:
        values = [x]
        for name, i, j in steps:
            if name in UNARY:
                values.append(UNARY[name](values[i]))
            else:
                values.append(BINARY[name](values[i], values[j]))
        if two_outputs:
            return values[-1], jnp.sum(values[-2] ** 2)
        return values[-1]

    return fun


inputs = st.lists(
    st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False), min_size=3, max_size=3
).map(np.array)


def _well_behaved(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return all(
        bool(jnp.all(jnp.isfinite(a)) and jnp.all(jnp.abs(a) < 1e6)) for a in leaves
    )


_lap_full = jax.jit(
    lambda fun, x: fwdlap.lap(fun, (x,), (identity_jacobian(x),), (None,)),
    static_argnums=0,
)

_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@settings(_SETTINGS, max_examples=30)
@given(steps=programs(), x=inputs, two_outputs=st.booleans())
def test_random_programs(
    steps: list[tuple[str, int, int]], x: np.ndarray, two_outputs: bool
) -> None:
    fun = build(steps, two_outputs)
    x_ = jnp.asarray(x)
    ref_out, ref_jac, ref_lap = reference_triple(fun, x_)
    assume(_well_behaved((ref_out, ref_jac, ref_lap)))
    out, jac, lap = _lap_full(fun, x_)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac, rtol=1e-7, atol=1e-9)
    assert tree_allclose(lap, ref_lap, rtol=1e-6, atol=1e-8)


@settings(_SETTINGS, max_examples=15)
@given(
    steps=programs(),
    x=inputs,
    seed=st.integers(0, 2**16),
    num_dirs=st.integers(1, 4),
)
def test_random_programs_random_seeds(
    steps: list[tuple[str, int, int]], x: np.ndarray, seed: int, num_dirs: int
) -> None:
    # Random directions V and a random input laplacian L:
    # lap = sum_k v_k^T H v_k + J L, jac = V J^T.
    fun = build(steps, two_outputs=False)
    x_ = jnp.asarray(x)
    key_v, key_l = jax.random.split(jax.random.key(seed))
    v = jax.random.normal(key_v, (num_dirs, 3), dtype=x_.dtype)
    lap_in = jax.random.normal(key_l, (3,), dtype=x_.dtype)
    full_jac = jax.jacfwd(fun)(x_)  # (3, 3)
    expected_jac = jnp.einsum("oi,ki->ko", full_jac, v)
    forward_hessian = lambda f: jax.jacfwd(jax.jacfwd(f))  # noqa: E731 (while loops)
    expected_lap = hessian_trace_weighted(fun, x_, v, forward_hessian)
    expected_lap = expected_lap + full_jac @ lap_in
    assume(_well_behaved((expected_jac, expected_lap)))
    run = jax.jit(fwdlap.lap, static_argnums=0)
    out, jac, lap = run(fun, (x_,), (v,), (lap_in,))
    assert tree_allclose(out, fun(x_))
    assert tree_allclose(jac, expected_jac, rtol=1e-7, atol=1e-9)
    assert tree_allclose(lap, expected_lap, rtol=1e-6, atol=1e-8)
