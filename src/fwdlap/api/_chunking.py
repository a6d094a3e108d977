"""Evaluating the tangent directions in blocks, and deciding when that pays.

A dense pass carries every intermediate value with all `n` directions. Once those
jacobians outgrow the CPU caches, the pass is bound by memory traffic, and pushing
the directions through in blocks (one primal evaluation, a loop over the linearised
tangent map) runs faster, because each block's jacobians stay in cache. When they
fit, the loop only costs (smaller matmuls, a sequential loop), so the `"auto"` policy
chunks only past a working-set threshold, and sizes the blocks so that each carries
about `AUTO_BLOCK_BYTES` of jacobians. Both were calibrated with `benchmarks/` on a
2-core CPU (batches of 16 configurations):

- blocks made the FermiNet- and Psiformer-shaped models 0.5-0.7x faster from about
  9 MiB of jacobians per configuration, and made the MLPs (under 4 MiB) 1.1-1.6x
  slower;
- the best block carried 8-10 MiB: 8 directions for FermiNet at N = 32 (1.2 MiB per
  direction; 16 were 1.2x slower), 16 for Psiformer at N = 32 (0.49 MiB; 24 were
  1.1x slower), 24 for FermiNet at N = 16 (0.36 MiB; 16 were 1.2x slower).
"""

import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal, SupportsIndex, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._core import _jax, lap_flat, lap_partial_flat
from .._core.sparse import SparseSpec, WindowUnsupported, logger, muted
from .._core.windowed import lap_flat_windowed
from .._core.zeros import is_zero, zero_jacobian, zero_laplacian

ChunkSize = int | Literal["auto"] | None
"""`chunk_size` once checked: a Python int, "auto" or None."""

ChunkSizeArg = SupportsIndex | Literal["auto"] | None
"""`chunk_size` as the public functions accept it: any integer type (anything
`operator.index` accepts, such as `np.int64`), "auto" or None."""

AUTO = "auto"
AUTO_BLOCK = 16
"""The fewest directions `"auto"` splits into blocks is twice this."""

AUTO_BLOCK_BYTES = 9 * 2**20
"""Estimated jacobian bytes per block that `"auto"` aims for."""

AUTO_BLOCK_RANGE = (8, 32)
"""The fewest and the most directions per block under `"auto"`."""

AUTO_MIN_BYTES = 6 * 2**20
"""Estimated jacobian bytes per call past which `"auto"` evaluates in blocks."""

AUTO_LOOP_MIN_BYTES = 9 * 2**20
"""`AUTO_MIN_BYTES` for a sparse pass whose loops carry dense jacobians: each window
runs those loops again, so windows pay later (measured on a `lax.scan` over layers)."""

SPARSE_AUTO_ROWS = 24
"""Directions per window of a sparse pass under `"auto"` (8 particles of 3)."""


def as_positive_int(value: Any) -> int | None:
    """`value` as a Python int if it is a positive integer, else None.

    Anything `operator.index` accepts counts (`np.int64(2)`, a concrete JAX integer
    scalar), except booleans.
    """
    if isinstance(value, bool | np.bool_):
        return None
    try:
        number = operator.index(value)
    except TypeError:  # also JAX's error for a traced integer
        return None
    return number if number >= 1 else None


def check_chunk_size(api: str, chunk_size: Any) -> ChunkSize:
    """`chunk_size` after checking it is a positive integer, "auto" or None.

    An integer of another type (a NumPy or concrete JAX integer scalar) comes back as a
    Python int.
    """
    if chunk_size is None or (isinstance(chunk_size, str) and chunk_size == AUTO):
        return chunk_size
    number = as_positive_int(chunk_size)
    if number is None:
        raise ValueError(
            f'{api}: `chunk_size` must be a positive int, "auto" or None, got '
            f"{chunk_size!r}. Any integer type works (a Python int, np.int64, a "
            "concrete JAX integer scalar), but not a traced value: the block size "
            "fixes the shapes of the compiled program."
        )
    return number


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
    specs: list[Any] = jax.tree_util.tree_map(_spec, list(primals))
    try:
        trace_fn: Any = jax.make_jaxpr  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return trace_fn(fun)(*specs).jaxpr
    except Exception:  # noqa: BLE001 - a heuristic's probe must never break the call
        return None


