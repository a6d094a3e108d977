"""Jacobian layouts: how a jacobian crosses the boundary of a jaxpr.

A loop body, a cond branch or a jit body is a jaxpr with fixed inputs and outputs, so
the jacobian of every value entering or leaving one takes one *layout*:

- `ZERO`: a symbolic zero; nothing is passed.
- `DENSE`: an array `(rows, *shape)`, `rows` being the pass's directions (a window's,
  in a windowed sparse pass).
- `Blocks(idx)`: the data `(k * block_size, *shape)` of a `sparse.SparseJac` with the
  block indices `idx (k, *shape)`.

A `Mode` is one pass's set of layouts, with the moves of jacobians into and out of
them. The dense mode uses only `ZERO` and `DENSE`; the block-sparse mode all three.
"""

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import jax.numpy as jnp
import numpy as np

from . import sparse
from .sparse import SparseContext, SparseJac, Window, is_sparse
from .zeros import instantiate, is_zero, zero_jacobian


class Kind(enum.Enum):
    """The layouts without data of their own."""

    ZERO = "zero"
    DENSE = "dense"


ZERO = Kind.ZERO
DENSE = Kind.DENSE


@dataclasses.dataclass(frozen=True, eq=False)
class Blocks:
    """The block-sparse layout with the static block indices `idx (k, *shape)`."""

    idx: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Blocks)
            and self.idx.shape == other.idx.shape
            and bool(np.array_equal(self.idx, other.idx))
        )

    __hash__ = None  # pyright: ignore[reportAssignmentType]


Layout: TypeAlias = Kind | Blocks


def layout_of(jac: Any) -> Layout:
    if is_zero(jac):
        return ZERO
    return Blocks(jac.idx) if is_sparse(jac) else DENSE


def stacked(layout: Layout, length: int) -> Layout:
    """The layout of `length` values of `layout` stacked along a new axis 0."""
    if not isinstance(layout, Blocks):
        return layout
    k, *shape = layout.idx.shape
    idx = np.broadcast_to(layout.idx[:, None], (k, length, *shape))
    return Blocks(np.ascontiguousarray(idx))


class Tangents(NamedTuple):
    """The tangents of some values at a jaxpr's boundary.

    `jacs` holds each jacobian's layout, `laps` whether each laplacian is non-zero;
    only the non-zero ones are passed.
    """

    jacs: list[Layout]
    laps: list[bool]

    @classmethod
    def of(cls, jacs: Sequence[Any], laps: Sequence[Any]) -> "Tangents":
        """The tangents of values whose jacobians and laplacians are these."""
        return cls([layout_of(j) for j in jacs], [not is_zero(lp) for lp in laps])

    @classmethod
    def concat(cls, *groups: "Tangents") -> "Tangents":
        return cls(
            [lo for g in groups for lo in g.jacs], [nz for g in groups for nz in g.laps]
        )

    def split(self, num: int) -> tuple["Tangents", "Tangents"]:
        """The first `num` values' tangents and the others'."""
        return (
            Tangents(self.jacs[:num], self.laps[:num]),
            Tangents(self.jacs[num:], self.laps[num:]),
        )

    def jac_nonzero(self) -> list[bool]:
        return [lo is not ZERO for lo in self.jacs]

    def num_passed(self) -> int:
        """How many arrays pass: the non-zero jacobians and laplacians."""
        return sum(self.jac_nonzero()) + sum(self.laps)

    def group(self) -> tuple[int, list[bool], list[bool]]:
        """`(values, jacobian passed, laplacian passed)`, to regroup binders."""
        return len(self.jacs), self.jac_nonzero(), list(self.laps)


