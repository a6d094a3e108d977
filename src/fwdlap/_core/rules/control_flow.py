"""Higher-order primitives: jit, remat, cond, scan and while, in both modes.

Each rule transforms the inner jaxpr(s), so the work inside stays forward-Laplacian.
Every jacobian crossing a body takes one layout (`..layout`): zero or dense, and in
the block-sparse mode also the blocks of a `SparseJac`. Only the non-zero jacobians
and laplacians are passed in and out.

- cond: every branch is traced with the operands' layouts; each output takes the join
  of the layouts the branches give it.
- loops: a carry keeps one layout for all iterations, found by a fixpoint as JAX's JVP
  finds which carries are non-zero: trace the body, join each carry's layout with what
  the body returns for it, and repeat until the body maps the layouts into themselves.
  A scanned input takes one layout for all its slices; a scanned output the layout the
  body gives it.
- jit and remat: the outputs keep the layouts the body gives them. The sparse mode
  inlines these bodies instead (see the rewrites below), and a cond whose index is
  known: the layouts then need no fixpoint.

Dense bodies are traced by the cached `lap_jaxpr`: the same jaxpr object each time
lets `jit` reuse its compiled code on repeated eager calls. In a windowed sparse pass
(`sparse.Window`) every body takes the window's start as one more input, in front.
"""

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _jax, constants, registry, sparse
from ..layout import DENSE, ZERO, Mode, Tangents, stacked
from ..registry import DECLINED, Fallback, LapRule
from ..sparse import SparseContext, is_sparse
from ..transform import lap_flat_layouts, lap_jaxpr
from ..zeros import instantiate, is_zero, zero_laplacian
from .loop_jaxprs import cond_ignoring_tangents, group_sizes, reorder_binders

Result = tuple[list[Any], list[Any], list[Any]]

# --- bodies --------------------------------------------------------------------------


def trace_body(
    mode: Mode, closed: Any, inputs: Tangents, outputs: Tangents | None = None
) -> tuple[Any, Tangents]:
    """`closed` as the `ClosedJaxpr` `[P..., J..., L...] -> [P..., J..., L...]`.

    Its inputs' tangents are `inputs`; its outputs' are `outputs`, or without them
    what the body gives. Returns the jaxpr and its outputs' tangents.
    """
    if mode.sparse is None:
        return _trace_dense(mode, closed, inputs, outputs)
    return _trace_sparse(mode, closed, inputs, outputs)


def probe(mode: Mode, closed: Any, inputs: Tangents) -> Tangents:
    """The tangents `closed` gives its outputs, reporting no densification."""
    with contextlib.nullcontext() if mode.sparse is None else sparse.muted():
        return trace_body(mode, closed, inputs)[1]


def _trace_dense(
    mode: Mode, closed: Any, inputs: Tangents, outputs: Tangents | None
) -> tuple[Any, Tangents]:
    jaxpr, out_jac, out_lap = lap_jaxpr(
        closed,
        mode.rows,
        inputs.jac_nonzero(),
        inputs.laps,
        False if outputs is None else outputs.jac_nonzero(),
        False if outputs is None else outputs.laps,
    )
    return jaxpr, Tangents([DENSE if nz else ZERO for nz in out_jac], out_lap)


def _trace_sparse(
    mode: Mode, closed: Any, inputs: Tangents, outputs: Tangents | None
) -> tuple[Any, Tangents]:
    in_avals = list(closed.in_avals)
    starts = [jax.typeof(s) for s in mode.window_args()]
    avals = [*starts, *in_avals, *passed_avals(mode, in_avals, inputs)]
    found: list[Tangents] = []

    def body(*all_args: Any) -> list[Any]:
        inner, args = mode.inside(all_args)
        primals, jacs, laps = unpack(inner, args, len(in_avals), inputs)
        outs, jac_outs, lap_outs = lap_flat_layouts(
            _jax.jaxpr_as_fun(closed), primals, jacs, laps, inner.ctx
        )
        found.append(Tangents.of(jac_outs, lap_outs))
        want = found[0] if outputs is None else outputs
        return [*outs, *tangent_args(inner, outs, jac_outs, lap_outs, want)]

    dbg = closed.jaxpr.debug_info.with_unknown_names()
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
        _jax.wrap_init(body, debug_info=dbg), avals
    )
    return _jax.ClosedJaxpr(jaxpr, consts), found[0] if outputs is None else outputs


