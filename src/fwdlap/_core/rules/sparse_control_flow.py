"""Block-sparse control flow: `scan` and `while` loops (`fori_loop` lowers to one of
them), and a `cond` whose branch is only known at run time.

Bodies and branches are traced once more in the sparse mode. Every value crossing them
gets one *layout*: zero (`None`), a static block index array `(k, *S)`, or `DENSE`.

- cond: every branch is traced with the operands' layouts; each output gets the union
  of the layouts the branches return for it.
- loops: a carry keeps one layout for all iterations. The layouts grow by a fixpoint,
  as the dense rule grows which carries are non-zero: trace the body, take the union
  of each carry's layout with what the body returns for it, and repeat until the body
  maps the layouts into themselves. A carry whose union passes the threshold is dense
  from then on. Scanned inputs take the union of their blocks along the scanned axis,
  so that every iteration sees one layout; scanned outputs get the layout the body
  gives them.

In a windowed pass (`sparse.Window`) the bodies take the window's start as one more
input, in front, so that their dense jacobians hold the same rows as outside. A
laplacian whose jacobian turns dense on the way in or out is windowed as anywhere else.
"""

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _jax, sparse
from ..sparse import SparseContext, SparseJac, is_sparse
from ..transform import lap_flat_layouts
from ..zeros import instantiate, is_zero, zero_jacobian, zero_laplacian
from .loop_jaxprs import cond_ignoring_tangents, group_sizes, reorder_binders
from .sparse_rules import Fallback

DENSE = "dense"
Layout = Any  # None | DENSE | np.ndarray of block ids


def layout_of(jac: Any) -> Layout:
    if is_zero(jac):
        return None
    return jac.idx if is_sparse(jac) else DENSE


def _join(ctx: SparseContext, a: Layout, b: Layout) -> Layout:
    """The smallest layout holding both (dense past the threshold)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, str) or isinstance(b, str):
        return DENSE
    both = sparse.union(a, b)
    return DENSE if both.shape[0] > ctx.max_blocks else both


def _same(a: Layout, b: Layout) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    return a == b  # None or DENSE


def _rows(ctx: SparseContext, layout: Layout) -> int:
    return ctx.rows if isinstance(layout, str) else layout.shape[0] * ctx.block_size


def _data_aval(ctx: SparseContext, aval: Any, layout: Layout) -> Any:
    tangent = aval.to_tangent_aval()
    return tangent.update(shape=(_rows(ctx, layout), *tangent.shape))


def _window_args(ctx: SparseContext) -> list[Any]:
    """The leading body arguments of a windowed pass: the window's start."""
    return [] if ctx.window is None else [ctx.window.start]


def _window_groups(ctx: SparseContext) -> list[tuple[int, list[bool], list[bool]]]:
    """`_groups` of `_window_args`: one primal without tangents."""
    return [] if ctx.window is None else [(1, [False], [False])]


def _in_body(ctx: SparseContext, args: Sequence[Any]) -> tuple[SparseContext, list]:
    """The context inside a body and the body's own arguments (start split off)."""
    if ctx.window is None:
        return ctx, list(args)
    window = sparse.Window(args[0], ctx.window.blocks)
    return dataclasses.replace(ctx, window=window), list(args[1:])


def _leaving_lap(ctx: SparseContext, lap: Any, layout: Layout) -> Any:
    """A loop or cond output's laplacian for `sparse_rules.finish`.

    A dense output's laplacian already holds its window's terms (the body windowed
    what turned dense inside), so `finish` must not window it again.
    """
    if ctx.window is not None and isinstance(layout, str) and not is_zero(lap):
        return sparse.WindowedLaplacian(lap)
    return lap


def _entering_lap(ctx: SparseContext, jac: Any, lap: Any, layout: Layout) -> Any:
    """The laplacian of a value given `layout`: windowed if its jacobian turns dense."""
    if isinstance(layout, str) and is_sparse(jac):
        return ctx.window_laplacian(lap)
    return lap


