"""Block-sparse jacobians: the representation and its static index algebra.

The `n` tangent directions are grouped into `num_blocks` blocks of `block_size`
consecutive directions (the 3 coordinates of one particle, say). A `SparseJac` of a
value of shape `S` stores, for every element, only the blocks that element can depend
on:

- `idx`: a NumPy int array `(k, *S)`, known while tracing. `idx[t, s]` is the block
  held in slot `t` of element `s`, or -1 for an empty slot. The blocks of one element
  are distinct.
- `data`: a JAX array `(k * block_size, *S)`. Row `t * block_size + c` holds, for each
  element, the derivative along direction `c` of the block in slot `t` (zero for an
  empty slot).

So the dense jacobian is `J[idx[t, s] * block_size + c, s] = data[t * block_size + c,
s]`, summed over slots. Because the slots of one element name distinct blocks, a
second-order sum over directions, `sum_k J_k(s)^2`, is the same sum over the rows of
`data`: that is why dense rules run unchanged on `data` once every operand's slots
are *aligned* (slot `t` of element `s` names the same block in every operand).

Everything about `idx` is computed with NumPy at trace time; compiled programs only
see `data` and a few constant masks.
"""

import contextlib
import contextvars
import dataclasses
import logging
import pathlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _jax, constants, platform
from .zeros import is_zero as _is_zero

logger = logging.getLogger("fwdlap.sparse")

_FWDLAP_DIR = str(pathlib.Path(__file__).resolve().parents[1])


def user_source_line() -> str:
    """`file:line (function)` of the user code that issued the current primitive."""
    try:
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(_FWDLAP_DIR) and _jax.is_user_filename(name):
                return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
    except Exception:  # noqa: BLE001 - only used in messages
        pass
    return ""


ON_DENSIFY = ("ignore", "log", "warn", "raise")


class DensificationWarning(UserWarning):
    """A block-sparse jacobian was made dense because fwdlap had no sparse rule."""


class DensificationError(RuntimeError):
    """Raised for a rule-driven densification under `on_densify="raise"`."""


@dataclasses.dataclass(frozen=True)
class Densification:
    """One place where a block-sparse jacobian became dense.

    **Attributes:**

    - `primitive`: the JAX primitive (or `custom_jvp` function) being processed.
    - `cause`: `"threshold"` when the values genuinely depend on more blocks than the
        threshold allows (a sum over particles, say), `"rule"` when fwdlap has no
        sparse rule for this case and fell back to the dense one.
    - `reason`: a sentence saying why.
    - `shape`: the shape of the value whose jacobian became dense.
    - `blocks`: the number of blocks per element it would have needed (0 if unknown).
    - `source`: the user's source line that issued the primitive, where known.
    """

    primitive: str
    cause: str
    reason: str
    shape: tuple[int, ...]
    blocks: int
    source: str

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return (
            f"{self.primitive}{where}: jacobian of shape {self.shape} made dense "
            f"({self.cause}): {self.reason}"
        )


_recorders: contextvars.ContextVar[tuple[list[Densification], ...]] = (
    contextvars.ContextVar("fwdlap_densification_recorders", default=())
)


@contextlib.contextmanager
def record_densifications() -> Iterator[list[Densification]]:
    """Collect every densification that happens while tracing inside the block."""
    events: list[Densification] = []
    token = _recorders.set((*_recorders.get(), events))
    try:
        yield events
    finally:
        _recorders.reset(token)


