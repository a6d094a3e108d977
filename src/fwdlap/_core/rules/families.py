"""Family helpers: one line registers a primitive's behaviour in every pass.

As JAX's `defjvp` / `deflinear`, a helper builds the rules of a whole family from what
is particular to the primitive (its derivatives, how it moves block indices), so that
the dense and the block-sparse mode of the forward Laplacian and the fourth-order pass
(`taylor4`) cannot drift apart:

- `def_elementwise(prim, derivatives)`: f(x) per element, from one derivative table
  (the Laplacian takes its first two entries, the fourth-order pass four). Sparse: the
  operands are aligned to the union of their blocks and the dense rule runs on that
  data.
- `def_linear(prim, index_map=None)`: linear in the differentiable inputs: the map is
  applied to every direction and coefficient. Sparse: `index_map` moves the block
  indices as the primitive moves values (NumPy, at trace time), or an explicit
  `sparse=` rule, or `elementwise=True`.
- `def_zero(prim)`: no tangents out (comparisons, floor, stop_gradient, ...).
- `def_bilinear(prim, dense, sparse=...)`: mul, dot_general, conv; the fourth-order
  pass takes the series product.

A linear or bilinear primitive must say how the sparse mode treats it: pass
`sparse=None` to make its operands dense on purpose, which `DENSE_ONLY` records.
"""

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import registry
from ..registry import LapRule
from ..taylor4 import rules as taylor4_rules
from ..zeros import (
    add,
    is_zero,
    num_directions,
    zero_jacobian,
    zero_laplacian,
)
from . import sparse_rules
from .generic import generic_lap_rule, jvp_rows, primitive_jvp_fn

Derivatives = Callable[[Any, Any, dict[str, Any]], Iterable[Any]]
"""`(x, y, params) -> f'(x), f''(x), f'''(x), f''''(x)`, given the input `x` and the
output `y`: an elementwise primitive's one derivative table.

A pass takes the first entries it needs (the forward Laplacian two, the fourth-order
pass four); written as a generator, the table never computes the orders not taken.
"""

_MISSING: Any = object()

DENSE_ONLY: set[Any] = set()
"""Primitives of the linear and bilinear families whose sparse mode densifies."""
ELEMENTWISE: set[Any] = set()
"""Primitives whose sparse rule aligns the operands (they act per element)."""
NO_TANGENT: set[Any] = set()
"""Primitives registered with `def_zero`."""
DERIVATIVES: dict[Any, Derivatives] = {}
"""The derivative table of each unary elementwise primitive."""


def sum_squares(jac: Any) -> Any:
    """sum_k J_k * J_k over the leading direction axis."""
    # An elementwise product and a reduction fuse in XLA; an einsum would lower to a
    # dot_general whose batch dimensions are every output element.
    return jnp.sum(jac * jac, axis=0)


# --- elementwise ---------------------------------------------------------------------


def def_elementwise(
    prim: Any,
    derivatives: Derivatives | None = None,
    *,
    dense: registry.Rule | None = None,
    taylor4: registry.Rule | None = None,
    real_only: bool = False,
) -> None:
    """Register an elementwise primitive, in both modes and the fourth-order pass.

    **Arguments:**

    - `prim`: the primitive (nothing is registered if it is None: not in this JAX).
    - `derivatives`: for a unary primitive, its derivative table (`Derivatives`).
    - `dense`: the dense rule of a primitive with several operands (default: the
        generic rule).
    - `taylor4`: the fourth-order rule of a primitive with several operands (default:
        that pass's generic rule).
    - `real_only`: complex inputs take the generic rules.
    """
    if prim is None:
        return
    if derivatives is not None:
        DERIVATIVES[prim] = derivatives
        dense = unary_rule(prim, derivatives, real_only)
        taylor4 = taylor4_rules.elementwise_rule(prim, derivatives, real_only)
    elif dense is None:
        dense = generic_lap_rule(prim)
    sparse = sparse_elementwise(prim, dense)
    registry.register(prim, LapRule(dense, sparse, "elementwise", taylor4=taylor4))


