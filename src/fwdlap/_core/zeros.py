"""Symbolic-zero helpers shared by the trace and the rules."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _jax

Zero = _jax.Zero


def is_zero(x: Any) -> bool:
    """Whether `x` is a symbolic zero (or a float0 array, which also means zero)."""
    if type(x) is Zero:
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and dtype == jax.dtypes.float0


def tangent_aval(primal: Any) -> Any:
    """The tangent aval of a primal value."""
    return jax.typeof(primal).to_tangent_aval()


def zero_laplacian(primal: Any) -> Any:
    """A symbolic zero shaped like `primal`'s tangent."""
    return Zero(tangent_aval(primal))


def zero_jacobian(primal: Any, n: int) -> Any:
    """A symbolic zero jacobian with leading direction axis `n`."""
    aval = tangent_aval(primal)
    return Zero(aval.update(shape=(n, *aval.shape)))


def zero_tangent_from_primal(primal: Any, jsize: int | None = None) -> Any:
    """A symbolic zero tangent for `primal`: zero without storing any zeros.

    Pass it to `fwdlap.lap` (or `lap_partial`) wherever an input's jacobian or
    laplacian is zero. The trace never instantiates it, so work that would only
    multiply zeros is skipped entirely; a symbolic zero is also a valid argument of a
    `jax.jit`-compiled function (it is a pytree with no leaves). It is what
    `fwdlap.Zero.from_value` returns, and `None` means the same in the pytree API.

    **Arguments:**

    - `primal`: the value (array, scalar or tracer) whose tangent is zero. Integer and
        boolean primals get a `float0` zero, as in `jax.jvp`.
    - `jsize`: `None` for a zero laplacian, shaped like `primal`; an integer $n$ for a
        zero jacobian with a leading axis of $n$ directions, shaped
        `(n, *primal.shape)`.

    **Returns:**

    A `jax.interpreters.ad.Zero` carrying only the shape and dtype of the tangent
    (`isinstance(z, fwdlap.Zero)` is true).

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    x = jnp.ones(3)
    zero_lap = fwdlap.zero_tangent_from_primal(x)
    zero_jac = fwdlap.zero_tangent_from_primal(x, 3)
    _, _, lap = fwdlap.lap(lambda y: jnp.sum(y**3), (x,), (jnp.eye(3),), (zero_lap,))
    assert zero_jac.aval.shape == (3, 3)
    assert jnp.allclose(lap, 18.0)
    ```
    """
    return zero_laplacian(primal) if jsize is None else zero_jacobian(primal, jsize)


def instantiate(x: Any) -> Any:
    """Turn a symbolic zero into a dense array of zeros (under the current trace)."""
    if type(x) is Zero:
        aval: Any = x.aval
        if aval.dtype == jax.dtypes.float0:
            return np.zeros(aval.shape, jax.dtypes.float0)
        return jnp.zeros(aval.shape, aval.dtype)
    return x


def num_directions(jacobians: Any) -> int:
    """The shared number of directions n from a list of jacobians (arrays or zeros)."""
    for j in jacobians:
        shape = j.aval.shape if type(j) is Zero else jnp.shape(j)  # type: ignore[union-attr]
        return shape[0]
    raise ValueError("fwdlap: cannot infer the number of directions from no inputs.")


def add(x: Any, y: Any) -> Any:
    """Add two tangents, either of which may be a symbolic zero."""
    if type(x) is Zero:
        return y
    if type(y) is Zero:
        return x
    return x + y


def broadcast_operands(
    primals: Any, jacobians: Any, laplacians: Any
) -> tuple[list[Any], list[Any], list[Any]]:
    """Broadcast the operands of an elementwise primitive to its output shape.

    `lax` elementwise primitives broadcast implicitly: a rank-0 operand beside arrays
    (`mul a:f[3] b:f[]`) and size-1 axes of equal-rank operands (`mul a:f[3,1]
    b:f[1,3]`). A jacobian carries an extra leading direction axis, so it does not
    broadcast the way its primal does; rules that combine jacobians by hand call this
    first. Symbolic zeros stay symbolic.
    """
    shapes = [tuple(jnp.shape(p)) for p in primals]
    shape = tuple(jnp.broadcast_shapes(*shapes))
    if all(s == shape for s in shapes):
        return list(primals), list(jacobians), list(laplacians)
    ps, js, ls = [], [], []
    for p, j, lp, s in zip(primals, jacobians, laplacians, shapes, strict=True):
        if s != shape:
            p = jnp.broadcast_to(p, shape)
            if type(j) is Zero:
                jac_aval: Any = j.aval
                j = Zero(jac_aval.update(shape=(jac_aval.shape[0], *shape)))
            else:
                n = j.shape[0]
                j = jnp.reshape(j, (n, *s) if s else (n,) + (1,) * len(shape))
                j = jnp.broadcast_to(j, (n, *shape))
            if type(lp) is Zero:
                lp = Zero(lp.aval.update(shape=shape))
            else:
                lp = jnp.broadcast_to(lp, shape)
        ps.append(p)
        js.append(j)
        ls.append(lp)
    return ps, js, ls
