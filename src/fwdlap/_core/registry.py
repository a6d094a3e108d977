"""The rule registry: primitive -> forward-Laplacian rule.

A rule has the signature

    rule(primals, jacobians, laplacians, **params) -> (out, jacobian_out, laplacian_out)

`primals` are the primitive's inputs. `jacobians[i]` has shape `(n, *primals[i].shape)`
and `laplacians[i]` has `primals[i].shape`; either may be a symbolic zero (`Zero`).
For primitives with `multiple_results`, each output is a list. Outputs may be symbolic
zeros too. Rules run under the parent trace: ordinary `jax.numpy` / `lax` code works.

Higher-order primitives get "trace rules" instead, which also receive the `LapTrace` so
that they can transform inner jaxprs.
"""

from collections.abc import Callable
from typing import Any

import jax

Rule = Callable[..., Any]

# primitive -> rule(primals, jacobians, laplacians, **params)
rules: dict[Any, Rule] = {}
# primitive -> rule(trace, primals, jacobians, laplacians, **params)
trace_rules: dict[Any, Rule] = {}


def register(primitive: Any, rule: Rule) -> None:
    """Register `rule` as the forward-Laplacian rule of `primitive`."""
    rules[primitive] = rule


def register_trace_rule(primitive: Any, rule: Rule) -> None:
    """Register a rule that also receives the `LapTrace` (higher-order primitives)."""
    trace_rules[primitive] = rule


# --- custom_jvp functions ------------------------------------------------------------
#
# A `jax.custom_jvp` function reaches `LapTrace.process_custom_jvp_call` as a
# `custom_jvp_call` whose `fun` is either the function's own Python callable (a direct
# call) or a function evaluating the jaxpr it was staged into (inside `jax.jit`, and so
# for everything in `jax.numpy.linalg`). Rules are keyed by the custom_jvp object's
# underlying Python function; staged calls are matched by the source location JAX
# recorded and then verified: the staged jaxpr must equal a fresh trace of the
# registered function at the same input types. That check rejects calls that an outer
# transformation (`jax.vmap` inside the differentiated function, say) has rewritten;
# they take the generic path of differentiating the function's JVP rule.
#
# A custom_jvp rule has the signature
#
#     rule(primals, jacobians, laplacians) -> (outs, jacobian_outs, laplacian_outs)
#
# with lists over the function's (flat) arguments and outputs; it may return
# `NotImplemented` to fall back to the generic path for these inputs.

# custom_jvp.fun -> (custom_jvp object, rule)
custom_jvp_rules: dict[Any, tuple[Any, Rule]] = {}
# dense custom_jvp rule -> its block-sparse variant, rule(ctx, primals, jacs, laps)
sparse_custom_jvp_rules: dict[Any, Rule] = {}
# "name at file:line" -> custom_jvp.fun
_custom_jvp_by_src: dict[str, Any] = {}
# (custom_jvp.fun, input avals) -> printed jaxpr of a fresh trace
_fresh_jaxpr_text: dict[tuple[Any, tuple[Any, ...]], str | None] = {}


def register_custom_jvp(custom_jvp_fn: Any, rule: Rule) -> None:
    """Register `rule` for calls of the `jax.custom_jvp` function `custom_jvp_fn`."""
    from . import _jax

    target = custom_jvp_fn.fun
    custom_jvp_rules[target] = (custom_jvp_fn, rule)
    _custom_jvp_by_src[_jax.fun_sourceinfo(target)] = target
    for key in [k for k in _fresh_jaxpr_text if k[0] is target]:
        del _fresh_jaxpr_text[key]


def unregister_custom_jvp(custom_jvp_fn: Any) -> Rule | None:
    """Remove the rule of `custom_jvp_fn`; returns it (or None if there was none)."""
    entry = custom_jvp_rules.pop(custom_jvp_fn.fun, None)
    return None if entry is None else entry[1]


