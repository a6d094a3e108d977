"""custom_jvp functions: their rules in the table, and the generic path.

A `jax.custom_jvp` function reaches `LapTrace.process_custom_jvp_call` as a
`custom_jvp_call` whose `fun` is either the function's own Python callable (a direct
call) or a function evaluating the jaxpr it was staged into (inside `jax.jit`, and so
for everything in `jax.numpy.linalg`). Rules are keyed by the custom_jvp object's
underlying Python function; staged calls are matched by the source location JAX
recorded and then verified: the staged jaxpr must equal a fresh trace of the
registered function at the same input types. That check rejects calls that an outer
transformation (`jax.vmap` inside the differentiated function, say) has rewritten;
they take the generic path. (`jax.nn.softmax` is matched on its source location alone:
its rule reads the JVP rule it is given and declines what it does not recognise.)

The generic path differentiates the function's JVP rule once more. The rule gives
f'(x)[t]; the Laplacian needs f''(x)[v, v] = d/ds f'(x + s v)[v], the JVP of the rule
with respect to its primal inputs. The rule is traced to a jaxpr once (a `WrappedFun`
may only be called once, see `CustomJvpCall`) and then reused for every direction.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .. import _jax, registry, sparse
from ..registry import Fallback, LapRule
from ..sparse import is_sparse
from ..zeros import Zero, instantiate, is_zero
from . import sparse_rules
from .families import acts_elementwise
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


# --- one call -------------------------------------------------------------------------


class CustomJvpCall:
    """A `custom_jvp_call` being processed: what its rules get as `call=`.

    **Attributes:**

    - `fun`: the function called (see the module docstring).
    - `jvp`: its JVP rule, a `WrappedFun` that may be called only once: use `traced`.
    - `symbolic_zeros`: whether the JVP rule takes symbolic zeros.
    - `name`: a readable name for reports.
    """

    def __init__(self, fun: Any, jvp: Any, symbolic_zeros: bool, name: str):
        self.fun = fun
        self.jvp = jvp
        self.symbolic_zeros = symbolic_zeros
        self.name = name
        self._traced: tuple[Any, Any] | None = None

    def traced(self, primals, jacobians, laplacians) -> tuple[Any, Any]:
        """`trace_jvp_rule` of this call, traced on the first use only.

        Only which tangents are zero matters, and densifying keeps zeros zero.
        """
        if self._traced is None:
            self._traced = trace_jvp_rule(
                primals, jacobians, laplacians, self.jvp, self.symbolic_zeros
            )
        return self._traced


def lap_custom_jvp_call(
    trace: Any,
    fun: Any,
    jvp: Any,
    symbolic_zeros: bool,
    primals: list[Any],
    jacs: list[Any],
    laps: list[Any],
) -> tuple[list[Any], list[Any], list[Any]]:
    """Forward-Laplacian outputs of a `custom_jvp_call`, under the parent trace.

    The table's rule for `fun` (or the generic one) runs sparse where it can; a
    sparse rule that declines has the operands made dense for the dense rule, and a
    dense rule that declines gives way to the generic one.
    """
    found = find_rule(fun)
    rule, out_avals = (GENERIC, None) if found is None else found
    call = CustomJvpCall(fun, jvp, symbolic_zeros, rule.name or _custom_jvp_name(fun))
    ctx = trace.sparse
    if ctx is not None and any(is_sparse(j) for j in jacs):
        if rule.sparse is None:
            reason = "a custom_jvp function with a rule for dense jacobians only"
            result: Any = Fallback("rule", reason)
        else:
            result = rule.sparse(ctx, primals, jacs, laps, call=call)
        if not isinstance(result, Fallback):
            outs, jac_outs, lap_outs = (list(r) for r in result)
            if found is not None and not rule.by_source and out_avals is None:
                _direct_call_out_avals(fun, primals)  # the call reads what it stores
            jac_outs, lap_outs = sparse_rules.finish_all(
                ctx, call.name, outs, jac_outs, lap_outs
            )
            return outs, jac_outs, lap_outs
        laps = ctx.densified_laplacians(jacs, laps)
        jacs = sparse_rules.densify_operands(ctx, call.name, jacs, result)
    result = rule.dense(trace, primals, jacs, laps, call=call)
    if isinstance(result, Fallback):
        return GENERIC.dense(trace, primals, jacs, laps, call=call)
    outs, jac_outs, lap_outs = (list(r) for r in result)
    if found is not None and not rule.by_source:
        if out_avals is None:
            out_avals = _direct_call_out_avals(fun, primals)
        _check_outputs(rule, out_avals, outs, jac_outs, lap_outs, trace.n)
    return outs, jac_outs, lap_outs


# --- the generic rule -----------------------------------------------------------------


def generic_dense(ctx: Any, primals, jacobians, laplacians, *, call: CustomJvpCall):
    """Differentiate the JVP rule once more."""
    jvp_fn, _ = call.traced(primals, jacobians, laplacians)
    return laplacian_from_jvp(jvp_fn, primals, jacobians, laplacians)


def generic_sparse(ctx: Any, primals, jacobians, laplacians, *, call: CustomJvpCall):
    """An elementwise JVP rule (`jax.nn.relu`, say) runs on aligned data."""
    jvp_fn, closed = call.traced(primals, jacobians, laplacians)
    if any(not is_zero(j) and not is_sparse(j) for j in jacobians):
        return Fallback("threshold", "an operand's jacobian is already dense")
    shapes = {j.shape for j in jacobians if is_sparse(j)}
    if len(shapes) != 1 or not acts_elementwise(closed.jaxpr, shapes.pop()):
        reason = "a custom_jvp function whose JVP rule is not elementwise"
        return Fallback("rule", reason)
    aligned = sparse_rules.align_slots(ctx, call.name, primals, jacobians)
    if isinstance(aligned, Fallback):
        return aligned
    rows, target = aligned
    outs, jac_outs, lap_outs = laplacian_from_jvp(jvp_fn, primals, rows, laplacians)
    jac_outs = [sparse_rules.wrap(j, target, ctx.block_size) for j in jac_outs]
    return outs, jac_outs, lap_outs


GENERIC = LapRule(generic_dense, generic_sparse, kind="custom_jvp")
"""The rule of a custom_jvp function without one of its own."""


# --- jax.nn.softmax -------------------------------------------------------------------


def softmax_dense(ctx: Any, primals, jacobians, laplacians, *, call: CustomJvpCall):
    """`softmax_rule`, or the generic rule where it does not apply."""
    traced = call.traced(primals, jacobians, laplacians)
    outs = softmax_rule(
        primals, jacobians, laplacians, call.jvp, call.symbolic_zeros, traced
    )
    return Fallback("rule", "not the usual softmax") if outs is None else outs


def softmax_sparse(ctx: Any, primals, jacobians, laplacians, *, call: CustomJvpCall):
    """`jax.nn.softmax` of a block-sparse input.

    Each output element depends on the blocks of its whole softmax axis. Where those
    are within the threshold, `softmax_rule` runs on the input's data aligned to them
    and the outputs stay sparse.
    """
    jac = jacobians[0]
    traced = call.traced(primals, jacobians, laplacians)
    if not is_sparse(jac):
        return Fallback("threshold", "an operand's jacobian is already dense")
    if any(not is_zero(j) for j in jacobians[1:]):
        return Fallback("rule", "a softmax argument other than x has tangents")
    layout = softmax_layout(traced[1], len(primals))
    if layout is None:
        return Fallback("rule", "the softmax's JVP rule is not the usual one")
    axes, perm = layout
    # The blocks are found in the output's layout (jax.vmap may have moved the batch
    # axis); the rule itself brings the aligned rows into that layout.
    idx_out = np.transpose(jac.idx, (0, *(1 + p for p in perm)))
    target = sparse.union_along(idx_out, axes, ctx.max_blocks)
    if target is None:
        reason = f"the softmax depends on more than {ctx.max_blocks} blocks per element"
        return Fallback("threshold", reason)
    back = (0, *(1 + p for p in np.argsort(perm)))
    rows = [sparse.align(jac, np.transpose(target, back)), *jacobians[1:]]
    outs = softmax_rule(
        primals, rows, laplacians, call.jvp, call.symbolic_zeros, traced
    )
    if outs is None:
        return Fallback("rule", "the softmax's JVP rule is not the usual one")
    (y,), (jac_y,), (lap_y,) = outs
    return [y], [sparse_rules.wrap(jac_y, target, ctx.block_size)], [lap_y]


# --- finding the rule of a call -------------------------------------------------------


def find_rule(fun: Any) -> tuple[LapRule, Any] | None:
    """The table's rule for a `custom_jvp_call` of `fun`, if any.

    Returns `(rule, out_avals)` where `out_avals` is None for a direct call (the output
    types are only known once `fun` is traced) and for a rule matched `by_source`.
    """
    target, closed = call_target(fun)
    if target is not None:
        rule = registry.rules.get(target)
        if rule is not None:
            return rule, None
    src = call_source(fun)
    key = registry.custom_jvp_by_source.get(src) if src is not None else None
    rule = registry.rules.get(key) if key is not None else None
    if rule is None:
        return None
    if rule.by_source:
        return rule, None
    if target is not None or closed is None:
        return None
    fresh = _fresh_trace_text(key, tuple(closed.in_avals))
    if fresh is None or fresh != str(closed.jaxpr):
        return None
    return rule, list(closed.out_avals)


@functools.cache
def _fresh_trace_text(target: Any, in_avals: tuple[Any, ...]) -> str | None:
    """The printed jaxpr of `target(*args)` at `in_avals`, or None if that fails."""

    def flat_target(*args: Any) -> list[Any]:
        return jax.tree_util.tree_leaves(target(*args))

    try:
        dbg = _jax.make_debug_info("fwdlap rule check", flat_target, in_avals, {})
        wrapped = _jax.wrap_init(flat_target, debug_info=dbg)
        jaxpr, _, _ = _jax.trace_to_jaxpr_dynamic(wrapped, list(in_avals))
        return str(jaxpr)
    except Exception:  # noqa: BLE001 - any failure means "not this function"
        return None


def _direct_call_out_avals(fun: Any, primals: Any) -> list[Any]:
    """Trace a directly called custom_jvp `fun` (abstractly) for its output types.

    Also fills the output-structure store that `jax.custom_jvp.__call__` reads, which
    the call expects either `fun` or the JVP rule to have filled.
    """
    avals = [jax.typeof(p) for p in primals]
    _, out_avals, _ = _jax.trace_to_jaxpr_dynamic(fun, avals)
    return list(out_avals)


def _check_outputs(
    rule: LapRule,
    out_avals: list[Any],
    outs: list[Any],
    jacs: list[Any],
    laps: list[Any],
    n: int,
) -> None:
    """Check a rule's outputs against the function's (a user's rule may be wrong)."""
    dense = rule.dense
    name = getattr(dense, "__qualname__", None) or repr(dense)
    if not len(outs) == len(jacs) == len(laps) == len(out_avals):
        raise ValueError(
            f"The forward-Laplacian rule {name!r} registered with "
            f"fwdlap.register_rule returned {len(outs)} primal outputs, "
            f"{len(jacs)} jacobians and {len(laps)} laplacians, but the custom_jvp "
            f"function has {len(out_avals)} (flattened) outputs. Return three lists "
            "with one entry per output."
        )
    triples = zip(out_avals, outs, jacs, laps, strict=True)
    for i, (aval, o, j, lp) in enumerate(triples):
        shape = tuple(aval.shape)
        got = (_shape(o), _shape(j), _shape(lp))
        want = (shape, (n, *shape), shape)
        if got != want:
            raise ValueError(
                f"The forward-Laplacian rule {name!r} registered with "
                f"fwdlap.register_rule returned shapes {got[0]} (primal), {got[1]} "
                f"(jacobian) and {got[2]} (laplacian) for output {i}, expected "
                f"{want[0]}, {want[1]} and {want[2]}: the jacobian has a leading axis "
                "of the n tangent directions."
            )


def _shape(x: Any) -> tuple[int, ...]:
    aval: Any = x.aval if type(x) is Zero else jax.typeof(x)
    return tuple(aval.shape)


def call_target(fun: Any) -> tuple[Any, Any]:
    """What the `fun` of a `custom_jvp_call` evaluates.

    Returns `(python_function, None)` when `fun` is the custom_jvp function's own Python
    function, only wrapped to flatten its outputs (a direct call); `(None,
    closed_jaxpr)` when `fun` evaluates a jaxpr (the call was staged into a jaxpr
    first, as inside `jax.jit`); `(None, None)` otherwise. Any transformation but
    output flattening (batch_subtrace, jvp_subtrace, ...) means an outer trace changed
    what `fun` computes, and the generic path must differentiate the JVP rule.
    """
    f = getattr(fun, "f", None)
    names = [getattr(gen, "__name__", "") for gen, _ in getattr(fun, "transforms", ())]
    if (
        isinstance(f, functools.partial)
        and f.func is _jax.JAXPR_AS_FUN_IMPL
        and not names
        and len(f.args) == 1
        and not f.keywords
    ):
        return None, f.args[0]
    if f is not None and names and all(n in _jax.FLATTEN_TRANSFORMS for n in names):
        return f, None
    return None, None


def call_source(fun: Any) -> str | None:
    """The "name at file:line" source info that JAX recorded for a custom_jvp call."""
    dbg = getattr(fun, "debug_info", None)
    return getattr(dbg, "func_src_info", None)


def _custom_jvp_name(fun: Any) -> str:
    """A readable name for a custom_jvp function in densification reports."""
    src = call_source(fun)
    if src:
        return src.split(" at ")[0]
    target, _ = call_target(fun)
    return getattr(target, "__name__", None) or "custom_jvp function"


def _register() -> None:
    if _jax.softmax_custom_jvp is not None:
        softmax = LapRule(
            softmax_dense, softmax_sparse, "custom_jvp", by_source=True, name="softmax"
        )
        registry.register(_jax.softmax_custom_jvp, softmax)


_register()