@dataclasses.dataclass(frozen=True)
class Mode:
    """The layouts of one pass, and moving jacobians into and out of them.

    `Mode(n)` is the dense mode: jacobians of `n` directions, `ZERO` or `DENSE`.
    `Mode.block_sparse(ctx)` adds `Blocks`, with `ctx`'s threshold and window.
    """

    rows: int
    sparse: SparseContext | None = None

    @classmethod
    def block_sparse(cls, ctx: SparseContext) -> "Mode":
        return cls(ctx.rows, ctx)

    @property
    def ctx(self) -> SparseContext:
        """The sparse context; only a block-sparse layout or a window reaches it."""
        assert self.sparse is not None, "the dense mode has no block-sparse layouts"
        return self.sparse

    @property
    def max_blocks(self) -> int:
        return 0 if self.sparse is None else self.sparse.max_blocks

    def join(self, a: Layout, b: Layout) -> Layout:
        """The smallest layout holding both (dense past the threshold)."""
        if a is ZERO:
            return b
        if b is ZERO:
            return a
        if isinstance(a, Blocks) and isinstance(b, Blocks):
            both = sparse.union(a.idx, b.idx)
            return DENSE if both.shape[0] > self.ctx.max_blocks else Blocks(both)
        return DENSE

    def join_all(self, a: Tangents, b: Tangents) -> Tangents:
        return Tangents(
            [self.join(x, y) for x, y in zip(a.jacs, b.jacs, strict=True)],
            [x or y for x, y in zip(a.laps, b.laps, strict=True)],
        )

    def data_rows(self, layout: Layout) -> int:
        if isinstance(layout, Blocks):
            return layout.idx.shape[0] * self.ctx.block_size
        return self.rows

    def data_aval(self, aval: Any, layout: Layout) -> Any:
        """The aval of the data passed for a value of `aval` in `layout`."""
        tangent = aval.to_tangent_aval()
        return tangent.update(shape=(self.data_rows(layout), *tangent.shape))

    def to_data(self, jac: Any, primal: Any, layout: Layout) -> Any:
        """The data of `jac` in `layout`, which holds it (`join` makes sure)."""
        if is_sparse(jac):
            if isinstance(layout, Blocks):
                return sparse.align(jac, layout.idx)
            return self.ctx.densify(jac)
        if is_zero(jac):
            return instantiate(zero_jacobian(primal, self.data_rows(layout)))
        assert layout is DENSE, "a dense jacobian takes only the dense layout"
        return jac

    def from_data(self, data: Any, primal: Any, layout: Layout) -> Any:
        """The jacobian of `primal` whose data in `layout` is `data`."""
        if layout is ZERO:
            return zero_jacobian(primal, self.rows)
        if isinstance(layout, Blocks):
            return SparseJac(data, layout.idx, self.ctx.block_size)
        return data

    def entering_laplacian(self, jac: Any, lap: Any, layout: Layout) -> Any:
        """The laplacian of a value taking `layout`: windowed if it turns dense."""
        if layout is DENSE and is_sparse(jac):
            return self.ctx.window_laplacian(lap)
        return lap

    def leaving_laplacian(self, lap: Any, layout: Layout) -> Any:
        """A laplacian leaving a jaxpr, for `sparse_rules.finish`.

        A dense output's laplacian holds its window's terms already (the body windowed
        what turned dense inside), so `finish` must not window it again.
        """
        if self.window is not None and layout is DENSE and not is_zero(lap):
            return sparse.WindowedLaplacian(lap)
        return lap

    @property
    def window(self) -> Window | None:
        return None if self.sparse is None else self.sparse.window

    def window_args(self) -> list[Any]:
        """The first arguments of every body in a windowed pass: the window's start."""
        return [] if self.window is None else [self.window.start]

    def inside(self, args: Sequence[Any]) -> tuple["Mode", list[Any]]:
        """The mode inside a body and the body's own arguments (the start split off)."""
        if self.window is None:
            return self, list(args)
        window = Window(args[0], self.window.blocks)
        inner = dataclasses.replace(self.ctx, window=window)
        return Mode.block_sparse(inner), list(args[1:])

    def scanned_layout(self, primitive: Any, jac: Any, x: Any) -> Layout:
        """One layout for every slice of `x` along the scanned axis (its axis 0)."""
        layout = layout_of(jac)
        if not isinstance(layout, Blocks):
            return layout
        uniform = sparse.union_along(layout.idx, [0], self.ctx.max_blocks)
        if uniform is None:
            self.report(
                primitive,
                "a scanned input's slices depend on more than "
                f"{self.ctx.max_blocks} blocks together",
                jnp.shape(x),
            )
            return DENSE
        return Blocks(np.ascontiguousarray(uniform[:, 0]))

    def report(self, primitive: Any, reason: str, shape: Any) -> None:
        """Report that a value went past the threshold (the sparse mode only)."""
        if self.sparse is not None:
            self.sparse.densified(
                primitive, "threshold", reason, shape, self.sparse.num_blocks
            )
