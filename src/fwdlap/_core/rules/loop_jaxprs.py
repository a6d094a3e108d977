"""Jaxpr plumbing for the control-flow rules: binder order, the loop condition."""

from collections.abc import Sequence
from typing import Any

from .. import _jax


def reorder_binders(closed: Any, groups_in: list[int], groups_out: list[int]) -> Any:
    """Reorder `[P..., J..., L...]` binders, each split into groups, into
    `[P_g1, J_g1, L_g1, P_g2, J_g2, L_g2, ...]`."""

    def regroup(vars_: list[Any], sizes: list[int]) -> list[Any]:
        ng = len(sizes) // 3
        blocks, start = [], 0
        for s in sizes:
            blocks.append(vars_[start : start + s])
            start += s
        p_blocks, j_blocks, l_blocks = (
            blocks[:ng],
            blocks[ng : 2 * ng],
            blocks[2 * ng :],
        )
        out: list[Any] = []
        for g in range(ng):
            out += p_blocks[g] + j_blocks[g] + l_blocks[g]
        return out

    jaxpr = closed.jaxpr
    return _jax.replace_jaxpr_binders(
        closed,
        regroup(list(jaxpr.invars), groups_in),
        regroup(list(jaxpr.outvars), groups_out),
    )


def group_sizes(groups: list[tuple[int, list[bool], list[bool]]]) -> list[int]:
    """Binder sizes in `[P..., J..., L...]` order for (count, jac_nz, lap_nz) groups."""
    return (
        [c for c, _, _ in groups]
        + [sum(j) for _, j, _ in groups]
        + [sum(lp) for _, _, lp in groups]
    )


def cond_ignoring_tangents(
    cond_jaxpr: Any, num_primal: int, tangent_avals: Sequence[Any]
) -> Any:
    """The loop condition, taking (and ignoring) tangent carries of `tangent_avals`
    after its `num_primal` constants and primal carries."""
    avals = [*cond_jaxpr.in_avals, *tangent_avals]
    fun = _jax.jaxpr_as_fun(cond_jaxpr)

    def cond(*args: Any) -> Any:
        return fun(*args[:num_primal])

    dbg = cond_jaxpr.jaxpr.debug_info.with_unknown_names()
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
        _jax.wrap_init(cond, debug_info=dbg), avals
    )
    return _jax.ClosedJaxpr(jaxpr, consts)
