"""Rules for primitives that are linear in their differentiable inputs.

A linear map has no second-order term: the output jacobian is the map applied to each
direction and the output laplacian is the map applied to the input laplacian.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

from .. import _jax, registry
from ..zeros import (
    instantiate,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)
from .generic import primitive_jvp_fn

# Linear in their single (array) input: apply the primitive to the tangents directly.
_UNARY_NAMES = [
    "neg",
    "reshape",
    "broadcast_in_dim",
    "transpose",
    "squeeze",
    "expand_dims",
    "slice",
    "rev",
    "copy",
    "real",
    "imag",
    "conj",
    "cumsum",
    "reduce_precision",
    "tile",
]
# Linear in their differentiable inputs, possibly with integer or boolean operands:
# apply JAX's JVP rule (which is the linear map itself) to the tangents.
_MULTI_NAMES = [
    "add",
    "sub",
    "concatenate",
    "pad",
    "select_n",
    "dynamic_slice",
    "dynamic_update_slice",
    "gather",
    "scatter",
    "scatter_add",
    "scatter_sub",
    "complex",
    "reduce_window_sum",
    "convert_element_type",
    "sharding_constraint",
    "device_put",
    "split",
    "stack",
    "unstack",
    "psum",
    "all_gather",
    "ppermute",
    "all_to_all",
    "fft",
]


def _lookup(name: str) -> Any:
    return getattr(lax, f"{name}_p", None)


def unary_linear_rule(primitive: Any):
    def rule(
        primals: Sequence[Any],
        jacobians: Sequence[Any],
        laplacians: Sequence[Any],
        **params: Any,
    ):
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        out = primitive.bind(x, **params)
        if is_zero(jac):
            jac_out = zero_jacobian(out, jac.aval.shape[0])
        else:
            jac_out = jax.vmap(lambda j: primitive.bind(j, **params))(jac)
        lap_out = zero_laplacian(out) if is_zero(lap) else primitive.bind(lap, **params)
        return out, jac_out, lap_out

    return rule


def multi_linear_rule(primitive: Any):
    def rule(
        primals: Sequence[Any],
        jacobians: Sequence[Any],
        laplacians: Sequence[Any],
        **params: Any,
    ):
        jvp_fn = primitive_jvp_fn(primitive, params)
        outs, lap_out = jvp_fn(primals, laplacians)
        nz = [i for i, j in enumerate(jacobians) if not is_zero(j)]
        n = num_directions(jacobians)
        if nz:
            zero_flags: list[bool] = []

            def one_direction(*v_nz: Any) -> list[Any]:
                vs = [zero_laplacian(p) for p in primals]
                for i, v in zip(nz, v_nz, strict=False):
                    vs[i] = v
                _, tangents = jvp_fn(primals, vs)
                zero_flags[:] = [is_zero(t) for t in tangents]
                return [instantiate(t) for t in tangents]

            jac_out = jax.vmap(one_direction)(*[jacobians[i] for i in nz])
            jac_out = [
                zero_jacobian(p, n) if z else j
                for p, j, z in zip(outs, jac_out, zero_flags, strict=False)
            ]
        else:
            jac_out = [zero_jacobian(p, n) for p in outs]
        if primitive.multiple_results:
            return outs, jac_out, lap_out
        return outs[0], jac_out[0], lap_out[0]

    return rule


def zero_derivative_rule(primitive: Any):
    """For piecewise-constant primitives (floor, sign, stop_gradient, ...)."""

    def rule(
        primals: Sequence[Any],
        jacobians: Sequence[Any],
        laplacians: Sequence[Any],
        **params: Any,
    ):
        out = primitive.bind(*primals, **params)
        n = num_directions(jacobians)
        outs = out if primitive.multiple_results else [out]
        jacs = [zero_jacobian(o, n) for o in outs]
        laps = [zero_laplacian(o) for o in outs]
        if primitive.multiple_results:
            return outs, jacs, laps
        return out, jacs[0], laps[0]

    return rule


def _register() -> None:
    for name in _UNARY_NAMES:
        prim = _lookup(name)
        if prim is not None:
            registry.register(prim, unary_linear_rule(prim))
    for name in _MULTI_NAMES:
        prim = _lookup(name)
        if prim is not None:
            registry.register(prim, multi_linear_rule(prim))
    add_any = getattr(_jax, "add_any_p", None)
    if add_any is not None:
        registry.register(add_any, multi_linear_rule(add_any))
    for name in [
        "sign",
        "floor",
        "ceil",
        "round",
        "stop_gradient",
        "is_finite",
        "nextafter",
    ]:
        prim = _lookup(name)
        if prim is not None:
            registry.register(prim, zero_derivative_rule(prim))


_register()
