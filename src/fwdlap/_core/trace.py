"""The forward-Laplacian tracer: a JAX `Trace`/`Tracer` pair.

A `LapTracer` carries `(primal, jacobian, laplacian)`. The jacobian has a leading
axis of `n` tangent directions; the laplacian has the primal's shape. Either may be
a symbolic zero (`Zero`), which is never instantiated inside the trace, and a value
whose two tangents are both zero is never wrapped in a tracer at all.

The structure follows JAX's own `JVPTrace` (`jax/_src/interpreters/ad.py`).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.tree_util import Partial

from . import _jax, dot_split, registry, sparse
from .registry import Fallback, LapRule
from .rules.custom import lap_custom_jvp_call
from .rules.generic import generic_lap_rule
from .rules.sparse_rules import apply_rule
from .sparse import SparseContext, is_sparse
from .zeros import Zero, instantiate, is_zero, zero_jacobian, zero_laplacian

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
    src = _jax.custom_jvp_call_src_info(fun)  # "name at file:line"; jit keeps it
    if src:
        return f"function {src.split(' at ')[0]!r}"
    target, _ = _jax.custom_jvp_call_target(fun)
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


def _is_differentiable(primal: Any) -> bool:
    dtype = jax.typeof(primal).dtype
    return jax.numpy.issubdtype(dtype, jax.numpy.inexact)


def maybe_lap_tracer(trace: LapTrace, primal: Any, jac: Any, lap: Any) -> Any:
    """Wrap in a `LapTracer` unless both tangents are (symbolically) zero."""
    if (is_zero(jac) and is_zero(lap)) or not _is_differentiable(primal):
        return primal
    if is_zero(jac):
        jac = zero_jacobian(primal, trace.n)
    if is_zero(lap):
        lap = zero_laplacian(primal)
    return LapTracer(trace, primal, jac, lap)


def _normalize(primal: Any, tangent: Any, zero: Any) -> Any:
    return zero if is_zero(tangent) or not _is_differentiable(primal) else tangent


def lap_flat(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    sparsity: sparse.SparseSpec | None = None,
    window: sparse.Window | None = None,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Forward Laplacian of a function of flat arguments returning a flat list.

    Tangent outputs may be symbolic zeros; the caller decides what to instantiate.
    With `sparsity`, jacobians whose values are known while tracing are carried
    block-sparse (`sparse.SparseJac`) and come back dense. With a `window` as well,
    the dense jacobians (outputs included) hold only the window's rows and the
    laplacians only their part of the sum (see `sparse.Window`).
    """
    ctx = None if sparsity is None else sparsity.resolve(n, window)
    rows = n if ctx is None else ctx.rows
    with _jax.take_current_trace() as parent:
        trace = LapTrace(parent, _jax.TraceTag(), rows, ctx)
        jacobians = [
            _normalize(p, j, zero_jacobian(p, rows))
            for p, j in zip(primals, jacobians, strict=True)
        ]
        if ctx is not None:
            jacobians = [
                j if is_zero(j) else sparse.sparsify_input(ctx, i, p, j)
                for i, (p, j) in enumerate(zip(primals, jacobians, strict=True))
            ]
            if window is not None and not all(
                is_zero(j) or is_sparse(j) for j in jacobians
            ):
                raise sparse.WindowUnsupported("an input jacobian is dense")
        jacobians = [
            jax.numpy.asarray(j) if isinstance(j, np.ndarray) else j for j in jacobians
        ]
        laplacians = [
            jax.numpy.asarray(lp) if isinstance(lp, np.ndarray) else lp
            for lp in laplacians
        ]
        in_tracers = [
            maybe_lap_tracer(trace, p, j, _normalize(p, lp, zero_laplacian(p)))
            for p, j, lp in zip(primals, jacobians, laplacians, strict=True)
        ]
        # `jax.nn.softmax` as its custom_jvp (the flag JAX means to make the default),
        # for `rules.custom.softmax_rule`, which the sparse mode runs on block-sparse
        # data where the softmax axis spans few enough blocks.
        with _jax.set_current_trace(trace), jax.softmax_custom_jvp(True):
            outs = fun(*in_tracers)
        triples = [trace.to_triple(o) for o in outs]
        del trace, in_tracers
    if ctx is not None:
        triples = [_dense_output(ctx, p, j, lp) for p, j, lp in triples]
    return unzip3(triples)


def _dense_output(ctx: SparseContext, primal: Any, jac: Any, lap: Any) -> Triple:
    """An output of a sparse pass with its jacobian dense (of the window's rows)."""
    if is_sparse(jac):
        return primal, ctx.densify(jac), ctx.window_laplacian(lap)
    if is_zero(jac):
        return primal, jac, ctx.window_laplacian(lap)
    return primal, jac, lap


