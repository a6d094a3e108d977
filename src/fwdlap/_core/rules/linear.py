"""Primitives that are linear in their differentiable inputs, or have no derivative.

A linear map has no second-order term: the output jacobian is the map applied to each
direction and the output laplacian is the map applied to the input laplacian. In the
sparse mode, structural primitives move block indices as they move values; the others
are elementwise (aligned) or have their own sparse rule. The same `def_linear` /
`def_zero` call gives the fourth-order pass its rule: the map applied to every Taylor
coefficient, or no coefficients at all.
"""

from typing import Any

from jax import lax

from .. import _jax, registry
from ..registry import LapRule
from . import sparse_rules
from .families import def_linear, def_zero
from .generic import generic_lap_rule

INDEX_MAPS = sparse_rules.INDEX_MAPS
bind = sparse_rules.bind


def _prim(name: str) -> Any:
    """`lax.<name>_p`, or None where this JAX has no such primitive."""
    return getattr(lax, f"{name}_p", None)


def _register_linear() -> None:
    # One array operand: the primitive itself maps every direction.
    for name in ("neg", "copy", "real", "imag", "conj", "reduce_precision"):
        def_linear(_prim(name), unary=True, elementwise=True)
    for name in ("broadcast_in_dim", "reshape", "transpose", "squeeze", "slice", "rev"):
        def_linear(_prim(name), INDEX_MAPS[name], unary=True)
    def_linear(_prim("tile"), INDEX_MAPS["tile"], unary=True)
    cumsum = bind(sparse_rules.cumulative_rule, lax.cumsum_p)
    def_linear(lax.cumsum_p, sparse=cumsum, unary=True)
    # Several operands (or integer ones): JAX's JVP rule is the linear map.
    for prim in (lax.add_p, lax.sub_p, lax.select_n_p, lax.complex_p, _jax.add_any_p):
        def_linear(prim, elementwise=True)
    def_linear(lax.convert_element_type_p, elementwise=True)
    rules = {
        "concatenate": sparse_rules.concatenate_rule,
        "split": sparse_rules.split_rule,
        "stack": sparse_rules.stack_rule,
        "unstack": sparse_rules.unstack_rule,
        "pad": sparse_rules.pad_rule,
        "gather": sparse_rules.gather_rule,
        "dynamic_slice": sparse_rules.dynamic_slice_rule,
        "dynamic_update_slice": sparse_rules.dynamic_update_slice_rule,
        "scatter": sparse_rules.scatter_rule,
        "scatter_add": sparse_rules.scatter_add_rule,
    }
    for name, rule in rules.items():
        prim = _prim(name)
        def_linear(prim, sparse=None if prim is None else bind(rule, prim))
    # Densified on purpose: no sparse rule (yet), or values mixed across devices.
    for name in (
        "scatter_sub",
        "reduce_window_sum",
        "sharding_constraint",
        "device_put",
        "psum",
        "all_gather",
        "ppermute",
        "all_to_all",
        "fft",
    ):
        def_linear(_prim(name), sparse=None)


def _register_zero() -> None:
    for name in (
        "sign", "floor", "ceil", "round", "nextafter", "stop_gradient", "is_finite",
        "eq", "ne", "lt", "le", "gt", "ge", "argmax", "argmin", "and", "or", "not",
        "xor", "reduce_and", "reduce_or", "reduce_xor", "population_count",
    ):  # fmt: skip
        def_zero(_prim(name))


def _register_others() -> None:
    """Nonlinear primitives that copy or mix block indices: generic dense rules."""
    for name in ("scatter_min", "scatter_max", "scatter_mul"):
        prim = _prim(name)
        if prim is not None:
            sparse = bind(sparse_rules.scatter_add_rule, prim)
            registry.register(prim, LapRule(generic_lap_rule(prim), sparse))
    solve = _jax.linear_solve_p
    sparse = bind(sparse_rules.all_to_all_rule, solve)
    registry.register(solve, LapRule(generic_lap_rule(solve), sparse))


_register_linear()
_register_zero()
_register_others()