def to_layout(ctx: SparseContext, jac: Any, primal: Any, layout: Layout) -> Any:
    """The data of `jac` in `layout`, which holds it (the fixpoint makes sure)."""
    if isinstance(layout, str):
        if is_sparse(jac):
            return ctx.densify(jac)
        return instantiate(zero_jacobian(primal, ctx.rows)) if is_zero(jac) else jac
    if is_sparse(jac):
        return sparse.align(jac, layout)
    assert is_zero(jac), "a dense jacobian cannot take a block-sparse layout"
    return instantiate(zero_jacobian(primal, _rows(ctx, layout)))


def from_layout(ctx: SparseContext, data: Any, primal: Any, layout: Layout) -> Any:
    if layout is None:
        return zero_jacobian(primal, ctx.rows)
    if isinstance(layout, str):
        return data
    return SparseJac(data, layout, ctx.block_size)


def trace_body(
    ctx: SparseContext,
    closed: Any,
    in_layouts: Sequence[Layout],
    in_laps: Sequence[bool],
    out_layouts: Sequence[Layout] | None = None,
    out_laps: Sequence[bool] | None = None,
) -> Any:
    """Trace `closed` in the sparse mode, its input jacobians in `in_layouts`.

    Without output layouts this is a probe: it returns the layouts and laplacian flags
    the body gives its outputs, and reports no densification. With them it returns the
    `ClosedJaxpr` `[P..., J..., L...] -> [P..., J..., L...]` whose jacobians are the
    data of the non-zero layouts and whose laplacians are those flagged.
    """
    in_avals = list(closed.in_avals)
    starts = [jax.typeof(s) for s in _window_args(ctx)]
    avals = [
        *starts,
        *in_avals,
        *[
            _data_aval(ctx, a, lo)
            for a, lo in zip(in_avals, in_layouts, strict=True)
            if lo is not None
        ],
        *[a.to_tangent_aval() for a, nz in zip(in_avals, in_laps, strict=True) if nz],
    ]
    store: dict[str, Any] = {}

    def body(*all_args: Any) -> list[Any]:
        inner, args = _in_body(ctx, all_args)
        primals = list(args[: len(in_avals)])
        rest = iter(args[len(in_avals) :])
        jacs = [
            zero_jacobian(p, inner.rows)
            if lo is None
            else from_layout(inner, next(rest), p, lo)
            for p, lo in zip(primals, in_layouts, strict=True)
        ]
        laps = [
            next(rest) if nz else zero_laplacian(p)
            for p, nz in zip(primals, in_laps, strict=True)
        ]
        outs, jac_outs, lap_outs = lap_flat_layouts(
            _jax.jaxpr_as_fun(closed), primals, jacs, laps, inner
        )
        store["layouts"] = [layout_of(j) for j in jac_outs]
        store["laps"] = [not is_zero(lp) for lp in lap_outs]
        if out_layouts is None or out_laps is None:
            return list(outs)
        return [
            *outs,
            *_tangent_args(inner, outs, jac_outs, lap_outs, out_layouts, out_laps),
        ]

    dbg = closed.jaxpr.debug_info.with_unknown_names()
    probe = out_layouts is None
    with sparse.muted() if probe else contextlib.nullcontext():
        jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
            _jax.wrap_init(body, debug_info=dbg), avals
        )
    if probe:
        return store["layouts"], store["laps"]
    return _jax.ClosedJaxpr(jaxpr, consts)


def _fixpoint(
    ctx: SparseContext,
    body: Any,
    before: tuple[list[Layout], list[bool]],
    carry: tuple[list[Layout], list[bool]],
    after: tuple[list[Layout], list[bool]],
) -> tuple[list[Layout], list[bool], list[Layout], list[bool]] | None:
    """Carry layouts the body maps into themselves, and the other outputs' layouts.

    `before` and `after` are the fixed inputs around the carries (constants; scanned
    inputs). None if the layouts do not settle (they always should: each round only
    grows them, and they are bounded).
    """
    layouts, laps = list(carry[0]), list(carry[1])
    num = len(layouts)
    for _ in range(num * (ctx.max_blocks + 2) + 2):
        outs, out_laps = trace_body(
            ctx,
            body,
            [*before[0], *layouts, *after[0]],
            [*before[1], *laps, *after[1]],
        )
        grown = [_join(ctx, a, b) for a, b in zip(layouts, outs[:num], strict=True)]
        grown_laps = [a or b for a, b in zip(laps, out_laps[:num], strict=True)]
        if (
            all(_same(a, b) for a, b in zip(grown, layouts, strict=True))
            and grown_laps == laps
        ):
            return layouts, laps, outs[num:], out_laps[num:]
        layouts, laps = grown, grown_laps
    return None


