"""Higher-order primitives: jit, scan, while, cond, remat.

Each rule turns the inner jaxpr(s) into forward-Laplacian jaxprs (`lap_jaxpr`) that take
and return only the non-zero tangents, so the work inside stays forward-Laplacian.
Loops find which carries have non-zero tangents by a fixpoint, as JAX's JVP does.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _jax, registry
from ..registry import DECLINED, LapRule
from ..sparse import is_sparse
from ..transform import jacobian_aval, lap_jaxpr, unpack_tangents
from ..zeros import instantiate, is_zero
from . import sparse_control_flow as scf
from . import sparse_rules
from .loop_jaxprs import cond_ignoring_tangents, group_sizes, reorder_binders


def _nonzero(xs: Sequence[Any]) -> list[bool]:
    return [not is_zero(x) for x in xs]


def _nz_values(xs: Sequence[Any]) -> list[Any]:
    return [x for x in xs if not is_zero(x)]


def _fill(outs: Sequence[Any], nz: Sequence[bool], values: Any, zero: Any) -> list[Any]:
    it = iter(values)
    return [next(it) if z else zero(o) for o, z in zip(outs, nz, strict=False)]


def _split_outputs(
    trace: Any, primals_out: list[Any], rest: Sequence[Any], jac_nz, lap_nz
):
    return unpack_tangents(primals_out, rest, jac_nz, lap_nz, trace.n)


# --- jit -----------------------------------------------------------------------------


def jit_rule(trace: Any, primals, jacobians, laplacians, **params):
    closed = params["jaxpr"]
    jac_nz, lap_nz = _nonzero(jacobians), _nonzero(laplacians)
    new_jaxpr, out_jac_nz, out_lap_nz = lap_jaxpr(closed, trace.n, jac_nz, lap_nz)
    extra_in = sum(jac_nz) + sum(lap_nz)
    extra_out = sum(out_jac_nz) + sum(out_lap_nz)
    unspecified = _jax.UNSPECIFIED_SHARDING
    new_params = dict(
        params,
        jaxpr=new_jaxpr,
        in_shardings=(*params["in_shardings"], *(unspecified,) * extra_in),
        out_shardings=(*params["out_shardings"], *(unspecified,) * extra_out),
        in_layouts=(*params["in_layouts"], *(None,) * extra_in),
        out_layouts=(*params["out_layouts"], *(None,) * extra_out),
        donated_invars=(*params["donated_invars"], *(False,) * extra_in),
    )
    outs = _jax.jit_p.bind(
        *primals, *_nz_values(jacobians), *_nz_values(laplacians), **new_params
    )
    num_out = len(closed.out_avals)
    primals_out = list(outs[:num_out])
    jacs, laps = _split_outputs(
        trace, primals_out, outs[num_out:], out_jac_nz, out_lap_nz
    )
    return primals_out, jacs, laps


# --- remat ---------------------------------------------------------------------------


def remat_rule(trace: Any, primals, jacobians, laplacians, **params):
    jaxpr = params["jaxpr"]
    jac_nz, lap_nz = _nonzero(jacobians), _nonzero(laplacians)
    new_closed, out_jac_nz, out_lap_nz = lap_jaxpr(
        _jax.close_jaxpr(jaxpr), trace.n, jac_nz, lap_nz
    )
    new_jaxpr = _jax.convert_constvars_jaxpr(new_closed.jaxpr)
    extra = sum(jac_nz) + sum(lap_nz)
    prevent_cse = params["prevent_cse"]
    if isinstance(prevent_cse, tuple):
        prevent_cse = (True,) * len(new_closed.consts) + prevent_cse + (True,) * extra
    outs = _jax.remat_p.bind(
        *new_closed.consts,
        *primals,
        *_nz_values(jacobians),
        *_nz_values(laplacians),
        **dict(params, jaxpr=new_jaxpr, prevent_cse=prevent_cse),
    )
    num_out = len(jaxpr.outvars)
    primals_out = list(outs[:num_out])
    jacs, laps = _split_outputs(
        trace, primals_out, outs[num_out:], out_jac_nz, out_lap_nz
    )
    return primals_out, jacs, laps


# --- cond ----------------------------------------------------------------------------


def cond_rule(trace: Any, primals, jacobians, laplacians, **params):
    branches = params["branches"]
    index, *ops = primals
    _, *op_jacs = jacobians
    _, *op_laps = laplacians
    jac_nz, lap_nz = _nonzero(op_jacs), _nonzero(op_laps)
    # Union over branches of which outputs carry tangents, then instantiate to it.
    probes = [lap_jaxpr(br, trace.n, jac_nz, lap_nz) for br in branches]
    out_jac_nz = [any(z) for z in zip(*(p[1] for p in probes), strict=False)]
    out_lap_nz = [any(z) for z in zip(*(p[2] for p in probes), strict=False)]
    new_branches = tuple(
        lap_jaxpr(br, trace.n, jac_nz, lap_nz, out_jac_nz, out_lap_nz)[0]
        for br in branches
    )
    outs = _jax.cond_p.bind(
        index,
        *ops,
        *_nz_values(op_jacs),
        *_nz_values(op_laps),
        **dict(params, branches=new_branches),
    )
    num_out = len(branches[0].out_avals)
    primals_out = list(outs[:num_out])
    jacs, laps = _split_outputs(
        trace, primals_out, outs[num_out:], out_jac_nz, out_lap_nz
    )
    return primals_out, jacs, laps


# --- loops ---------------------------------------------------------------------------


def _fixpoint_carry(body: Any, n: int, const_nz, carry_nz, xs_nz, num_carry: int):
    """Grow carry non-zero masks until the body's carry outputs match its inputs."""
    jac_c, lap_c = list(carry_nz[0]), list(carry_nz[1])
    for _ in range(len(jac_c) * 2 + 2):
        jac_in = [*const_nz[0], *jac_c, *xs_nz[0]]
        lap_in = [*const_nz[1], *lap_c, *xs_nz[1]]
        _, out_jac, out_lap = lap_jaxpr(body, n, jac_in, lap_in)
        new_jac = [a or b for a, b in zip(jac_c, out_jac[:num_carry], strict=False)]
        new_lap = [a or b for a, b in zip(lap_c, out_lap[:num_carry], strict=False)]
        if new_jac == jac_c and new_lap == lap_c:
            break
        jac_c, lap_c = new_jac, new_lap
    return jac_c, lap_c