def fixpoint(
    mode: Mode, body: Any, consts: Tangents, carry: Tangents, xs: Tangents
) -> tuple[Tangents, Tangents] | None:
    """The carries' tangents the body maps into themselves, and its other outputs'.

    `consts` and `xs` are the fixed inputs around the carries. None if the layouts do
    not settle (they should: each round only grows them, and they are bounded).
    """
    num = len(carry.jacs)
    for _ in range(num * (mode.max_blocks + 2) + 2):
        outs = probe(mode, body, Tangents.concat(consts, carry, xs))
        out_carry, others = outs.split(num)
        grown = mode.join_all(carry, out_carry)
        if grown == carry:
            return carry, others
        carry = grown
    return None


def _report_dense_carries(
    mode: Mode, primitive: Any, primals: Sequence[Any], start: Tangents, end: Tangents
) -> None:
    for i, (p, a, b) in enumerate(zip(primals, start.jacs, end.jacs, strict=True)):
        if b is DENSE and a is not DENSE:
            mode.report(
                primitive,
                f"loop carry {i} accumulates more than {mode.max_blocks} blocks per "
                "element over the iterations",
                jnp.shape(p),
            )


# --- in and out of a body ------------------------------------------------------------


def tangent_args(
    mode: Mode,
    primals: Sequence[Any],
    jacs: Sequence[Any],
    laps: Sequence[Any],
    tangents: Tangents,
) -> list[Any]:
    """The jacobians' data in their layouts (the non-zero ones), then the laplacians."""
    data = [
        mode.to_data(j, p, lo)
        for j, p, lo in zip(jacs, primals, tangents.jacs, strict=True)
        if lo is not ZERO
    ]
    return data + [
        instantiate(mode.entering_laplacian(j, lp, lo))
        for j, lp, lo, nz in zip(jacs, laps, tangents.jacs, tangents.laps, strict=True)
        if nz
    ]


def passed_avals(mode: Mode, avals: Sequence[Any], tangents: Tangents) -> list[Any]:
    """The avals of the tangents passed with values of `avals` (see `tangent_args`)."""
    jacs = [
        mode.data_aval(a, lo)
        for a, lo in zip(avals, tangents.jacs, strict=True)
        if lo is not ZERO
    ]
    return jacs + [
        a.to_tangent_aval() for a, nz in zip(avals, tangents.laps, strict=True) if nz
    ]


def unpack(mode: Mode, values: Sequence[Any], num: int, tangents: Tangents) -> Result:
    """`num` primals, then the data of their non-zero tangents, as three lists."""
    primals = list(values[:num])
    rest = iter(values[num:])
    jacs = [
        mode.from_data(None if lo is ZERO else next(rest), p, lo)
        for p, lo in zip(primals, tangents.jacs, strict=True)
    ]
    laps = [
        next(rest) if nz else zero_laplacian(p)
        for p, nz in zip(primals, tangents.laps, strict=True)
    ]
    return primals, jacs, laps


def results(mode: Mode, outs: Sequence[Any], num: int, tangents: Tangents) -> Result:
    """A rule's results from the outputs of the primitive it binds (see `unpack`)."""
    primals, jacs, laps = unpack(mode, outs, num, tangents)
    laps = [
        mode.leaving_laplacian(lp, lo)
        for lp, lo in zip(laps, tangents.jacs, strict=True)
    ]
    return primals, jacs, laps


def _split(xs: Sequence[Any], *sizes: int) -> list[list[Any]]:
    """`xs` cut into consecutive groups of `sizes`, then the rest."""
    groups, start = [], 0
    for size in sizes:
        groups.append(list(xs[start : start + size]))
        start += size
    return [*groups, list(xs[start:])]


# --- jit and remat (the dense mode only) --------------------------------------------


def jit_rule(mode: Mode, primitive, primals, jacs, laps, params) -> Result:
    closed = params["jaxpr"]
    inputs = Tangents.of(jacs, laps)
    new_jaxpr, outputs = trace_body(mode, closed, inputs)
    tangents = tangent_args(mode, primals, jacs, laps, inputs)
    extra_in, extra_out = len(tangents), outputs.num_passed()
    unspecified = _jax.UNSPECIFIED_SHARDING
    new_params = dict(
        params,
        jaxpr=new_jaxpr,
        in_shardings=(*params["in_shardings"], *(unspecified,) * extra_in),
        out_shardings=(*params["out_shardings"], *(unspecified,) * extra_out),
        in_layouts=(*params["in_layouts"], *(None,) * extra_in),
        out_layouts=(*params["out_layouts"], *(None,) * extra_out),
        donated_invars=(*params["donated_invars"], *(False,) * extra_in),
    )
    outs = _jax.jit_p.bind(*primals, *tangents, **new_params)
    return results(mode, outs, len(closed.out_avals), outputs)