_muted: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fwdlap_densifications_muted", default=False
)


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Report no densification inside the block (probe traces of a loop body)."""
    token = _muted.set(True)
    try:
        yield
    finally:
        _muted.reset(token)


class WindowUnsupported(Exception):
    """Raised while tracing a windowed sparse pass that cannot be windowed.

    The caller falls back to one whole sparse pass (see `Window`).
    """


@dataclasses.dataclass(frozen=True)
class Window:
    """The blocks of directions that the dense jacobians of one windowed pass hold.

    A windowed sparse pass keeps its block-sparse jacobians whole (they do not depend
    on the window) and gives every dense jacobian only the rows of blocks `start` to
    `start + blocks`. The passes of all windows share one program: `start` is a
    traced integer, so the sparse work is done once and only the dense work repeats.

    Laplacians are split the same way: a dense value's laplacian holds the terms of
    its window's directions, a sparse value's holds all of them. Where a sparse value
    turns dense, its laplacian goes to the window with `start == 0` only
    (`SparseContext.window_laplacian`), so that summing over windows counts it once.
    """

    start: Any
    blocks: int

    def inside(self, x: Any) -> Any:
        """`x`, computed inside the loop over windows rather than before it.

        Partial evaluation computes everything that does not depend on the window
        once, before the loop, and hands it in: a broadcast of such a value (in
        `jnp.where`, say) would be handed in at its full size. Adding a zero that
        depends on the window keeps the broadcast in the loop, fused with its use.
        """
        return x + (self.start < 0).astype(jnp.result_type(x))


_held: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "fwdlap_densifications_held", default=None
)


@contextlib.contextmanager
def held_reports() -> Iterator[None]:
    """Report the block's densifications only if it finishes without an exception.

    A windowed pass that turns out impossible is traced again as one pass, which
    reports the same densifications.
    """
    held: list[Any] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
    for ctx, event in held:  # not reached when the block raised
        ctx._emit(event)  # pyright: ignore[reportPrivateUsage]


@dataclasses.dataclass(frozen=True)
class WindowedLaplacian:
    """A sparse rule's laplacian that already holds only its window's terms.

    `sparse_rules.finish` windows the laplacian of a result that turns dense, which is
    right when the rule computed it from block-sparse data (all directions). A rule
    that densifies part-way and adds terms from the window's dense rows (det's square
    of the log-det jacobian) windows the rest itself and returns this instead.
    """

    value: Any


@dataclasses.dataclass(frozen=True)
class SparseContext:
    """The sparse mode of one `lap` call, resolved against its number of directions."""

    block_size: int
    num_blocks: int
    max_blocks: int
    on_densify: str
    window: Window | None = None
    # A pass the user did not ask to be sparse (`seed_blocks`) reports nothing.
    quiet: bool = False
    # (primitive, source line) already warned about in this pass: warn once each.
    warned: set[tuple[str, str | None]] = dataclasses.field(
        default_factory=set, compare=False, hash=False, repr=False
    )

    @property
    def n(self) -> int:
        return self.block_size * self.num_blocks

    @property
    def rows(self) -> int:
        """Rows of a dense jacobian: `n`, or the window's directions."""
        if self.window is None:
            return self.n
        return self.block_size * self.window.blocks

    def densify(self, sj: "SparseJac", axes: Sequence[int] = ()) -> Any:
        """`sj` as a dense jacobian of `rows` rows, summed over value `axes`."""
        return densify(sj, self.num_blocks, axes, self.window)

    def window_laplacian(self, lap: Any) -> Any:
        """The laplacian of a value that turns dense, for this pass's window."""
        if self.window is None or _is_zero(lap):
            return lap
        first = self.window.start == 0
        return jnp.where(first, lap, jnp.zeros_like(lap))

    def densified_laplacians(
        self, jacs: Sequence[Any], laps: Sequence[Any]
    ) -> list[Any]:
        """`laps`, with those of the sparse `jacs` (being made dense) windowed."""
        return [
            self.window_laplacian(lp) if is_sparse(j) else lp
            for j, lp in zip(jacs, laps, strict=True)
        ]

    def densified(
        self, primitive: Any, cause: str, reason: str, shape: Any, blocks: int = 0
    ) -> None:
        """Report a densification: record it, log it, and warn or raise if asked."""
        if _muted.get() or self.quiet:
            return
        event = Densification(
            primitive=str(primitive),
            cause=cause,
            reason=reason,
            shape=tuple(int(d) for d in shape),
            blocks=int(blocks),
            source=user_source_line(),
        )
        held = _held.get()
        if held is not None:
            held.append((self, event))
            return
        self._emit(event)

    def _emit(self, event: Densification) -> None:
        for events in _recorders.get():
            events.append(event)
        if self.on_densify != "ignore":
            logger.debug("%s", event)
        if event.cause != "rule":
            return
        if self.on_densify == "warn":
            key = (event.primitive, event.source)
            if key in self.warned:
                return
            self.warned.add(key)
            warnings.warn(
                f"fwdlap sparse mode: {event}. The result is exact, but this part of "
                "the pass runs dense; pass on_densify='log' or 'ignore' to "
                "fwdlap.Sparsity to silence this warning.",
                DensificationWarning,
                stacklevel=2,
            )
        elif self.on_densify == "raise":
            raise DensificationError(
                f"fwdlap sparse mode (on_densify='raise'): {event}. Give the primitive "
                "a dense-compatible formulation, or pass on_densify='log' to "
                "fwdlap.Sparsity to accept the densification."
            )


