"""Drivers: run a function, or a jaxpr, through a `LapTrace`.

- `lap_flat`: the forward Laplacian of a function of flat arguments (every public
  transformation ends here).
- `lap_jaxpr`: a `ClosedJaxpr` turned into its forward-Laplacian jaxpr, cached, for the
  rules of higher-order primitives.
- `lap_partial_flat`: the primal now, the tangents later (`fwdlap.lap_partial`).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.tree_util import Partial

from . import _jax, registry, sparse
from .sparse import SparseContext, is_sparse
from .trace import LapTrace, Triple, is_differentiable, maybe_lap_tracer, unzip3
from .zeros import Zero, instantiate, is_zero, zero_jacobian, zero_laplacian


def _normalize(primal: Any, tangent: Any, zero: Any) -> Any:
    return zero if is_zero(tangent) or not is_differentiable(primal) else tangent


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
        not is_zero(j) and is_differentiable(p)
        for p, j in zip(primals, example_jacobians, strict=False)
    ]
    lap_nz = [
        not is_zero(lp) and is_differentiable(p)
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
    with registry.linearizing():
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