def jacobian_bytes(fun: Callable[..., Any], primals: Sequence[Any], n: int) -> int:
    """Estimated bytes of the dense jacobians of one pass: `n` times the primal's.

    `primals` holds `fun`'s positional arguments (pytrees of arrays). `fun` is traced
    once more, to a jaxpr, for the sizes of its intermediates. Should that fail (it
    may use something only the forward-Laplacian trace accepts), the estimate is 0
    and the pass is not split.
    """
    jaxpr = _trace(fun, primals)
    return 0 if jaxpr is None else n * _intermediate_bytes(jaxpr)


def _loops_carry_dense(jaxpr: Any, rows: int) -> bool:
    """Whether a loop of the jaxpr (at any depth) returns values of `rows` rows."""
    for eqn in jaxpr.eqns:
        if eqn.primitive in (_jax.scan_p, _jax.while_p) and any(
            getattr(v.aval, "shape", ())[:1] == (rows,) for v in eqn.outvars
        ):
            return True
    return any(_loops_carry_dense(sub, rows) for sub in _jax.subjaxprs(jaxpr))


def sparse_pass_bytes(
    pass_fun: Callable[..., Any], primals: Sequence[Any], n: int
) -> tuple[int, bool]:
    """Bytes of the dense jacobians of a traced sparse pass (0 if tracing fails), and
    whether its loops carry dense jacobians."""
    jaxpr = _trace(pass_fun, primals)
    if jaxpr is None:
        return 0, False
    return _intermediate_bytes(jaxpr, rows=n), _loops_carry_dense(jaxpr, n)