class SparseJac:
    """A block-sparse jacobian: `data (k * block_size, *S)` and static `idx (k, *S)`."""

    __slots__ = ("data", "idx", "block_size")

    def __init__(self, data: Any, idx: np.ndarray, block_size: int):
        self.data = data
        self.idx = idx
        self.block_size = block_size

    @property
    def k(self) -> int:
        return int(self.idx.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.idx.shape[1:])

    def with_data(self, data: Any) -> "SparseJac":
        return SparseJac(data, self.idx, self.block_size)

    def __repr__(self) -> str:
        return (
            f"SparseJac(k={self.k}, block_size={self.block_size}, shape={self.shape})"
        )


def is_sparse(x: Any) -> bool:
    return type(x) is SparseJac


# --- the static index algebra (NumPy) ----------------------------------------


def compress(mask: np.ndarray) -> np.ndarray:
    """Shrink every axis along which `mask` is constant to size 1 (for broadcasting)."""
    for axis in range(mask.ndim):
        if mask.shape[axis] > 1:
            first = np.take(mask, [0], axis=axis)
            if np.array_equal(np.broadcast_to(first, mask.shape), mask):
                mask = first
    return mask


def _valid_first(idx: np.ndarray) -> np.ndarray:
    """Move the non-empty slots of every element to the front (stable)."""
    order = np.argsort(idx < 0, axis=0, kind="stable")
    return np.take_along_axis(idx, order, axis=0)


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per element, the blocks of `a` then those of `b` not in `a` (same shape `S`).

    Slots stay where `a` has them when `a` has no empty slot before a full one, so that
    aligning `a` to the result costs nothing in the common cases.
    """
    if a.shape == b.shape and np.array_equal(a, b):
        return a
    in_a = (b[:, None] == a[None]).any(axis=1)
    extra = np.where(in_a | (b < 0), -1, b)
    if not (extra >= 0).any():
        return a
    merged = _valid_first(np.concatenate([a, extra], axis=0))
    count = int((merged >= 0).sum(axis=0).max())
    return np.ascontiguousarray(merged[: max(count, 1)])


def union_all(idxs: Sequence[np.ndarray]) -> np.ndarray:
    out = idxs[0]
    for other in idxs[1:]:
        out = union(out, other)
    return out


def is_uniform(idx: np.ndarray, axes: Sequence[int]) -> bool:
    """Whether every slot is constant along the value axes `axes`."""
    for axis in axes:
        first = np.take(idx, [0], axis=axis + 1)
        if not np.array_equal(np.broadcast_to(first, idx.shape), idx):
            return False
    return True


def union_along(idx: np.ndarray, axes: Sequence[int], cap: int) -> np.ndarray | None:
    """Per element, the union over the value axes `axes`, broadcast back along them.

    Returns None as soon as an element would need more than `cap` blocks.
    """
    axes = sorted(set(axes))
    if not axes or is_uniform(idx, axes):
        return idx
    src = [a + 1 for a in axes]
    dst = list(range(1, 1 + len(axes)))
    moved = np.moveaxis(idx, src, dst)
    k, lead, rest = (
        moved.shape[0],
        moved.shape[1 : 1 + len(axes)],
        moved.shape[1 + len(axes) :],
    )
    flat = moved.reshape(k, int(np.prod(lead)), *rest)
    out = flat[:, 0]
    for m in range(1, flat.shape[1]):
        out = union(out, flat[:, m])
        if out.shape[0] > cap:
            return None
    out = np.broadcast_to(
        out.reshape(out.shape[0], *([1] * len(axes)), *rest),
        (out.shape[0], *lead, *rest),
    )
    return np.ascontiguousarray(np.moveaxis(out, dst, src))


def count_blocks_along(idx: np.ndarray, axes: Sequence[int], num_blocks: int) -> int:
    """The largest number of distinct blocks of any element after a sum over `axes`.

    Uses a presence table instead of building the union, so it stays cheap when the
    union is large (it only serves densification reports).
    """
    axes = sorted(set(axes))
    keep = [a for a in range(idx.ndim - 1) if a not in axes]
    moved = np.moveaxis(idx, [a + 1 for a in keep], list(range(1, 1 + len(keep))))
    groups = int(np.prod([idx.shape[a + 1] for a in keep], dtype=np.int64))
    flat = moved.reshape(idx.shape[0], groups, -1)
    present = np.zeros((groups, num_blocks + 1), bool)
    rows = np.broadcast_to(np.arange(groups)[None, :, None], flat.shape)
    present[rows.ravel(), flat.ravel() + 1] = True
    return int(present[:, 1:].sum(axis=1).max()) if groups else 0


def count_blocks(idx: np.ndarray) -> int:
    """The largest number of blocks of any element."""
    return int((idx >= 0).sum(axis=0).max()) if idx.size else 0


def pad_slots(sj: SparseJac, k: int) -> SparseJac:
    """Append empty slots up to `k`."""
    extra = k - sj.k
    if extra <= 0:
        return sj
    idx = np.concatenate([sj.idx, np.full((extra, *sj.shape), -1, sj.idx.dtype)])
    zeros = jnp.zeros((extra * sj.block_size, *sj.shape), sj.data.dtype)
    return SparseJac(jnp.concatenate([sj.data, zeros]), idx, sj.block_size)


def drop_empty_slots(sj: SparseJac) -> SparseJac:
    """Remove slots that are empty for every element (after slicing, say)."""
    keep = [t for t in range(sj.k) if (sj.idx[t] >= 0).any()]
    if len(keep) == sj.k or not keep:
        return sj
    b = sj.block_size
    rows = np.concatenate([np.arange(t * b, (t + 1) * b) for t in keep])
    if keep == list(range(len(keep))):
        data = sj.data[: len(keep) * b]
    else:
        data = jnp.take(sj.data, rows, axis=0)
    return SparseJac(data, sj.idx[keep], b)


# --- moving data between layouts ----------------------------------------------


def _slots(sj: SparseJac) -> Any:
    return sj.data.reshape(sj.k, sj.block_size, *sj.shape)


def align(sj: SparseJac, target: np.ndarray) -> Any:
    """`sj`'s data in the slots of `target`, a per-element superset of `sj.idx`."""
    if target.shape == sj.idx.shape and np.array_equal(target, sj.idx):
        return sj.data
    b, shape = sj.block_size, sj.shape
    slots = _slots(sj)
    eq = (sj.idx[None] == target[:, None]) & (target[:, None] >= 0)
    rows = []
    for tp in range(target.shape[0]):
        acc = None
        for t in range(sj.k):
            m = eq[tp, t]
            if not m.any():
                continue
            term = slots[t] if m.all() else jnp.where(compress(m)[None], slots[t], 0)
            acc = term if acc is None else acc + term  # disjoint masks: a select
        rows.append(jnp.zeros((b, *shape), sj.data.dtype) if acc is None else acc)
    return jnp.stack(rows).reshape(target.shape[0] * b, *shape)


