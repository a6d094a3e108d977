"""The collapsed fourth-order Taylor tracer: a JAX `Trace`/`Tracer` pair.

A `Taylor4Tracer` carries `(primal, series)` with `series = (x1, x2, x3, X4)`: `x1`,
`x2` and `x3` have a leading axis of the `n` directions, `X4` has the primal's shape
and holds the fourth coefficient summed over the directions (with the context's
signs). Any of the four may be a symbolic zero (`Zero`); a value whose four are all
zero is never wrapped in a tracer. The structure follows JAX's own `JVPTrace`
(`jax/_src/interpreters/ad.py`) and fwdlap's `LapTrace`; a primitive's rule is the
`taylor4` field of its entry in the one rule table (`registry.rules`), and the
generic nested-JVP rule where there is none.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _jax, constants, registry
from ..rules.control_flow import while_with_scalar_predicate
from ..zeros import instantiate, is_zero
from .custom import custom_jvp_rule
from .generic import generic_rule
from .series import (
    ORDER,
    Context,
    Series,
    coefficient_aval,
    is_float,
    is_zero_series,
    nonzero_mask,
    zero_coefficient,
    zero_series,
)


class Taylor4Tracer(_jax.Tracer):
    """A value with its Taylor coefficients 1-3 per direction and the collapsed 4th."""

    __slots__ = ["primal", "series"]

    def __init__(self, trace: "Taylor4Trace", primal: Any, series: Series):
        _jax.init_tracer(self, trace, jax.typeof(primal))
        self.primal = primal
        self.series = series

    def to_concrete_value(self) -> Any:
        return _jax.to_concrete_value(self.primal)

    def _short_repr(self) -> str:
        return f"Taylor4Tracer({self.primal})"


if not _jax.TRACER_INIT_TAKES_AVAL:  # JAX 0.9: `aval` is not a slot yet
    Taylor4Tracer.aval = property(lambda self: jax.typeof(self.primal))  # type: ignore


def maybe_tracer(trace: "Taylor4Trace", primal: Any, series: Sequence[Any]) -> Any:
    """Wrap in a `Taylor4Tracer` unless every coefficient is (symbolically) zero."""
    if not is_float(primal) or is_zero_series(series):
        return primal
    full = tuple(
        zero_coefficient(primal, k, trace.ctx) if is_zero(t) else t
        for k, t in enumerate(series)
    )
    return Taylor4Tracer(trace, primal, full)  # type: ignore[arg-type]


class Taylor4Trace(_jax.Trace):
    """Carries `(primal, (x1, x2, x3, X4))` through every primitive."""

    def __init__(self, parent_trace: Any, tag: Any, ctx: Context):
        super().__init__()
        self.parent_trace = parent_trace
        self.tag = tag
        self.ctx = ctx

    def to_pair(self, val: Any) -> tuple[Any, Series]:
        if isinstance(val, Taylor4Tracer) and val._trace.tag is self.tag:
            return val.primal, val.series
        return val, zero_series(val, self.ctx)

    def stage_value(self, val: Any) -> Any:
        primal, series = self.to_pair(val)
        stage = self.parent_trace.stage_value
        primal = stage(primal)
        series = tuple(t if is_zero(t) else stage(t) for t in series)
        return maybe_tracer(self, primal, series)

    def process_primitive(self, primitive: Any, tracers: Any, params: Any, /) -> Any:
        primals, series = _unzip(map(self.to_pair, tracers))
        if all(is_zero_series(s) for s in series):
            return _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        inline = _inline_jaxpr(primitive, params, primals)
        if inline is not None:
            closed, args = inline(tracers)
            with _jax.set_current_trace(self):
                outs = _jax.eval_jaxpr(closed.jaxpr, closed.consts, *args)
            return outs if primitive.multiple_results else outs[0]
        if primitive is _jax.while_p and params["cond_jaxpr"].out_avals[0].shape:
            with _jax.set_current_trace(self):
                return while_with_scalar_predicate(tracers, params)
        entry = registry.rules.get(primitive)
        rule = None if entry is None else entry.taylor4
        with _jax.set_current_trace(self.parent_trace):
            if rule is None:
                out = generic_rule(self.ctx, primitive, primals, series, **params)
            else:
                out = rule(self.ctx, primals, series, **params)
        primal_out, series_out = out
        if primitive.multiple_results:
            return [
                maybe_tracer(self, p, s)
                for p, s in zip(primal_out, series_out, strict=True)
            ]
        return maybe_tracer(self, primal_out, series_out)

    def process_call(self, call_primitive: Any, f: Any, tracers: Any, params: Any, /):
        # `closed_call` and friends: inline the body so it stays in Taylor mode.
        del call_primitive, params
        with _jax.set_current_trace(self):
            return f.call_wrapped(*tracers)

    def process_custom_jvp_call(
        self, primitive: Any, fun: Any, jvp: Any, tracers: Any, /, *, symbolic_zeros
    ) -> Any:
        primals, series = _unzip(map(self.to_pair, tracers))
        if all(is_zero_series(s) for s in series):
            params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
            return _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        with _jax.set_current_trace(self.parent_trace):
            outs, series_out = custom_jvp_rule(
                self.ctx, primals, series, jvp, symbolic_zeros
            )
        return [maybe_tracer(self, p, s) for p, s in zip(outs, series_out, strict=True)]

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
        primals, series = _unzip(map(self.to_pair, tracers))
        if all(is_zero_series(s) for s in series):
            params = dict(
                subfuns=(fun, fwd, bwd),
                out_trees=out_trees,
                symbolic_zeros=symbolic_zeros,
            )
            return _jax.bind_with_trace(primitive, self.parent_trace, primals, params)
        name = getattr(fun, "__name__", None) or str(fun)
        raise NotImplementedError(
            f"fwdlap.biharmonic cannot propagate Taylor coefficients through the "
            f"jax.custom_vjp function {name!r}: a custom_vjp rule only defines "
            "reverse-mode derivatives, while the biharmonic needs forward-mode "
            "derivatives up to order four. Give the function a jax.custom_jvp rule "
            "instead, or keep it outside the function passed to fwdlap.biharmonic."
        )


def _inline_jaxpr(primitive: Any, params: Any, primals: Any) -> Any:
    """Call-like primitives traced in place: `tracers -> (jaxpr, args)`.

    `jit` and `remat` bodies are inlined (under an outer `jax.jit` that costs nothing);
    so is the branch of a `cond` whose index is known while tracing.
    """
    if primitive is _jax.jit_p:
        return lambda tracers: (params["jaxpr"], tracers)
    if primitive is _jax.remat_p:
        return lambda tracers: (_jax.close_jaxpr(params["jaxpr"]), tracers)
    if primitive is _jax.cond_p:
        index = constants.concrete_value(primals[0])
        if index is None:
            return None
        branches = params["branches"]
        branch = branches[int(np.clip(int(index), 0, len(branches) - 1))]
        return lambda tracers: (branch, tracers[1:])
    return None


def _unzip(pairs: Any) -> tuple[list[Any], list[Series]]:
    xs: list[Any] = []
    ys: list[Series] = []
    for x, y in pairs:
        xs.append(x)
        ys.append(y)
    return xs, ys


def _normalize(primal: Any, series: Sequence[Any], ctx: Context) -> Series:
    if not is_float(primal):
        return zero_series(primal, ctx)
    return tuple(  # type: ignore[return-value]
        zero_coefficient(primal, k, ctx)
        if t is None or is_zero(t)
        else (jnp.asarray(t) if isinstance(t, np.ndarray) else t)
        for k, t in enumerate(series)
    )


def taylor4_flat(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    series: Sequence[Sequence[Any]],
    ctx: Context,
) -> tuple[list[Any], list[Series]]:
    """Push collapsed fourth-order Taylor series through a flat function.

    `series[i]` is `(x1, x2, x3, X4)` for `primals[i]` (entries may be None or
    symbolic zeros). Returns the outputs and their series, which may hold symbolic
    zeros; the caller decides what to instantiate.
    """
    with _jax.take_current_trace() as parent:
        trace = Taylor4Trace(parent, _jax.TraceTag(), ctx)
        ins = [
            maybe_tracer(trace, p, _normalize(p, s, ctx))
            for p, s in zip(primals, series, strict=True)
        ]
        with _jax.set_current_trace(trace):
            outs = fun(*ins)
        pairs = [trace.to_pair(o) for o in outs]
        del trace, ins
    outs, series_out = _unzip(pairs)
    return outs, series_out


# --- inner jaxprs --------------------------------------------------------------------

Mask = tuple[bool, ...]
"""Which of a value's four coefficients are non-zero."""


