"""Running a forward-Laplacian pass: at once, in chunks of directions, in windows.

Every public function evaluates its directions here, in one of three ways:

- one pass with all `n` directions (`lap_flat`);
- chunks: the function is linearised once (`lap_partial_flat`) and a `lax.scan` runs
  the linear tangent map on `chunk` directions at a time (`lap_flat_chunked`,
  `lap_flat_rows` for directions made from seed rows chunk by chunk);
- windows, in the block-sparse mode: one sparse pass whose dense jacobians hold the
  directions of a window of particle blocks at a time (`lap_flat_windowed`).

The `"auto"` policy picks among them. A dense pass carries every intermediate value
with all `n` directions. Once those jacobians outgrow the CPU caches, the pass is
bound by memory traffic, and chunks run faster, because each chunk's jacobians stay
in cache. When they fit, the loop only costs (smaller matmuls, a sequential loop), so
`"auto"` chunks only past a working-set threshold, and sizes the chunks so that each
carries about `AUTO_CHUNK_BYTES` of jacobians. Both were calibrated with
`benchmarks/` on a 2-core CPU (batches of 16 configurations):

- chunks made the FermiNet- and Psiformer-shaped models 0.5-0.7x faster from about
  9 MiB of jacobians per configuration, and made the MLPs (under 4 MiB) 1.1-1.6x
  slower;
- the best chunk carried 8-10 MiB: 8 directions for FermiNet at N = 32 (1.2 MiB per
  direction; 16 were 1.2x slower), 16 for Psiformer at N = 32 (0.49 MiB; 24 were
  1.1x slower), 24 for FermiNet at N = 16 (0.36 MiB; 16 were 1.2x slower).
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _jax, registry, sparse
from .platform import targets_cpu
from .sparse import SparseSpec, WindowUnsupported, logger, muted, seed_blocks
from .transform import lap_flat, lap_partial_flat
from .zeros import Zero, is_zero, zero_jacobian, zero_laplacian

Triple = tuple[list[Any], list[Any], list[Any]]

ChunkSize = int | Literal["auto"] | None
"""How to evaluate the directions: a chunk size, `"auto"` or None (one pass)."""

AUTO = "auto"

AUTO_CHUNK = 16
"""The fewest directions `"auto"` splits into chunks is twice this."""

AUTO_CHUNK_BYTES = 9 * 2**20
"""Estimated jacobian bytes per chunk that `"auto"` aims for."""

AUTO_CHUNK_RANGE = (8, 32)
"""The fewest and the most directions per chunk under `"auto"`."""

AUTO_MIN_BYTES = 6 * 2**20
"""Estimated jacobian bytes per call past which `"auto"` evaluates in chunks."""

AUTO_LOOP_MIN_BYTES = 9 * 2**20
"""`AUTO_MIN_BYTES` for a sparse pass whose loops carry dense jacobians: each window
runs those loops again, so windows pay later (measured on a `lax.scan` over layers)."""

AUTO_WINDOW_ROWS = 24
"""Directions per window of a sparse pass under `"auto"` (8 particles of 3)."""


# --- the entry points ----------------------------------------------------------------


def lap_evaluate(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    chunk_size: ChunkSize,
    sparsity: SparseSpec | None = None,
    blocks: bool = True,
) -> Triple:
    """`lap_flat`, its directions evaluated as `chunk_size` says.

    **Arguments:**

    - `fun`, `primals`, `jacobians`, `laplacians`, `n`: as for `lap_flat`.
    - `chunk_size`: an int, `"auto"` or None (one pass). In the dense mode it is the
        chunk size; in the sparse mode it bounds the dense jacobians to windows of
        whole particle blocks (the block-sparse ones are computed once).
    - `sparsity`: the block-sparse mode, or None.
    - `blocks`: without `sparsity`, whether unit-vector seeds keep their particle
        blocks until values mix more than two of them (`sparse.seed_blocks`);
        not with an int `chunk_size`, which asks for dense chunks of directions.

    **Returns:**

    What `lap_flat` returns: outputs, their jacobians (`n` rows) and laplacians,
    tangents possibly symbolic zeros. Results agree with one pass up to
    floating-point reordering.
    """
    if sparsity is None and blocks and chunk_size in (None, AUTO):
        sparsity = seed_blocks(jacobians, n)
    if sparsity is not None and n > 0:
        args = (primals, jacobians, laplacians)
        return _lap_flat_sparse(fun, *args, n, sparsity, chunk_size)
    chunk = chunk_size_for(chunk_size, fun, primals, n)
    if chunk is None:
        return lap_flat(fun, primals, jacobians, laplacians, n)
    return lap_flat_chunked(fun, primals, jacobians, laplacians, n, chunk)


linearize = lap_partial_flat
"""The primal outputs now and the tangent map for later: `lap_partial`'s door to
`transform.lap_partial_flat`, which returns the outputs and a `Partial` mapping
`(jacobians, laplacians)` of `n` directions to the outputs' ones."""