def _one_hot(idx: np.ndarray, num_blocks: int, window: Window | None) -> Any:
    """`(blocks, *S')`: whether each element's slot holds each block (or None).

    `S'` is `S` with the axes along which `idx` is constant shrunk to 1. With a
    window the blocks are the window's, compared at run time (the window's start is
    traced); without, all `num_blocks`, as a NumPy constant, None if none occurs.
    """
    idx = compress(idx)
    ndim = idx.ndim
    if window is None:
        blocks = np.arange(num_blocks).reshape(num_blocks, *([1] * ndim))
        onehot = compress(idx[None] == blocks)
        return onehot if onehot.any() else None
    if not (idx >= 0).any():
        return None
    shape = (window.blocks, *([1] * ndim))
    blocks = window.start + jnp.arange(window.blocks, dtype=jnp.int32).reshape(shape)
    # Blocks past the last one (a padded final window) match no slot.
    return platform.on_context_mesh(jnp.asarray(idx, jnp.int32))[None] == blocks


def densify(
    sj: SparseJac,
    num_blocks: int,
    axes: Sequence[int] = (),
    window: Window | None = None,
) -> Any:
    """The dense jacobian `(num_blocks * block_size, *S)`, summed over value `axes`.

    Each slot scatters into the dense layout through a one-hot matrix of its block
    indices, as one einsum: a slot whose blocks vary along a summed axis becomes a
    matrix product (a sum over particles, say), one constant along it is summed first.
    With a `window`, only its blocks' rows are made.
    """
    b, shape = sj.block_size, sj.shape
    axes = sorted(set(axes))
    out_axes = [a for a in range(len(shape)) if a not in axes]
    letters = "abcdefghijklmnopqrstuvwx"[: len(shape)]
    slots = _slots(sj)
    out_blocks = num_blocks if window is None else window.blocks
    out_spec = "yz" + "".join(letters[a] for a in out_axes)
    out = None
    for t in range(sj.k):
        onehot = _one_hot(sj.idx[t], num_blocks, window)
        if onehot is None:
            continue
        keep = [a for a in range(len(shape)) if onehot.shape[a + 1] > 1]
        if any(a in axes for a in keep):
            # The block varies along a summed axis: a matrix product with the one-hot.
            onehot = onehot.reshape(out_blocks, *[shape[a] for a in keep])
            spec = f"z{letters},y{''.join(letters[a] for a in keep)}->{out_spec}"
            term = jnp.einsum(
                spec,
                slots[t],
                onehot.astype(sj.data.dtype),
                precision=jax.lax.Precision.HIGHEST,
            )
        else:
            # Sum first, then place: a select that XLA fuses with its consumer.
            summed = jnp.sum(slots[t], axis=tuple(a + 1 for a in axes))
            mask = onehot.reshape(
                onehot.shape[0], *[onehot.shape[a + 1] for a in out_axes]
            )
            if window is not None:
                summed = window.inside(summed)
            term = jnp.where(mask[:, None], summed[None], 0)
        out = term if out is None else out + term
    out_shape = tuple(shape[a] for a in out_axes)
    if out is None:
        return jnp.zeros((out_blocks * b, *out_shape), sj.data.dtype)
    return out.reshape(out_blocks * b, *out_shape)