def interleave(primals: Sequence[Any], series: Sequence[Any], masks: Sequence[Mask]):
    """`[p, its non-zero coefficients..., p', ...]`, zeros instantiated where the
    mask says non-zero."""
    out: list[Any] = []
    for p, s, m in zip(primals, series, masks, strict=True):
        out.append(p)
        out.extend(instantiate(t) for t, keep in zip(s, m, strict=True) if keep)
    return out


def deinterleave(
    values: Sequence[Any], masks: Sequence[Mask], ctx: Context
) -> tuple[list[Any], list[Series]]:
    """The inverse of `interleave`: primals and their series (zeros where masked)."""
    it = iter(values)
    primals: list[Any] = []
    series: list[Series] = []
    for m in masks:
        p = next(it)
        primals.append(p)
        series.append(
            tuple(  # type: ignore[arg-type]
                next(it) if keep else zero_coefficient(p, k, ctx)
                for k, keep in enumerate(m)
            )
        )
    return primals, series


def taylor4_jaxpr(
    closed: Any,
    ctx: Context,
    in_masks: Sequence[Mask],
    instantiate_masks: Sequence[Mask] | None = None,
) -> tuple[Any, list[Mask]]:
    """Turn a `ClosedJaxpr` into its collapsed-Taylor `ClosedJaxpr`.

    The new jaxpr's binders are interleaved: each input's primal followed by its
    non-zero coefficients (as `in_masks` says), and likewise for the outputs. Outputs
    whose `instantiate_masks` entry is set come back (as zeros if need be) even where
    they are symbolically zero. Returns the jaxpr and the output masks.
    """
    inst = None if instantiate_masks is None else tuple(map(tuple, instantiate_masks))
    new, masks = _taylor4_jaxpr_cached(
        closed, ctx, tuple(tuple(m) for m in in_masks), inst
    )
    return new, list(masks)