class RowGroup(NamedTuple):
    """`num` directions made from seed rows, a chunk at a time.

    `chunk(start, size)` returns the flat jacobians of rows `start .. start + size`
    (zero past `num`); the group's second-order terms are summed with `sign`.
    """

    num: int
    sign: float
    chunk: Callable[[Any, int], list[Any]]


def lap_flat_rows(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    groups: Sequence[RowGroup],
    chunk_size: ChunkSize,
    keep_jacobians: bool,
) -> tuple[list[Any], list[Any], list[Any] | None]:
    """The signed sum of the groups' laplacians, in one pass or in chunks.

    The input laplacians are zero. One group that fits a chunk is one pass; otherwise
    `fun` is linearised once, with the chunk size of the largest group, and each group
    runs its chunks in a `lax.scan`.

    **Arguments:**

    - `fun`, `primals`: as for `lap_flat`.
    - `groups`: the directions, by group.
    - `chunk_size`: as for `lap_evaluate` (dense mode).
    - `keep_jacobians`: whether to return the jacobians (for a single group).

    **Returns:**

    `(outs, laplacians, jacobians)`: the outputs, `sum_g sign_g` of the groups'
    laplacians, and the last group's output jacobians (`num` rows) or None.
    """
    most = max(g.num for g in groups)
    size = chunk_size_for(chunk_size, fun, primals, most) or most
    zero_laps = [zero_laplacian(p) for p in primals]
    if len(groups) == 1 and groups[0].num == size:
        group = groups[0]
        outs, jacs, laps = lap_flat(fun, primals, group.chunk(0, size), zero_laps, size)
        return outs, _signed(laps, group.sign), jacs if keep_jacobians else None
    examples = [_jacobian_struct(p, size) for p in primals]
    outs, tangent_map = lap_partial_flat(fun, primals, examples, zero_laps, size)
    total: list[Any] | None = None
    jacobians = None
    for group in groups:
        jacs, laps = _map_chunks(
            tangent_map,
            outs,
            primals,
            group.chunk,
            zero_laps,
            group.num,
            size,
            keep_jacobians,
        )
        laps = _signed(laps, group.sign)
        total = laps if total is None else _add(total, laps)
        jacobians = jacs
    return outs, cast(list[Any], total), jacobians


# --- the "auto" policy ---------------------------------------------------------------


def chunk_size_for(
    chunk_size: ChunkSize,
    fun: Callable[..., Any],
    primals: Sequence[Any],
    n: int,
) -> int | None:
    """The chunk size to evaluate `n` directions with, or None for one pass.

    `"auto"` chunks on the CPU when there are at least `2 * AUTO_CHUNK` directions and
    the jacobians would exceed `AUTO_MIN_BYTES`, in chunks of about `AUTO_CHUNK_BYTES`
    each (`auto_chunk`); otherwise, and on accelerators (where one wide pass keeps
    the device busy), it makes one pass.

    **Arguments:**

    - `chunk_size`: an int, `"auto"` or None.
    - `fun`, `primals`: the function and its positional arguments (pytrees of arrays),
        traced once more under `"auto"` to size its intermediates.
    - `n`: the number of directions.

    **Returns:**

    An int below `n`, or None.
    """
    if chunk_size is None:
        return None
    if chunk_size != AUTO:
        return None if chunk_size >= n else int(chunk_size)
    if n < 2 * AUTO_CHUNK or not targets_cpu():
        return None
    nbytes = jacobian_bytes(fun, primals, n)
    if nbytes < AUTO_MIN_BYTES:
        return None
    chunk = auto_chunk(n, nbytes)
    return None if chunk >= n else chunk


