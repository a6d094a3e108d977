"""Rules of the block-sparse mode (see `..sparse` for the representation).

Most rules do not compute anything new. They work out, with NumPy at trace time, which
blocks each output element depends on, lay the operands' `data` out so that every
element's slots name the same blocks in every operand (*alignment*), and then run the
dense rule of the primitive on `data` as if it were a dense jacobian of `k * b`
directions. That is exact: the dense rules only ever combine the jacobians of the
elements that one output element depends on, direction by direction.

- elementwise primitives: align the operands to the union of their blocks;
- reductions, cumulative ops and sort: first make every slot constant along the
  reduced axes (the union along them);
- structural primitives (reshape, transpose, broadcast, slice, concatenate, pad,
  gather, dynamic_slice, ...): `data` moves like the values; `idx` is moved the same
  way, in NumPy or by running the primitive on the (concrete) slot indices;
- dot_general: the union along the contracting dimensions, and for two
  tangent-carrying operands the cross term as one product over slot pairs, masked to
  the pairs that name the same block;
- slogdet and det live in `linalg.py`, scan, while and cond in `control_flow.py`.

A rule returns a `Fallback` when it cannot stay sparse; the caller then makes the
operands dense (reporting why) and runs the dense rule.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import constants, registry, sparse
from ..registry import Fallback as Fallback
from ..registry import LapRule
from ..sparse import SparseContext, SparseJac, is_sparse
from ..zeros import add, is_zero, zero_jacobian, zero_laplacian
from .generic import generic_lap_rule

Result = tuple[Any, Any, Any]
PrimitiveRule = Callable[..., "Result | Fallback"]
"""`(ctx, primitive, primals, jacobians, laplacians, params)`; `bind` makes a rule."""


def bind(rule: PrimitiveRule, primitive: Any) -> registry.Rule:
    """`rule` for one primitive, with the table's signature."""

    def bound(ctx: SparseContext, primals, jacobians, laplacians, **params: Any):
        return rule(
            ctx, primitive, list(primals), list(jacobians), list(laplacians), params
        )

    return bound


def _too_many(ctx: SparseContext, what: str, blocks: int = 0) -> Fallback:
    return Fallback(
        "threshold",
        f"{what} depends on more than {ctx.max_blocks} blocks per element",
        blocks,
    )


def dense_rule(ctx: SparseContext, primitive: Any) -> Callable[..., Any]:
    """The table's dense rule of `primitive` (else the generic one), to run on data."""
    rule = registry.rules.get(primitive)
    dense = generic_lap_rule(primitive) if rule is None else rule.dense
    return functools.partial(dense, ctx)


def _rows_jacs(
    primals: Sequence[Any], jacs: Sequence[Any], datas: dict[int, Any], rows: int
) -> list[Any]:
    """Jacobians for a dense rule: aligned data where given, zeros of `rows` else."""
    return [
        datas[i] if i in datas else zero_jacobian(p, rows)
        for i, p in enumerate(primals)
    ]


def wrap(out: Any, idx: np.ndarray, block_size: int) -> Any:
    return out if is_zero(out) else SparseJac(out, idx, block_size)


# --- elementwise -------------------------------------------------------------------


def _broadcast_sparse(sj: SparseJac, shape: tuple[int, ...]) -> SparseJac:
    if sj.shape == shape:
        return sj
    k, b = sj.k, sj.block_size
    lead = (1,) * (len(shape) - len(sj.shape))
    idx = np.broadcast_to(sj.idx.reshape(k, *lead, *sj.shape), (k, *shape))
    data = sj.data.reshape(k * b, *lead, *sj.shape)
    return SparseJac(jnp.broadcast_to(data, (k * b, *shape)), idx, b)


def align_elementwise(ctx, what, primals, jacs, laps):
    """Broadcast the operands of an elementwise operation and align their slots.

    Returns `(primals, jacobians, laplacians, target)` where the sparse jacobians are
    replaced by their data laid out in the slots of `target` (zeros get `k * b`
    directions), or a `Fallback` if an element would need too many blocks.
    """
    shape = tuple(jnp.broadcast_shapes(*[jnp.shape(p) for p in primals]))
    primals, laps, jacs = list(primals), list(laps), list(jacs)
    for i, p in enumerate(primals):
        if tuple(jnp.shape(p)) != shape:
            primals[i] = jnp.broadcast_to(p, shape)
            if not is_zero(laps[i]):
                laps[i] = jnp.broadcast_to(laps[i], shape)
            else:
                laps[i] = zero_laplacian(primals[i])
            if is_sparse(jacs[i]):
                jacs[i] = _broadcast_sparse(jacs[i], shape)
    aligned = align_slots(ctx, what, primals, jacs)
    if isinstance(aligned, Fallback):
        return aligned
    return primals, aligned[0], laps, aligned[1]


