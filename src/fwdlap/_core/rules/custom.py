"""custom_jvp: differentiate the user's JVP rule once more.

The rule gives f'(x)[t]. The Laplacian needs f''(x)[v, v] = d/ds f'(x + s v)[v], which
is the JVP of the rule with respect to its primal inputs. The rule is traced to a jaxpr
once (a `WrappedFun` may only be called once) and then reused for every direction.
"""

from collections.abc import Sequence
from typing import Any

import jax

from .. import _jax
from ..zeros import Zero, instantiate, is_zero
from .generic import laplacian_from_jvp


def custom_jvp_rule(
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    jvp: Any,
    symbolic_zeros: bool,
    traced: tuple[Any, Any] | None = None,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Forward-Laplacian outputs of a `custom_jvp` function from its JVP rule.

    `traced` is what `trace_jvp_rule` returned, where the caller traced it already.
    """
    jvp_fn, _ = traced or trace_jvp_rule(
        primals, jacobians, laplacians, jvp, symbolic_zeros
    )
    return laplacian_from_jvp(jvp_fn, primals, jacobians, laplacians)


def trace_jvp_rule(
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    jvp: Any,
    symbolic_zeros: bool,
) -> tuple[Any, Any]:
    """The JVP rule as `jvp_fn(primals, tangents)`, and its `ClosedJaxpr`.

    Only which jacobians and laplacians are zero matters, not their values or their
    number of directions.
    """
    nonzero = [
        not (is_zero(j) and is_zero(lp))
        for j, lp in zip(jacobians, laplacians, strict=False)
    ]
    nonzero = [nz and _is_float(p) for nz, p in zip(nonzero, primals, strict=False)]
    num_in = len(primals)
    tangent_avals = [jax.typeof(p).to_tangent_aval() for p in primals]

    def rule_fn(*args: Any) -> list[Any]:
        ps = list(args[:num_in])
        rest = iter(args[num_in:])
        ts: list[Any] = []
        for nz, aval in zip(nonzero, tangent_avals, strict=False):
            if nz:
                ts.append(next(rest))
            elif symbolic_zeros:
                ts.append(_jax.SymbolicZero(aval))
            else:
                ts.append(instantiate(Zero(aval)))
        outs = jvp.call_wrapped(*ps, *ts)
        primals_out, tangents_out = outs[: len(outs) // 2], outs[len(outs) // 2 :]
        tangents_out = [
            instantiate(Zero(t.aval)) if isinstance(t, _jax.SymbolicZero) else t
            for t in tangents_out
        ]
        return [*primals_out, *tangents_out]

    in_avals = [jax.typeof(p) for p in primals]
    in_avals += [aval for nz, aval in zip(nonzero, tangent_avals, strict=False) if nz]
    dbg = _jax.make_debug_info("custom_jvp rule", rule_fn, tuple(in_avals), {})
    jaxpr, _, consts = _jax.trace_to_jaxpr_dynamic(
        _jax.wrap_init(rule_fn, debug_info=dbg.with_unknown_names()), in_avals
    )
    closed = _jax.ClosedJaxpr(jaxpr, consts)
    rule_as_fun = _jax.jaxpr_as_fun(closed)

    def jvp_fn(ps: Sequence[Any], ts: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        nz_ts = [instantiate(t) for t, nz in zip(ts, nonzero, strict=False) if nz]
        outs = rule_as_fun(*ps, *nz_ts)
        half = len(outs) // 2
        return list(outs[:half]), list(outs[half:])

    return jvp_fn, closed


def softmax_rule(
    primals: Sequence[Any],
    jacobians: Sequence[Any],
    laplacians: Sequence[Any],
    jvp: Any,
    symbolic_zeros: bool,
    traced: tuple[Any, Any] | None = None,
) -> tuple[list[Any], list[Any], list[Any]] | None:
    """Forward-Laplacian outputs of `jax.nn.softmax` from its own (linear) JVP rule.

    With `g_k = J_y[k] / y = J_x[k] - <y, J_x[k]>` (the softmax axis' average) the
    second derivative along `v_k` is `y (d2x - <y, d2x> + g_k^2 - <y, g_k^2>)`, so
    the Laplacian is the JVP rule applied to `L_x + sum_k g_k^2`: two applications
    of the first-order rule instead of differentiating it. Where `y` is zero (masked
    or underflowed) `g` is taken as 0; its terms are multiplied by `y` anyway.
    Returns None unless only the logits (the first argument) carry tangents.
    """
    if any(
        not (is_zero(j) and is_zero(lp))
        for j, lp in zip(jacobians[1:], laplacians[1:], strict=True)
    ) or is_zero(jacobians[0]):
        return None
    jvp_fn, closed = traced or trace_jvp_rule(
        primals, jacobians, laplacians, jvp, symbolic_zeros
    )
    rest = [Zero(jax.typeof(p).to_tangent_aval()) for p in primals[1:]]
    y = jvp_fn(primals, [Zero(jax.typeof(primals[0]).to_tangent_aval()), *rest])[0][0]
    layout = softmax_layout(closed, len(primals))
    if layout is None:
        return None
    axes, perm = layout
    jac_x, lap_x = jacobians[0], laplacians[0]
    if perm != tuple(range(len(perm))):
        # A softmax under `jax.vmap` may lay its output out differently from its
        # input (the batch axis moved); bring the tangents into the output's layout.
        jac_x = jax.numpy.transpose(jac_x, (0, *(1 + p for p in perm)))
        if not is_zero(lap_x):
            lap_x = jax.numpy.transpose(lap_x, perm)
    jac_y = _softmax_tangent(y, jac_x, axes, rows=True)
    safe_y = jax.numpy.where(y == 0, 1, y)
    g = jax.numpy.where(y == 0, 0, jac_y / safe_y)
    second = jax.numpy.sum(g * g, axis=0)
    total = second if is_zero(lap_x) else lap_x + second
    lap_y = _softmax_tangent(y, total, axes, rows=False)
    return [y], [jac_y], [lap_y]


def _softmax_tangent(y: Any, t: Any, axes: list[int], rows: bool) -> Any:
    """Softmax's JVP `y (t - <y, t>)`, the average over `axes` taken as an einsum.

    JAX's own rule sums `y * t` with `reduce_sum`. With rows of directions in front,
    jaxlib 0.10.2's CPU backend miscompiles that pattern in float32 (a YNNPACK fusion
    of `t - sum(y * t, keepdims=True)` over 4-d tangents with more than 8 rows gives
    wrong rows from the 9th on); as a contraction it is computed correctly.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    ndim = jax.numpy.ndim(y)
    spec_y = letters[:ndim]
    kept = "".join(c for i, c in enumerate(spec_y) if i not in axes)
    lead = "Z" if rows else ""
    inner = jax.numpy.einsum(
        f"{lead}{spec_y},{spec_y}->{lead}{kept}",
        t,
        y,
        precision=jax.lax.Precision.HIGHEST,
    )
    shape = [1 if i in axes else d for i, d in enumerate(jax.numpy.shape(y))]
    if rows:
        shape = [jax.numpy.shape(t)[0], *shape]
    return y * (t - inner.reshape(shape))


def softmax_layout(
    closed: Any, n_primals: int
) -> tuple[list[int], tuple[int, ...]] | None:
    """The softmax axes and the layout of a softmax's JVP rule, or None if unclear.

    Returns `(axes, perm)`: the rule's output tangent is laid out as
    `transpose(t, perm)` of the logits' tangent `t`, and `axes` (of that layout) are
    the ones the rule sums over. Under `jax.vmap` the rule may move the batch axis, so
    the layout is read off the rule's jaxpr: its tangent input may only go through
    `transpose`s, all of its uses must see the same layout, and that layout must have
    the output's shape. Anything else returns None, and the caller differentiates the
    rule itself instead.
    """
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != n_primals + 1 or not jaxpr.outvars:
        return None
    tangent = jaxpr.invars[n_primals]
    rank = len(tangent.aval.shape)
    perms: dict[Any, tuple[int, ...]] = {tangent: tuple(range(rank))}
    used: set[tuple[int, ...]] = set()
    for eqn in jaxpr.eqns:
        for var in eqn.invars:
            if isinstance(var, _jax.Var) and var in perms:
                if eqn.primitive is jax.lax.transpose_p:
                    order = eqn.params["permutation"]
                    perms[eqn.outvars[0]] = tuple(perms[var][p] for p in order)
                else:
                    used.add(perms[var])
    out_shape = tuple(jaxpr.outvars[-1].aval.shape)
    if len(used) != 1:
        return None
    perm = used.pop()
    if tuple(tangent.aval.shape[p] for p in perm) != out_shape:
        return None
    found = reduced_axes(closed)
    if found is None or any(a >= len(out_shape) for a in found):
        return None
    return sorted(found), perm


def reduced_axes(closed: Any) -> set[int] | None:
    """The axes a softmax's JVP rule sums over (its `reduce_sum`s), or None if none."""
    axes: set[int] = set()

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive is jax.lax.reduce_sum_p:
                axes.update(int(a) for a in eqn.params["axes"])
        for sub in _jax.subjaxprs(jaxpr):
            visit(sub)

    visit(closed.jaxpr)
    return axes or None


def _is_float(x: Any) -> bool:
    return jax.numpy.issubdtype(jax.typeof(x).dtype, jax.numpy.inexact)