def _report_dense_carries(
    ctx: SparseContext, primitive: Any, primals: Sequence[Any], start, end
) -> None:
    for i, (p, a, b) in enumerate(zip(primals, start, end, strict=True)):
        if isinstance(b, str) and not isinstance(a, str):
            ctx.densified(
                primitive,
                "threshold",
                f"loop carry {i} accumulates more than {ctx.max_blocks} blocks per "
                "element over the iterations",
                jnp.shape(p),
                ctx.num_blocks,
            )


def _scanned_layout(ctx: SparseContext, primitive: Any, jac: Any, x: Any) -> Layout:
    """One layout for every slice along the scanned axis (axis 0 of the value)."""
    layout = layout_of(jac)
    if layout is None or isinstance(layout, str):
        return layout
    uniform = sparse.union_along(layout, [0], ctx.max_blocks)
    if uniform is None:
        ctx.densified(
            primitive,
            "threshold",
            f"a scanned input's slices depend on more than {ctx.max_blocks} blocks "
            "together",
            jnp.shape(x),
            ctx.num_blocks,
        )
        return DENSE
    return np.ascontiguousarray(uniform[:, 0])


def _stacked(layout: Layout, length: int) -> Layout:
    if layout is None or isinstance(layout, str):
        return layout
    k, *shape = layout.shape
    return np.ascontiguousarray(np.broadcast_to(layout[:, None], (k, length, *shape)))


def _groups(layouts: Sequence[Layout], laps: Sequence[bool]) -> tuple:
    return (len(layouts), [lo is not None for lo in layouts], list(laps))


def _tangent_args(
    ctx: SparseContext,
    primals: Sequence[Any],
    jacs: Sequence[Any],
    laps: Sequence[Any],
    layouts: Sequence[Layout],
    lap_flags: Sequence[bool],
) -> list[Any]:
    """The jacobian data in `layouts` (non-zero ones), then the flagged laplacians."""
    data = [
        to_layout(ctx, j, p, lo)
        for j, p, lo in zip(jacs, primals, layouts, strict=True)
        if lo is not None
    ]
    return data + [
        instantiate(_entering_lap(ctx, j, lp, lo))
        for j, lp, lo, nz in zip(jacs, laps, layouts, lap_flags, strict=True)
        if nz
    ]