def _instantiate_to(xs: Sequence[Any], nz: Sequence[bool]) -> list[Any]:
    return [instantiate(x) for x, z in zip(xs, nz, strict=False) if z]


def scan_rule(trace: Any, primals, jacobians, laplacians, **params):
    n = trace.n
    num_consts, num_carry = params["num_consts"], params["num_carry"]
    body = params["jaxpr"]
    split = lambda xs: (
        xs[:num_consts],
        xs[num_consts : num_consts + num_carry],
        xs[num_consts + num_carry :],
    )
    c_p, k_p, x_p = split(list(primals))
    c_j, k_j, x_j = split(list(jacobians))
    c_l, k_l, x_l = split(list(laplacians))
    const_nz = (_nonzero(c_j), _nonzero(c_l))
    xs_nz = (_nonzero(x_j), _nonzero(x_l))
    jac_c, lap_c = _fixpoint_carry(
        body, n, const_nz, (_nonzero(k_j), _nonzero(k_l)), xs_nz, num_carry
    )
    num_ys = len(body.out_avals) - num_carry
    # Carry outputs are instantiated to the fixpoint; ys keep their own sparsity.
    probe = lap_jaxpr(
        body, n, [*const_nz[0], *jac_c, *xs_nz[0]], [*const_nz[1], *lap_c, *xs_nz[1]]
    )
    ys_jac_nz, ys_lap_nz = probe[1][num_carry:], probe[2][num_carry:]
    new_body, _, _ = lap_jaxpr(
        body,
        n,
        [*const_nz[0], *jac_c, *xs_nz[0]],
        [*const_nz[1], *lap_c, *xs_nz[1]],
        [*jac_c, *ys_jac_nz],
        [*lap_c, *ys_lap_nz],
    )
    groups_in = [
        (num_consts, const_nz[0], const_nz[1]),
        (num_carry, jac_c, lap_c),
        (len(x_p), xs_nz[0], xs_nz[1]),
    ]
    groups_out = [(num_carry, jac_c, lap_c), (num_ys, ys_jac_nz, ys_lap_nz)]
    new_body = reorder_binders(
        new_body, group_sizes(groups_in), group_sizes(groups_out)
    )
    # Scanned jacobians are (n, length, ...); scan needs the length axis first.
    xs_jacs = [jnp.moveaxis(j, 0, 1) for j in _nz_values(x_j)]
    args = [
        *c_p, *_nz_values(c_j), *_nz_values(c_l),
        *k_p, *_instantiate_to(k_j, jac_c), *_instantiate_to(k_l, lap_c),
        *x_p, *xs_jacs, *_nz_values(x_l),
    ]  # fmt: skip
    new_params = dict(
        params,
        jaxpr=new_body,
        num_consts=num_consts + sum(const_nz[0]) + sum(const_nz[1]),
        num_carry=num_carry + sum(jac_c) + sum(lap_c),
    )
    if "linear" in params:  # JAX < 0.10
        new_params["linear"] = (False,) * len(args)
    outs = _jax.scan_p.bind(*args, **new_params)
    nk = num_carry + sum(jac_c) + sum(lap_c)
    carry_outs, ys_outs = outs[:nk], outs[nk:]
    k_out = list(carry_outs[:num_carry])
    k_jac, k_lap = _split_outputs(trace, k_out, carry_outs[num_carry:], jac_c, lap_c)
    y_out = list(ys_outs[:num_ys])
    rest = list(ys_outs[num_ys:])
    nyj = sum(ys_jac_nz)
    rest = [jnp.moveaxis(j, 1, 0) for j in rest[:nyj]] + rest[nyj:]
    y_jac, y_lap = _split_outputs(trace, y_out, rest, ys_jac_nz, ys_lap_nz)
    return k_out + y_out, k_jac + y_jac, k_lap + y_lap


