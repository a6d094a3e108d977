"""The block-sparse mode with its dense jacobians evaluated a window at a time.

In a many-particle function the block-sparse jacobians of the first layers are small,
but once a value depends on most particles its jacobian is dense, with all `n`
directions, and past the CPU caches those dense values bound the run time. Here one
sparse pass is traced with the dense rows limited to a window of particle blocks
whose start is a traced integer (`sparse.Window`). Partial evaluation with that start
unknown splits the pass in two: everything that does not depend on the window (the
primal, the block-sparse jacobians and their laplacians) runs once, and the dense
part runs in a `lax.scan` over the windows, each carrying `rows` directions.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

from . import _jax, sparse
from .transform import lap_flat
from .zeros import is_zero, zero_jacobian


def lap_flat_windowed(
    fun: Callable[..., Sequence[Any]],
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    n: int,
    sparsity: sparse.SparseSpec,
    window_blocks: int,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The sparse `lap_flat`, its dense jacobians in windows of `window_blocks` blocks.

    Returns what `lap_flat(..., sparsity)` does, with dense output jacobians of `n`
    rows. Raises `sparse.WindowUnsupported` where the pass cannot be windowed (an
    input jacobian that is not block-sparse, an output jacobian that does not depend
    on the window); the caller then makes one pass.
    """
    ctx = sparsity.resolve(n)
    windows = -(-ctx.num_blocks // window_blocks)
    if windows <= 1:
        return lap_flat(fun, primals, jacobians, laplacians, n, sparsity)
    num_in = len(primals)
    store: dict[str, Any] = {}

    def one_window(*args: Any) -> list[Any]:
        window = sparse.Window(args[num_in], window_blocks)
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
    wrapped = _jax.wrap_init(one_window, debug_info=dbg.with_unknown_names())
    with sparse.held_reports():
        jaxpr, out_pvals, consts = _jax.trace_to_jaxpr_nounits(
            wrapped, pvals, instantiate=False
        )
    num_out = store["outs"]
    outs = [_primal(pv) for pv in out_pvals[:num_out]]
    num_jacs = sum(aval is None for aval in store["jac_avals"])
    jac_pvals = out_pvals[num_out : num_out + num_jacs]
    lap_pvals = out_pvals[num_out + num_jacs :]
    if any(pv.is_known() for pv in jac_pvals):
        # Dense rows that do not depend on the window cannot be every window's rows.
        raise sparse.WindowUnsupported("an output jacobian does not depend on it")
    # A laplacian that does not depend on the window is counted once, not per window.
    scanned = [*jac_pvals, *[pv for pv in lap_pvals if not pv.is_known()]]

    def step(carry: None, start: Any) -> tuple[None, list[Any]]:
        return carry, list(_jax.eval_jaxpr(jaxpr, consts, start))

    starts = jnp.arange(windows, dtype=jnp.int32) * window_blocks
    stacked: list[Any] = []
    if scanned:
        _, stacked = lax.scan(step, None, starts)
    it = iter(stacked)
    jacs = [
        _join_rows(next(it), n) if aval is None else zero_jacobian(o, n)
        for o, aval in zip(outs, store["jac_avals"], strict=True)
    ]
    lap_it = iter(lap_pvals)
    laps = [
        _window_sum(next(lap_it), it) if aval is None else _jax.Zero(aval)
        for aval in store["lap_avals"]
    ]
    return outs, jacs, laps


def _window_sum(pval: Any, scanned: Any) -> Any:
    """A laplacian: the sum of its windows' parts, or the known whole."""
    if pval.is_known():
        return pval.get_known()
    return jnp.sum(next(scanned), axis=0)


def _join_rows(stacked: Any, n: int) -> Any:
    """`(windows, rows, *S)` window jacobians as one `(n, *S)` (the padding cut)."""
    return stacked.reshape(-1, *stacked.shape[2:])[:n]


def _primal(pval: Any) -> Any:
    if not pval.is_known():
        raise RuntimeError("fwdlap sparse mode: a primal output depends on a window.")
    return pval.get_known()
