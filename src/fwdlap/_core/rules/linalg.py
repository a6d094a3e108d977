"""Dedicated rules for `jnp.linalg.slogdet` and `jnp.linalg.det`.

Both are `jax.custom_jvp` functions whose JVP rules solve with the matrix; the generic
path differentiates those rules once more, which goes through the LU primitives for
every direction. These rules instead factorise `A` once, form `A^{-1}` from that
factorisation (which also gives the primal), and use, for jacobians `J_k` and
laplacian `L` of `A`,

    B_k = A^{-1} J_k                      (one batched matmul: n m^3 flops)
    d log|det A|[J_k] = tr(B_k) = sum(A^{-T} * J_k)
    lap log|det A|    = tr(A^{-1} L) - sum_k tr(B_k B_k)
                      = tr(A^{-1} L) - sum_k sum(B_k * B_k^T)

and for the determinant, `det' = det * tr(B_k)` and
`lap det = det * (lap log|det A| + sum_k tr(B_k)^2)`.

So a call costs one LU factorisation, two triangular solves for the inverse, one
`n`-batched matmul and O(n m^2) reductions. The sign of a real determinant is locally
constant: its tangents are zero. Complex matrices fall back to the generic path.
Batch dimensions `(..., m, m)` are supported. At a singular matrix the tangents are not
finite (the generic path of `det` handles rank m-1 through cofactors; this one does
not).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import _jax, registry, sparse
from ..registry import Fallback, LapRule
from ..zeros import add, is_zero, num_directions, zero_jacobian, zero_laplacian


def slogdet_and_inverse(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(sign, log|det a|, a^{-1})` of real matrices `(..., m, m)` from one LU."""
    m = a.shape[-1]
    lu, pivots, permutation = lax.linalg.lu(a)
    diag = jnp.diagonal(lu, axis1=-2, axis2=-1)
    singular = jnp.any(diag == 0, axis=-1)
    iota = jnp.arange(m, dtype=pivots.dtype)
    swaps = jnp.count_nonzero(pivots != iota, axis=-1)
    negatives = jnp.count_nonzero(diag < 0, axis=-1)
    parity = (swaps + negatives) % 2
    sign = jnp.where(singular, 0, 1 - 2 * parity).astype(a.dtype)
    logdet = jnp.where(singular, -jnp.inf, jnp.sum(jnp.log(jnp.abs(diag)), axis=-1))
    # a[perm] = L U, so a^{-1} = U^{-1} L^{-1} P with (P x)_i = x_{perm_i}.
    p = jax.nn.one_hot(permutation, m, dtype=a.dtype)
    y = lax.linalg.triangular_solve(
        lu, p, left_side=True, lower=True, unit_diagonal=True
    )
    inverse = lax.linalg.triangular_solve(lu, y, left_side=True, lower=False)
    return sign, logdet.astype(a.dtype), inverse


def _logdet_tangents(
    inverse: jax.Array, jacobian: Any, laplacian: Any, n: int, out: jax.Array
) -> tuple[Any, Any]:
    """Jacobian `(n, ...)` and laplacian `(...)` of log|det A|."""
    jac_out: Any = zero_jacobian(out, n)
    lap_out: Any = zero_laplacian(out)
    if not is_zero(jacobian):
        # tr(A^{-1} J_k) as one multiply-and-sum, without B's diagonal (a select of
        # every B_k). B is kept as `(..., i, k, l)`, the product's own layout, and
        # its transpose is read inside the fused sum rather than copied.
        jac_out = jnp.sum(
            jnp.swapaxes(inverse, -1, -2) * jacobian, axis=(-2, -1)
        ).astype(out.dtype)
        b = jnp.einsum("...ij,k...jl->...ikl", inverse, jacobian)
        lap_out = -jnp.sum(b * jnp.swapaxes(b, -3, -1), axis=(-3, -2, -1))
    if not is_zero(laplacian):
        lap_out = add(lap_out, jnp.einsum("...ij,...ji->...", inverse, laplacian))
    return jac_out, lap_out


def _is_real(a: Any) -> bool:
    return bool(jnp.issubdtype(jax.typeof(a).dtype, jnp.floating))


