"""`lap_filter`: the forward Laplacian of functions of any pytrees, Equinox-style."""

from collections.abc import Callable
from typing import Any

import jax

from .._core import evaluate
from .._core.zeros import Zero
from . import _checks
from ._checks import FilteredPrimals, Jacobians, Laplacians, OutTree

_LAP_FILTER = "fwdlap.lap_filter"


class _Outputs:
    """Holds what `fun` returned that the core does not see: its structure and the
    leaves that are not arrays."""

    def __init__(self) -> None:
        self.treedef: Any = None
        self.leaves: list[Any] = []
        self.is_array: list[bool] = []


@_checks.validates_own_inputs
def lap_filter(
    fun: Callable[..., Any],
    primals: FilteredPrimals,
    jacobians: Jacobians,
    laplacians: Laplacians,
    **kwargs: Any,
) -> tuple[OutTree, OutTree, OutTree]:
    r"""Like [`fwdlap.lap`][], but for pytrees that hold more than arrays.

    It is to [`fwdlap.lap`][] what `equinox.filter_jvp` is to `jax.jvp`. `primals` may
    hold leaves that are not arrays (functions, strings, Python integers, static
    configuration, Equinox modules with non-array fields), and `fun` may be any
    callable, including an Equinox module (`model(x)`) or a bound method
    (`model.method`).

    Which leaves are differentiated is set by the tangents, as in `equinox.filter_jvp`:
    a leaf whose jacobian and laplacian are both `None` is held static (closed over,
    never traced), and `None` may stand for a whole subtree, such as a whole module.
    Every other leaf must be an array (or a Python scalar) with tangents shaped as for
    [`fwdlap.lap`][]. To perturb the parameters of a module passed as a primal, give
    tangents to its inexact arrays only, e.g. built from
    `equinox.filter(model, equinox.is_inexact_array)`.

    In the outputs, leaves that are not arrays come back unchanged with `None` as
    their jacobian and laplacian, and so do outputs whose tangents are symbolic zeros
    (outputs that do not depend on the differentiated inputs, or integer outputs).

    The computed quantity is the one of [`fwdlap.lap`][]: for directions $v_1, \dots,
    v_n$ and input laplacian $\ell$,
    $\text{laplacians\_out} = \sum_k v_k^\top (\nabla^2 f)\, v_k + J \ell$.
    It is evaluated as `fwdlap.lap` does with its default `chunk_size="auto"`: in
    blocks of 8 to 32 directions on the CPU when the jacobians would be large (there
    is no `chunk_size` argument here, as keyword arguments go to `fun`).

    **Arguments:**

    - `fun`: the function to differentiate; called as `fun(*primals, **kwargs)`.
    - `primals`: a tuple or list with one pytree per positional argument of `fun`.
    - `jacobians`: the structure of `primals`; `None` for static leaves or subtrees,
        otherwise arrays of shape `(n, *primal_leaf.shape)` with one `n` throughout,
        or symbolic zeros.
    - `laplacians`: the structure of `primals`; `None`, symbolic zeros, or arrays
        shaped like their primal leaves.
    - `**kwargs`: passed to `fun` and never differentiated.

    **Returns:**

    A 3-tuple `(out, jacobians_out, laplacians_out)` with the structure of `fun`'s
    output. Leaves of `jacobians_out` have shape `(n, *out_leaf.shape)` and leaves of
    `laplacians_out` the output leaf's shape, or are `None` where the output leaf is
    not an array or its tangent is zero.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import fwdlap

    model = eqx.nn.MLP(3, 1, width_size=8, depth=2, key=jax.random.key(0))
    x = jnp.ones(3)

    # The Laplacian of the model in its input: the model is closed over.
    out, jac, lap = fwdlap.lap_filter(model, (x,), (jnp.eye(3),), (None,))

    # The model as a primal, perturbing its parameters along one direction.
    params = eqx.filter(model, eqx.is_inexact_array)
    direction = jax.tree_util.tree_map(lambda p: jnp.ones((1, *p.shape)), params)
    out, jac, lap = fwdlap.lap_filter(
        lambda m, x: m(x), (model, x), (direction, None), (None, None)
    )
    ```
    """
    checked = _checks.check_inputs(
        _LAP_FILTER, fun, primals, jacobians, laplacians, filtered=True
    )
    dynamic_index = [i for i, d in enumerate(checked.dynamic) if d]
    store = _Outputs()

    def flat_fun(*dynamic_leaves: Any) -> list[Any]:
        leaves = list(checked.primals)
        for i, leaf in zip(dynamic_index, dynamic_leaves, strict=True):
            leaves[i] = leaf
        out = fun(*jax.tree_util.tree_unflatten(checked.treedef, leaves), **kwargs)
        store.leaves, store.treedef = jax.tree_util.tree_flatten(out)
        store.is_array = [_checks.is_array(leaf) for leaf in store.leaves]
        return [leaf for leaf, a in zip(store.leaves, store.is_array, strict=True) if a]

    outs, jacs, laps = evaluate.lap_evaluate(
        flat_fun, *checked.dynamic_leaves(), checked.n, evaluate.AUTO
    )

    out_leaves: list[Any] = []
    jac_leaves: list[Any] = []
    lap_leaves: list[Any] = []
    dynamic_out = iter(zip(outs, jacs, laps, strict=True))
    for leaf, leaf_is_array in zip(store.leaves, store.is_array, strict=True):
        if leaf_is_array:
            out, jac, lap = next(dynamic_out)
            out_leaves.append(out)
            jac_leaves.append(None if isinstance(jac, Zero) else jac)
            lap_leaves.append(None if isinstance(lap, Zero) else lap)
        else:
            out_leaves.append(leaf)
            jac_leaves.append(None)
            lap_leaves.append(None)

    def unflatten(leaves: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(store.treedef, leaves)

    return unflatten(out_leaves), unflatten(jac_leaves), unflatten(lap_leaves)
