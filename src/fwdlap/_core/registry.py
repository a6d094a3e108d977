"""The rule registry: primitive -> forward-Laplacian rule.

A rule has the signature

    rule(primals, jacobians, laplacians, **params) -> (primal_out, jacobian_out, laplacian_out)

`primals` are the primitive's inputs. `jacobians[i]` has shape `(n, *primals[i].shape)`
and `laplacians[i]` has `primals[i].shape`; either may be a symbolic zero (`Zero`).
For primitives with `multiple_results`, each output is a list. Outputs may be symbolic
zeros too. Rules run under the parent trace: ordinary `jax.numpy` / `lax` code works.

Higher-order primitives get "trace rules" instead, which also receive the `LapTrace` so
that they can transform inner jaxprs.
"""

from collections.abc import Callable
from typing import Any

Rule = Callable[..., Any]

# primitive -> rule(primals, jacobians, laplacians, **params)
rules: dict[Any, Rule] = {}
# primitive -> rule(trace, primals, jacobians, laplacians, **params)
trace_rules: dict[Any, Rule] = {}


def register(primitive: Any, rule: Rule) -> None:
    """Register `rule` as the forward-Laplacian rule of `primitive`."""
    rules[primitive] = rule


def register_trace_rule(primitive: Any, rule: Rule) -> None:
    """Register a rule that also receives the `LapTrace` (for higher-order primitives)."""
    trace_rules[primitive] = rule