def remat_rule(mode: Mode, primitive, primals, jacs, laps, params) -> Result:
    jaxpr = params["jaxpr"]
    inputs = Tangents.of(jacs, laps)
    new_closed, outputs = trace_body(mode, _jax.close_jaxpr(jaxpr), inputs)
    tangents = tangent_args(mode, primals, jacs, laps, inputs)
    prevent_cse = params["prevent_cse"]
    if isinstance(prevent_cse, tuple):
        num_consts = len(new_closed.consts)
        prevent_cse = (True,) * num_consts + prevent_cse + (True,) * len(tangents)
    outs = _jax.remat_p.bind(
        *new_closed.consts,
        *primals,
        *tangents,
        **dict(
            params,
            jaxpr=_jax.convert_constvars_jaxpr(new_closed.jaxpr),
            prevent_cse=prevent_cse,
        ),
    )
    return results(mode, outs, len(jaxpr.outvars), outputs)


# --- cond ----------------------------------------------------------------------------


def cond_rule(mode: Mode, primitive, primals, jacs, laps, params) -> Result:
    """Every branch returns the join of the layouts the branches give (the index, an
    integer, has no tangents)."""
    branches = params["branches"]
    index, ops, op_jacs, op_laps = primals[0], primals[1:], jacs[1:], laps[1:]
    inputs = Tangents.of(op_jacs, op_laps)
    probes = [probe(mode, br, inputs) for br in branches]
    outputs = functools.reduce(mode.join_all, probes)
    _report_dense_union(mode, primitive, branches[0].out_avals, probes, outputs)
    new_branches = tuple(trace_body(mode, br, inputs, outputs)[0] for br in branches)
    args = [
        index,
        *mode.window_args(),
        *ops,
        *tangent_args(mode, ops, op_jacs, op_laps, inputs),
    ]
    outs = _jax.cond_p.bind(*args, **dict(params, branches=new_branches))
    return results(mode, outs, len(branches[0].out_avals), outputs)


def _report_dense_union(
    mode: Mode,
    primitive: Any,
    avals: Sequence[Any],
    probes: Sequence[Tangents],
    union: Tangents,
) -> None:
    for i, (aval, lo) in enumerate(zip(avals, union.jacs, strict=True)):
        if lo is DENSE and all(p.jacs[i] is not DENSE for p in probes):
            mode.report(
                primitive,
                f"output {i} of the branches together depends on more than "
                f"{mode.max_blocks} blocks per element",
                aval.shape,
            )


# --- loops ---------------------------------------------------------------------------


def scan_rule(mode: Mode, primitive, primals, jacs, laps, params) -> Any:
    nc, nk = params["num_consts"], params["num_carry"]
    body, length = params["jaxpr"], params["length"]
    c_p, k_p, x_p = _split(primals, nc, nk)
    c_j, k_j, x_j = _split(jacs, nc, nk)
    c_l, k_l, x_l = _split(laps, nc, nk)
    consts, start = Tangents.of(c_j, c_l), Tangents.of(k_j, k_l)
    xs = Tangents(
        [mode.scanned_layout(primitive, j, x) for j, x in zip(x_j, x_p, strict=True)],
        [not is_zero(lp) for lp in x_l],
    )
    found = fixpoint(mode, body, consts, start, xs)
    if found is None:
        return Fallback("rule", "the loop carries' block layouts did not settle")
    carry, ys = found
    _report_dense_carries(mode, primitive, k_p, start, carry)
    new_body, _ = trace_body(
        mode, body, Tangents.concat(consts, carry, xs), Tangents.concat(carry, ys)
    )
    new_body = reorder_binders(
        new_body,
        group_sizes([*_window_groups(mode), consts.group(), carry.group(), xs.group()]),
        group_sizes([carry.group(), ys.group()]),
    )
    xs_data = [
        jnp.moveaxis(mode.to_data(j, x, stacked(lo, length)), 0, 1)  # scan axis first
        for j, x, lo in zip(x_j, x_p, xs.jacs, strict=True)
        if lo is not ZERO
    ]
    xs_laps = [
        instantiate(mode.entering_laplacian(j, lp, lo))
        for j, lp, lo, nz in zip(x_j, x_l, xs.jacs, xs.laps, strict=True)
        if nz
    ]
    window = mode.window_args()
    args = [
        *window,
        *c_p, *tangent_args(mode, c_p, c_j, c_l, consts),
        *k_p, *tangent_args(mode, k_p, k_j, k_l, carry),
        *x_p, *xs_data, *xs_laps,
    ]  # fmt: skip
    new_params = dict(
        params,
        jaxpr=new_body,
        num_consts=len(window) + nc + consts.num_passed(),
        num_carry=nk + carry.num_passed(),
    )
    if "linear" in params:  # JAX < 0.10
        new_params["linear"] = (False,) * len(args)
    outs = _jax.scan_p.bind(*args, **new_params)
    carry_end = new_params["num_carry"]
    k_out, k_jac, k_lap = results(mode, outs[:carry_end], nk, carry)
    y_out, y_jac, y_lap = _unpack_stacked(mode, outs[carry_end:], ys, length)
    return k_out + y_out, k_jac + y_jac, k_lap + y_lap


