"""Names kept for code written against the original single-file fwdlap.

The original `fwdlap` re-exported JAX's symbolic zero as `fwdlap.Zero`, and its users
build zero laplacians with `fwdlap.Zero.from_value(x)`. JAX has since removed
`Zero.from_value` (and its successor `Zero.from_primal_value`), so a plain re-export no
longer offers that spelling. `Zero` below restores it without subclassing JAX's class:
JAX's internals test `type(t) is Zero`, which a subclass would fail.
"""

from typing import Any

from ._core import _jax
from ._core.zeros import zero_tangent_from_primal


class _ZeroMeta(type):
    """Makes `fwdlap.Zero` stand for JAX's own symbolic-zero class.

    `isinstance` and `issubclass` answer for JAX's class, and calling
    `fwdlap.Zero(aval)` builds JAX's symbolic zero, so every zero fwdlap hands out or
    accepts is the one kind of object JAX's internals expect.
    """

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, _jax.Zero)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _jax.Zero)

    def __call__(cls, aval: Any) -> _jax.Zero:
        return _jax.Zero(aval)


class Zero(metaclass=_ZeroMeta):
    r"""A symbolic zero tangent: kept for compatibility with the original fwdlap.

    Code written for the original single-file `fwdlap` spells a zero laplacian
    `fwdlap.Zero.from_value(x)`; that keeps working here. New code should call
    `fwdlap.zero_tangent_from_primal` (or pass `None` as the tangent), which gives
    the very same object.

    `fwdlap.Zero` is a stand-in for JAX's own symbolic zero
    (`jax.interpreters.ad.Zero`), not a separate class: `fwdlap.Zero(aval)` and
    `fwdlap.Zero.from_value(x)` both return JAX's symbolic zero, and
    `isinstance(t, fwdlap.Zero)` is true for any symbolic zero, whether it came from
    fwdlap or from JAX. Test tangents with `isinstance`, not with
    `type(t) is fwdlap.Zero`.

    A symbolic zero is a pytree with no leaves (its shape and dtype are static), so it
    can be passed through `jax.jit`, `jax.vmap` and `lax` control flow like the arrays
    it stands in for. fwdlap skips every operation on it instead of adding zeros.

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    x = jnp.arange(3.0)
    zero = fwdlap.Zero.from_value(x)  # a zero laplacian shaped like x
    out, jac, lap = fwdlap.lap(jnp.sin, (x,), (jnp.eye(3),), (zero,))
    assert isinstance(zero, fwdlap.Zero)
    ```
    """

    @staticmethod
    def from_value(value: Any) -> _jax.Zero:
        r"""A symbolic zero tangent shaped like `value` (a zero laplacian).

        Kept for compatibility with the original fwdlap; it is
        `fwdlap.zero_tangent_from_primal(value)`.

        **Arguments:**

        - `value`: an array or scalar; only its shape and dtype are used.

        **Returns:**

        JAX's symbolic zero with `value`'s tangent shape and dtype.
        """
        return zero_tangent_from_primal(value)

    @staticmethod
    def from_primal_value(value: Any) -> _jax.Zero:
        r"""The same as `fwdlap.Zero.from_value`: JAX's later spelling of it."""
        return zero_tangent_from_primal(value)