def unary_rule(prim: Any, derivatives: Derivatives, real_only: bool = False):
    """The dense rule `f'(x) J`, `f''(x) sum_k J_k^2 + f'(x) L` of a unary primitive."""
    generic = generic_lap_rule(prim)

    def rule(ctx: Any, primals, jacobians, laplacians, **params: Any):
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        if real_only and jnp.iscomplexobj(x):
            return generic(ctx, primals, jacobians, laplacians, **params)
        y = prim.bind(x, **params)
        # Only the two orders the Laplacian needs are computed (see `Derivatives`).
        d1, d2 = itertools.islice(derivatives(x, y, params), 2)
        if is_zero(jac):
            jac_out = zero_jacobian(y, jac.aval.shape[0])
            second = zero_laplacian(y)
        else:
            jac_out = d1 * jac
            second = d2 * sum_squares(jac)
        first = zero_laplacian(y) if is_zero(lap) else d1 * lap
        return y, jac_out, add(second, first)

    return rule


def sparse_elementwise(prim: Any, dense: registry.Rule) -> registry.Rule:
    """The sparse rule of an elementwise primitive: align, then run `dense`."""

    def rule(ctx: Any, primals, jacobians, laplacians, **params: Any):
        aligned = sparse_rules.align_elementwise(
            ctx, prim, primals, jacobians, laplacians
        )
        if isinstance(aligned, registry.Fallback):
            return aligned
        primals, jacobians, laplacians, target = aligned
        out = dense(ctx, primals, jacobians, laplacians, **params)
        if isinstance(out, registry.Fallback):
            return out
        outs, jac_out, lap_out = out
        if isinstance(jac_out, list):  # several outputs, or a custom_jvp function
            jac_out = [sparse_rules.wrap(j, target, ctx.block_size) for j in jac_out]
        else:
            jac_out = sparse_rules.wrap(jac_out, target, ctx.block_size)
        return outs, jac_out, lap_out

    ELEMENTWISE.add(prim)
    return rule


def acts_elementwise(jaxpr: Any, shape: tuple[int, ...]) -> bool:
    """Whether every equation of `jaxpr` acts elementwise on values of `shape`.

    Scalars may broadcast in. Used to keep custom_jvp functions such as `jax.nn.relu`
    sparse: their JVP rule then only couples an element with itself.
    """
    for eqn in jaxpr.eqns:
        avals = [v.aval for v in (*eqn.invars, *eqn.outvars)]
        if any(tuple(getattr(a, "shape", ())) not in ((), shape) for a in avals):
            return False
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if inner is not None:
            if not acts_elementwise(getattr(inner, "jaxpr", inner), shape):
                return False
        elif eqn.primitive is lax.broadcast_in_dim_p:
            if tuple(eqn.invars[0].aval.shape) != ():
                return False
        elif eqn.primitive not in ELEMENTWISE and eqn.primitive not in NO_TANGENT:
            return False
    return True


# --- linear --------------------------------------------------------------------------


def def_linear(
    prim: Any,
    index_map: Callable[..., Any] | None = None,
    *,
    sparse: Any = _MISSING,
    elementwise: bool = False,
    unary: bool = False,
) -> None:
    """Register a primitive that is linear in its differentiable inputs.

    **Arguments:**

    - `prim`: the primitive (nothing is registered if it is None).
    - `index_map`: `(idx, **params) -> idx` moving block indices `(k, *shape)` as
        the primitive moves values (None where it cannot).
    - `sparse`: the sparse rule instead (None: densify on purpose).
    - `elementwise`: the primitive is also elementwise (its sparse rule aligns).
    - `unary`: one array operand: the primitive itself is applied to the tangents
        (and the Taylor coefficients); else JAX's JVP rule of the primitive is.
    """
    if prim is None:
        return
    if unary:
        dense, taylor4 = unary_linear_rule(prim), taylor4_rules.linear_rule(prim)
    else:
        dense, taylor4 = multi_linear_rule(prim), taylor4_rules.linear_jvp_rule(prim)
    if index_map is not None:
        sparse = sparse_rules.bind(sparse_rules.structural_rule(index_map), prim)
    elif elementwise:
        sparse = sparse_elementwise(prim, dense)
    elif sparse is _MISSING:
        raise TypeError(f"def_linear({prim}): say how the sparse mode treats it")
    if sparse is None:
        DENSE_ONLY.add(prim)
    registry.register(prim, LapRule(dense, sparse, "linear", taylor4=taylor4))


