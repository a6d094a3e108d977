"""Folding values known while tracing (`fwdlap._core.constants`).

Rules recover index arrays and the seeds' zero pattern from the equations that made
them under `jax.jit`. The index arithmetic is evaluated in NumPy, so each case is
checked against the same expression evaluated eagerly by JAX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwdlap._core import constants


def _eye(x):
    return jnp.eye(x.size, dtype=x.dtype)


def _shifted_eye(x):
    return jnp.eye(x.size, k=1, dtype=jnp.int32)


def _index_arithmetic(x):
    idx = jnp.arange(x.size) * 3 - 2
    return jnp.where(idx >= 0, idx, idx + x.size)


def _bitwise(x):
    i = jnp.arange(x.size, dtype=jnp.int32)
    return (i & 6) | (i > 3).astype(jnp.int32)


def _broadcast_reshape(x):
    row = jnp.arange(x.size, dtype=jnp.float32)
    return jnp.broadcast_to(row, (2, x.size)).reshape(x.size, 2)


def _comparisons(x):
    i = jnp.arange(x.size)
    return jnp.stack([i < 2, i <= 2, i > 2, i != 2, i == 2])


def _float_to_int(x):
    return (jnp.arange(x.size, dtype=jnp.float32) * 1.5).astype(jnp.int32)


def _float_scalars(x):
    # Float32 arithmetic and comparisons with scalar constants, rounded as XLA does.
    r = jnp.arange(x.size, dtype=jnp.float32) * 0.1 + 1e-8
    return jnp.stack([r, (r < 0.3).astype(jnp.float32), r * r - 0.01])


CASES = [
    _float_scalars,
    _eye,
    _shifted_eye,
    _index_arithmetic,
    _bitwise,
    _broadcast_reshape,
    _comparisons,
    _float_to_int,
]


@pytest.mark.parametrize("build", CASES, ids=lambda f: f.__name__)
def test_concrete_value_matches_eager_jax(build):
    x = jnp.ones(6, jnp.float32)
    expected = np.asarray(build(x))
    seen = []

    def traced(x):
        value = build(x)
        seen.append(constants.concrete_value(value))
        return value

    jax.jit(traced).trace(x)
    (folded,) = seen
    assert folded is not None
    assert folded.dtype == expected.dtype
    np.testing.assert_array_equal(folded, expected)


def test_concrete_value_of_a_traced_input_is_unknown():
    seen = []

    def traced(x):
        seen.append(constants.concrete_value(x * 2))
        return x

    jax.jit(traced).trace(jnp.ones(3))
    assert seen == [None]


def test_folding_an_identity_compiles_nothing():
    # Binding the identity's primitives would compile one XLA program per primitive.
    x = jnp.ones(7, jnp.float32)
    seen = []

    def traced(x):
        seen.append(constants.concrete_value(jnp.eye(x.size, k=2, dtype=x.dtype)))
        return x

    with jax.log_compiles(), _count_compiles() as compiles:
        jax.jit(traced).trace(x)
    np.testing.assert_array_equal(seen[0], np.eye(7, k=2, dtype=np.float32))
    assert compiles == []


class _count_compiles:
    """Collects the "Compiling ..." records `jax.log_compiles` writes."""

    def __enter__(self):
        import logging

        self.records: list = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        self.logger = logging.getLogger("jax")
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.records[:] = [r for r in self.records if "ompil" in r.getMessage()]
