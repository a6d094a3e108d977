"""Products with an expanded or concatenated operand, computed on the small parts.

FermiNet-shaped networks feed each layer `concatenate([h, tile(mean_up),
tile(mean_down), ...]) @ w`: most of the contracted features are means over the
electrons, copied back to every electron. Done as written, the product with the copied
part repeats the same work once per electron and per direction. The `LapTrace`
remembers how each of its values was made, and a `dot_general` of a value that is an
*expansion* of a smaller one along axes the product does not contract is computed on
the smaller value and expanded afterwards:

    broadcast(m) @ w            ==  broadcast(m @ w)
    tile(m, reps) @ w           ==  tile(m @ w, reps)
    m[idx] @ w                  ==  (m @ w)[idx]         (idx carries no tangent)
    (c * m) @ w                 ==  c * (m @ w)           (c constant along the
                                                           contracted axes)
    reshape(m) @ w              ==  reshape(m @ w)        (contracted axes kept whole)
    concatenate([a, a, b]) @ w  ==  concatenate([a @ w, a @ w, b @ w])
                                                          (along a free axis)

Expansions are followed through each other (`jnp.repeat` is a broadcast and a reshape,
`jnp.ones((n, 1)) * m[None]` a product with a broadcast), and the product is taken at
the smallest value on the way. A concatenation along a contracted axis is split into a
sum of products where one of its parts is such an expansion:

    concatenate([a, b], axis=k) @ w  ==  a @ w[:ka] + b @ w[ka:]   (k contracted)

The parts go through the trace's own rules, so their jacobians and laplacians are the
products' exact ones; the results differ from the unsplit product only by the order of
floating-point additions. A value is only taken apart when that at least halves the
rows of the product. The unused whole values are left to XLA's dead-code elimination.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _jax

MAX_PARTS = 16
"""The most parts a concatenation may have and still be split."""

MAX_STEPS = 8
"""How many expansions in a row are followed back from a product's operand."""


class Origin(NamedTuple):
    """How a traced value was made: the primitive, its operands and parameters."""

    primitive: Any
    operands: tuple[Any, ...]
    params: dict[str, Any]


Origins = dict[int, tuple[Any, Origin]]
Expand = Callable[[Any, int, int], Any]
"""Maps a product of the smaller value to the product of the larger one.

Called as `expand(r, lead, trail)`, where `r` holds the smaller value's free axes
between `lead` axes and `trail` axes of the other operand.
"""


class Step(NamedTuple):
    """One expansion: the smaller value, its contracted axes, and how to expand."""

    small: Any
    contracting: tuple[int, ...]
    expand: Expand


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(np.shape(value))


def _size(value: Any) -> int:
    return int(np.prod(_shape(value), dtype=np.int64))


def _free_axes(ndim: int, contracting: Sequence[int]) -> list[int]:
    return [d for d in range(ndim) if d not in contracting]


def _full_shape(r: Any, lead: int, trail: int, middle: Sequence[int]) -> tuple:
    """`r`'s shape with its middle axes (the value's free axes) replaced."""
    shape = _shape(r)
    return (*shape[:lead], *middle, *shape[len(shape) - trail :])