def _log_abs_det_parts(
    primals: Sequence[Any], jacobians: Sequence[Any], laplacians: Sequence[Any]
) -> tuple[int, Any, Any, Any, Any] | None:
    """`(n, sign, log|det A|, its jacobian, its laplacian)`, or None for complex A."""
    (a,), (ja,), (la,) = primals, jacobians, laplacians
    if not _is_real(a):
        return None
    n = num_directions(jacobians)
    sign, logdet, inverse = slogdet_and_inverse(a)
    jac_log, lap_log = _logdet_tangents(inverse, ja, la, n, logdet)
    return n, sign, logdet, jac_log, lap_log


def _slogdet_outputs(parts: tuple[int, Any, Any, Any, Any]) -> Any:
    """`[sign, log|det|]` with their tangents (the sign's are zero)."""
    n, sign, logdet, jac_log, lap_log = parts
    sign_jac = zero_jacobian(sign, n)
    sign_lap = zero_laplacian(sign)
    return [sign, logdet], [sign_jac, jac_log], [sign_lap, lap_log]


def _det_outputs(parts: tuple[int, Any, Any, Any, Any]) -> Any:
    """`[det]` and its tangents from those of log|det| (dense or block-sparse)."""
    n, sign, logdet, jac_log, lap_log = parts
    det = sign * jnp.exp(logdet)
    if is_zero(jac_log):
        jac_det: Any = zero_jacobian(det, n)
        lap_det: Any = lap_log if is_zero(lap_log) else det * lap_log
    else:
        # Block-sparse rows name distinct blocks per element, so the sum of squares
        # over directions is the sum over the stored rows either way.
        if sparse.is_sparse(jac_log):
            rows = jac_log.data
            jac_det = jac_log.with_data(det * rows)
        else:
            rows = jac_log
            jac_det = det * rows
        lap_det = det * add(lap_log, jnp.sum(rows * rows, axis=0))
    return [det], [jac_det], [lap_det]


_COMPLEX = Fallback("rule", "a complex matrix")
_TOO_MANY = (
    "its sparse rule does not apply (the matrix rows depend on more than "
    "{} blocks, or it is complex)"
)


def slogdet_rule(ctx: Any, primals, jacobians, laplacians, **params: Any) -> Any:
    """Forward-Laplacian rule of `jnp.linalg.slogdet` (outputs `[sign, logabsdet]`)."""
    parts = _log_abs_det_parts(primals, jacobians, laplacians)
    return _COMPLEX if parts is None else _slogdet_outputs(parts)


def det_rule(ctx: Any, primals, jacobians, laplacians, **params: Any) -> Any:
    """Forward-Laplacian rule of `jnp.linalg.det` (for matrices larger than 3x3)."""
    parts = _log_abs_det_parts(primals, jacobians, laplacians)
    return _COMPLEX if parts is None else _det_outputs(parts)


# --- block-sparse variants -----------------------------------------------------------
#
# Make every slot constant along the columns, so that slot t of row i names one block
# idx[t, i]. With Q_t = (J restricted to slot t) A^{-1}, the directions of a block
# beta touch only the rows with idx[t, i] == beta, so
#
#   d log|det A| = sum_{t, i} Q_t[i, i]                      (to block idx[t, i])
#   sum_k tr(B_k B_k) = sum_{t, t', i, i'} [idx[t, i] == idx[t', i']]
#                       sum_c Q_t[c, i, i'] Q_t'[c, i', i]
#
# which costs k * b matrix products instead of n.