def sparse_auto_rows(
    dense: int, dim: int, block: int, loops: bool = False
) -> int | None:
    """Directions per window of a sparse pass under `"auto"`, or None for one window.

    The block-sparse jacobians are evaluated once whatever the window; windows only
    bound the dense ones (those of values that depend on most particles). They pay
    once those are large (larger with `loops` that carry dense jacobians, which every
    window runs again), and are balanced around `SPARSE_AUTO_ROWS` directions of
    whole particles.
    """
    if dim < 2 * SPARSE_AUTO_ROWS or jax.default_backend() != "cpu":
        return None
    if dense < (AUTO_LOOP_MIN_BYTES if loops else AUTO_MIN_BYTES):
        return None
    particles = dim // block
    windows = -(-dim // SPARSE_AUTO_ROWS)
    return -(-particles // windows) * block


def sparse_rows(
    chunk_size: ChunkSize,
    fun: Callable[..., Sequence[Any]],
    args: tuple[Sequence[Any], Sequence[Any], Sequence[Any]],
    n: int,
    spec: SparseSpec,
) -> int | None:
    """Directions per window of a sparse pass, or None for one window.

    An int is rounded down to whole blocks (at least one), so that each particle's
    coordinates share a window. `"auto"` traces the single pass once (quietly: its
    densifications are reported by the real pass) to size its dense jacobians.
    """
    if chunk_size is None:
        return None
    block = spec.resolve(n).block_size
    if chunk_size != AUTO:
        rows = max(block, chunk_size // block * block)
        return None if rows >= n else rows
    if n < 2 * SPARSE_AUTO_ROWS or jax.default_backend() != "cpu":
        return None
    primals, jacobians, laplacians = args

    def single_pass(*ps: Any) -> Any:
        return lap_flat(fun, list(ps), jacobians, laplacians, n, spec)[1]

    with muted():
        dense, loops = sparse_pass_bytes(single_pass, primals, n)
    return sparse_auto_rows(dense, n, block, loops)


def lap_flat_sparse(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    spec: SparseSpec,
    chunk_size: ChunkSize,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The sparse `lap_flat`, its dense jacobians in windows as `chunk_size` says.

    Where a pass cannot be windowed (an input jacobian that is not block-sparse), it
    is made whole; the result is the same.
    """
    args = (primals, jacobians, laplacians)
    rows = sparse_rows(chunk_size, fun, args, n, spec)
    if rows is not None:
        blocks = rows // spec.resolve(n).block_size
        try:
            return lap_flat_windowed(fun, *args, n, spec, blocks)
        except WindowUnsupported as why:
            logger.debug("fwdlap sparse mode: one pass, not windows: %s", why)
    return lap_flat(fun, *args, n, spec)


def _spec(p: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p))


def balanced_block(n: int, target: int = AUTO_BLOCK) -> int:
    """Block size near `target` that splits `n` directions with little padding."""
    blocks = -(-n // target)
    return -(-n // blocks)


def auto_block(n: int, nbytes: int) -> int:
    """Directions per block for `n` directions whose jacobians take `nbytes`.

    About `AUTO_BLOCK_BYTES` per block, within `AUTO_BLOCK_RANGE`, balanced over `n`.
    """
    low, high = AUTO_BLOCK_RANGE
    target = AUTO_BLOCK_BYTES * n // max(nbytes, 1)
    return balanced_block(n, int(min(max(target, low), high)))


def resolve_chunk_size(
    chunk_size: ChunkSize,
    fun: Callable[..., Any],
    primals: Sequence[Any],
    n: int,
) -> int | None:
    """The block size to evaluate `n` directions with, or None for one pass.

    `"auto"` splits on the CPU backend when there are at least `2 * AUTO_BLOCK`
    directions and the jacobians would exceed `AUTO_MIN_BYTES`, into blocks of about
    `AUTO_BLOCK_BYTES` each (`auto_block`); otherwise, and on accelerators (where
    one wide pass keeps the device busy), it makes one pass.
    """
    if chunk_size is None:
        return None
    if chunk_size != AUTO:
        return None if chunk_size >= n else int(chunk_size)
    if n < 2 * AUTO_BLOCK or jax.default_backend() != "cpu":
        return None
    nbytes = jacobian_bytes(fun, primals, n)
    if nbytes < AUTO_MIN_BYTES:
        return None
    block = auto_block(n, nbytes)
    return None if block >= n else block


def lap_flat_blocked(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    chunk_size: ChunkSize,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The dense `lap_flat`, in one pass or in blocks as `chunk_size` resolves."""
    block = resolve_chunk_size(chunk_size, fun, primals, n)
    if block is None:
        return lap_flat(fun, primals, jacobians, laplacians, n)
    return lap_flat_chunked(fun, primals, jacobians, laplacians, n, block)


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


def lap_flat_chunked(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    size: int,
) -> tuple[list[Any], list[Any], list[Any]]:
    """`lap_flat` evaluated `size` directions at a time.

    `fun` is linearised once (`lap_partial_flat`) and the blocks run in one
    `lax.scan` over the linear tangent map, so the compiled program holds the primal
    once and the tangent computation once. The scan has no carry (its stacked outputs
    need no initial value, whose types would have to match exactly under sharding):
    the blocks' laplacians are summed after it. The input laplacians go with the first
    block only; the last block is padded with zero directions.
    """
    blocks = -(-n // size)
    live = [_is_live(p, j) for p, j in zip(primals, jacobians, strict=True)]
    padded = [
        _pad_rows(j, blocks * size) if keep else j
        for j, keep in zip(jacobians, live, strict=True)
    ]

    def block(start: Any) -> list[Any]:
        return [
            _rows(j, start, size) if keep else j
            for j, keep in zip(padded, live, strict=True)
        ]

    outs, pe = lap_partial_flat(fun, primals, block(0), laplacians, size)
    lap_live = [_is_live(p, lp) for p, lp in zip(primals, laplacians, strict=True)]
    # Block 0 takes the input laplacians, every other block zeros.
    stacked = [
        jnp.concatenate([lp[None], jnp.zeros((blocks - 1, *lp.shape), lp.dtype)])
        for lp, keep in zip(laplacians, lap_live, strict=True)
        if keep
    ]
    masks: dict[str, list[bool]] = {}

    def body(carry: None, xs: tuple[Any, list[Any]]) -> tuple[None, Any]:
        start, laps_in = xs
        given = iter(laps_in)
        laps = [
            next(given) if keep else lp
            for lp, keep in zip(laplacians, lap_live, strict=True)
        ]
        tangents = cast("tuple[list[Any], list[Any]]", pe(block(start), laps))
        jacs_out, laps_out = tangents
        masks["jac"] = [not is_zero(j) for j in jacs_out]
        masks["lap"] = [not is_zero(lp) for lp in laps_out]
        return carry, (_pick(jacs_out, masks["jac"]), _pick(laps_out, masks["lap"]))

    starts = jnp.arange(blocks) * size
    _, (jac_blocks, lap_blocks) = lax.scan(body, None, (starts, stacked))
    jac_iter, lap_iter = iter(jac_blocks), iter(lap_blocks)
    jacs = [
        next(jac_iter).reshape(-1, *jnp.shape(out))[:n] if nz else zero_jacobian(out, n)
        for out, nz in zip(outs, masks["jac"], strict=True)
    ]
    laps = [
        jnp.sum(next(lap_iter), axis=0) if nz else zero_laplacian(out)
        for out, nz in zip(outs, masks["lap"], strict=True)
    ]
    return outs, jacs, laps


def _pick(values: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    return [v for v, keep in zip(values, mask, strict=True) if keep]