def balanced_chunk(n: int, target: int = AUTO_CHUNK) -> int:
    """Chunk size near `target` that splits `n` directions with little padding."""
    chunks = -(-n // target)
    return -(-n // chunks)


def auto_chunk(n: int, nbytes: int) -> int:
    """Directions per chunk for `n` directions whose jacobians take `nbytes`.

    About `AUTO_CHUNK_BYTES` per chunk, within `AUTO_CHUNK_RANGE`, balanced over `n`.
    """
    low, high = AUTO_CHUNK_RANGE
    target = AUTO_CHUNK_BYTES * n // max(nbytes, 1)
    return balanced_chunk(n, int(min(max(target, low), high)))


def jacobian_bytes(fun: Callable[..., Any], primals: Sequence[Any], n: int) -> int:
    """Estimated bytes of the dense jacobians of one pass: `n` times the primal's.

    `primals` holds `fun`'s positional arguments (pytrees of arrays). `fun` is traced
    once more, to a jaxpr, for the sizes of its intermediates. Should that fail (it
    may use something only the forward-Laplacian trace accepts), the estimate is 0
    and the pass is not split.
    """
    jaxpr = _trace(fun, primals)
    return 0 if jaxpr is None else n * _intermediate_bytes(jaxpr)


def window_rows(
    chunk_size: ChunkSize,
    fun: Callable[..., Sequence[Any]],
    args: tuple[Sequence[Any], Sequence[Any], Sequence[Any]],
    n: int,
    spec: SparseSpec,
) -> int | None:
    """Directions per window of a sparse pass, or None for one window.

    An int is rounded down to whole particle blocks (at least one), so that each
    particle's coordinates share a window. `"auto"` traces the single pass once
    (quietly: its densifications are reported by the real pass) to size its dense
    jacobians.
    """
    if chunk_size is None:
        return None
    block = spec.resolve(n).block_size
    if chunk_size != AUTO:
        rows = max(block, chunk_size // block * block)
        return None if rows >= n else rows
    if n < 2 * AUTO_WINDOW_ROWS or not targets_cpu():
        return None
    primals, jacobians, laplacians = args

    def single_pass(*ps: Any) -> Any:
        return lap_flat(fun, list(ps), jacobians, laplacians, n, spec)[1]

    with muted():
        dense, loops = sparse_pass_bytes(single_pass, primals, n)
    return auto_window_rows(dense, n, block, loops)


def auto_window_rows(
    dense: int, dim: int, block: int, loops: bool = False
) -> int | None:
    """Directions per window of a sparse pass under `"auto"`, or None for one window.

    The block-sparse jacobians are evaluated once whatever the window; windows only
    bound the dense ones (those of values that depend on most particles). They pay
    once those are large (larger with `loops` that carry dense jacobians, which every
    window runs again), and are balanced around `AUTO_WINDOW_ROWS` directions of
    whole particle blocks of `block` directions.
    """
    if dim < 2 * AUTO_WINDOW_ROWS or not targets_cpu():
        return None
    if dense < (AUTO_LOOP_MIN_BYTES if loops else AUTO_MIN_BYTES):
        return None
    particles = dim // block
    windows = -(-dim // AUTO_WINDOW_ROWS)
    return -(-particles // windows) * block


def sparse_pass_bytes(
    pass_fun: Callable[..., Any], primals: Sequence[Any], n: int
) -> tuple[int, bool]:
    """Bytes of the dense jacobians of a traced sparse pass (0 if tracing fails), and
    whether its loops carry dense jacobians."""
    jaxpr = _trace(pass_fun, primals)
    if jaxpr is None:
        return 0, False
    return _intermediate_bytes(jaxpr, rows=n), loops_carry_dense(jaxpr, n)


def loops_carry_dense(jaxpr: Any, rows: int) -> bool:
    """Whether a loop of the jaxpr (at any depth) returns values of `rows` rows."""
    for eqn in jaxpr.eqns:
        if eqn.primitive in (_jax.scan_p, _jax.while_p) and any(
            getattr(v.aval, "shape", ())[:1] == (rows,) for v in eqn.outvars
        ):
            return True
    return any(loops_carry_dense(sub, rows) for sub in _jax.subjaxprs(jaxpr))


def _intermediate_bytes(jaxpr: Any, rows: int | None = None) -> int:
    """Bytes of the values a jaxpr computes, nested jaxprs included (loops once).

    With `rows`, only values whose leading axis has that length count: in a
    forward-Laplacian jaxpr with `n` directions, the dense jacobians.
    """
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            shape = getattr(aval, "shape", None)
            dtype = getattr(aval, "dtype", None)
            if shape is None or dtype is None:
                continue
            if rows is not None and (not shape or shape[0] != rows):
                continue
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    for sub in _jax.subjaxprs(jaxpr):
        total += _intermediate_bytes(sub, rows)
    return total


def _trace(fun: Callable[..., Any], primals: Sequence[Any]) -> Any:
    """`fun`'s jaxpr for arguments shaped like `primals`, or None if tracing fails."""
    specs: list[Any] = jax.tree_util.tree_map(_shape_struct, list(primals))
    try:
        make_jaxpr: Any = jax.make_jaxpr  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return make_jaxpr(fun)(*specs).jaxpr
    except Exception:  # noqa: BLE001 - a heuristic's probe must never break the call
        return None


def _shape_struct(p: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p))


def _jacobian_struct(primal: Any, rows: int) -> jax.ShapeDtypeStruct:
    """The shape of a jacobian of `rows` directions (an example: no values needed)."""
    return jax.ShapeDtypeStruct((rows, *jnp.shape(primal)), jnp.result_type(primal))


# --- chunks of directions ------------------------------------------------------------


def lap_flat_chunked(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    size: int,
) -> Triple:
    """`lap_flat` evaluated `size` directions at a time.

    `fun` is linearised once (`lap_partial_flat`) and the chunks run in one
    `lax.scan` over the linear tangent map, so the compiled program holds the primal
    once and the tangent computation once. The input laplacians go with the first
    chunk only; the last chunk is padded with zero directions.
    """
    chunks = -(-n // size)
    live = [_is_live(p, j) for p, j in zip(primals, jacobians, strict=True)]
    padded = [
        _pad_rows(j, chunks * size) if keep else j
        for j, keep in zip(jacobians, live, strict=True)
    ]

    def chunk_jacobians(start: Any, size: int = size) -> list[Any]:
        return [
            _rows(j, start, size) if keep else j
            for j, keep in zip(padded, live, strict=True)
        ]

    examples = chunk_jacobians(0)
    outs, tangent_map = lap_partial_flat(fun, primals, examples, laplacians, size)
    jacs, laps = _map_chunks(
        tangent_map, outs, primals, chunk_jacobians, laplacians, n, size, True
    )
    return outs, cast(list[Any], jacs), laps


def _map_chunks(
    tangent_map: Callable[..., Any],
    outs: Sequence[Any],
    primals: Sequence[Any],
    chunk_jacobians: Callable[[Any, int], list[Any]],
    laplacians: Sequence[Any],
    n: int,
    size: int,
    keep_jacobians: bool,
) -> tuple[list[Any] | None, list[Any]]:
    """The outputs' jacobians (`n` rows, or None) and laplacians, chunk by chunk.

    The input laplacians go with the first chunk, zeros with the others. Tangents that
    are symbolic zeros stay out of the scan and come back as symbolic zeros.
    """
    chunks = -(-n // size)
    lap_live = [_is_live(p, lp) for p, lp in zip(primals, laplacians, strict=True)]
    first_chunk_laps = [
        jnp.concatenate([lp[None], jnp.zeros((chunks - 1, *lp.shape), lp.dtype)])
        for lp, keep in zip(laplacians, lap_live, strict=True)
        if keep
    ]
    masks: dict[str, list[bool]] = {}

    def one_chunk(xs: tuple[Any, list[Any]]) -> tuple[list[Any], list[Any]]:
        start, chunk_laps = xs
        given = iter(chunk_laps)
        laps = [
            next(given) if keep else lp
            for lp, keep in zip(laplacians, lap_live, strict=True)
        ]
        jacs_out, laps_out = tangent_map(chunk_jacobians(start, size), laps)
        masks["jac"] = [keep_jacobians and not is_zero(j) for j in jacs_out]
        masks["lap"] = [not is_zero(lp) for lp in laps_out]
        return _pick(jacs_out, masks["jac"]), _pick(laps_out, masks["lap"])

    starts = jnp.arange(chunks) * size
    jac_chunks, lap_chunks = stacked_map(one_chunk, (starts, first_chunk_laps))
    jac_iter, lap_iter = iter(jac_chunks), iter(lap_chunks)
    jacs = [
        join_rows(next(jac_iter), n) if live else zero_jacobian(out, n)
        for out, live in zip(outs, masks["jac"], strict=True)
    ]
    laps = [
        sum_chunks(next(lap_iter)) if live else zero_laplacian(out)
        for out, live in zip(outs, masks["lap"], strict=True)
    ]
    return (jacs if keep_jacobians else None), laps


def stacked_map(body: Callable[[Any], Any], xs: Any) -> Any:
    """`body` over the leading axis of `xs`, its outputs stacked: one `lax.scan`.

    The scan has no carry: stacked outputs need no initial value, whose types would
    have to match the body's exactly (shardings included, under explicitly sharded
    meshes); sums over chunks or windows are taken after it.
    """

    def step(carry: None, x: Any) -> tuple[None, Any]:
        return carry, body(x)

    return lax.scan(step, None, xs)[1]


def join_rows(stacked: Any, n: int) -> Any:
    """`(chunks, rows, *S)` jacobians of chunks or windows as one `(n, *S)`."""
    return stacked.reshape(-1, *stacked.shape[2:])[:n]


def sum_chunks(stacked: Any) -> Any:
    """A laplacian: the sum of its chunks' (or windows') parts."""
    return jnp.sum(stacked, axis=0)


def _is_live(primal: Any, tangent: Any) -> bool:
    """Whether a tangent is an array to slice or pass on (not zero, not float0)."""
    return not is_zero(tangent) and jnp.issubdtype(jnp.result_type(primal), jnp.inexact)


def _rows(jac: Any, start: Any, size: int) -> Any:
    return lax.dynamic_slice_in_dim(jac, start, size, axis=0)


def _pad_rows(jac: Any, rows: int) -> Any:
    extra = rows - jac.shape[0]
    if extra == 0:
        return jac
    return jnp.concatenate([jac, jnp.zeros((extra, *jac.shape[1:]), jac.dtype)])


def _pick(values: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    return [v for v, keep in zip(values, mask, strict=True) if keep]


def _signed(laps: list[Any], sign: float) -> list[Any]:
    """`laps`, negated for a negative `sign` (symbolic zeros stay)."""
    if sign > 0:
        return laps
    return [lp if is_zero(lp) else -lp for lp in laps]


def _add(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Two lists of laplacians added (a symbolic zero adds nothing)."""
    return [
        x if is_zero(y) else y if is_zero(x) else x + y
        for x, y in zip(a, b, strict=True)
    ]


# --- sparse windows ------------------------------------------------------------------


def _lap_flat_sparse(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    spec: SparseSpec,
    chunk_size: ChunkSize,
) -> Triple:
    """The sparse `lap_flat`, its dense jacobians in windows as `chunk_size` says.

    Where a pass cannot be windowed (an input jacobian that is not block-sparse), it
    is made whole; the result is the same.
    """
    args = (primals, jacobians, laplacians)
    rows = window_rows(chunk_size, fun, args, n, spec)
    if rows is not None:
        blocks_per_window = rows // spec.resolve(n).block_size
        try:
            return lap_flat_windowed(fun, *args, n, spec, blocks_per_window)
        except WindowUnsupported as why:
            logger.debug("fwdlap sparse mode: one pass, not windows: %s", why)
    return lap_flat(fun, *args, n, spec)


def lap_flat_windowed(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    sparsity: SparseSpec,
    blocks_per_window: int,
) -> Triple:
    """The sparse `lap_flat`, its dense jacobians a window of particle blocks at a time.

    In a many-particle function the block-sparse jacobians of the first layers are
    small, but once a value depends on most particles its jacobian is dense, with all
    `n` directions, and past the CPU caches those dense values bound the run time.
    Here one sparse pass is traced with the dense rows limited to a window of
    `blocks_per_window` particle blocks whose start is a traced integer
    (`sparse.Window`). Partial evaluation with that start unknown splits the pass in
    two: everything that does not depend on the window (the primal, the block-sparse
    jacobians and their laplacians) runs once, and the dense part runs in a
    `lax.scan` over the windows.

    **Returns:**

    What `lap_flat(..., sparsity)` does, with dense output jacobians of `n` rows.

    **Raises:**

    `sparse.WindowUnsupported` where the pass cannot be windowed (an input jacobian
    that is not block-sparse, an output jacobian that does not depend on the
    window); the caller then makes one pass.
    """
    ctx = sparsity.resolve(n)
    windows = -(-ctx.num_blocks // blocks_per_window)
    if windows <= 1:
        return lap_flat(fun, primals, jacobians, laplacians, n, sparsity)
    num_in = len(primals)
    store: dict[str, Any] = {}

    def one_window(*args: Any) -> list[Any]:
        window = sparse.Window(args[num_in], blocks_per_window)
        outs, jacs, laps = lap_flat(
            fun, list(args[:num_in]), jacobians, laplacians, n, sparsity, window
        )
        store["outs"] = len(outs)
        store["jac_avals"] = [j.aval if is_zero(j) else None for j in jacs]
        store["lap_avals"] = [lp.aval if is_zero(lp) else None for lp in laps]
        live_jacs = [j for j in jacs if not is_zero(j)]
        live_laps = [lp for lp in laps if not is_zero(lp)]
        return [*outs, *live_jacs, *live_laps]

    pvals = [_jax.PartialVal.known(p) for p in primals]
    pvals.append(_jax.PartialVal.unknown(_jax.ShapedArray((), jnp.int32)))
    dbg = _jax.make_debug_info("lap_windowed", fun, tuple(primals), {})
    traced = _jax.wrap_init(one_window, debug_info=dbg.with_unknown_names())
    with sparse.held_reports(), registry.linearizing():
        jaxpr, out_pvals, consts = _jax.trace_to_jaxpr_nounits(
            traced, pvals, instantiate=False
        )
    num_out = store["outs"]
    outs = [_known_primal(pv) for pv in out_pvals[:num_out]]
    num_jacs = sum(aval is None for aval in store["jac_avals"])
    jac_pvals = out_pvals[num_out : num_out + num_jacs]
    lap_pvals = out_pvals[num_out + num_jacs :]
    if any(pv.is_known() for pv in jac_pvals):
        # Dense rows that do not depend on the window cannot be every window's rows.
        raise sparse.WindowUnsupported("an output jacobian does not depend on it")
    # A laplacian that does not depend on the window is counted once, not per window.
    scanned = [*jac_pvals, *[pv for pv in lap_pvals if not pv.is_known()]]

    def window_part(start: Any) -> list[Any]:
        return list(_jax.eval_jaxpr(jaxpr, consts, start))

    starts = jnp.arange(windows, dtype=jnp.int32) * blocks_per_window
    stacked: list[Any] = stacked_map(window_part, starts) if scanned else []
    it = iter(stacked)
    jacs = [
        join_rows(next(it), n) if aval is None else zero_jacobian(o, n)
        for o, aval in zip(outs, store["jac_avals"], strict=True)
    ]
    lap_it = iter(lap_pvals)
    laps = [
        _window_sum(next(lap_it), it) if aval is None else Zero(aval)
        for aval in store["lap_avals"]
    ]
    return outs, jacs, laps


def _window_sum(pval: Any, scanned: Any) -> Any:
    """A laplacian: the sum of its windows' parts, or the known whole."""
    if pval.is_known():
        return pval.get_known()
    return sum_chunks(next(scanned))


def _known_primal(pval: Any) -> Any:
    if not pval.is_known():
        raise RuntimeError("fwdlap sparse mode: a primal output depends on a window.")
    return pval.get_known()
