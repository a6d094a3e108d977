"""The forward-Laplacian tracer: a JAX `Trace`/`Tracer` pair.

A `LapTracer` carries `(primal, jacobian, laplacian)`. The jacobian has a leading
axis of `n` tangent directions; the laplacian has the primal's shape. Either may be
a symbolic zero (`Zero`), which is never instantiated inside the trace, and a value
whose two tangents are both zero is never wrapped in a tracer at all.

The structure follows JAX's own `JVPTrace` (`jax/_src/interpreters/ad.py`).
"""

import functools
from typing import Any

import jax

from . import _jax, dot_split, registry
from .registry import Fallback, LapRule
from .rules.custom import call_source, call_target, lap_custom_jvp_call
from .rules.generic import generic_lap_rule
from .rules.sparse_rules import apply_rule
from .sparse import SparseContext, is_sparse
from .zeros import is_zero, zero_jacobian, zero_laplacian

Triple = tuple[Any, Any, Any]


class LapTracer(_jax.Tracer):
    """A value with its jacobian (n directions) and laplacian inside a `LapTrace`."""

    __slots__ = ["primal", "jacobian", "laplacian"]

    def __init__(self, trace: "LapTrace", primal: Any, jacobian: Any, laplacian: Any):
        _jax.init_tracer(self, trace, jax.typeof(primal))
        self.primal = primal
        self.jacobian = jacobian
        self.laplacian = laplacian

    def to_concrete_value(self) -> Any:
        return _jax.to_concrete_value(self.primal)

    def _short_repr(self) -> str:
        return f"LapTracer({self.primal})"


if not _jax.TRACER_INIT_TAKES_AVAL:  # JAX 0.9: `aval` is not a slot yet
    LapTracer.aval = property(lambda self: jax.typeof(self.primal))  # type: ignore


class LapTrace(_jax.Trace):
    """Carries (primal, jacobian, laplacian) triples through every primitive."""

    def __init__(
        self, parent_trace: Any, tag: Any, n: int, sparse: SparseContext | None = None
    ):
        super().__init__()
        self.parent_trace = parent_trace
        self.tag = tag
        self.n = n
        self.sparse = sparse
        # id -> (value, how it was made), for `dot_split`.
        self.origins: dict[int, tuple[Any, dot_split.Origin]] = {}

    def to_triple(self, val: Any) -> Triple:
        if isinstance(val, LapTracer) and val._trace.tag is self.tag:
            return val.primal, val.jacobian, val.laplacian
        return val, zero_jacobian(val, self.n), zero_laplacian(val)

    def stage_value(self, val: Any) -> Any:
        primal, jac, lap = self.to_triple(val)
        stage = self.parent_trace.stage_value
        primal = stage(primal)
        if is_sparse(jac):
            jac = jac.with_data(stage(jac.data))
        else:
            jac = jac if is_zero(jac) else stage(jac)
        lap = lap if is_zero(lap) else stage(lap)
        return maybe_lap_tracer(self, primal, jac, lap)

    def process_primitive(self, primitive: Any, tracers: Any, params: Any, /) -> Any:
        rule = registry.rules.get(primitive) or _generic(primitive)
        primals, jacs, laps = unzip3(map(self.to_triple, tracers))
        if rule.rewrite is not None:
            out = rule.rewrite(self, tracers, primals, jacs, laps, params)
            if not isinstance(out, Fallback):
                return out
        if all(is_zero(t) for t in (*jacs, *laps)):
            out = _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        else:
            with _jax.set_current_trace(self.parent_trace):
                out = apply_rule(self, rule, primitive, primals, jacs, laps, params)
            out = self.lift(primitive.multiple_results, *out)
        if isinstance(out, LapTracer):
            dot_split.record(self.origins, primitive, tracers, params, out)
        return out

    def lift(self, multiple_results: bool, primal: Any, jac: Any, lap: Any) -> Any:
        """A rule's outputs as tracers of this trace (lists if `multiple_results`)."""
        if multiple_results:
            return [
                maybe_lap_tracer(self, p, j, lp)
                for p, j, lp in zip(primal, jac, lap, strict=True)
            ]
        return maybe_lap_tracer(self, primal, jac, lap)

    def process_call(self, call_primitive: Any, f: Any, tracers: Any, params: Any, /):
        # `closed_call` and friends: inline the body so it stays forward-Laplacian.
        del call_primitive, params
        with _jax.set_current_trace(self):
            return f.call_wrapped(*tracers)

    def process_custom_jvp_call(
        self, primitive: Any, fun: Any, jvp: Any, tracers: Any, /, *, symbolic_zeros
    ) -> Any:
        primals, jacs, laps = unzip3(map(self.to_triple, tracers))
        if all(is_zero(t) for t in (*jacs, *laps)):
            params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
            return _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        with _jax.set_current_trace(self.parent_trace):
            outs = lap_custom_jvp_call(
                self, fun, jvp, symbolic_zeros, primals, jacs, laps
            )
        return self.lift(True, *outs)

    def process_custom_vjp_call(
        self,
        primitive: Any,
        fun: Any,
        fwd: Any,
        bwd: Any,
        tracers: Any,
        /,
        *,
        out_trees: Any,
        symbolic_zeros: Any,
    ) -> Any:
        primals, jacs, laps = unzip3(map(self.to_triple, tracers))
        if all(is_zero(t) for t in (*jacs, *laps)):
            params = dict(
                subfuns=(fun, fwd, bwd),
                out_trees=out_trees,
                symbolic_zeros=symbolic_zeros,
            )
            return _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        raise NotImplementedError(
            f"fwdlap cannot propagate a forward Laplacian through the jax.custom_vjp "
            f"{_custom_vjp_name(fun)}: a custom_vjp rule only defines reverse-mode "
            "derivatives, while a Laplacian needs forward-mode second derivatives. "
            "Give the function a jax.custom_jvp rule instead (fwdlap differentiates "
            "it twice), or keep the custom_vjp function outside the function passed "
            "to fwdlap.lap."
        )


def _custom_vjp_name(fun: Any) -> str:
    """`function 'name'` for a custom_vjp call, also when `jax.jit` staged it."""
    src = call_source(fun)  # "name at file:line"; jit keeps it
    if src:
        return f"function {src.split(' at ')[0]!r}"
    target, _ = call_target(fun)
    if target is not None:
        return f"function {getattr(target, '__name__', '?')!r}"
    return "function (staged by jax.jit, which did not keep its name)"


@functools.cache
def _generic(primitive: Any) -> LapRule:
    """The rule of a primitive missing from the table: JVP rules, twice."""
    return LapRule(generic_lap_rule(primitive))


def unzip3(triples: Any) -> tuple[list[Any], list[Any], list[Any]]:
    xs, ys, zs = [], [], []
    for x, y, z in triples:
        xs.append(x)
        ys.append(y)
        zs.append(z)
    return xs, ys, zs


def is_differentiable(primal: Any) -> bool:
    dtype = jax.typeof(primal).dtype
    return jax.numpy.issubdtype(dtype, jax.numpy.inexact)


def maybe_lap_tracer(trace: LapTrace, primal: Any, jac: Any, lap: Any) -> Any:
    """Wrap in a `LapTracer` unless both tangents are (symbolically) zero."""
    if (is_zero(jac) and is_zero(lap)) or not is_differentiable(primal):
        return primal
    if is_zero(jac):
        jac = zero_jacobian(primal, trace.n)
    if is_zero(lap):
        lap = zero_laplacian(primal)
    return LapTracer(trace, primal, jac, lap)
