"""Values known while tracing: constants that reach primitives as tracers.

Under `jax.jit`, index arrays written as constants in user code reach primitives as
tracers (`jnp.asarray`, negative-index normalisation, ...). Rules that need such a
value (a gather's indices, a `cond`'s branch index) recover it by evaluating the
equations that produced it, when those depend on constants only.
"""

from typing import Any

import jax
import numpy as np

from . import _jax

FOLD_DEPTH = 24
"""How many producing equations back a value is followed."""

FOLD_MAX_SIZE = 1 << 20
"""The largest intermediate (in elements) evaluated while folding."""


def concrete_value(x: Any) -> Any:
    """`x` as a NumPy array if its value is known while tracing, else None."""
    if not isinstance(x, _jax.Tracer):
        return np.asarray(x)
    value = _jax.to_concrete_value(x)
    if value is not None:
        return np.asarray(value)
    try:
        return _fold(x, FOLD_DEPTH)
    except Exception:  # noqa: BLE001 - anything unexpected means "not known"
        return None


def _fold(tracer: Any, depth: int) -> Any:
    """The value of `tracer` from its producing equations, or None."""
    const = _jax.tracer_constant(tracer)
    if const is not None:
        return np.asarray(const)
    eqn = _jax.producing_equation(tracer)
    if eqn is None or depth == 0 or eqn.effects:
        return None
    if getattr(tracer.aval, "size", FOLD_MAX_SIZE) >= FOLD_MAX_SIZE:
        return None
    ins = []
    for t in eqn.in_tracers:
        value = _fold(t, depth - 1) if isinstance(t, _jax.Tracer) else t
        if value is None:
            return None
        ins.append(value)
    outs = _evaluate(eqn, ins)
    var = _jax.tracer_var(tracer)
    for out, outvar in zip(outs, eqn.outvars, strict=True):
        if outvar is var:
            return np.asarray(out)
    return None


def _evaluate(eqn: Any, ins: list) -> list:
    """The outputs of `eqn` on the known inputs `ins`.

    The index arithmetic that builds identities and index arrays (`iota`, comparisons,
    casts, broadcasts) runs in NumPy: binding it would compile one XLA program per
    primitive, a third of a second on a process's first trace.
    """
    numpy_rule = _NUMPY_RULES.get(eqn.primitive.name)
    if numpy_rule is not None and len(eqn.outvars) == 1:
        dtype = np.dtype(eqn.outvars[0].aval.dtype)
        # Each operand in its traced dtype, so that NumPy computes in the dtype XLA
        # would, whatever type a constant's value is stored in.
        arrays = [
            np.asarray(x, getattr(getattr(t, "aval", None), "dtype", None))
            for x, t in zip(ins, eqn.in_tracers, strict=True)
        ]
        out = numpy_rule(arrays, **eqn.params)
        if out is not None:
            return [np.asarray(out).astype(dtype, copy=False)]
    with jax.ensure_compile_time_eval():
        outs = eqn.primitive.bind(*ins, **eqn.params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _iota(ins, *, dtype, shape, dimension, **_):
    del ins
    along = np.arange(shape[dimension], dtype=dtype)
    view = [1] * len(shape)
    view[dimension] = shape[dimension]
    return np.broadcast_to(along.reshape(view), shape)


def _broadcast_in_dim(ins, *, shape, broadcast_dimensions, **_):
    (x,) = ins
    view = [1] * len(shape)
    for axis, size in zip(broadcast_dimensions, x.shape, strict=True):
        view[axis] = size
    return np.broadcast_to(x.reshape(view), shape)


def _convert(ins, *, new_dtype, **_):
    (x,) = ins
    # Float to integer casts of non-finite values are XLA's to define: leave them
    # to XLA.
    if np.issubdtype(x.dtype, np.floating) and not np.issubdtype(
        np.dtype(new_dtype), np.floating
    ):
        return None
    return x.astype(new_dtype)


def _reshape(ins, *, new_sizes, dimensions=None, **_):
    (x,) = ins
    return None if dimensions is not None else x.reshape(new_sizes)


def _binary(op):
    def rule(ins, **_):
        return op(*ins)

    return rule


_NUMPY_RULES = {
    "iota": _iota,
    "broadcast_in_dim": _broadcast_in_dim,
    "convert_element_type": _convert,
    "reshape": _reshape,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "eq": _binary(np.equal),
    "ne": _binary(np.not_equal),
    "lt": _binary(np.less),
    "le": _binary(np.less_equal),
    "gt": _binary(np.greater),
    "ge": _binary(np.greater_equal),
    "and": _binary(np.bitwise_and),
    "or": _binary(np.bitwise_or),
}
"""NumPy evaluations of the primitives that build constants, by primitive name."""
