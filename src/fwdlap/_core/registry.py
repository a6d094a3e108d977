"""The rule table: primitive or `jax.custom_jvp` function -> `LapRule`.

Every forward-Laplacian rule, dense or block-sparse, for a primitive or for a
`custom_jvp` function, has one signature:

    rule(ctx, primals, jacobians, laplacians, **params) -> (outs, jacobians, laplacians)

- `ctx` is the `LapTrace` for a dense rule (`ctx.n` directions) and the
  `sparse.SparseContext` for a sparse rule.
- `primals` are the inputs. `jacobians[i]` has shape `(n, *primals[i].shape)` (for a
  sparse rule it may be a `sparse.SparseJac`) and `laplacians[i]` has
  `primals[i].shape`; either may be a symbolic zero (`zeros.Zero`).
- The three results are single values, or lists for a primitive with
  `multiple_results` and for every `custom_jvp` function. They may be symbolic zeros.
- `params` are the primitive's parameters; a `custom_jvp` rule gets `call`, a
  `rules.custom.CustomJvpCall` (the JVP rule, traced at most once).

Rules run under the parent trace: ordinary `jax.numpy` / `lax` code works in them.

**Declining.** A rule that cannot handle a call returns a `Fallback` saying why. A
sparse rule that declines has its operands made dense (the reason is reported) and the
dense rule runs; a dense rule that declines gives way to the generic rule
(`rules.generic`), which differentiates the JVP rule twice. The generic rule is also
what runs for anything not in the table.

**Rewrites.** A few primitives are better traced differently than by a rule (a jitted
`jnp` helper inlined, a `dot_general` of a broadcast value done on the small value).
`LapRule.rewrite(trace, tracers, primals, jacobians, laplacians, params)` runs under
the `LapTrace` itself, before the rule (even when every tangent is zero), and returns
the output tracers or a `Fallback`.

**The fourth-order pass.** An entry also holds the rule of the collapsed fourth-order
Taylor pass behind `fwdlap.biharmonic` (`taylor4`), which has its own signature,

    rule(ctx, primals, series, **params) -> (outs, series)

(see `taylor4.rules`), or None where that pass's generic rule does (nested JVPs).

Family helpers (`rules.families`) fill the table for the common cases, the dense, the
sparse and the fourth-order behaviour together: `def_elementwise`, `def_linear`,
`def_zero`, `def_bilinear`. Rules of the fourth-order pass alone (its loops and
branches) are added to an entry with `set_pass_rule`.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

from . import _jax
from .platform import targets_cpu

Rule = Callable[..., Any]

KINDS = frozenset(
    {
        "elementwise",  # f(x) per element, with f' and f''
        "linear",  # a linear map of the differentiable inputs: no second-order term
        "zero",  # piecewise constant (or no float output): no tangents out
        "bilinear",  # only cross terms: mul, dot_general, conv
        "reduction",  # reductions, cumulative ops, sort
        "control_flow",  # transforms inner jaxprs: jit, remat, cond, scan, while
        "custom_jvp",  # a rule for a `jax.custom_jvp` function
        "other",  # anything else: a user's rule, a one-off formula
    }
)


class Fallback:
    """A rule's answer that it does not handle this call, and why.

    **Attributes:**

    - `cause`: `"rule"` (no rule applies to this call) or `"threshold"` (a sparse rule
        would need more blocks per element than allowed).
    - `reason`: a sentence for densification reports.
    - `blocks`: how many blocks per element the result would depend on, if known.
    """

    __slots__ = ("cause", "reason", "blocks")

    def __init__(self, cause: str, reason: str, blocks: int = 0):
        self.cause = cause
        self.reason = reason
        self.blocks = blocks

    def __repr__(self) -> str:
        return f"Fallback({self.cause!r}, {self.reason!r})"


DECLINED = Fallback("rule", "the rule does not apply to this call")
"""A shared `Fallback` for rewrites, whose reasons are never reported."""


@dataclasses.dataclass(frozen=True, eq=False)
class LapRule:
    """The forward-Laplacian behaviour of one primitive or `custom_jvp` function.

    **Attributes:**

    - `dense`: the rule for dense (or zero) jacobians.
    - `sparse`: the rule for block-sparse jacobians, or None: the operands are then
        made dense (and the densification reported) before `dense` runs.
    - `kind`: the family (one of `KINDS`), for tests and reports.
    - `rewrite`: optional, traced under the `LapTrace` before the rule (see above).
    - `by_source`: for a `custom_jvp` function: calls staged into a jaxpr are matched
        on JAX's recorded source location alone (the rule checks the JVP rule it
        gets), not by comparing the staged jaxpr with a fresh trace.
    - `name`: the name in densification reports (default: the primitive's or the
        function's).
    - `taylor4`: the rule of the fourth-order pass, or None: its generic rule.
    """

    dense: Rule
    sparse: Rule | None = None
    kind: str = "other"
    rewrite: Rule | None = None
    by_source: bool = False
    name: str | None = None
    taylor4: Rule | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; one of {sorted(KINDS)}")


# primitive or custom_jvp function (its Python function, `custom_jvp.fun`) -> rule
rules: dict[Any, LapRule] = {}
# "name at file:line" of a registered custom_jvp function -> its key in `rules`
custom_jvp_by_source: dict[str, Any] = {}


def key_of(target: Any) -> Any:
    """The table key of a primitive (itself) or a `jax.custom_jvp` function (`fun`)."""
    return target.fun if isinstance(target, jax.custom_jvp) else target


def register(target: Any, rule: LapRule) -> None:
    """Make `rule` the forward-Laplacian rule of `target` (replacing any other).

    `target` is a primitive or a `jax.custom_jvp` function.
    """
    key = key_of(target)
    rules[key] = rule
    if key is not target:
        custom_jvp_by_source[_jax.fun_sourceinfo(key)] = key


def set_pass_rule(target: Any, *, taylor4: Rule) -> None:
    """Give the entry of `target` its fourth-order rule, keeping its other rules.

    The entry must exist: a forward-Laplacian registration made after this one would
    replace the whole entry, so registering in that order is an error, not a silent
    loss.
    """
    key = key_of(target)
    if key not in rules:
        raise KeyError(f"{target} has no entry: register its Laplacian rules first")
    rules[key] = dataclasses.replace(rules[key], taylor4=taylor4)


def unregister(target: Any) -> LapRule | None:
    """Remove the rule of `target`; returns it (or None if there was none)."""
    return rules.pop(key_of(target), None)


def state() -> tuple[Any, ...]:
    """A fingerprint of the table, for caches of transformed jaxprs.

    A cached forward-Laplacian jaxpr is only valid for the rules it was built with;
    keying caches on this fingerprint makes `fwdlap.register_rule` (or a test that
    swaps a rule) take effect on functions that were already traced. The default
    backend is part of it because some rules emit backend-specific code (see
    `rules.reduction`), and so is `is_linearizing` (see `rules.bilinear`).
    """
    return (tuple(map(id, rules.values())), targets_cpu(), is_linearizing())


_LINEARIZING = contextvars.ContextVar("fwdlap_linearizing", default=False)


@contextlib.contextmanager
def linearizing() -> Iterator[None]:
    """Marks the passes traced inside as linearised (`lap_partial`, sparse windows).

    Such a pass is split into a part that needs only the primals and a part that
    needs the tangents (or the window), so no value may be computed together with a
    tangent, even where that would be faster (see `rules.bilinear`).
    """
    token = _LINEARIZING.set(True)
    try:
        yield
    finally:
        _LINEARIZING.reset(token)


def is_linearizing() -> bool:
    """Whether the pass being traced is linearised (see `linearizing`)."""
    return _LINEARIZING.get()
