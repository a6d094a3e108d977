"""The dedicated slogdet and det rules, against jax.hessian and the generic path.

The generic path (differentiating JAX's own JVP rules of slogdet / det) is forced by
removing the registered rules for the duration of a test.
"""

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap
from fwdlap._core import registry

RNG = np.random.default_rng(3)


def linalg_rules() -> dict[Any, registry.LapRule]:
    """The registered rules of custom_jvp functions matched by call (slogdet, det)."""
    return {
        key: rule
        for key, rule in registry.rules.items()
        if rule.kind == "custom_jvp" and not rule.by_source
    }


@contextlib.contextmanager
def restored_rules() -> Iterator[None]:
    saved = dict(registry.rules)
    try:
        yield
    finally:
        registry.rules.clear()
        registry.rules.update(saved)


@pytest.fixture
def rule_calls() -> Iterator[list[str]]:
    """Wrap the registered linalg rules with call counters."""
    calls: list[str] = []
    with restored_rules():
        for target, rule in linalg_rules().items():

            def counted(
                ctx: Any,
                p: Any,
                j: Any,
                lp: Any,
                rule: Any = rule,
                name: str = target.__name__,
                **params: Any,
            ):
                calls.append(name)
                return rule.dense(ctx, p, j, lp, **params)

            registry.rules[target] = dataclasses.replace(rule, dense=counted)
        yield calls


@pytest.fixture
def generic_path() -> Iterator[None]:
    """Remove the linalg rules: slogdet and det go through their JVP rules."""
    with restored_rules():
        for target in linalg_rules():
            del registry.rules[target]
        yield


def matrix_fn(batch: tuple[int, ...], m: int, seed: int = 0) -> Any:
    """x -> a smooth, well-conditioned, non-symmetric batch of (m, m) matrices."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(batch, dtype=int)) * m * m
    w = jnp.asarray(rng.normal(size=(size, X.size)) / np.sqrt(X.size))
    base = jnp.asarray(rng.normal(size=(*batch, m, m)) + 3 * np.eye(m))
    return lambda x: base + jnp.tanh(w @ x).reshape(*batch, m, m)


X = jnp.asarray(RNG.normal(size=6))


def make(kind: str, batch: tuple[int, ...], m: int) -> Any:
    mats = matrix_fn(batch, m, seed=m + len(batch))
    if kind == "slogdet":

        def f(x: jax.Array) -> jax.Array:
            sign, logdet = jnp.linalg.slogdet(mats(x))
            return jnp.stack([sign * jnp.cos(logdet), logdet])

        return f
    return lambda x: jnp.linalg.det(mats(x)) ** 2


def reference(f: Any, x: jax.Array) -> Any:
    """(f, jacobian with directions first, trace of jax.hessian), compiled."""

    def ref(x: jax.Array) -> Any:
        hess = jax.hessian(f)(x)
        jac = jnp.moveaxis(jax.jacfwd(f)(x), -1, 0)
        return f(x), jac, jnp.trace(hess, axis1=-2, axis2=-1)

    return jax.jit(ref)(x)


CASES = [
    ("slogdet", (), 4),
    ("slogdet", (3,), 5),
    ("det", (2, 3), 5),
]


@pytest.mark.parametrize(("kind", "batch", "m"), CASES)
def test_rule_matches_jax_hessian(kind: str, batch: Any, m: int, rule_calls: list[str]):
    f = make(kind, batch, m)
    n = X.size
    out, jac, lap = jax.jit(
        lambda x: fwdlap.lap(f, (x,), (jnp.eye(n),), (jnp.zeros(n),))
    )(X)
    assert rule_calls, "the dedicated rule did not run"
    ref_out, ref_jac, ref_lap = reference(f, X)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(jac, ref_jac, rtol=1e-9)
    np.testing.assert_allclose(lap, ref_lap, rtol=1e-9)


@pytest.mark.parametrize(("kind", "batch", "m"), [CASES[1], CASES[2]])
def test_rule_matches_generic_path(kind: str, batch: Any, m: int, request: Any):
    # Random directions and a non-zero input laplacian exercise every term.
    f = make(kind, batch, m)
    jac_in = jnp.asarray(np.random.default_rng(1).normal(size=(3, X.size)))
    lap_in = jnp.asarray(np.random.default_rng(2).normal(size=X.size))
    run = jax.jit(lambda x: fwdlap.lap(f, (x,), (jac_in,), (lap_in,)))
    calls = request.getfixturevalue("rule_calls")
    dedicated = run(X)
    assert calls
    request.getfixturevalue("generic_path")
    generic = jax.jit(lambda x: fwdlap.lap(f, (x,), (jac_in,), (lap_in,)))(X)
    for a, b in zip(dedicated, generic, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn", [jnp.linalg.slogdet, jnp.linalg.det])
def test_laplacian_only_input(fn: Any, rule_calls: list[str]):
    # A matrix with a laplacian but no jacobian: lap = tr(A^{-1} L) (times det).
    a = jnp.asarray(RNG.normal(size=(2, 4, 4)) + 4 * np.eye(4))
    lap_a = jnp.asarray(RNG.normal(size=(2, 4, 4)))
    zero_jac = fwdlap.zero_tangent_from_primal(a, 2)
    out, _, lap = fwdlap.lap(lambda m: fn(m), (a,), (zero_jac,), (lap_a,))
    assert rule_calls
    inv_trace = jnp.einsum("...ij,...ji->...", jnp.linalg.inv(a), lap_a)
    if fn is jnp.linalg.det:
        np.testing.assert_allclose(lap, jnp.linalg.det(a) * inv_trace, rtol=1e-10)
    else:
        np.testing.assert_allclose(out[0], jnp.sign(jnp.linalg.det(a)))
        np.testing.assert_allclose(lap[1], inv_trace, rtol=1e-10)
        np.testing.assert_array_equal(lap[0], 0.0)


def test_sign_is_correct_for_negative_determinants(rule_calls: list[str]):
    a = jnp.diag(jnp.asarray([1.0, -2.0, 3.0, 0.5]))
    perm = a[jnp.asarray([1, 0, 2, 3])]  # one row swap: det > 0 again
    jac = jnp.ones((1, 4, 4))
    run = jax.jit(lambda m: fwdlap.lap(jnp.linalg.slogdet, (m,), (jac,), (0 * m,)))
    for mat, sign in ((a, -1.0), (perm, 1.0), (-a, -1.0)):
        out, _, _ = run(mat)
        np.testing.assert_allclose(out[0], sign)
        np.testing.assert_allclose(out[1], np.log(3.0))
    assert rule_calls


def test_slogdet_qr_method_uses_the_rule(rule_calls: list[str]):
    mats = matrix_fn((), 4)
    f = lambda x: jnp.linalg.slogdet(mats(x), method="qr")[1]  # noqa: E731
    lap = fwdlap.laplacian(f)(X)
    assert rule_calls
    np.testing.assert_allclose(lap, reference(f, X)[2], rtol=1e-9)


def test_complex_matrices_fall_back_to_generic_path(rule_calls: list[str]):
    # The rule declines complex input; the generic path handles it.
    base = jnp.asarray(RNG.normal(size=(4, 4)) + 1j * RNG.normal(size=(4, 4)))

    def f(x: jax.Array) -> jax.Array:
        return jnp.linalg.slogdet(base + jnp.diag(x[:4]).astype(base.dtype))[1]

    lap = jax.jit(fwdlap.laplacian(f))(X)
    np.testing.assert_allclose(lap, reference(f, X)[2], rtol=1e-9)