def align_slots(ctx, what, primals, jacs):
    """Align sparse jacobians of one shape (no broadcasting): `(jacobians, target)`."""
    sparse_ops = {i: j for i, j in enumerate(jacs) if is_sparse(j)}
    target = sparse.union_all([j.idx for j in sparse_ops.values()])
    blocks = sparse.count_blocks(target)
    if blocks > ctx.max_blocks:
        return _too_many(ctx, f"the result of {what}", blocks)
    rows = target.shape[0] * ctx.block_size
    datas = {i: sparse.align(j, target) for i, j in sparse_ops.items()}
    return _rows_jacs(primals, jacs, datas, rows), target


# --- reductions, cumulative ops, sort -----------------------------------------


def _first_along(idx: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Drop the (uniform) value axes `axes` of `idx`."""
    index = tuple(0 if d in axes else slice(None) for d in range(idx.ndim - 1))
    return idx[(slice(None), *index)]


def reduce_rule(ctx, primitive, primals, jacs, laps, params):
    (jac,) = jacs
    axes = tuple(params["axes"])
    target = sparse.union_along(jac.idx, axes, ctx.max_blocks)
    if target is None and primitive is lax.reduce_sum_p:
        return _dense_sum(ctx, primals, jac, laps, params)
    if target is None and primitive in (lax.reduce_max_p, lax.reduce_min_p):
        return _dense_chooser(ctx, primitive, primals, jac, laps, params)
    if target is None:
        return _too_many(ctx, f"{primitive} over axes {axes}")
    data = sparse.align(jac, target)
    out, jac_out, lap_out = dense_rule(ctx, primitive)(primals, [data], laps, **params)
    return out, wrap(jac_out, _first_along(target, axes), ctx.block_size), lap_out


def _report_dense_reduction(ctx, primitive, jac, axes):
    blocks = sparse.count_blocks_along(jac.idx, axes, ctx.num_blocks)
    ctx.densified(
        primitive,
        "threshold",
        f"the {primitive} over axes {axes} depends on {blocks} blocks per element, "
        f"more than {ctx.max_blocks}",
        jac.shape,
        blocks,
    )


def _dense_sum(ctx, primals, jac, laps, params):
    """A sum over more blocks than the threshold: scatter straight into dense form."""
    axes = tuple(params["axes"])
    (x,), (lap,) = primals, laps
    out = lax.reduce_sum_p.bind(x, **params)
    _report_dense_reduction(ctx, lax.reduce_sum_p, jac, axes)
    lap_out = (
        zero_laplacian(out) if is_zero(lap) else lax.reduce_sum_p.bind(lap, **params)
    )
    return out, ctx.densify(jac, axes), lap_out


def _dense_chooser(ctx, primitive, primals, jac, laps, params):
    """max/min over more blocks than the threshold, without densifying the input.

    The derivative of a max is that of the chosen element (averaged over ties, as in
    JAX's own rule) and it has no second-order term: weight the sparse jacobian by
    the choice, then sum it into dense form like a sum.
    """
    axes = tuple(params["axes"])
    (x,), (lap,) = primals, laps
    out = primitive.bind(x, **params)
    kept = [d for d in range(jnp.ndim(x)) if d not in axes]
    chosen = x == lax.broadcast_in_dim(out, jnp.shape(x), kept)
    weight = chosen / jnp.sum(chosen, axis=axes, keepdims=True).astype(x.dtype)
    weight = weight.astype(jac.data.dtype)
    _report_dense_reduction(ctx, primitive, jac, axes)
    weighted = jac.with_data(jac.data * weight[None])
    lap_out = zero_laplacian(out) if is_zero(lap) else jnp.sum(lap * weight, axes)
    return out, ctx.densify(weighted, axes), lap_out


def cumulative_rule(ctx, primitive, primals, jacs, laps, params):
    (jac,) = jacs
    axis = params["axis"]
    target = sparse.union_along(jac.idx, (axis,), ctx.max_blocks)
    if target is None:
        return _too_many(ctx, f"{primitive} along axis {axis}")
    data = sparse.align(jac, target)
    out, jac_out, lap_out = dense_rule(ctx, primitive)(primals, [data], laps, **params)
    return out, wrap(jac_out, target, ctx.block_size), lap_out


def sort_rule(ctx, primitive, primals, jacs, laps, params):
    axis = params["dimension"]
    unions = []
    for j in jacs:
        if is_sparse(j):
            u = sparse.union_along(j.idx, (axis,), ctx.max_blocks)
            if u is None:
                return _too_many(ctx, f"sort along axis {axis}")
            unions.append(u)
    target = sparse.union_all(unions)
    if sparse.count_blocks(target) > ctx.max_blocks:
        return _too_many(ctx, "sort")
    rows = target.shape[0] * ctx.block_size
    datas = {i: sparse.align(j, target) for i, j in enumerate(jacs) if is_sparse(j)}
    outs, jac_outs, lap_outs = dense_rule(ctx, primitive)(
        primals, _rows_jacs(primals, jacs, datas, rows), laps, **params
    )
    return outs, [wrap(j, target, ctx.block_size) for j in jac_outs], lap_outs


# --- structural primitives ---------------------------------------------------


def _bid_idx(idx, *, shape, broadcast_dimensions, **_):
    k = idx.shape[0]
    tmp = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
        tmp[d] = idx.shape[1 + i]
    return np.broadcast_to(idx.reshape(k, *tmp), (k, *shape))


def _reshape_idx(idx, *, new_sizes, dimensions=None, **_):
    if dimensions is not None:
        return None
    return idx.reshape(idx.shape[0], *new_sizes)


def _transpose_idx(idx, *, permutation, **_):
    return np.transpose(idx, (0, *[p + 1 for p in permutation]))


def _squeeze_idx(idx, *, dimensions, **_):
    return np.squeeze(idx, axis=tuple(d + 1 for d in dimensions))


def _slice_idx(idx, *, start_indices, limit_indices, strides=None, **_):
    strides = strides or (1,) * len(start_indices)
    index = tuple(
        slice(s, e, st)
        for s, e, st in zip(start_indices, limit_indices, strides, strict=True)
    )
    return idx[(slice(None), *index)]


def _rev_idx(idx, *, dimensions, **_):
    return np.flip(idx, axis=tuple(d + 1 for d in dimensions))


def _tile_idx(idx, *, reps, **_):
    return np.tile(idx, (1, *reps))


INDEX_MAPS: dict[str, Callable[..., np.ndarray | None]] = {
    "broadcast_in_dim": _bid_idx,
    "reshape": _reshape_idx,
    "transpose": _transpose_idx,
    "squeeze": _squeeze_idx,
    "slice": _slice_idx,
    "rev": _rev_idx,
    "tile": _tile_idx,
}


def structural_rule(idx_fn):
    """A sparse rule moving block indices with `idx_fn(idx, **params)` (NumPy)."""

    def rule(ctx, primitive, primals, jacs, laps, params):
        jac = jacs[0]
        if any(is_sparse(j) or not is_zero(j) for j in jacs[1:]):
            return Fallback("rule", f"{primitive} with tangents on its shape operands")
        idx = idx_fn(jac.idx, **params)
        if idx is None:
            return Fallback("rule", f"{primitive} with these parameters")
        wide = _wide_broadcast(ctx, jac, idx)
        if wide is not None:
            return wide
        rows = jac.k * ctx.block_size
        out, jac_out, lap_out = dense_rule(ctx, primitive)(
            primals, _rows_jacs(primals, jacs, {0: jac.data}, rows), laps, **params
        )
        return out, wrap(jac_out, np.ascontiguousarray(idx), ctx.block_size), lap_out

    return rule


def _wide_broadcast(ctx: SparseContext, jac: SparseJac, idx: np.ndarray) -> Any:
    """A `Fallback` for copying a jacobian of half the directions to a larger value.

    Such a value (a mean over half the particles, broadcast to every particle) is half
    as large in the block-sparse layout as dense, but it will be dense as soon as it
    meets another particle's blocks, and the copies of its slots cost more to align
    and scatter than a dense broadcast, which `dot_split` multiplies before copying.
    """
    grows = idx.size >= 2 * jac.idx.size
    if not grows or 2 * jac.k * ctx.block_size < ctx.n:
        return None
    blocks = sparse.count_blocks(jac.idx)
    return Fallback(
        "threshold",
        f"it copies a jacobian of {blocks} blocks per element (half the directions "
        "or more) to a larger value, which costs less dense",
        blocks,
    )


def _common_slots(jacs: Sequence[Any], primals: Sequence[Any], positions) -> tuple:
    """Pad the sparse operands at `positions` to one slot count; idx for zeros."""
    k = max(j.k for j in jacs if is_sparse(j))
    datas, idxs = {}, {}
    for i in positions:
        j = jacs[i]
        if is_sparse(j):
            j = sparse.pad_slots(j, k)
            datas[i], idxs[i] = j.data, j.idx
        else:
            idxs[i] = np.full((k, *jnp.shape(primals[i])), -1, np.int32)
    return k, datas, idxs


def _joining_rule(join_idx):
    """Concatenate-like primitives: pad every operand to one slot count, then join."""

    def rule(ctx, primitive, primals, jacs, laps, params):
        k, datas, idxs = _common_slots(jacs, primals, range(len(primals)))
        idx = join_idx([idxs[i] for i in range(len(primals))], params)
        out, jac_out, lap_out = dense_rule(ctx, primitive)(
            primals,
            _rows_jacs(primals, jacs, datas, k * ctx.block_size),
            laps,
            **params,
        )
        return out, wrap(jac_out, idx, ctx.block_size), lap_out

    return rule


concatenate_rule = _joining_rule(
    lambda idxs, p: np.concatenate(idxs, axis=p["dimension"] + 1)
)
stack_rule = _joining_rule(lambda idxs, p: np.stack(idxs, axis=p["axis"] + 1))


def _splitting_rule(split_idx):
    """Primitives with one operand and several outputs that partition it."""

    def rule(ctx, primitive, primals, jacs, laps, params):
        (jac,) = jacs
        idxs = split_idx(jac.idx, params)
        outs, jac_outs, lap_outs = dense_rule(ctx, primitive)(
            primals, [jac.data], laps, **params
        )
        jac_outs = [
            wrap(j, np.ascontiguousarray(i), ctx.block_size)
            for j, i in zip(jac_outs, idxs, strict=True)
        ]
        return outs, jac_outs, lap_outs

    return rule


split_rule = _splitting_rule(
    lambda idx, p: np.split(idx, np.cumsum(p["sizes"])[:-1], axis=p["axis"] + 1)
)
unstack_rule = _splitting_rule(
    lambda idx, p: [
        np.take(idx, i, axis=p["axis"] + 1) for i in range(idx.shape[p["axis"] + 1])
    ]
)


def _eager_idx(fn: Callable[..., Any], *idxs: np.ndarray) -> np.ndarray:
    """Run a copying primitive on every slot of the (concrete) block indices.

    Indices are shifted by one so that padding and fill values (0) become -1.
    """
    k = idxs[0].shape[0]
    with jax.ensure_compile_time_eval():
        slots = [
            np.asarray(fn(*[jnp.asarray(ix[t] + 1, jnp.int32) for ix in idxs]))
            for t in range(k)
        ]
    return (np.stack(slots) - 1).astype(np.int32)


def _static_values(
    primitive: Any, primals, jacs, positions: tuple[int, ...], needs_values: bool = True
) -> Any:
    """Values of the operands not at `positions` (indices, starts, padding values).

    They must carry no tangent and, with `needs_values`, be known while tracing;
    returns a `Fallback` otherwise.
    """
    static = [i for i in range(len(primals)) if i not in positions]
    if any(not is_zero(jacs[i]) for i in static):
        return Fallback("rule", f"{primitive} with a tangent on an index operand")
    if not needs_values:
        return []
    values = [constants.concrete_value(primals[i]) for i in static]
    if any(v is None for v in values):
        return Fallback(
            "rule", f"{primitive} with indices only known at run time (traced)"
        )
    return values


def _copy_slots(ctx, primitive, fn, positions, slots, primals, jacs, laps, params):
    """Run `fn` on the slot ids of the operands at `positions`, the primitive on data.

    `slots` is `_common_slots(jacs, primals, positions)`.
    """
    k, datas, idxs = slots
    idx = _eager_idx(fn, *[idxs[i] for i in positions])
    rows = k * ctx.block_size
    out, jac_out, lap_out = dense_rule(ctx, primitive)(
        primals, _rows_jacs(primals, jacs, datas, rows), laps, **params
    )
    return out, wrap(jac_out, idx, ctx.block_size), lap_out


def _copy_rule(positions: tuple[int, ...], make_fn, needs_values: bool = True):
    """A rule for a primitive that copies elements of the operands at `positions`.

    The other operands must pass `_static_values`; `make_fn(params, values)` returns
    the function that applies the primitive to int32 arrays in place of the copied
    operands (and may return a `Fallback` instead).
    """

    def rule(ctx, primitive, primals, jacs, laps, params):
        values = _static_values(primitive, primals, jacs, positions, needs_values)
        if isinstance(values, Fallback):
            return values
        fn = make_fn(params, values)
        if isinstance(fn, Fallback):
            return fn
        slots = _common_slots(jacs, primals, positions)
        return _copy_slots(
            ctx, primitive, fn, positions, slots, primals, jacs, laps, params
        )

    return rule


def _pad_fn(params, values):
    # The padding value's slots fill the padding: it may carry a tangent too.
    return lambda a, v: lax.pad(a, v, params["padding_config"])


def _gather_fn(params, values):
    (indices,) = values
    p = dict(params, fill_value=0)
    return lambda a: lax.gather_p.bind(a, jnp.asarray(indices), **p)


def _dynamic_slice_fn(params, values):
    return lambda a: lax.dynamic_slice(
        a, [int(v) for v in values], params["slice_sizes"]
    )


def _dynamic_update_slice_fn(params, values):
    return lambda a, u: lax.dynamic_update_slice(a, u, [int(v) for v in values])


pad_rule = _copy_rule((0, 1), _pad_fn, needs_values=False)
gather_rule = _copy_rule((0,), _gather_fn)
dynamic_update_slice_rule = _copy_rule((0, 1), _dynamic_update_slice_fn)


class _ScatterAdd:
    """`scatter_add` with the call's indices, applied to other operands (block ids).

    It also stands for `scatter_min`/`scatter_max` (and `scatter_mul`): an output
    element depends on the same sources whichever way they are combined.
    """

    def __init__(self, params, values):
        (self.indices,) = values
        self.params = params

    def __call__(self, a, u):
        p = self.params
        return lax.scatter_add(
            a,
            jnp.asarray(self.indices),
            u,
            p["dimension_numbers"],
            indices_are_sorted=p["indices_are_sorted"],
            unique_indices=p["unique_indices"],
            mode=p["mode"],
        )

    def collides(self, operand_idx, update_idx) -> bool:
        """Whether some output element sums tangents from two sources."""
        has = lambda idx: (idx >= 0).any(axis=0).astype(np.int32)  # noqa: E731
        with jax.ensure_compile_time_eval():
            counts = np.asarray(
                self(jnp.asarray(has(operand_idx)), jnp.asarray(has(update_idx)))
            )
        return bool(counts.max(initial=0) > 1)

    def targets(self, operand_shape, update_shape) -> np.ndarray | None:
        """The flat output position of every update element (-1: dropped).

        The transpose of scatter_add in the updates is a gather, so pulling the
        output positions back through it reads off each update's target. None when
        the positions are not exact in float32.
        """
        size = int(np.prod(operand_shape, dtype=np.int64))
        if size >= 2**24:
            return None
        zeros = jnp.zeros(operand_shape, jnp.float32)
        with jax.ensure_compile_time_eval():
            _, pull = jax.vjp(
                lambda u: self(zeros, u), jnp.zeros(update_shape, jnp.float32)
            )
            positions = jnp.arange(1, size + 1, dtype=jnp.float32)
            (got,) = pull(positions.reshape(operand_shape))
        return np.rint(np.asarray(got)).astype(np.int64) - 1


def scatter_add_rule(ctx, primitive, primals, jacs, laps, params):
    """Copy the slot ids where sources do not collide, else take their union.

    Where one output element sums several tangent-carrying sources, its slots are the
    union of their blocks; every source is aligned to the slots of the element it
    lands in, and the dense rule then adds the aligned data.
    """
    values = _static_values(primitive, primals, jacs, (0, 2))
    if isinstance(values, Fallback):
        return values
    fn = _ScatterAdd(params, values)
    slots = _common_slots(jacs, primals, (0, 2))
    idxs = slots[2]
    if not fn.collides(idxs[0], idxs[2]):
        return _copy_slots(
            ctx, primitive, fn, (0, 2), slots, primals, jacs, laps, params
        )
    operand_shape, update_shape = jnp.shape(primals[0]), jnp.shape(primals[2])
    target = fn.targets(operand_shape, update_shape)
    if target is None:
        return Fallback("rule", f"{primitive} into more than 2**24 elements")
    out_idx = _scatter_union(ctx, idxs[0], idxs[2], target)
    if out_idx is None:
        return _too_many(ctx, f"{primitive} summing several particles' values")
    size = out_idx[0].size
    flat_out = out_idx.reshape(out_idx.shape[0], size)
    # Each update's slots are those of the element it lands in (none if dropped).
    landed = np.where(target >= 0, target, 0).reshape(-1)
    update_target = flat_out[:, landed].reshape(out_idx.shape[0], *update_shape)
    update_target = np.where(target[None] >= 0, update_target, -1)
    aligned = {
        i: sparse.align(jacs[i], goal)
        for i, goal in ((0, out_idx), (2, update_target))
        if is_sparse(jacs[i])
    }
    rows = out_idx.shape[0] * ctx.block_size
    out, jac_out, lap_out = dense_rule(ctx, primitive)(
        primals, _rows_jacs(primals, jacs, aligned, rows), laps, **params
    )
    return out, wrap(jac_out, out_idx, ctx.block_size), lap_out


def _scatter_union(
    ctx: SparseContext,
    operand_idx: np.ndarray,
    update_idx: np.ndarray,
    target: np.ndarray,
) -> np.ndarray | None:
    """Per output element, the union of the blocks of every source that lands there."""
    k = operand_idx.shape[0]
    shape = operand_idx.shape[1:]
    size = int(np.prod(shape, dtype=np.int64))
    member = np.zeros((size, ctx.num_blocks), bool)
    flat_op = operand_idx.reshape(k, size)
    flat_up = update_idx.reshape(k, -1)
    flat_target = target.reshape(-1)
    for t in range(k):
        ok = flat_op[t] >= 0
        member[np.nonzero(ok)[0], flat_op[t][ok]] = True
        ok = (flat_up[t] >= 0) & (flat_target >= 0)
        member[flat_target[ok], flat_up[t][ok]] = True
    counts = member.sum(axis=1)
    width = int(counts.max(initial=0))
    if width > ctx.max_blocks:
        return None
    width = max(width, 1)
    # A stable sort puts each element's blocks first, in increasing order.
    blocks = np.argsort(~member, axis=1, kind="stable")[:, :width]
    used = np.arange(width)[None] < counts[:, None]
    out = np.where(used, blocks, -1).astype(np.int32).T
    return out.reshape(width, *shape)


def _scatter_fn(params, values):
    """`scatter` with the call's indices (it replaces: no union is needed)."""

    (indices,) = values
    return lambda a, u: lax.scatter(
        a,
        jnp.asarray(indices),
        u,
        params["dimension_numbers"],
        indices_are_sorted=params["indices_are_sorted"],
        unique_indices=params["unique_indices"],
        mode=params["mode"],
    )


def dynamic_slice_rule(ctx, primitive, primals, jacs, laps, params):
    """Concrete starts copy exactly; traced starts take the union along sliced axes."""
    starts = [constants.concrete_value(s) for s in primals[1:]]
    if all(s is not None for s in starts):
        return _copy_rule((0,), _dynamic_slice_fn)(
            ctx, primitive, primals, jacs, laps, params
        )
    jac = jacs[0]
    sizes = params["slice_sizes"]
    axes = [d for d, size in enumerate(sizes) if size != jac.shape[d]]
    target = sparse.union_along(jac.idx, axes, ctx.max_blocks)
    if target is None:
        return _too_many(ctx, "dynamic_slice at a traced position")
    data = sparse.align(jac, target)
    rows = target.shape[0] * ctx.block_size
    out, jac_out, lap_out = dense_rule(ctx, primitive)(
        primals, _rows_jacs(primals, jacs, {0: data}, rows), laps, **params
    )
    idx = target[(slice(None), *[slice(0, s) for s in sizes])]
    return out, wrap(jac_out, np.ascontiguousarray(idx), ctx.block_size), lap_out


# --- dot_general ----------------------------------------------------------------------


def _side_idx(
    idx: np.ndarray, contract, batch, free, other_free: int, a_side: bool
) -> np.ndarray:
    """Block indices of one operand laid out as the dot_general output."""
    kept = [d for d in range(idx.ndim - 1) if d not in contract]
    reduced = _first_along(idx, contract)
    order = [kept.index(d) for d in batch] + [kept.index(d) for d in free]
    r = np.transpose(reduced, (0, *[o + 1 for o in order]))
    nb = len(batch)
    k = r.shape[0]
    if a_side:  # (k, batch, a_free) -> (k, batch, a_free, 1...)
        return r.reshape(*r.shape, *([1] * other_free))
    # (k, batch, b_free) -> (k, batch, 1..., b_free)
    return r.reshape(k, *r.shape[1 : 1 + nb], *([1] * other_free), *r.shape[1 + nb :])


def _dot_side(ctx, jac, contract, batch, free, other_free, a_side):
    """`(aligned data, slots, output-layout idx)` of one sparse operand, or None."""
    if not is_sparse(jac):
        return None
    union = sparse.union_along(jac.idx, contract, ctx.max_blocks)
    if union is None:
        return _too_many(ctx, "dot_general's contraction")
    idx = _side_idx(union, contract, batch, free, other_free, a_side)
    return sparse.align(jac, union), union.shape[0], idx


def dot_general_rule(ctx, primitive, primals, jacs, laps, params):
    (a, b), (ja, jb), (la, lb) = primals, jacs, laps
    (lc, rc), (lbatch, rbatch) = params["dimension_numbers"]
    a_free = [d for d in range(jnp.ndim(a)) if d not in lc and d not in lbatch]
    b_free = [d for d in range(jnp.ndim(b)) if d not in rc and d not in rbatch]
    out_shape = tuple(
        jax.eval_shape(lambda a, b: primitive.bind(a, b, **params), a, b).shape
    )
    bs = ctx.block_size
    side_a = _dot_side(ctx, ja, lc, lbatch, a_free, len(b_free), True)
    side_b = _dot_side(ctx, jb, rc, rbatch, b_free, len(a_free), False)
    if isinstance(side_a, Fallback):
        return side_a
    if isinstance(side_b, Fallback):
        return side_b
    if side_a is None or side_b is None:
        data, k, ix = side_a if side_a is not None else side_b  # pyright: ignore
        datas = {0: data} if side_a is not None else {1: data}
        out, jac_out, lap_out = dense_rule(ctx, primitive)(
            primals, _rows_jacs(primals, jacs, datas, k * bs), laps, **params
        )
        idx = np.ascontiguousarray(np.broadcast_to(ix, (k, *out_shape)))
        return out, wrap(jac_out, idx, bs), lap_out
    (da, ka, ia), (db, kb, ib) = side_a, side_b
    oa = np.broadcast_to(ia, (ka, *out_shape))
    ob = np.broadcast_to(ib, (kb, *out_shape))
    target = sparse.union(np.ascontiguousarray(oa), np.ascontiguousarray(ob))
    blocks = sparse.count_blocks(target)
    if blocks > ctx.max_blocks:
        return _too_many(ctx, "the result of dot_general", blocks)
    out = primitive.bind(a, b, **params)
    first_a = jax.vmap(lambda j: primitive.bind(j, b, **params))(da)
    first_b = jax.vmap(lambda j: primitive.bind(a, j, **params))(db)
    jac_out = sparse.align(SparseJac(first_a, np.ascontiguousarray(oa), bs), target)
    jac_out = jac_out + sparse.align(
        SparseJac(first_b, np.ascontiguousarray(ob), bs), target
    )
    lap_out: Any = zero_laplacian(out)
    if not is_zero(la):
        lap_out = add(lap_out, primitive.bind(la, b, **params))
    if not is_zero(lb):
        lap_out = add(lap_out, primitive.bind(a, lb, **params))
    cross = _paired_cross(primitive, da, ka, ia, db, kb, ib, params, bs, a, b)
    if cross is not None:
        lap_out = add(lap_out, 2 * cross)
    return out, SparseJac(jac_out, target, bs), lap_out


def _paired_cross(primitive, da, ka, ia, db, kb, ib, params, bs, a, b):
    """sum over directions of dot_general(J_a[k], J_b[k]), pairing equal blocks."""
    (lc, rc), (lbatch, rbatch) = params["dimension_numbers"]
    nb = len(lbatch)
    # Per slot pair: which output elements pair the same block (-1 never pairs).
    eq = (ia[:, None] == ib[None, :]) & (ia[:, None] >= 0)  # (ka, kb, *out)
    if not eq.any():
        return None
    lhs = da.reshape(ka, bs, *jnp.shape(a))
    rhs = db.reshape(kb, bs, *jnp.shape(b))
    shift = lambda dims: tuple(d + 2 for d in dims)  # noqa: E731
    dims = (((1, *shift(lc)), (1, *shift(rc))), (shift(lbatch), shift(rbatch)))
    prod = lax.dot_general(
        lhs, rhs, dims, preferred_element_type=params.get("preferred_element_type")
    )
    # prod: (batch, ka, a_free, kb, b_free) -> (ka, kb, batch, a_free, b_free)
    n_af = len([d for d in range(jnp.ndim(a)) if d not in lc and d not in lbatch])
    n_bf = len([d for d in range(jnp.ndim(b)) if d not in rc and d not in rbatch])
    perm = (
        nb,
        nb + 1 + n_af,
        *range(nb),
        *range(nb + 1, nb + 1 + n_af),
        *range(nb + 2 + n_af, nb + 2 + n_af + n_bf),
    )
    prod = jnp.transpose(prod, perm)
    mask = sparse.compress(np.broadcast_to(eq, (ka, kb, *prod.shape[2:])))
    return jnp.sum(jnp.where(mask, prod, 0), axis=(0, 1)).astype(prod.dtype)


def all_to_all_rule(ctx, primitive, primals, jacs, laps, params):
    """Primitives whose every output element may depend on every input element.

    `custom_linear_solve` (`jnp.linalg.solve`, `inv`): every element gets the union
    of the blocks of all operands, so the rule stays sparse while that union is
    within the threshold (a small system of one or two particles).
    """
    blocks = np.unique(
        np.concatenate([j.idx.reshape(-1) for j in jacs if is_sparse(j)])
    )
    blocks = blocks[blocks >= 0].astype(np.int32)
    if blocks.size > ctx.max_blocks:
        return _too_many(ctx, f"{primitive} (every output element)", blocks.size)
    k = max(blocks.size, 1)
    column = np.full(k, -1, np.int32)
    column[: blocks.size] = blocks

    def slots(shape: Sequence[int]) -> np.ndarray:
        return np.broadcast_to(column.reshape(k, *[1] * len(shape)), (k, *shape))

    datas = {
        i: sparse.align(j, slots(j.shape)) for i, j in enumerate(jacs) if is_sparse(j)
    }
    outs, jac_outs, lap_outs = dense_rule(ctx, primitive)(
        primals, _rows_jacs(primals, jacs, datas, k * ctx.block_size), laps, **params
    )
    if not primitive.multiple_results:
        shape = jnp.shape(outs)
        return (
            outs,
            wrap(jac_outs, np.ascontiguousarray(slots(shape)), ctx.block_size),
            lap_outs,
        )
    jac_outs = [
        wrap(j, np.ascontiguousarray(slots(jnp.shape(o))), ctx.block_size)
        for o, j in zip(outs, jac_outs, strict=True)
    ]
    return outs, jac_outs, lap_outs


def no_tangent_rule(ctx, primitive, primals, jacs, laps, params):
    """Primitives whose outputs carry no tangent (comparisons, argmax, ...)."""
    out = primitive.bind(*primals, **params)
    outs = out if primitive.multiple_results else [out]
    jac_outs = [zero_jacobian(o, ctx.rows) for o in outs]
    lap_outs = [zero_laplacian(o) for o in outs]
    if primitive.multiple_results:
        return outs, jac_outs, lap_outs
    return out, jac_outs[0], lap_outs[0]


scatter_rule = _copy_rule((0, 2), _scatter_fn)


# --- dispatch ------------------------------------------------------------------------


def apply_rule(
    trace: Any,
    rule: LapRule,
    primitive: Any,
    primals: Sequence[Any],
    jacs: Sequence[Any],
    laps: Sequence[Any],
    params: dict[str, Any],
) -> Any:
    """Run `rule` for a primitive: sparse where it can, else dense; under the parent.

    Returns the rule's `(outs, jacobians, laplacians)`, lists for `multiple_results`.
    """
    ctx = trace.sparse
    if ctx is not None and any(is_sparse(j) for j in jacs):
        result = _apply_sparse(ctx, rule, primitive, primals, jacs, laps, params)
        if not isinstance(result, Fallback):
            return _finished(ctx, primitive, result, primitive.multiple_results)
        laps = ctx.densified_laplacians(jacs, laps)
        jacs = densify_operands(ctx, primitive, jacs, result)
    out = rule.dense(trace, primals, jacs, laps, **params)
    if isinstance(out, Fallback):
        out = generic_lap_rule(primitive)(trace, primals, jacs, laps, **params)
    return out


def _apply_sparse(ctx, rule, primitive, primals, jacs, laps, params) -> Any:
    if any(not is_zero(j) and not is_sparse(j) for j in jacs):
        reason = "an operand's jacobian is already dense"
        return Fallback("threshold", reason, ctx.num_blocks)
    if rule.sparse is None:
        return Fallback("rule", f"fwdlap has no sparse rule for {primitive}")
    return rule.sparse(ctx, list(primals), list(jacs), list(laps), **params)


def _finished(ctx: SparseContext, what: Any, result: Any, multiple: bool) -> Any:
    """`finish` every output of a sparse rule's `result`."""
    outs, jacs, laps = result
    if not multiple:
        jac, lap = finish(ctx, what, outs, jacs, laps)
        return outs, jac, lap
    jacs, laps = finish_all(ctx, what, outs, jacs, laps)
    return outs, jacs, laps


def finish_all(
    ctx: SparseContext, what: Any, outs: Any, jacs: Any, laps: Any
) -> tuple[list[Any], list[Any]]:
    """`finish` over lists of outputs: `(jacobians, laplacians)`."""
    pairs = [
        finish(ctx, what, o, j, lp) for o, j, lp in zip(outs, jacs, laps, strict=True)
    ]
    return [j for j, _ in pairs], [lp for _, lp in pairs]


def densify_operands(
    ctx: SparseContext, primitive: Any, jacs: Sequence[Any], fallback: Fallback
) -> list[Any]:
    """Make every sparse jacobian dense, reporting the densification once."""
    shapes = [j.shape for j in jacs if is_sparse(j)]
    ctx.densified(
        primitive, fallback.cause, fallback.reason, shapes[0], fallback.blocks
    )
    return [ctx.densify(j) if is_sparse(j) else j for j in jacs]


def finish(
    ctx: SparseContext, primitive: Any, out: Any, jac: Any, lap: Any
) -> tuple[Any, Any]:
    """Normalise a sparse rule's output: zeros, empty slots, the threshold.

    Returns the jacobian and the laplacian; a sparse rule's operands are all sparse,
    so a dense result turned dense here, and its laplacian is windowed, unless the
    rule returned it windowed already (`sparse.WindowedLaplacian`: det, loops).
    """
    jac = _finish_jacobian(ctx, primitive, out, jac)
    if isinstance(lap, sparse.WindowedLaplacian):
        return jac, lap.value
    if not is_zero(jac) and not is_sparse(jac):
        lap = ctx.window_laplacian(lap)
    return jac, lap


def _finish_jacobian(ctx: SparseContext, primitive: Any, out: Any, jac: Any) -> Any:
    if is_zero(jac):
        return zero_jacobian(out, ctx.rows)
    if not is_sparse(jac):
        return jac
    if not jnp.issubdtype(jax.typeof(out).dtype, jnp.inexact):
        return zero_jacobian(out, ctx.rows)
    jac = sparse.drop_empty_slots(jac)
    if not (jac.idx >= 0).any():
        return zero_jacobian(out, ctx.rows)
    blocks = sparse.count_blocks(jac.idx)
    if blocks > ctx.max_blocks:
        ctx.densified(
            primitive,
            "threshold",
            f"the result depends on {blocks} blocks per element, more than "
            f"{ctx.max_blocks}",
            jac.shape,
            blocks,
        )
        return ctx.densify(jac)
    return jac
