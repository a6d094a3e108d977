"""`lap` and `lap_partial` on pytrees (basic version; validation lives in _checks)."""

from collections.abc import Callable, Sequence
from typing import Any

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from .._core import lap_flat, lap_partial_flat
from .._core.zeros import Zero, is_zero


def _is_zero_leaf(x: Any) -> bool:
    return x is None or type(x) is Zero


def _flatten_tangents(tree: Any, treedef: Any) -> list[Any]:
    leaves = treedef.flatten_up_to(tree)
    return leaves


def _num_directions(jac_leaves: Sequence[Any]) -> int:
    for j in jac_leaves:
        if j is None:
            continue
        shape = j.aval.shape if type(j) is Zero else jnp.shape(j)
        if len(shape) > 0:
            return shape[0]
    return 0


def _densify(primal: Any, tangent: Any, jac_n: int | None) -> Any:
    if not is_zero(tangent):
        return tangent
    aval = jax.typeof(primal)
    shape = aval.shape if jac_n is None else (jac_n, *aval.shape)
    tangent_dtype = aval.to_tangent_aval().dtype
    if tangent_dtype == jax.dtypes.float0:
        return np.zeros(shape, jax.dtypes.float0)
    return jnp.zeros(shape, tangent_dtype)


def lap(
    fun: Callable[..., Any],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
) -> tuple[Any, Any, Any]:
    """Forward Laplacian of `fun` at `primals` (see `fwdlap.lap`)."""
    flat_p, in_tree = jax.tree_util.tree_flatten(tuple(primals))
    flat_j = _flatten_tangents(tuple(jacobians), in_tree)
    flat_l = _flatten_tangents(tuple(laplacians), in_tree)
    n = _num_directions(flat_j)
    out_tree_box: list[Any] = []

    def flat_fun(*args: Any) -> list[Any]:
        out = fun(*jax.tree_util.tree_unflatten(in_tree, args))
        leaves, out_tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return leaves

    flat_j = [Zero_or(j, p, n) for j, p in zip(flat_j, flat_p)]
    flat_l = [Zero_or(lp, p, None) for lp, p in zip(flat_l, flat_p)]
    outs, jacs, laps = lap_flat(flat_fun, flat_p, flat_j, flat_l, n)
    out_tree = out_tree_box[0]
    jacs = [_densify(o, j, n) for o, j in zip(outs, jacs)]
    laps = [_densify(o, lp, None) for o, lp in zip(outs, laps)]
    unflatten = lambda xs: jax.tree_util.tree_unflatten(out_tree, xs)
    return unflatten(outs), unflatten(jacs), unflatten(laps)


def Zero_or(t: Any, primal: Any, n: int | None) -> Any:
    from .._core.zeros import zero_jacobian, zero_laplacian

    if t is None:
        return zero_laplacian(primal) if n is None else zero_jacobian(primal, n)
    return t


def lap_partial(
    fun: Callable[..., Any],
    primals: Sequence[Any],
    example_jacobians: Sequence[Any],
    example_laplacians: Sequence[Any],
) -> tuple[Any, Partial]:
    """Partially evaluated forward Laplacian (see `fwdlap.lap_partial`)."""
    flat_p, in_tree = jax.tree_util.tree_flatten(tuple(primals))
    flat_j = _flatten_tangents(tuple(example_jacobians), in_tree)
    flat_l = _flatten_tangents(tuple(example_laplacians), in_tree)
    n = _num_directions(flat_j)
    out_tree_box: list[Any] = []

    def flat_fun(*args: Any) -> list[Any]:
        out = fun(*jax.tree_util.tree_unflatten(in_tree, args))
        leaves, out_tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return leaves

    flat_j = [Zero_or(j, p, n) for j, p in zip(flat_j, flat_p)]
    flat_l = [Zero_or(lp, p, None) for lp, p in zip(flat_l, flat_p)]
    outs, pe_fn = lap_partial_flat(flat_fun, flat_p, flat_j, flat_l, n)
    out_tree = out_tree_box[0]
    avals = [jax.typeof(o) for o in outs]
    apply = functools.partial(_apply_lap_pe, in_tree, out_tree, tuple(avals_shapes(avals)))
    pe = Partial(apply, pe_fn)
    return jax.tree_util.tree_unflatten(out_tree, outs), pe


def avals_shapes(avals: Sequence[Any]) -> list[Any]:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]


def _apply_lap_pe(
    in_tree: Any,
    out_tree: Any,
    out_structs: Any,
    pe_fn: Any,
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
) -> tuple[Any, Any]:
    flat_j = _flatten_tangents(tuple(jacobians), in_tree)
    flat_l = _flatten_tangents(tuple(laplacians), in_tree)
    n = _num_directions(flat_j)
    jacs, laps = pe_fn(flat_j, flat_l)
    jacs = [_densify(jnp.zeros(s.shape, s.dtype), j, n) for s, j in zip(out_structs, jacs)]
    laps = [_densify(jnp.zeros(s.shape, s.dtype), lp, None) for s, lp in zip(out_structs, laps)]
    unflatten = lambda xs: jax.tree_util.tree_unflatten(out_tree, xs)
    return unflatten(jacs), unflatten(laps)