def while_rule(trace: Any, primals, jacobians, laplacians, **params):
    n = trace.n
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    cc_p = list(primals[:cond_nconsts])
    bc_p = list(primals[cond_nconsts : cond_nconsts + body_nconsts])
    bc_j = list(jacobians[cond_nconsts : cond_nconsts + body_nconsts])
    bc_l = list(laplacians[cond_nconsts : cond_nconsts + body_nconsts])
    k_p = list(primals[cond_nconsts + body_nconsts :])
    k_j = list(jacobians[cond_nconsts + body_nconsts :])
    k_l = list(laplacians[cond_nconsts + body_nconsts :])
    num_carry = len(k_p)
    const_nz = (_nonzero(bc_j), _nonzero(bc_l))
    jac_c, lap_c = _fixpoint_carry(
        body_jaxpr,
        n,
        const_nz,
        (_nonzero(k_j), _nonzero(k_l)),
        ([], []),
        num_carry,
    )
    new_body, _, _ = lap_jaxpr(
        body_jaxpr, n, [*const_nz[0], *jac_c], [*const_nz[1], *lap_c], jac_c, lap_c
    )
    groups_in = [(body_nconsts, const_nz[0], const_nz[1]), (num_carry, jac_c, lap_c)]
    groups_out = [(num_carry, jac_c, lap_c)]
    new_body = reorder_binders(
        new_body, group_sizes(groups_in), group_sizes(groups_out)
    )
    carry_avals = [jax.typeof(c) for c in k_p]
    tangent_avals = [
        *[jacobian_aval(a, n) for a, z in zip(carry_avals, jac_c, strict=True) if z],
        *[a.to_tangent_aval() for a, z in zip(carry_avals, lap_c, strict=True) if z],
    ]
    new_cond = cond_ignoring_tangents(
        cond_jaxpr, cond_nconsts + num_carry, tangent_avals
    )
    args = [
        *cc_p,
        *bc_p, *_nz_values(bc_j), *_nz_values(bc_l),
        *k_p, *_instantiate_to(k_j, jac_c), *_instantiate_to(k_l, lap_c),
    ]  # fmt: skip
    outs = _jax.while_p.bind(
        *args,
        **dict(
            params,
            cond_jaxpr=new_cond,
            body_jaxpr=new_body,
            body_nconsts=body_nconsts + sum(const_nz[0]) + sum(const_nz[1]),
        ),
    )
    k_out = list(outs[:num_carry])
    k_jac, k_lap = _split_outputs(trace, k_out, outs[num_carry:], jac_c, lap_c)
    return k_out, k_jac, k_lap