def _fresh_trace_text(target: Any, in_avals: tuple[Any, ...]) -> str | None:
    """The printed jaxpr of `target(*args)` at `in_avals`, or None if that fails."""
    from . import _jax

    key = (target, in_avals)
    if key not in _fresh_jaxpr_text:

        def flat_target(*args: Any) -> list[Any]:
            return jax.tree_util.tree_leaves(target(*args))

        try:
            dbg = _jax.make_debug_info("fwdlap rule check", flat_target, in_avals, {})
            wrapped = _jax.wrap_init(flat_target, debug_info=dbg)
            jaxpr, _, _ = _jax.trace_to_jaxpr_dynamic(wrapped, list(in_avals))
            text: str | None = str(jaxpr)
        except Exception:  # noqa: BLE001 - any failure means "not this function"
            text = None
        _fresh_jaxpr_text[key] = text
    return _fresh_jaxpr_text[key]


def find_custom_jvp_rule(fun: Any) -> tuple[Rule, Any] | None:
    """The registered rule that applies to a `custom_jvp_call` of `fun`, if any.

    Returns `(rule, out_avals)` where `out_avals` is None for a direct call (the output
    types are only known once `fun` is traced, see `finish_custom_jvp_call`).
    """
    from . import _jax

    if not custom_jvp_rules:
        return None
    target, closed = _jax.custom_jvp_call_target(fun)
    if target is not None:
        entry = custom_jvp_rules.get(target)
        return None if entry is None else (entry[1], None)
    if closed is None:
        return None
    src = _jax.custom_jvp_call_src_info(fun)
    target = _custom_jvp_by_src.get(src) if src is not None else None
    entry = custom_jvp_rules.get(target) if target is not None else None
    if entry is None:
        return None
    fresh = _fresh_trace_text(target, tuple(closed.in_avals))
    if fresh is None or fresh != str(closed.jaxpr):
        return None
    return entry[1], list(closed.out_avals)


def direct_call_out_avals(fun: Any, primals: Any) -> list[Any]:
    """Trace a directly called custom_jvp `fun` (abstractly) for its output types.

    Also fills the output-structure store that `jax.custom_jvp.__call__` reads, which
    the call expects either `fun` or the JVP rule to have filled.
    """
    from . import _jax

    avals = [jax.typeof(p) for p in primals]
    _, out_avals, _ = _jax.trace_to_jaxpr_dynamic(fun, avals)
    return list(out_avals)


def apply_custom_jvp_rule(
    fun: Any, primals: list[Any], jacobians: list[Any], laplacians: list[Any], n: int
) -> tuple[list[Any], list[Any], list[Any]] | None:
    """Run the registered rule for a `custom_jvp_call` of `fun`; None if there is none.

    Runs under the parent trace. Checks the rule's output types against the function's.
    """
    found = find_custom_jvp_rule(fun)
    if found is None:
        return None
    rule, out_avals = found
    result = rule(list(primals), list(jacobians), list(laplacians))
    if result is NotImplemented:
        return None
    if out_avals is None:
        out_avals = direct_call_out_avals(fun, primals)
    outs, jacs, laps = (list(r) for r in result)
    _check_custom_jvp_rule_outputs(rule, out_avals, outs, jacs, laps, n)
    return outs, jacs, laps


def _check_custom_jvp_rule_outputs(
    rule: Rule,
    out_avals: list[Any],
    outs: list[Any],
    jacs: list[Any],
    laps: list[Any],
    n: int,
) -> None:
    name = getattr(rule, "__qualname__", None) or repr(rule)
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
    from .zeros import Zero

    aval: Any = x.aval if type(x) is Zero else jax.typeof(x)
    return tuple(aval.shape)


def state() -> tuple[Any, ...]:
    """A fingerprint of every registered rule, for caches of transformed jaxprs.

    A cached forward-Laplacian jaxpr is only valid for the rules it was built with;
    keying caches on this fingerprint makes `fwdlap.register_rule` (or a test that
    swaps a rule) take effect on functions that were already traced. The default
    backend is part of it because some rules emit backend-specific code (see
    `rules.reduction`).
    """
    return (
        *(
            tuple(id(r) for r in table.values())
            for table in (rules, trace_rules, custom_jvp_rules)
        ),
        jax.default_backend(),
    )
