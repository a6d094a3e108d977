"""`fwdlap.register_rule`: teach fwdlap a forward-Laplacian rule."""

from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.extend.core as jex_core

from .._core import registry
from .._core.registry import Fallback, LapRule
from .._core.rules.families import sparse_elementwise


def register_rule(
    primitive: Any,
    rule: Callable[..., Any],
    *,
    sparse: Literal["elementwise"] | None = None,
) -> None:
    r"""Register a forward-Laplacian rule for a primitive or a custom_jvp function.

    fwdlap propagates, for every intermediate value $y$, its jacobian (one row per
    tangent direction $v_k$) and its laplacian
    $\sum_k v_k^\top \nabla^2 y \, v_k$ (plus the first-order term of the input
    laplacians). Operations without a rule of their own are differentiated twice with
    JAX's JVP rules, which is always correct but can be slow. A rule replaces that with
    a formula.

    **Arguments:**

    - `primitive`: either a `jax.extend.core.Primitive`, or a function decorated with
        `jax.custom_jvp` (which then keeps its JVP rule for every other transformation).
    - `rule`: the rule. Registering again replaces the previous rule.
    - `sparse`: how the block-sparse mode (`fwdlap.Sparsity`) treats the operation.
        `None` (the default): its operands' jacobians are made dense first (a
        `fwdlap.DensificationWarning` says so). `"elementwise"`: every output element
        depends only on the same element of the (broadcast) inputs, as for `jnp.exp`
        or `x * y`; the jacobians then stay block-sparse and `rule` runs on their
        stored rows, aligned so that each row names the same block in every operand.

    **Rules for primitives** have the signature

    ```python
    rule(primals, jacobians, laplacians, **params) -> (out, jacobian_out, laplacian_out)
    ```

    `primals` is the list of the primitive's inputs and `params` its parameters.
    `jacobians[i]` has shape `(n, *primals[i].shape)`: a leading axis of `n` tangent
    directions. `laplacians[i]` has the shape of `primals[i]`. Either may be a symbolic
    zero, a `fwdlap.Zero` (test with `isinstance(t, fwdlap.Zero)`), for inputs that
    do not depend on the differentiated variables; the rule may return `fwdlap.Zero`
    too. For
    an input $x$ with jacobian $J$ and laplacian $L$ and an output $y = f(x)$, the rule
    returns $y$, the jacobian $J_y[k] = f'(x)\,J[k]$ and the laplacian
    $L_y = \sum_k f''(x)[J[k], J[k]] + f'(x)\,L$ (with several inputs, $f''$ includes
    the cross terms). For a primitive with `multiple_results`, each of the three
    outputs is a list. The rule runs under the enclosing transformations (`jax.jit`,
    `jax.vmap`, ...), so ordinary `jax.numpy` and `jax.lax` code works in it.

    **Rules for `jax.custom_jvp` functions** have the signature

    ```python
    rule(primals, jacobians, laplacians) -> (outs, jacobian_outs, laplacian_outs)
    ```

    with lists over the function's arguments and over the leaves of its output
    (`jax.tree_util.tree_leaves`), shaped as above. The function must take arrays as
    positional arguments (no pytrees, no `nondiff_argnums`). A rule may return
    `NotImplemented` to fall back to differentiating the function's JVP rule for these
    inputs (fwdlap's own `slogdet` rule does so for complex matrices). The rule is used
    whenever the function is called inside the function given to fwdlap, directly or
    under `jax.jit`; where a transformation inside that function (say a `jax.vmap`
    around the call) has rewritten the call, fwdlap falls back to the JVP rule, which is
    always correct. The shapes the rule returns are checked against the function's.

    fwdlap ships rules of this kind for `jnp.linalg.slogdet` and `jnp.linalg.det`: they
    factorise the matrix once and use its inverse, instead of differentiating JAX's JVP
    rules through the LU primitives.

    **Returns:**

    Nothing; the rule applies to every later trace.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import fwdlap

    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))

    def softplus_rule(primals, jacobians, laplacians):
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        s = jax.nn.sigmoid(x)
        if isinstance(jac, fwdlap.Zero):  # x does not depend on the variables
            jac_out, lap_out = jac, jnp.zeros_like(x)
        else:
            jac_out, lap_out = s * jac, s * (1 - s) * jnp.sum(jac**2, axis=0)
        if not isinstance(lap, fwdlap.Zero):
            lap_out = lap_out + s * lap
        return [softplus(x)], [jac_out], [lap_out]

    fwdlap.register_rule(softplus, softplus_rule)
    ```
    """
    if not callable(rule):
        raise TypeError(
            "fwdlap.register_rule: `rule` must be a callable, got "
            f"{type(rule).__name__}."
        )
    if sparse not in (None, "elementwise"):
        raise ValueError(
            "fwdlap.register_rule: `sparse` must be None or 'elementwise', got "
            f"{sparse!r}."
        )
    if isinstance(primitive, jex_core.Primitive):
        dense = _primitive_rule(rule)
        sparse_rule = None if sparse is None else sparse_elementwise(primitive, dense)
        registry.register(primitive, LapRule(dense, sparse_rule))
        return
    if isinstance(primitive, jax.custom_jvp):
        custom_fn = cast(Any, primitive)
        nondiff: tuple[int, ...] = tuple(getattr(custom_fn, "nondiff_argnums", ()))
        if nondiff:
            raise ValueError(
                "fwdlap.register_rule: the jax.custom_jvp function "
                f"{_name(custom_fn)!r} has nondiff_argnums={nondiff}; rules can only "
                "be registered for custom_jvp functions whose arguments are all "
                "differentiable arrays. Pass the non-differentiable values by closure "
                "instead."
            )
        if getattr(custom_fn, "jvp", None) is None:
            raise ValueError(
                "fwdlap.register_rule: the jax.custom_jvp function "
                f"{_name(custom_fn)!r} has no JVP rule yet; call its `defjvp` first, "
                "so that other transformations (and fwdlap's fallback) can use it."
            )
        dense = _custom_jvp_rule(rule)
        sparse_rule = None if sparse is None else sparse_elementwise(custom_fn, dense)
        registry.register(custom_fn, LapRule(dense, sparse_rule, kind="custom_jvp"))
        return
    raise TypeError(
        "fwdlap.register_rule: `primitive` must be a jax.extend.core.Primitive or a "
        f"function decorated with jax.custom_jvp, got {type(primitive).__name__}. "
        "Other Python functions need no rule: fwdlap traces through them."
    )


def _primitive_rule(rule: Callable[..., Any]) -> Callable[..., Any]:
    """A user's primitive rule with the table's signature."""

    def dense(ctx: Any, primals: Any, jacobians: Any, laplacians: Any, **params: Any):
        del ctx
        return rule(primals, jacobians, laplacians, **params)

    dense.__qualname__ = getattr(rule, "__qualname__", repr(rule))
    return dense


def _custom_jvp_rule(rule: Callable[..., Any]) -> Callable[..., Any]:
    """A user's custom_jvp rule with the table's signature and way to decline."""

    def dense(ctx: Any, primals: Any, jacobians: Any, laplacians: Any, **params: Any):
        del ctx, params
        out = rule(list(primals), list(jacobians), list(laplacians))
        if out is NotImplemented:
            return Fallback("rule", "the registered rule returned NotImplemented")
        return out

    dense.__qualname__ = getattr(rule, "__qualname__", repr(rule))
    return dense


def _name(fn: Any) -> str:
    inner = getattr(fn, "fun", fn)
    return str(getattr(inner, "__qualname__", None) or repr(fn))