def _sparse_log_abs_det(ctx: Any, primals, jacobians, laplacians):
    (a,), (ja,), (la,) = primals, jacobians, laplacians
    if not _is_real(a) or not sparse.is_sparse(ja):
        return None
    cols = jnp.ndim(a) - 1
    target = sparse.union_along(ja.idx, (cols,), ctx.max_blocks)
    if target is None:
        return None
    k, bs = target.shape[0], ctx.block_size
    data = sparse.align(ja, target).reshape(k, bs, *jnp.shape(a))
    rows_idx = target[..., 0]  # (k, ..., m)
    sign, logdet, inverse = slogdet_and_inverse(a)
    q = jnp.einsum("tc...ij,...jl->tc...il", data, inverse)
    diag = jnp.diagonal(q, axis1=-2, axis2=-1)  # (k, b, ..., m)
    per_row = sparse.SparseJac(diag.reshape(k * bs, *diag.shape[2:]), rows_idx, bs)
    jac_log = _sum_last_axis(ctx, per_row)
    q_t = jnp.swapaxes(q, -1, -2)
    second = None
    for t in range(k):
        for u in range(k):
            same = (rows_idx[t][..., :, None] == rows_idx[u][..., None, :]) & (
                rows_idx[t][..., :, None] >= 0
            )
            if not same.any():
                continue
            prod = jnp.sum(q[t] * q_t[u], axis=0)
            term = jnp.sum(jnp.where(sparse.compress(same), prod, 0), axis=(-2, -1))
            second = term if second is None else second + term
    lap_log: Any = zero_laplacian(logdet) if second is None else -second
    if not is_zero(la):
        lap_log = add(lap_log, jnp.einsum("...ij,...ji->...", inverse, la))
    return ctx.rows, sign, logdet, jac_log, lap_log


def _sum_last_axis(ctx: Any, sj: Any) -> Any:
    """Sum a sparse jacobian over its last value axis (sparse if it stays small)."""
    axis = len(sj.shape) - 1
    target = sparse.union_along(sj.idx, (axis,), ctx.max_blocks)
    if target is None:
        blocks = sparse.count_blocks_along(sj.idx, (axis,), ctx.num_blocks)
        ctx.densified(
            "slogdet/det",
            "threshold",
            f"the determinant depends on {blocks} blocks, more than {ctx.max_blocks}",
            sj.shape[:-1],
            blocks,
        )
        return ctx.densify(sj, (axis,))
    data = jnp.sum(sparse.align(sj, target), axis=-1)
    return sparse.SparseJac(data, target[..., 0], sj.block_size)


def _sparse_declined(ctx: Any) -> Fallback:
    return Fallback("threshold", _TOO_MANY.format(ctx.max_blocks))


def sparse_slogdet_rule(ctx: Any, primals, jacobians, laplacians, **params) -> Any:
    """`slogdet_rule` for a block-sparse matrix whose rows name few blocks."""
    parts = _sparse_log_abs_det(ctx, primals, jacobians, laplacians)
    return _sparse_declined(ctx) if parts is None else _slogdet_outputs(parts)


def sparse_det_rule(ctx: Any, primals, jacobians, laplacians, **params) -> Any:
    """`det_rule` for a block-sparse matrix whose rows name few blocks."""
    parts = _sparse_log_abs_det(ctx, primals, jacobians, laplacians)
    if parts is None:
        return _sparse_declined(ctx)
    n, sign, logdet, jac_log, lap_log = parts
    if ctx.window is None or is_zero(jac_log) or sparse.is_sparse(jac_log):
        return _det_outputs(parts)
    # log|det| turned dense, so det's square term sums over this window's rows only:
    # window the rest of the laplacian here, not after.
    parts = (n, sign, logdet, jac_log, ctx.window_laplacian(lap_log))
    outs, jacs, (lap,) = _det_outputs(parts)
    return outs, jacs, [sparse.WindowedLaplacian(lap)]


_CHEAP = Fallback("rule", "1x1 and 2x2 determinants: JAX's own JVP rule is cheap")


def small_slogdet_rule(ctx: Any, primals, jacobians, laplacians, **params) -> Any:
    """`_slogdet_small` (1x1, 2x2): JAX's own JVP rule, differentiated once more."""
    return _CHEAP


def _register() -> None:
    def rule(dense: Any, sparse: Any) -> LapRule:
        return LapRule(dense, sparse, kind="custom_jvp")

    for fn in _jax.slogdet_custom_jvps:
        registry.register(fn, rule(slogdet_rule, sparse_slogdet_rule))
    if _jax.det_custom_jvp is not None:
        registry.register(_jax.det_custom_jvp, rule(det_rule, sparse_det_rule))
    if _jax.slogdet_small_custom_jvp is not None:
        small = rule(small_slogdet_rule, sparse_slogdet_rule)
        registry.register(_jax.slogdet_small_custom_jvp, small)


_register()