def from_dense_concrete(
    jac: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(data, idx)` of a concrete dense jacobian `(n, *S)`, from its non-zeros."""
    n, shape = jac.shape[0], jac.shape[1:]
    num_blocks = n // block_size
    blocks = jac.reshape(num_blocks, block_size, *shape)
    nonzero = (blocks != 0).any(axis=1)  # (num_blocks, *S)
    k = max(1, int(nonzero.sum(axis=0).max()) if nonzero.size else 1)
    ids = np.where(nonzero, np.arange(num_blocks).reshape(-1, *([1] * len(shape))), -1)
    # Largest ids first puts -1 last; reverse to ascending order among valid slots.
    ordered = -np.sort(-ids, axis=0)[:k][::-1]
    idx = _valid_first(ordered).astype(np.int32)
    safe = np.where(idx < 0, 0, idx)
    gathered = np.take_along_axis(blocks, safe[:, None], axis=0)  # (k, b, *S)
    gathered = np.where((idx >= 0)[:, None], gathered, 0)
    return gathered.reshape(k * block_size, *shape), idx


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """What the user asked for; resolved into a `SparseContext` once `n` is known."""

    block_size: int | None = None
    threshold: int | None = None
    on_densify: str = "warn"
    quiet: bool = False

    def resolve(self, n: int, window: Window | None = None) -> SparseContext:
        block_size = self.block_size
        if block_size is None:
            block_size = 3 if n % 3 == 0 else 1
        if n % block_size:
            raise ValueError(
                f"fwdlap sparse mode: the {n} tangent directions do not split into "
                f"blocks of block_size={block_size}. Pass "
                f"fwdlap.Sparsity(block_size=b) with a b that divides {n} (3 for "
                "particle coordinates; 1 always works)."
            )
        num_blocks = n // block_size
        if self.threshold is None:
            max_blocks = max(1, num_blocks // 2)
        else:
            max_blocks = max(1, self.threshold // block_size)
        return SparseContext(
            block_size, num_blocks, max_blocks, self.on_densify, window, self.quiet
        )


PAIR_BLOCKS = 2
"""Blocks per element that `seed_blocks`'s default pass keeps sparse, given at least
twice as many blocks. With FermiNet's pair stream kept sparse, the default pass took
0.65x the time of one block at 32 electrons and 0.7-0.96x at 7-16; on the Psiformer,
whose attention mixes all electrons at once, both took the same time."""


def seed_blocks(jacobians: Sequence[Any], n: int) -> SparseSpec | None:
    """The sparse mode that keeps seeds' particle blocks until they mix, if it applies.

    The dense mode's input jacobians are often unit vectors (the identity that
    `fwdlap.laplacian` builds, or a user's `jnp.eye`): then every input element
    depends on one block of directions, and so do the values of the first layers of a
    many-particle function, until an operation mixes particles. Carrying those values
    block-sparse skips the work on their zero rows (the first layers' products at
    `num_blocks` times fewer rows). The returned spec keeps values that depend on up
    to two blocks (`PAIR_BLOCKS`: pair features such as electron-electron distances
    and the streams built on them, which hold `num_blocks**2` elements) and densifies
    at the first value that depends on more, from where the pass is the dense one. It
    reports nothing: the user asked for no sparsity. None (the plain dense pass)
    unless every non-zero input jacobian is known while tracing and depends on one
    block per element, and there are at least two blocks.
    """
    spec = SparseSpec(on_densify="ignore", quiet=True)
    block = spec.resolve(n).block_size if n > 0 else 0
    if n < 2 * max(block, 1):
        return None
    live = [j for j in jacobians if not _is_zero(j)]
    if not live:
        return None
    for jac in live:
        if getattr(jac, "size", 0) > constants.FOLD_MAX_SIZE:
            return None
        value = constants.concrete_value(jac)
        if value is None or value.shape[:1] != (n,):
            return None
        _, idx = from_dense_concrete(value, block)
        if count_blocks(idx) > 1:
            return None
    kept = PAIR_BLOCKS if n // block >= 2 * PAIR_BLOCKS else 1
    return SparseSpec(block, kept * block, "ignore", quiet=True)


def sparsify_input(ctx: SparseContext, index: int, primal: Any, jac: Any) -> Any:
    """The block-sparse form of an input jacobian, if its values are known now."""
    value = constants.concrete_value(jac)
    shape = tuple(np.shape(primal))
    if value is None:
        ctx.densified(
            f"input {index}",
            "rule",
            "its jacobian is traced, so its zero pattern is unknown: build it with "
            "NumPy (np.eye) outside of jax.jit, or use fwdlap.laplacian(..., "
            "sparsity=...), which builds the identity itself",
            shape,
        )
        return jac
    data, idx = from_dense_concrete(value, ctx.block_size)
    blocks = count_blocks(idx)
    if blocks > ctx.max_blocks:
        ctx.densified(
            f"input {index}",
            "threshold",
            f"its jacobian already depends on {blocks} blocks per element",
            shape,
            blocks,
        )
        return jac
    data = jnp.asarray(data, jax.typeof(jac).dtype)
    return SparseJac(platform.on_context_mesh(data), idx, ctx.block_size)
