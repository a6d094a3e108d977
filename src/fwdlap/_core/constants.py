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
    with jax.ensure_compile_time_eval():
        outs = eqn.primitive.bind(*ins, **eqn.params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    var = _jax.tracer_var(tracer)
    for out, outvar in zip(outs, eqn.outvars, strict=True):
        if outvar is var:
            return np.asarray(out)
    return None
