"""Independent references for the tests: nothing here calls fwdlap."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def identity_jacobian(x: jax.Array) -> jax.Array:
    """Unit directions for every coordinate of `x`, shaped `(x.size, *x.shape)`."""
    return jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape)


def reference_laplacian(f: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    """Trace of `jax.jacfwd(jax.jacfwd(f))`, per output element (works for while)."""
    hess = jax.jacfwd(jax.jacfwd(f))(x)

    def trace_leaf(h: jax.Array) -> jax.Array:
        out_shape = h.shape[: h.ndim - 2 * x.ndim]
        h = h.reshape(*out_shape, x.size, x.size)
        return jnp.trace(h, axis1=-2, axis2=-1)

    return jax.tree_util.tree_map(trace_leaf, hess)


def reference_jacobian(f: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    """`jax.jacfwd(f)`, rearranged to fwdlap's layout: directions first."""
    jac = jax.jacfwd(f)(x)

    def to_directions_first(j: jax.Array) -> jax.Array:
        out_shape = j.shape[: j.ndim - x.ndim]
        j = j.reshape(*out_shape, x.size)
        return jnp.moveaxis(j, -1, 0)

    return jax.tree_util.tree_map(to_directions_first, jac)


def tree_allclose(a: Any, b: Any, rtol: float = 1e-7, atol: float = 1e-8) -> bool:
    """Whether two pytrees have the same structure and allclose leaves."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    if tree_a != tree_b:
        return False
    return all(
        np.shape(x) == np.shape(y) and np.allclose(x, y, rtol=rtol, atol=atol)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def reference_values(
    f: Callable[[jax.Array], Any], x: jax.Array
) -> tuple[Any, Any, Any]:
    """`(f(x), reference_jacobian(f, x), reference_laplacian(f, x))`."""
    return f(x), reference_jacobian(f, x), reference_laplacian(f, x)


# The same, compiled once per function (`f` is static: pass a hashable callable).
reference_triple = jax.jit(reference_values, static_argnums=0)


def assert_matches_reference(
    got: Any,
    fun: Callable[[jax.Array], Any],
    x: jax.Array,
    rtol: float = 1e-7,
    atol: float = 1e-8,
) -> None:
    """`(out, jacobian, laplacian)` against `reference_triple(fun, x)`."""
    ref = reference_triple(fun, x)
    for name, a, b in zip(("value", "jacobian", "laplacian"), got, ref, strict=True):
        assert tree_allclose(a, b, rtol=rtol, atol=atol), name


def hessian_trace_weighted(
    f: Callable[[jax.Array], Any],
    x: jax.Array,
    v: jax.Array,
    hessian: Callable[..., Any] = jax.hessian,
) -> Any:
    """`sum_k v_k^T H v_k` per output element, from `jax.hessian` (v: (k, *x.shape)).

    Pass `hessian=lambda f: jax.jacfwd(jax.jacfwd(f))` for functions with a
    `while_loop`, which reverse mode cannot differentiate.
    """
    hess = hessian(f)(x)
    v = v.reshape(v.shape[0], x.size)

    def contract(h: jax.Array) -> jax.Array:
        out_shape = h.shape[: h.ndim - 2 * x.ndim]
        h = h.reshape(*out_shape, x.size, x.size)
        return jnp.einsum("ki,...ij,kj->...", v, h, v)

    return jax.tree_util.tree_map(contract, hess)


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    subs = []
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if hasattr(v, "eqns"):  # an open Jaxpr
                subs.append(v)
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # a ClosedJaxpr
                subs.append(v.jaxpr)
    return subs


def jaxpr_shapes(jaxpr: Any) -> list[tuple[int, ...]]:
    """Shapes of every value bound anywhere in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars]
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in _sub_jaxprs(eqn.params):
            shapes += jaxpr_shapes(sub)
    return shapes


def window_scans(jaxpr: Any) -> list[Any]:
    """The top-level scans over int32 window starts of a sparse pass in windows."""
    return [
        eqn
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "scan" and eqn.invars[-1].aval.dtype == jnp.int32
    ]


def window_count(jaxpr: Any) -> int:
    """How many windows a jaxpr's top-level window scan runs (1 without one)."""
    scans = window_scans(jaxpr)
    assert len(scans) <= 1
    return scans[0].params["length"] if scans else 1