def _broadcast_step(origin: Origin, value: Any, contracting) -> Step | None:
    if origin.params.get("sharding") is not None or len(origin.operands) != 1:
        return None  # more operands: dynamic shapes
    (operand,) = origin.operands
    dims = tuple(origin.params["broadcast_dimensions"])
    in_shape, out_shape = _shape(operand), _shape(value)
    small_contracting = []
    for axis in contracting:
        if axis not in dims or in_shape[dims.index(axis)] != out_shape[axis]:
            return None
        small_contracting.append(dims.index(axis))
    value_free = _free_axes(len(out_shape), contracting)
    small_free = _free_axes(len(in_shape), small_contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        full = _full_shape(r, lead, trail, [out_shape[a] for a in value_free])
        positions = (
            *range(lead),
            *(lead + value_free.index(dims[i]) for i in small_free),
            *range(lead + len(value_free), len(full)),
        )
        return lax.broadcast_in_dim(r, full, positions)

    return Step(operand, tuple(small_contracting), expand)


def _tile_step(origin: Origin, value: Any, contracting) -> Step | None:
    (operand,) = origin.operands
    reps = tuple(origin.params["reps"])
    if len(reps) != len(_shape(value)) or any(reps[a] != 1 for a in contracting):
        return None
    value_free = _free_axes(len(reps), contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        full_reps = (1,) * lead + tuple(reps[a] for a in value_free) + (1,) * trail
        return jnp.tile(r, full_reps)

    return Step(operand, tuple(contracting), expand)


def _reshape_step(origin: Origin, value: Any, contracting) -> Step | None:
    """A reshape that keeps each contracted axis whole, at the same flat stride."""
    if origin.params.get("dimensions") is not None or len(origin.operands) != 1:
        return None
    if origin.params.get("sharding") is not None:
        return None
    (operand,) = origin.operands
    in_shape, out_shape = _shape(operand), _shape(value)
    in_before = np.cumprod((1, *in_shape))[:-1]
    out_before = np.cumprod((1, *out_shape))[:-1]
    small_contracting: list[int] = []
    for axis in contracting:
        matches = [
            b
            for b in range(len(in_shape))
            if in_before[b] == out_before[axis]
            and in_shape[b] == out_shape[axis]
            and b not in small_contracting
        ]
        if not matches:
            return None
        small_contracting.append(matches[0])
    order = np.argsort(contracting)
    if list(np.asarray(small_contracting)[order]) != sorted(small_contracting):
        return None
    value_free = _free_axes(len(out_shape), contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        return lax.reshape(
            r, _full_shape(r, lead, trail, [out_shape[a] for a in value_free])
        )

    return Step(operand, tuple(small_contracting), expand)


def _gather_step(origin: Origin, value: Any, contracting) -> Step | None:
    """`operand[idx]` along one axis `k` (`jnp.take`, indexing with an index array)."""
    operand, indices = origin.operands
    params = origin.params
    dn = params["dimension_numbers"]
    shape = _shape(operand)
    ndim = len(shape)
    if dn.operand_batching_dims or len(dn.collapsed_slice_dims) != 1:
        return None
    (k,) = dn.collapsed_slice_dims
    if tuple(dn.start_index_map) != (k,):
        return None
    if _shape(indices)[-1:] != (1,) or len(_shape(indices)) != 2:
        return None
    if tuple(dn.offset_dims) != tuple(d for d in range(ndim) if d != k):
        return None
    if tuple(params["slice_sizes"]) != tuple(
        1 if d == k else shape[d] for d in range(ndim)
    ):
        return None
    if k in contracting or len(_shape(value)) != ndim:
        return None
    value_free = _free_axes(ndim, contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        axis = lead + value_free.index(k)
        r_shape = _shape(r)
        numbers = lax.GatherDimensionNumbers(
            offset_dims=tuple(d for d in range(len(r_shape)) if d != axis),
            collapsed_slice_dims=(axis,),
            start_index_map=(axis,),
            operand_batching_dims=(),
            start_indices_batching_dims=(),
        )
        sizes = tuple(1 if d == axis else n for d, n in enumerate(r_shape))
        return lax.gather(
            r,
            indices,
            numbers,
            sizes,
            indices_are_sorted=params["indices_are_sorted"],
            unique_indices=params["unique_indices"],
            mode=params["mode"],
            fill_value=params.get("fill_value"),
        )

    return Step(operand, tuple(contracting), expand)


def _mul_step(origin: Origin, value: Any, contracting) -> Step | None:
    """`scale * small`, where `scale` is constant along the contracted axes."""
    out_shape = _shape(value)
    a, b = origin.operands
    for small, scale in sorted(((a, b), (b, a)), key=lambda pair: _size(pair[0])):
        if len(_shape(small)) != len(out_shape) or len(_shape(scale)) != len(out_shape):
            return None
        if all(_shape(scale)[axis] == 1 for axis in contracting):
            break
    else:
        return None
    value_free = _free_axes(len(out_shape), contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        full = _full_shape(r, lead, trail, [out_shape[a] for a in value_free])
        scale_free = lax.squeeze(scale, tuple(contracting))
        positions = tuple(range(lead, lead + len(value_free)))
        scale_full = lax.broadcast_in_dim(scale_free, full, positions)
        product = lax.broadcast_in_dim(r, full, tuple(range(len(full))))
        return (
            lax.mul(scale_full, product) if scale is a else lax.mul(product, scale_full)
        )

    return Step(small, tuple(contracting), expand)


def _concatenate_step(origin: Origin, value: Any, contracting) -> Step | None:
    """Copies of one value side by side along a free axis (a tile written by hand)."""
    parts = origin.operands
    axis = origin.params["dimension"]
    if axis in contracting or any(p is not parts[0] for p in parts):
        return None
    value_free = _free_axes(len(_shape(value)), contracting)

    def expand(r: Any, lead: int, trail: int) -> Any:
        return lax.concatenate([r] * len(parts), lead + value_free.index(axis))

    return Step(parts[0], tuple(contracting), expand)


_STEPS: dict[Any, Callable[[Origin, Any, Any], Step | None]] = {
    lax.concatenate_p: _concatenate_step,
    lax.broadcast_in_dim_p: _broadcast_step,
    lax.reshape_p: _reshape_step,
    lax.gather_p: _gather_step,
    lax.mul_p: _mul_step,
}
if getattr(lax, "tile_p", None) is not None:  # JAX 0.10: jnp.tile is one primitive
    _STEPS[lax.tile_p] = _tile_step
_RECORDED = frozenset(_STEPS)


def record(origins: Origins, primitive: Any, operands, params, out) -> None:
    """Remember how the traced `out` was made, if `split_dot` may take it apart."""
    if primitive in _RECORDED:
        # The entry holds `out` itself, so its id is not reused during the trace.
        origins[id(out)] = (out, Origin(primitive, tuple(operands), dict(params)))


def _origin(origins: Origins, value: Any) -> Origin | None:
    entry = origins.get(id(value))
    return entry[1] if entry is not None and entry[0] is value else None


def _expansion(
    origins: Origins, value: Any, contracting: Sequence[int]
) -> tuple[Any, tuple[int, ...], list[Expand]] | None:
    """The smallest value `value` expands, if at most half its size, and the way back.

    Returns `(small, small's contracted axes, expansions from small to value)`.
    """
    small, small_contracting = value, tuple(contracting)
    steps: list[Step] = []
    best, best_size = 0, _size(value)
    while len(steps) < MAX_STEPS:
        origin = _origin(origins, small)
        if origin is None or origin.primitive not in _STEPS:
            break
        step = _STEPS[origin.primitive](origin, small, small_contracting)
        if step is None:
            break
        steps.append(step)
        small, small_contracting = step.small, step.contracting
        if _size(small) <= best_size:
            best, best_size = len(steps), _size(small)
    if best == 0 or 2 * best_size > _size(value):
        return None
    steps = steps[:best]
    return steps[-1].small, steps[-1].contracting, [s.expand for s in reversed(steps)]


def _dot_of_expansion(trace: Any, side: int, expansion, other: Any, params) -> Any:
    """`dot_general` with the expanded operand on `side`, done before expanding."""
    small, small_contracting, expands = expansion
    theirs = params["dimension_numbers"][0][1 - side]
    pair = (
        (small_contracting, tuple(theirs))
        if side == 0
        else (tuple(theirs), small_contracting)
    )
    new_params = {**params, "dimension_numbers": (pair, ((), ()))}
    other_free = len(_shape(other)) - len(theirs)
    lead, trail = (0, other_free) if side == 0 else (other_free, 0)
    with _jax.set_current_trace(trace):
        out = lax.dot_general_p.bind(
            *((small, other) if side == 0 else (other, small)), **new_params
        )
        for expand in expands:
            out = expand(out, lead, trail)
    return out


def _groups(
    origins: Origins, parts: Sequence[Any], contracting
) -> list[list[Any]] | None:
    """Parts in runs: each expansion alone, the others concatenated together."""
    cheap = [_expansion(origins, p, contracting) is not None for p in parts]
    if not any(cheap):
        return None
    runs: list[tuple[list[Any], bool]] = []
    for part, is_cheap in zip(parts, cheap, strict=True):
        if is_cheap or not runs or runs[-1][1]:
            runs.append(([part], is_cheap))
        else:
            runs[-1][0].append(part)
    return [run for run, _ in runs]


def split_dot(trace: Any, origins: Origins, tracers, params) -> Any:
    """`dot_general` of `tracers` part by part, or None where that saves nothing."""
    (contracting_pair, batch_pair) = params["dimension_numbers"]
    if batch_pair != ((), ()) or params.get("out_sharding") is not None:
        return None
    for side in (0, 1):
        value, other = tracers[side], tracers[1 - side]
        mine, theirs = contracting_pair[side], contracting_pair[1 - side]
        expansion = _expansion(origins, value, mine)
        if expansion is not None:
            return _dot_of_expansion(trace, side, expansion, other, params)
        origin = _origin(origins, value)
        if origin is None or origin.primitive is not lax.concatenate_p:
            continue
        if len(origin.operands) > MAX_PARTS:
            continue
        axis = origin.params["dimension"]
        if axis not in mine:
            out = _free_concatenation(trace, side, origin, other, params, mine)
            if out is not None:
                return out
            continue
        runs = _groups(origins, origin.operands, mine)
        if runs is None:
            continue
        other_axis = theirs[list(mine).index(axis)]
        return _sum_of_products(trace, side, runs, axis, other, other_axis, params)
    return None


def _free_concatenation(trace, side, origin: Origin, other, params, mine) -> Any:
    """A concatenation along a free axis with repeated parts: each product once."""
    parts = origin.operands
    unique = {id(p): p for p in parts}
    if 2 * len(unique) > len(parts):
        return None
    axis = origin.params["dimension"]
    value_free = _free_axes(len(_shape(parts[0])), mine)
    other_free = len(_shape(other)) - len(mine)
    out_axis = value_free.index(axis) + (0 if side == 0 else other_free)
    with _jax.set_current_trace(trace):
        products = {
            key: lax.dot_general_p.bind(
                *((part, other) if side == 0 else (other, part)), **params
            )
            for key, part in unique.items()
        }
        return lax.concatenate([products[id(p)] for p in parts], out_axis)


def _sum_of_products(trace, side, runs, axis, other, other_axis, params) -> Any:
    total = None
    start = 0
    with _jax.set_current_trace(trace):
        for run in runs:
            part = run[0] if len(run) == 1 else lax.concatenate(run, axis)
            stop = start + _shape(part)[axis]
            piece = lax.slice_in_dim(other, start, stop, axis=other_axis)
            args = (part, piece) if side == 0 else (piece, part)
            term = lax.dot_general_p.bind(*args, **params)
            total = term if total is None else lax.add(total, term)
            start = stop
    return total