def _unpack_stacked(
    mode: Mode, outs: Sequence[Any], ys: Tangents, length: int
) -> Result:
    """`unpack` for a scan's stacked outputs, whose jacobian data has the scan axis
    first."""
    num, num_data = len(ys.jacs), sum(ys.jac_nonzero())
    data = [jnp.moveaxis(d, 0, 1) for d in outs[num : num + num_data]]
    outs = [*outs[:num], *data, *outs[num + num_data :]]
    stacked_ys = Tangents([stacked(lo, length) for lo in ys.jacs], ys.laps)
    return results(mode, outs, num, stacked_ys)


def while_rule(mode: Mode, primitive, primals, jacs, laps, params) -> Any:
    """The condition sees primals only, so its constants' tangents are dropped."""
    ncc, nbc = params["cond_nconsts"], params["body_nconsts"]
    cond, body = params["cond_jaxpr"], params["body_jaxpr"]
    cc_p, bc_p, k_p = _split(primals, ncc, nbc)
    _, bc_j, k_j = _split(jacs, ncc, nbc)
    _, bc_l, k_l = _split(laps, ncc, nbc)
    consts, start = Tangents.of(bc_j, bc_l), Tangents.of(k_j, k_l)
    found = fixpoint(mode, body, consts, start, Tangents([], []))
    if found is None:
        return Fallback("rule", "the loop carries' block layouts did not settle")
    carry, _ = found
    _report_dense_carries(mode, primitive, k_p, start, carry)
    new_body, _ = trace_body(mode, body, Tangents.concat(consts, carry), carry)
    new_body = reorder_binders(
        new_body,
        group_sizes([*_window_groups(mode), consts.group(), carry.group()]),
        group_sizes([carry.group()]),
    )
    tangent_avals = passed_avals(mode, [jax.typeof(p) for p in k_p], carry)
    new_cond = cond_ignoring_tangents(cond, ncc + len(k_p), tangent_avals)
    window = mode.window_args()
    args = [
        *cc_p,
        *window,
        *bc_p, *tangent_args(mode, bc_p, bc_j, bc_l, consts),
        *k_p, *tangent_args(mode, k_p, k_j, k_l, carry),
    ]  # fmt: skip
    new_params = dict(
        params,
        cond_jaxpr=new_cond,
        body_jaxpr=new_body,
        body_nconsts=len(window) + nbc + consts.num_passed(),
    )
    outs = _jax.while_p.bind(*args, **new_params)
    return results(mode, outs, len(k_p), carry)


def _window_groups(mode: Mode) -> list[tuple[int, list[bool], list[bool]]]:
    """The binder group of `mode.window_args()`: primals without tangents."""
    return [(1, [False], [False]) for _ in mode.window_args()]


