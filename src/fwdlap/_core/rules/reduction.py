"""The rule for `reduce_sum`: linear, with short axes summed as slices.

XLA's CPU backend is slow at reducing a short axis of a large tangent, such as the 3
of an `(..., 3)` coordinate axis: on `(16, 8, 32, 32, 3)` tangents it took 3.8 ms
against 0.14 ms for adding the three slices. Tangents pay this once per direction,
so an axis of at most `MAX_SLICED_AXIS` elements is summed as a tree of slices,
which XLA fuses into one elementwise loop. On the FermiNet-shaped benchmark model
(spin means over 16 electrons, coordinate and atom axes) this cut the dense pass by
20-30%; with 32 the softmax sums of the Psiformer-shaped model at N = 32 got 20%
slower, so longer axes keep the reduction. This is done on the CPU backend only,
where it was measured. The primal output is computed by the primitive itself, as in
the user's code.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

from .. import registry
from ..platform import targets_cpu
from ..registry import LapRule
from ..taylor4 import rules as taylor4_rules
from ..zeros import is_zero, zero_jacobian, zero_laplacian
from . import sparse_rules
from .generic import generic_lap_rule

MAX_SLICED_AXIS = 16
"""The longest axis summed as slices rather than by a reduction."""


def tree_sum(x: Any, axis: int) -> Any:
    """Sums `x` over `axis` by adding halves until one slice is left.

    **Arguments:**

    - `x`: an array with a non-empty `axis`.
    - `axis`: the axis to sum over.

    **Returns:**

    `x` summed over `axis`, which is removed.
    """
    while x.shape[axis] > 1:
        length = x.shape[axis]
        half = length // 2
        summed = lax.slice_in_dim(x, 0, half, axis=axis) + lax.slice_in_dim(
            x, half, 2 * half, axis=axis
        )
        if length % 2:
            # The odd slice out joins the first partial sum.
            first = lax.slice_in_dim(summed, 0, 1, axis=axis) + lax.slice_in_dim(
                x, length - 1, length, axis=axis
            )
            summed = lax.concatenate(
                [first, lax.slice_in_dim(summed, 1, half, axis=axis)], axis
            )
        x = summed
    return lax.squeeze(x, (axis,))


def sum_axes(x: Any, axes: Sequence[int], params: dict[str, Any]) -> Any:
    """`reduce_sum` of `x` over `axes`, short axes as trees of slices.

    **Arguments:**

    - `x`: the array to sum.
    - `axes`: the axes of `x` to sum over.
    - `params`: the other parameters of the `reduce_sum` equation.

    **Returns:**

    `x` summed over `axes`.
    """
    # An explicit output sharding belongs to the reduction; keep it whole. Other
    # backends keep it too: the slowness, and the gain, were measured on the CPU.
    sliceable = params.get("out_sharding") is None and targets_cpu()
    reduced: list[int] = []
    for axis in sorted((a % x.ndim for a in axes), reverse=True):
        if sliceable and 0 < x.shape[axis] <= MAX_SLICED_AXIS:
            x = tree_sum(x, axis)
            reduced = [a - 1 for a in reduced]  # every kept axis was after `axis`
        else:
            reduced.append(axis)
    if not reduced:
        return x
    return lax.reduce_sum_p.bind(x, **{**params, "axes": tuple(sorted(reduced))})


def reduce_sum_rule(
    ctx: Any,
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    **params: Any,
):
    del ctx
    (x,), (jac,), (lap,) = primals, jacobians, laplacians
    axes = tuple(params["axes"])
    out = lax.reduce_sum_p.bind(x, **params)
    if is_zero(jac):
        jac_out = zero_jacobian(out, jac.aval.shape[0])
    else:
        jac_out = jax.vmap(lambda j: sum_axes(j, axes, params))(jac)
    lap_out = zero_laplacian(out) if is_zero(lap) else sum_axes(lap, axes, params)
    return out, jac_out, lap_out


def _register() -> None:
    """Reductions, cumulative ops and sort: generic dense rules except for sums.

    Their sparse rules first make every slot constant along the reduced axes.
    """
    bind = sparse_rules.bind
    sparse = bind(sparse_rules.reduce_rule, lax.reduce_sum_p)
    taylor4 = taylor4_rules.linear_rule(lax.reduce_sum_p)  # linear in one operand
    registry.register(
        lax.reduce_sum_p,
        LapRule(reduce_sum_rule, sparse, kind="reduction", taylor4=taylor4),
    )
    reductions = [(p, sparse_rules.reduce_rule) for p in _REDUCTIONS]
    cumulative = [(p, sparse_rules.cumulative_rule) for p in _CUMULATIVE]
    for prim, rule in [*reductions, *cumulative, (lax.sort_p, sparse_rules.sort_rule)]:
        dense = generic_lap_rule(prim)
        registry.register(prim, LapRule(dense, bind(rule, prim), kind="reduction"))


_REDUCTIONS = (lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p)
_CUMULATIVE = (lax.cumprod_p, lax.cummax_p, lax.cummin_p, lax.cumlogsumexp_p)


_register()
