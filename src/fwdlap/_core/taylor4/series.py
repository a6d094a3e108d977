"""A value's Taylor coefficients in the fourth-order pass, and the pass's `Context`.

A value carries `series = (x1, x2, x3, X4)`: `x1`, `x2` and `x3` have a leading axis
of rows (the `n` directions), `X4` has the primal's shape and holds the fourth
coefficient summed over the directions (with the context's signs). Any of the four may
be a symbolic zero (`Zero`); inside a rule, `None` stands for one (`opt`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..zeros import is_zero, zero_jacobian, zero_laplacian

Series = tuple[Any, Any, Any, Any]
"""`(x1, x2, x3, X4)`: three per-direction coefficients and the collapsed fourth."""

ORDER = 4


@dataclasses.dataclass(frozen=True)
class Context:
    """What every rule of a pass needs: the layout of the coefficients.

    In the *directions* layout (the default) coefficients 1-3 have a leading axis of
    `n` directions, and `signs` is None when every direction enters the collapsed sum
    with $+1$, else a tuple of $\\pm 1$ (hashable, so that transformed jaxprs can be
    cached on it).

    In the *moments* layout (`moments=True`, exact biharmonic only) `n` is the
    dimension $d$ and the coefficients are the tensors themselves, contracted where
    only their contraction is ever needed (see `moments`): coefficient 1 the $d$
    first derivatives, 2 the $d(d+1)/2$ entries $i \\le j$ of the second Taylor
    coefficient, 3 its third contracted once with the identity ($d$ rows).
    """

    n: int
    signs: tuple[float, ...] | None = None
    moments: bool = False

    def rows(self, k: int) -> int | None:
        """Rows of coefficient `k + 1` (None for the collapsed fourth)."""
        if k == ORDER - 1:
            return None
        if self.moments and k == 1:
            return self.n * (self.n + 1) // 2
        return self.n

    def collapse(self, rows: Any) -> Any:
        """`sum_k s_k rows[k]` over the leading direction axis."""
        return jnp.sum(self.signed(rows), axis=0)

    def signed(self, rows: Any) -> Any:
        """`s_k rows[k]` for every direction (the rows themselves without signs)."""
        if self.signs is None:
            return rows
        s = np.asarray(self.signs, dtype=np.dtype(rows.dtype))
        return rows * s.reshape((self.n,) + (1,) * (jnp.ndim(rows) - 1))


def zero_coefficient(primal: Any, k: int, ctx: Context) -> Any:
    """The symbolic zero of coefficient `k + 1` (`k` < 3: with rows)."""
    rows = ctx.rows(k)
    return zero_laplacian(primal) if rows is None else zero_jacobian(primal, rows)


def zero_series(primal: Any, ctx: Context) -> Series:
    """The series of a value that does not depend on the inputs."""
    return (
        zero_coefficient(primal, 0, ctx),
        zero_coefficient(primal, 1, ctx),
        zero_coefficient(primal, 2, ctx),
        zero_coefficient(primal, 3, ctx),
    )


def coefficient_aval(aval: Any, k: int, ctx: Context) -> Any:
    """The abstract value of coefficient `k + 1` of a value of `aval`."""
    tangent = aval.to_tangent_aval()
    rows = ctx.rows(k)
    if rows is not None:
        return tangent.update(shape=(rows, *tangent.shape))
    return tangent


def is_zero_series(series: Sequence[Any]) -> bool:
    """Whether all four coefficients are symbolic zeros."""
    return all(is_zero(t) for t in series)


def nonzero_mask(series: Sequence[Any]) -> tuple[bool, ...]:
    """Which of the four coefficients are not symbolic zeros."""
    return tuple(not is_zero(t) for t in series)


def is_float(x: Any) -> bool:
    """Whether `x` has an inexact dtype, so that it carries coefficients."""
    return bool(jnp.issubdtype(jax.typeof(x).dtype, jnp.inexact))


# --- None-aware arithmetic: None stands for a symbolic zero inside the rules ---------


def opt(t: Any) -> Any:
    """A coefficient, or None for a symbolic zero."""
    return None if is_zero(t) else t


def series_out(ctx: Context, out: Any, coefs: Sequence[Any]) -> Series:
    """The series of `out` from four coefficients, None made a symbolic zero."""
    return tuple(  # type: ignore[return-value]
        zero_coefficient(out, k, ctx) if c is None else c for k, c in enumerate(coefs)
    )