def scan_rule(ctx, primitive, primals, jacs, laps, params):
    nc, nk = params["num_consts"], params["num_carry"]
    body, length = params["jaxpr"], params["length"]

    def split(xs: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        return list(xs[:nc]), list(xs[nc : nc + nk]), list(xs[nc + nk :])

    (c_p, k_p, x_p), (c_j, k_j, x_j), (c_l, k_l, x_l) = map(
        split, (primals, jacs, laps)
    )
    consts = ([layout_of(j) for j in c_j], [not is_zero(lp) for lp in c_l])
    xs = (
        [_scanned_layout(ctx, primitive, j, x) for j, x in zip(x_j, x_p, strict=True)],
        [not is_zero(lp) for lp in x_l],
    )
    start = [layout_of(j) for j in k_j]
    found = _fixpoint(ctx, body, consts, (start, [not is_zero(lp) for lp in k_l]), xs)
    if found is None:
        return Fallback("rule", "the loop carries' block layouts did not settle")
    k_lo, k_lap, ys_lo, ys_lap = found
    _report_dense_carries(ctx, primitive, k_p, start, k_lo)
    new_body = trace_body(
        ctx,
        body,
        [*consts[0], *k_lo, *xs[0]],
        [*consts[1], *k_lap, *xs[1]],
        [*k_lo, *ys_lo],
        [*k_lap, *ys_lap],
    )
    groups_in = [
        *_window_groups(ctx),
        _groups(*consts),
        _groups(k_lo, k_lap),
        _groups(*xs),
    ]
    groups_out = [_groups(k_lo, k_lap), _groups(ys_lo, ys_lap)]
    new_body = reorder_binders(
        new_body, group_sizes(groups_in), group_sizes(groups_out)
    )

    def scanned_data(j: Any, x: Any, lo: Layout) -> Any:
        full = DENSE if isinstance(lo, str) else _stacked(lo, length)
        return jnp.moveaxis(to_layout(ctx, j, x, full), 0, 1)  # scan axis first

    xs_data = [
        scanned_data(j, x, lo)
        for j, x, lo in zip(x_j, x_p, xs[0], strict=True)
        if lo is not None
    ]
    xs_laps = [
        _entering_lap(ctx, j, lp, lo)
        for j, lp, lo, nz in zip(x_j, x_l, xs[0], xs[1], strict=True)
        if nz
    ]
    window = _window_args(ctx)
    args = [
        *window,
        *c_p,
        *_tangent_args(ctx, c_p, c_j, c_l, *consts),
        *k_p,
        *_tangent_args(ctx, k_p, k_j, k_l, k_lo, k_lap),
        *x_p,
        *xs_data,
        *[instantiate(lp) for lp in xs_laps],
    ]
    new_params = dict(
        params,
        jaxpr=new_body,
        num_consts=len(window)
        + nc
        + sum(g is not None for g in consts[0])
        + sum(consts[1]),
        num_carry=nk + sum(g is not None for g in k_lo) + sum(k_lap),
    )
    if "linear" in params:  # JAX < 0.10
        new_params["linear"] = (False,) * len(args)
    outs = _jax.scan_p.bind(*args, **new_params)
    carry_end = new_params["num_carry"]
    k_out, k_jac, k_lap_out = _unpack(ctx, outs[:carry_end], nk, k_lo, k_lap)
    ys_data = list(outs[carry_end:])
    num_ys = len(ys_lo)
    y_out = ys_data[:num_ys]
    y_rest = iter(ys_data[num_ys:])
    y_jac = [
        zero_jacobian(y, ctx.rows)
        if lo is None
        else from_layout(ctx, jnp.moveaxis(next(y_rest), 0, 1), y, _stacked(lo, length))
        for y, lo in zip(y_out, ys_lo, strict=True)
    ]
    y_lap = [
        _leaving_lap(ctx, next(y_rest), lo) if nz else zero_laplacian(y)
        for y, nz, lo in zip(y_out, ys_lap, ys_lo, strict=True)
    ]
    return k_out + y_out, k_jac + y_jac, k_lap_out + y_lap


def _unpack(
    ctx: SparseContext,
    outs: Sequence[Any],
    num: int,
    layouts: Sequence[Layout],
    laps: Sequence[bool],
) -> tuple[list[Any], list[Any], list[Any]]:
    primals = list(outs[:num])
    rest = iter(outs[num:])
    jac = [
        zero_jacobian(p, ctx.rows)
        if lo is None
        else from_layout(ctx, next(rest), p, lo)
        for p, lo in zip(primals, layouts, strict=True)
    ]
    lap = [
        _leaving_lap(ctx, next(rest), lo) if nz else zero_laplacian(p)
        for p, nz, lo in zip(primals, laps, layouts, strict=True)
    ]
    return primals, jac, lap


def while_rule(ctx, primitive, primals, jacs, laps, params):
    ncc, nbc = params["cond_nconsts"], params["body_nconsts"]
    cond, body = params["cond_jaxpr"], params["body_jaxpr"]
    cc_p = list(primals[:ncc])
    bc_p, bc_j, bc_l = (list(xs[ncc : ncc + nbc]) for xs in (primals, jacs, laps))
    k_p, k_j, k_l = (list(xs[ncc + nbc :]) for xs in (primals, jacs, laps))
    if any(not is_zero(j) for j in jacs[:ncc]):
        return Fallback("rule", "a while_loop condition whose constants carry tangents")
    consts = ([layout_of(j) for j in bc_j], [not is_zero(lp) for lp in bc_l])
    start = [layout_of(j) for j in k_j]
    found = _fixpoint(
        ctx, body, consts, (start, [not is_zero(lp) for lp in k_l]), ([], [])
    )
    if found is None:
        return Fallback("rule", "the loop carries' block layouts did not settle")
    k_lo, k_lap, _, _ = found
    _report_dense_carries(ctx, primitive, k_p, start, k_lo)
    new_body = trace_body(
        ctx, body, [*consts[0], *k_lo], [*consts[1], *k_lap], k_lo, k_lap
    )
    new_body = reorder_binders(
        new_body,
        group_sizes([*_window_groups(ctx), _groups(*consts), _groups(k_lo, k_lap)]),
        group_sizes([_groups(k_lo, k_lap)]),
    )
    carry_avals = [jax.typeof(p) for p in k_p]
    tangent_avals = [
        *[
            _data_aval(ctx, a, lo)
            for a, lo in zip(carry_avals, k_lo, strict=True)
            if lo is not None
        ],
        *[a.to_tangent_aval() for a, nz in zip(carry_avals, k_lap, strict=True) if nz],
    ]
    new_cond = cond_ignoring_tangents(cond, ncc + len(k_p), tangent_avals)
    window = _window_args(ctx)
    args = [
        *cc_p,
        *window,
        *bc_p,
        *_tangent_args(ctx, bc_p, bc_j, bc_l, *consts),
        *k_p,
        *_tangent_args(ctx, k_p, k_j, k_l, k_lo, k_lap),
    ]
    body_nconsts = (
        len(window) + nbc + sum(g is not None for g in consts[0]) + sum(consts[1])
    )
    outs = _jax.while_p.bind(
        *args,
        **dict(
            params,
            cond_jaxpr=new_cond,
            body_jaxpr=new_body,
            body_nconsts=body_nconsts,
        ),
    )
    return _unpack(ctx, outs, len(k_p), k_lo, k_lap)


def cond_rule(ctx, primitive, primals, jacs, laps, params):
    """A `cond` on a traced index: every branch returns the union of their layouts."""
    if not is_zero(jacs[0]):
        return Fallback("rule", "a cond whose index carries a tangent")
    branches = params["branches"]
    ops, op_jacs, op_laps = list(primals[1:]), list(jacs[1:]), list(laps[1:])
    in_layouts = [layout_of(j) for j in op_jacs]
    in_laps = [not is_zero(lp) for lp in op_laps]
    probes = [trace_body(ctx, br, in_layouts, in_laps) for br in branches]
    out_layouts: list[Layout] = list(probes[0][0])
    out_laps: list[bool] = list(probes[0][1])
    for layouts, flags in probes[1:]:
        out_layouts = [
            _join(ctx, a, b) for a, b in zip(out_layouts, layouts, strict=True)
        ]
        out_laps = [a or b for a, b in zip(out_laps, flags, strict=True)]
    for i, (out, lo) in enumerate(zip(branches[0].out_avals, out_layouts, strict=True)):
        if isinstance(lo, str) and not any(isinstance(p[0][i], str) for p in probes):
            ctx.densified(
                primitive,
                "threshold",
                f"output {i} of the branches together depends on more than "
                f"{ctx.max_blocks} blocks per element",
                out.shape,
                ctx.num_blocks,
            )
    new_branches = tuple(
        trace_body(ctx, br, in_layouts, in_laps, out_layouts, out_laps)
        for br in branches
    )
    args = [
        primals[0],
        *_window_args(ctx),
        *ops,
        *_tangent_args(ctx, ops, op_jacs, op_laps, in_layouts, in_laps),
    ]
    outs = _jax.cond_p.bind(*args, **dict(params, branches=new_branches))
    return _unpack(ctx, outs, len(branches[0].out_avals), out_layouts, out_laps)