def unary_linear_rule(prim: Any):
    """Apply the primitive itself to every direction and to the laplacian."""

    def rule(ctx: Any, primals, jacobians, laplacians, **params: Any):
        (x,), (jac,), (lap,) = primals, jacobians, laplacians
        out = prim.bind(x, **params)
        if is_zero(jac):
            jac_out = zero_jacobian(out, jac.aval.shape[0])
        else:
            jac_out = jax.vmap(lambda j: prim.bind(j, **params))(jac)
        lap_out = zero_laplacian(out) if is_zero(lap) else prim.bind(lap, **params)
        return out, jac_out, lap_out

    return rule


def multi_linear_rule(prim: Any):
    """Apply JAX's JVP rule (the linear map itself) to the directions and laplacian."""

    def rule(ctx: Any, primals, jacobians, laplacians, **params: Any):
        jvp_fn = primitive_jvp_fn(prim, params)
        outs, lap_out = jvp_fn(primals, laplacians)
        nz = [i for i, j in enumerate(jacobians) if not is_zero(j)]
        n = num_directions(jacobians)
        if nz:
            rows = jvp_rows(jvp_fn, primals, jacobians)
            jac_out = [
                zero_jacobian(p, n) if j is None else j
                for p, j in zip(outs, rows, strict=False)
            ]
        else:
            jac_out = [zero_jacobian(p, n) for p in outs]
        if prim.multiple_results:
            return outs, jac_out, lap_out
        return outs[0], jac_out[0], lap_out[0]

    return rule


# --- zero derivative -----------------------------------------------------------------


def def_zero(prim: Any) -> None:
    """Register a primitive whose outputs carry no tangent, in every pass."""
    if prim is None:
        return
    dense = functools.partial(_zero_rule, prim)
    sparse = sparse_rules.bind(sparse_rules.no_tangent_rule, prim)
    NO_TANGENT.add(prim)
    taylor4 = taylor4_rules.zero_rule(prim)
    registry.register(prim, LapRule(dense, sparse, "zero", taylor4=taylor4))


def _zero_rule(
    prim: Any, ctx: Any, primals: Sequence[Any], jacobians, laplacians, **params
):
    del ctx, laplacians
    out = prim.bind(*primals, **params)
    n = num_directions(jacobians)
    outs = out if prim.multiple_results else [out]
    jacs = [zero_jacobian(o, n) for o in outs]
    laps = [zero_laplacian(o) for o in outs]
    if prim.multiple_results:
        return outs, jacs, laps
    return out, jacs[0], laps[0]


# --- bilinear ------------------------------------------------------------------------


def def_bilinear(
    prim: Any,
    dense: registry.Rule,
    *,
    sparse: Any = _MISSING,
    rewrite: registry.Rule | None = None,
    ops: taylor4_rules.BilinearOps | None = None,
) -> None:
    """Register a bilinear primitive: its dense, sparse and fourth-order rules.

    `sparse="elementwise"` aligns the operands (mul); None densifies on purpose.
    `rewrite` runs under the trace first (see `registry`). `ops` says how the
    fourth-order pass forms products of rows (default: the primitive vmapped).
    """
    if sparse == "elementwise":
        sparse = sparse_elementwise(prim, dense)
    elif sparse is _MISSING:
        raise TypeError(f"def_bilinear({prim}): say how the sparse mode treats it")
    if sparse is None:
        DENSE_ONLY.add(prim)
    taylor4 = taylor4_rules.bilinear_rule(ops or taylor4_rules.BilinearOps(prim))
    rule = LapRule(dense, sparse, "bilinear", rewrite=rewrite, taylor4=taylor4)
    registry.register(prim, rule)