def while_with_scalar_predicate(args: Sequence[Any], params: Any) -> list[Any]:
    """A `while` whose predicate is an array, as the same loop with a scalar one.

    `jax.vmap` of a `while_loop` whose condition depends on the batch gives the loop
    a predicate of the batch's shape: it runs while any element's is true, and the
    elements whose predicate is false keep their carry (the predicate's shape is a
    prefix of every carry's). Written out with `any` and `select`, the loop's
    tangent carries may take their leading axis of directions like any other.
    """
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_fun = _jax.jaxpr_as_fun(params["cond_jaxpr"])
    body_fun = _jax.jaxpr_as_fun(params["body_jaxpr"])
    rank = len(params["cond_jaxpr"].out_avals[0].shape)
    cond_consts = list(args[:cond_nconsts])
    body_consts = list(args[cond_nconsts : cond_nconsts + body_nconsts])

    def keep_going(carry: list[Any]) -> Any:
        (pred,) = cond_fun(*cond_consts, *carry)
        return jnp.any(pred)

    def step(carry: list[Any]) -> list[Any]:
        (pred,) = cond_fun(*cond_consts, *carry)
        new = body_fun(*body_consts, *carry)
        return [
            jax.lax.select(
                jax.lax.broadcast_in_dim(pred, jnp.shape(c), tuple(range(rank))), n, c
            )
            for n, c in zip(new, carry, strict=True)
        ]

    init = list(args[cond_nconsts + body_nconsts :])
    return jax.lax.while_loop(keep_going, step, init)


# --- rewrites: traced under the LapTrace itself ---------------------------------------


def _has_sparse(trace: Any, jacobians: Sequence[Any]) -> bool:
    return trace.sparse is not None and any(is_sparse(j) for j in jacobians)


def _inline(trace: Any, closed: Any, args: Sequence[Any]) -> list[Any]:
    with _jax.set_current_trace(trace):
        return _jax.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _inline_jit(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """Inline jnp's `jit(inline=True)` helpers as JAX's own tracing does (so that
    `dot_split` sees their operands), and every jit body in the sparse mode."""
    if params.get("inline") or _has_sparse(trace, jacobians):
        return _inline(trace, params["jaxpr"], tracers)
    return DECLINED


def _inline_remat(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """The sparse mode inlines remat bodies."""
    if _has_sparse(trace, jacobians):
        return _inline(trace, _jax.close_jaxpr(params["jaxpr"]), tracers)
    return DECLINED


def _inline_known_branch(trace, tracers, primals, jacobians, laplacians, params):
    """The sparse mode inlines the branch of a `cond` whose index is known."""
    if not _has_sparse(trace, jacobians):
        return DECLINED
    index = _jax.concrete_value(primals[0])
    if index is None:
        return DECLINED
    branches = params["branches"]
    branch = branches[int(np.clip(int(index), 0, len(branches) - 1))]
    return _inline(trace, branch, tracers[1:])


def _scalar_predicate(trace, tracers, primals, jacobians, laplacians, params) -> Any:
    """A `while` whose predicate is an array (from `jax.vmap`), with a scalar one."""
    if not params["cond_jaxpr"].out_avals[0].shape:
        return DECLINED
    if all(is_zero(t) for t in (*jacobians, *laplacians)):
        return DECLINED
    with _jax.set_current_trace(trace):
        return while_with_scalar_predicate(tracers, params)


def _register() -> None:
    bind = sparse_rules.bind

    def control_flow(dense, sparse=None, rewrite=None) -> LapRule:
        return LapRule(dense, sparse, kind="control_flow", rewrite=rewrite)

    registry.register(_jax.jit_p, control_flow(jit_rule, rewrite=_inline_jit))
    registry.register(_jax.remat_p, control_flow(remat_rule, rewrite=_inline_remat))
    cond = control_flow(
        cond_rule, bind(scf.cond_rule, _jax.cond_p), _inline_known_branch
    )
    registry.register(_jax.cond_p, cond)
    registry.register(
        _jax.scan_p, control_flow(scan_rule, bind(scf.scan_rule, _jax.scan_p))
    )
    while_ = control_flow(
        while_rule, bind(scf.while_rule, _jax.while_p), _scalar_predicate
    )
    registry.register(_jax.while_p, while_)


_register()