def while_with_scalar_predicate(args: Sequence[Any], params: Any) -> list[Any]:
    """A `while` whose predicate is an array, as the same loop with a scalar one.

    `jax.vmap` of a `while_loop` whose condition depends on the batch gives the loop
    a predicate of the batch's shape: it runs while any element's is true, and the
    elements whose predicate is false keep their carry (the predicate's shape is a
    prefix of every carry's). Written out with `any` and `select`, the loop's
    tangent carries may take their leading axis of directions like any other.
    """
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_fun = _jax.jaxpr_as_fun(params["cond_jaxpr"])
    body_fun = _jax.jaxpr_as_fun(params["body_jaxpr"])
    rank = len(params["cond_jaxpr"].out_avals[0].shape)
    cond_consts = list(args[:cond_nconsts])
    body_consts = list(args[cond_nconsts : cond_nconsts + body_nconsts])

    def keep_going(carry: list[Any]) -> Any:
        (pred,) = cond_fun(*cond_consts, *carry)
        return jnp.any(pred)

    def step(carry: list[Any]) -> list[Any]:
        (pred,) = cond_fun(*cond_consts, *carry)
        new = body_fun(*body_consts, *carry)
        return [
            jax.lax.select(
                jax.lax.broadcast_in_dim(pred, jnp.shape(c), tuple(range(rank))), n, c
            )
            for n, c in zip(new, carry, strict=True)
        ]

    init = list(args[cond_nconsts + body_nconsts :])
    return jax.lax.while_loop(keep_going, step, init)


# --- rewrites: traced under the LapTrace itself ---------------------------------------


def _has_sparse(trace: Any, jacobians: Sequence[Any]) -> bool:
    return trace.sparse is not None and any(is_sparse(j) for j in jacobians)


def _inline(trace: Any, closed: Any, args: Sequence[Any]) -> list[Any]:
    with _jax.set_current_trace(trace):
        return _jax.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _inline_jit(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """Inline jnp's `jit(inline=True)` helpers as JAX's own tracing does (so that
    `dot_split` sees their operands), and every jit body in the sparse mode."""
    if params.get("inline") or _has_sparse(trace, jacobians):
        return _inline(trace, params["jaxpr"], tracers)
    return DECLINED


def _inline_remat(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """The sparse mode inlines remat bodies."""
    if _has_sparse(trace, jacobians):
        return _inline(trace, _jax.close_jaxpr(params["jaxpr"]), tracers)
    return DECLINED


def _inline_known_branch(trace, tracers, primals, jacobians, laplacians, params):
    """The sparse mode inlines the branch of a `cond` whose index is known."""
    if not _has_sparse(trace, jacobians):
        return DECLINED
    index = constants.concrete_value(primals[0])
    if index is None:
        return DECLINED
    branches = params["branches"]
    branch = branches[int(np.clip(int(index), 0, len(branches) - 1))]
    return _inline(trace, branch, tracers[1:])


def _scalar_predicate(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """A `while` whose predicate is an array (from `jax.vmap`), with a scalar one."""
    if not params["cond_jaxpr"].out_avals[0].shape:
        return DECLINED
    if all(is_zero(t) for t in (*jacobians, *laplacians)):
        return DECLINED
    with _jax.set_current_trace(trace):
        return while_with_scalar_predicate(tracers, params)


# --- the table -----------------------------------------------------------------------

ModeRule = Callable[..., Any]
"""`(mode, primitive, primals, jacobians, laplacians, params)`, in either mode."""


def _control_flow(
    primitive: Any, rule: ModeRule, rewrite: Any, both_modes: bool = True
) -> LapRule:
    """`rule` as the dense rule and, with `both_modes`, as the sparse one."""

    def dense(trace: Any, primals, jacobians, laplacians, **params: Any) -> Any:
        mode = Mode(trace.n)
        return rule(mode, primitive, primals, jacobians, laplacians, params)

    def block_sparse(ctx: SparseContext, primals, jacobians, laplacians, **params):
        mode = Mode.block_sparse(ctx)
        return rule(mode, primitive, primals, jacobians, laplacians, params)

    sparse_rule = block_sparse if both_modes else None
    return LapRule(dense, sparse_rule, kind="control_flow", rewrite=rewrite)


def _register() -> None:
    # jit and remat have no sparse rule: with a block-sparse jacobian their rewrites
    # inline the body, whose values then need no layouts.
    table = [
        (_jax.jit_p, jit_rule, _inline_jit, False),
        (_jax.remat_p, remat_rule, _inline_remat, False),
        (_jax.cond_p, cond_rule, _inline_known_branch, True),
        (_jax.scan_p, scan_rule, None, True),
        (_jax.while_p, while_rule, _scalar_predicate, True),
    ]
    for primitive, rule, rewrite, both_modes in table:
        registry.register(
            primitive, _control_flow(primitive, rule, rewrite, both_modes)
        )


_register()