@_jax.weakref_lru_cache
def _taylor4_jaxpr_cached(
    closed: Any,
    ctx: Context,
    in_masks: tuple[Mask, ...],
    inst: tuple[Mask, ...] | None,
) -> tuple[Any, tuple[Mask, ...]]:
    in_avals = list(closed.in_avals)
    avals: list[Any] = []
    for aval, mask in zip(in_avals, in_masks, strict=True):
        avals.append(aval)
        avals.extend(coefficient_aval(aval, k, ctx) for k in range(ORDER) if mask[k])
    store: dict[str, tuple[Mask, ...]] = {}

    def body(*args: Any) -> list[Any]:
        primals, series = deinterleave(args, in_masks, ctx)
        outs, series_out = taylor4_flat(_jax.jaxpr_as_fun(closed), primals, series, ctx)
        masks = [nonzero_mask(s) for s in series_out]
        if inst is not None:
            masks = [
                tuple(a or b for a, b in zip(m, i, strict=True))
                for m, i in zip(masks, inst, strict=True)
            ]
        store["masks"] = tuple(masks)  # type: ignore[arg-type]
        return interleave(outs, series_out, masks)  # type: ignore[arg-type]

    dbg = closed.jaxpr.debug_info.with_unknown_names()
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
        _jax.wrap_init(body, debug_info=dbg), avals
    )
    return _jax.ClosedJaxpr(jaxpr, consts), store["masks"]