def lap_flat_layouts(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    ctx: SparseContext,
) -> tuple[list[Any], list[Any], list[Any]]:
    """`lap_flat` in the sparse mode for jacobians already in their layouts.

    Jacobians may be `SparseJac`, dense or zero, and come back as the rules leave
    them (nothing is made sparse or dense here): the sparse control-flow rules trace
    loop bodies and cond branches with it.
    """
    with _jax.take_current_trace() as parent:
        trace = LapTrace(parent, _jax.TraceTag(), ctx.rows, ctx)
        in_tracers = [
            maybe_lap_tracer(trace, p, j, lp)
            for p, j, lp in zip(primals, jacobians, laplacians, strict=True)
        ]
        with _jax.set_current_trace(trace):
            outs = fun(*in_tracers)
        triples = [trace.to_triple(o) for o in outs]
        del trace, in_tracers
    return unzip3(triples)


# --- inner jaxprs --------------------------------------------------------------------


def unpack_tangents(
    primals: Sequence[Any],
    nonzero: Sequence[Any],
    jac_nz: Sequence[bool],
    lap_nz: Sequence[bool],
    n: int,
) -> tuple[list[Any], list[Any]]:
    """Rebuild full jacobian and laplacian lists from only their non-zero entries.

    `nonzero` holds the non-zero jacobians, then the non-zero laplacians, in the order
    of the masks; every other entry becomes a symbolic zero.
    """
    it = iter(nonzero)
    jacs = [
        next(it) if nz else zero_jacobian(p, n)
        for p, nz in zip(primals, jac_nz, strict=True)
    ]
    laps = [
        next(it) if nz else zero_laplacian(p)
        for p, nz in zip(primals, lap_nz, strict=True)
    ]
    return jacs, laps


def jacobian_aval(aval: Any, n: int) -> Any:
    tangent = aval.to_tangent_aval()
    return tangent.update(shape=(n, *tangent.shape))


def lap_jaxpr(
    closed: Any,
    n: int,
    jac_nz: Sequence[bool],
    lap_nz: Sequence[bool],
    instantiate_jac: bool | Sequence[bool] = False,
    instantiate_lap: bool | Sequence[bool] = False,
) -> tuple[Any, list[bool], list[bool]]:
    """Turn a `ClosedJaxpr` into its forward-Laplacian `ClosedJaxpr`.

    The new jaxpr's binders are `[*primals, *nonzero_jacs, *nonzero_laps]` and it
    returns `[*primal_outs, *nonzero_jac_outs, *nonzero_lap_outs]`. Also returns which
    output jacobians and laplacians are non-zero.

    Results are cached per jaxpr (weakly) and arguments: returning the same jaxpr
    object lets `jit` reuse its compiled executable on repeated eager calls.
    """
    num_out = len(closed.out_avals)
    new_jaxpr, out_jac, out_lap = _lap_jaxpr_cached(
        closed,
        n,
        tuple(jac_nz),
        tuple(lap_nz),
        tuple(_as_list(instantiate_jac, num_out)),
        tuple(_as_list(instantiate_lap, num_out)),
        registry.state(),
    )
    return new_jaxpr, list(out_jac), list(out_lap)


@_jax.weakref_lru_cache
def _lap_jaxpr_cached(
    closed: Any,
    n: int,
    jac_nz: tuple[bool, ...],
    lap_nz: tuple[bool, ...],
    inst_jac: tuple[bool, ...],
    inst_lap: tuple[bool, ...],
    registry_state: Any,
) -> tuple[Any, tuple[bool, ...], tuple[bool, ...]]:
    del registry_state  # only part of the cache key
    in_avals = list(closed.in_avals)
    jac_avals = [
        jacobian_aval(a, n) for a, nz in zip(in_avals, jac_nz, strict=False) if nz
    ]
    lap_avals = [
        a.to_tangent_aval() for a, nz in zip(in_avals, lap_nz, strict=False) if nz
    ]
    store: dict[str, list[bool]] = {}

    def body(*args: Any) -> list[Any]:
        primals = list(args[: len(in_avals)])
        jacs, laps = unpack_tangents(primals, args[len(in_avals) :], jac_nz, lap_nz, n)
        outs, out_jacs, out_laps = lap_flat(
            _jax.jaxpr_as_fun(closed), primals, jacs, laps, n
        )
        out_jacs = [
            instantiate(j) if i else j for j, i in zip(out_jacs, inst_jac, strict=False)
        ]
        out_laps = [
            instantiate(lp) if i else lp
            for lp, i in zip(out_laps, inst_lap, strict=False)
        ]
        store["jac"] = [not is_zero(j) for j in out_jacs]
        store["lap"] = [not is_zero(lp) for lp in out_laps]
        return [
            *outs,
            *[j for j in out_jacs if not is_zero(j)],
            *[lp for lp in out_laps if not is_zero(lp)],
        ]

    avals = [*in_avals, *jac_avals, *lap_avals]
    dbg = closed.jaxpr.debug_info.with_unknown_names()
    wrapped = _jax.wrap_init(body, debug_info=dbg)
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(wrapped, avals)
    return _jax.ClosedJaxpr(jaxpr, consts), tuple(store["jac"]), tuple(store["lap"])


def _as_list(flag: bool | Sequence[bool], length: int) -> list[bool]:
    return [flag] * length if isinstance(flag, bool) else list(flag)


# --- lap_partial ---------------------------------------------------------------------


def lap_partial_flat(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    example_jacobians: Sequence[Any],
    example_laplacians: Sequence[Any],
    n: int,
) -> tuple[list[Any], Partial]:
    """Partially evaluate `lap_flat`: compute the primal now, the tangents later.

    Returns the primal outputs and a `jax.tree_util.Partial` that maps
    `(jacobians, laplacians)` (flat lists) to `(jacobians_out, laplacians_out)`, with
    symbolic zeros where the output does not depend on the inputs' tangents.
    """
    jac_nz = [
        not is_zero(j) and _is_differentiable(p)
        for p, j in zip(primals, example_jacobians, strict=False)
    ]
    lap_nz = [
        not is_zero(lp) and _is_differentiable(p)
        for p, lp in zip(primals, example_laplacians, strict=False)
    ]
    num_in = len(primals)
    store: dict[str, Any] = {}

    def body(*args: Any) -> list[Any]:
        ps = list(args[:num_in])
        jacs, laps = unpack_tangents(ps, args[num_in:], jac_nz, lap_nz, n)
        outs, out_jacs, out_laps = lap_flat(fun, ps, jacs, laps, n)
        store["num_out"] = len(outs)
        store["jac_avals"] = [j.aval if is_zero(j) else None for j in out_jacs]
        store["lap_avals"] = [lp.aval if is_zero(lp) else None for lp in out_laps]
        return [
            *outs,
            *[j for j in out_jacs if not is_zero(j)],
            *[lp for lp in out_laps if not is_zero(lp)],
        ]

    pvals = [_jax.PartialVal.known(p) for p in primals]
    pvals += [
        _jax.PartialVal.unknown(jacobian_aval(jax.typeof(p), n))
        for p, nz in zip(primals, jac_nz, strict=False)
        if nz
    ]
    pvals += [
        _jax.PartialVal.unknown(jax.typeof(p).to_tangent_aval())
        for p, nz in zip(primals, lap_nz, strict=False)
        if nz
    ]
    dbg = _jax.make_debug_info("lap_partial", fun, tuple(primals), {})
    wrapped = _jax.wrap_init(body, debug_info=dbg.with_unknown_names())
    jaxpr, out_pvals, consts = _jax.trace_to_jaxpr_nounits(
        wrapped, pvals, instantiate=False
    )
    num_out = store["num_out"]
    primals_out = [_known_value(pv) for pv in out_pvals[:num_out]]
    tangent_pvals = out_pvals[num_out:]
    apply = functools.partial(
        _apply_partial,
        jaxpr,
        tuple(jac_nz),
        tuple(lap_nz),
        tuple(store["jac_avals"]),
        tuple(store["lap_avals"]),
        tuple(pv.is_known() for pv in tangent_pvals),
    )
    known = [pv.get_known() if pv.is_known() else None for pv in tangent_pvals]
    return primals_out, Partial(apply, list(consts), known)


def _known_value(pval: Any) -> Any:
    if not pval.is_known():
        raise RuntimeError("fwdlap.lap_partial: a primal output depends on a tangent.")
    return pval.get_known()


def _apply_partial(
    jaxpr: Any,
    jac_nz: tuple[bool, ...],
    lap_nz: tuple[bool, ...],
    jac_zero_avals: tuple[Any, ...],
    lap_zero_avals: tuple[Any, ...],
    known_mask: tuple[bool, ...],
    consts: list[Any],
    known: list[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
) -> tuple[list[Any], list[Any]]:
    args = [j for j, nz in zip(jacobians, jac_nz, strict=False) if nz]
    args += [lp for lp, nz in zip(laplacians, lap_nz, strict=False) if nz]
    args = [
        _jax.match_varying(x, v.aval) for x, v in zip(args, jaxpr.invars, strict=True)
    ]
    unknown_outs = iter(_jax.eval_jaxpr(jaxpr, consts, *args))
    known_outs = iter(known)
    nonzero = [next(known_outs) if k else next(unknown_outs) for k in known_mask]
    nz_iter = iter(nonzero)
    jac_out = [Zero(a) if a is not None else next(nz_iter) for a in jac_zero_avals]
    lap_out = [Zero(a) if a is not None else next(nz_iter) for a in lap_zero_avals]
    return jac_out, lap_out
