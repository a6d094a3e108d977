"""`has_aux=True`: auxiliary outputs returned as computed, not differentiated.

The differentiated part is checked against `jax.hessian` / `jax.grad` of the output
alone, the auxiliary data against a direct evaluation of the function, and its
derivatives (through the fwdlap call, by an outer `jax.grad`) against `jax.grad` of
the auxiliary data alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap

MODES = {
    "dense": {},
    "chunked": {"chunk_size": 2},
    "sparse": {"sparsity": fwdlap.Sparsity(block_size=3)},
    "sparse_windows": {"sparsity": fwdlap.Sparsity(block_size=3), "chunk_size": 3},
}


def model(p, x):
    """A scalar output and a pytree of auxiliary values, some of them integers."""
    r = x.reshape(-1, 3)
    h = jnp.tanh(p * r) * jnp.sum(r**2, axis=-1, keepdims=True)
    out = jnp.sum(jnp.sin(h)) + jnp.prod(x[:2])
    aux = {"h": h, "norm": jnp.sqrt(jnp.sum(h**2) * p), "count": jnp.int32(r.shape[0])}
    return out, aux


P = 0.7
X = jnp.linspace(-0.4, 1.1, 9)


def output_only(p, x):
    return model(p, x)[0]


def ref_laplacian(p, x):
    return jnp.trace(jax.hessian(output_only, argnums=1)(p, x))


def assert_aux_equal(aux, p, x):
    want = model(p, x)[1]
    assert jax.tree_util.tree_structure(aux) == jax.tree_util.tree_structure(want)
    leaves = jax.tree_util.tree_leaves
    for got, exp in zip(leaves(aux), leaves(want), strict=True):
        assert jnp.result_type(got) == jnp.result_type(exp)
        np.testing.assert_allclose(got, exp, rtol=1e-13)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("jit", [False, True])
def test_laplacian(mode, jit):
    fn = fwdlap.laplacian(model, argnums=1, has_aux=True, **MODES[mode])
    lap, aux = (jax.jit(fn) if jit else fn)(P, X)
    np.testing.assert_allclose(lap, ref_laplacian(P, X), rtol=1e-12)
    assert_aux_equal(aux, P, X)


@pytest.mark.parametrize("mode", MODES)
def test_value_grad_and_laplacian(mode):
    fn = fwdlap.value_grad_and_laplacian(model, argnums=1, has_aux=True, **MODES[mode])
    (value, aux), grad, lap = fn(P, X)
    np.testing.assert_allclose(value, output_only(P, X), rtol=1e-14)
    np.testing.assert_allclose(grad, jax.grad(output_only, argnums=1)(P, X), rtol=1e-12)
    np.testing.assert_allclose(lap, ref_laplacian(P, X), rtol=1e-12)
    assert_aux_equal(aux, P, X)


def test_hessian_diagonal():
    diag, aux = fwdlap.hessian_diagonal(model, argnums=1, has_aux=True)(P, X)
    want = jnp.diag(jax.hessian(output_only, argnums=1)(P, X))
    np.testing.assert_allclose(diag, want, rtol=1e-12, atol=1e-14)
    assert_aux_equal(aux, P, X)


@pytest.mark.parametrize("mode", ["dense", "chunked", "sparse"])
def test_lap(mode):
    eye = jnp.eye(X.size)
    kwargs = {k: v for k, v in MODES[mode].items()}
    out, jac, lap, aux = fwdlap.lap(
        model, (P, X), (None, eye), (None, None), has_aux=True, **kwargs
    )
    np.testing.assert_allclose(out, output_only(P, X), rtol=1e-14)
    np.testing.assert_allclose(jac, jax.grad(output_only, argnums=1)(P, X), rtol=1e-12)
    np.testing.assert_allclose(lap, ref_laplacian(P, X), rtol=1e-12)
    assert_aux_equal(aux, P, X)


def test_lap_partial():
    eye = jnp.eye(X.size)
    out, lap_pe, aux = fwdlap.lap_partial(
        model, (P, X), (None, eye), (None, None), has_aux=True
    )
    jac, lap = lap_pe((None, eye), (None, None))
    np.testing.assert_allclose(out, output_only(P, X), rtol=1e-14)
    np.testing.assert_allclose(jac, jax.grad(output_only, argnums=1)(P, X), rtol=1e-12)
    np.testing.assert_allclose(lap, ref_laplacian(P, X), rtol=1e-12)
    assert_aux_equal(aux, P, X)


@pytest.mark.parametrize("mode", MODES)
def test_outer_grad_sees_aux(mode):
    """The aux keeps its dependence on values outside the fwdlap call (a PINN's
    parameters), as `jax.grad(has_aux=True)`'s aux does."""

    def through_fwdlap(p):
        lap, aux = fwdlap.laplacian(model, argnums=1, has_aux=True, **MODES[mode])(p, X)
        return lap + aux["norm"]

    def reference(p):
        return ref_laplacian(p, X) + model(p, X)[1]["norm"]

    np.testing.assert_allclose(
        jax.grad(through_fwdlap)(P), jax.grad(reference)(P), rtol=1e-11
    )


def test_vmap():
    xs = jnp.stack([X, X[::-1], 0.5 * X])
    laps, aux = jax.vmap(fwdlap.laplacian(model, argnums=1, has_aux=True), (None, 0))(
        P, xs
    )
    for i, x in enumerate(xs):
        np.testing.assert_allclose(laps[i], ref_laplacian(P, x), rtol=1e-12)
        assert_aux_equal(jax.tree_util.tree_map(lambda a, i=i: a[i], aux), P, x)


def test_aux_costs_nothing_under_jit():
    """The aux values' tangents are dropped: XLA counts only the aux values' own
    arithmetic on top of the Laplacian alone."""
    weights = jax.random.normal(jax.random.key(0), (3, 16, 16)) / 4

    def net(x):
        h = jnp.tanh(x.reshape(-1, 3) @ weights[0, :3])
        for w in weights[1:]:
            h = jnp.tanh(h @ w)
        return jnp.sum(h), {"h": h, "mean": jnp.mean(h, axis=0)}

    x = jnp.linspace(-1.0, 1.0, 12)
    with_aux = jax.jit(fwdlap.laplacian(net, has_aux=True)).lower(x).compile()
    alone = jax.jit(fwdlap.laplacian(lambda x: net(x)[0])).lower(x).compile()
    flops = lambda c: c.cost_analysis()["flops"]  # noqa: E731
    # The mean over the 4 particles of 16 features: well under one tangent's worth.
    assert flops(with_aux) - flops(alone) <= 4 * 16 * 2


@pytest.mark.parametrize(
    "api",
    [
        lambda f: fwdlap.laplacian(f, has_aux=True),
        lambda f: fwdlap.value_grad_and_laplacian(f, has_aux=True),
        lambda f: fwdlap.hessian_diagonal(f, has_aux=True),
        lambda f: lambda x: fwdlap.lap(f, (x,), (jnp.eye(3),), (None,), has_aux=True),
        lambda f: (
            lambda x: fwdlap.lap_partial(f, (x,), (jnp.eye(3),), (None,), has_aux=True)
        ),
    ],
    ids=["laplacian", "vgl", "hessian_diagonal", "lap", "lap_partial"],
)
@pytest.mark.parametrize(
    "fun, message",
    [
        (lambda x: jnp.sum(x**2), r"must return a pair `\(output, aux\)`.*array"),
        (lambda x: (jnp.sum(x**2), x, x), r"returned a tuple of length 3"),
        (
            lambda x: (jnp.sum(x**2), {"tag": "a"}),
            r"holds the string 'a' at aux\['tag'\]",
        ),
    ],
    ids=["no_pair", "triple", "string_aux"],
)
def test_bad_aux_raises(api, fun, message):
    with pytest.raises(TypeError, match=message):
        api(fun)(jnp.ones(3))


def test_errors_name_the_transform():
    with pytest.raises(TypeError, match=r"^fwdlap\.laplacian: with `has_aux=True`"):
        fwdlap.laplacian(jnp.sum, has_aux=True)(jnp.ones(3))
    with pytest.raises(
        TypeError, match=r"fwdlap\.value_grad_and_laplacian: the first element"
    ):
        fwdlap.value_grad_and_laplacian(lambda x: (x, 0), has_aux=True)(jnp.ones(3))
    with pytest.raises(TypeError, match=r"`has_aux` must be True or False, got 1"):
        fwdlap.laplacian(jnp.sum, has_aux=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"^fwdlap\.lap: `has_aux` must be True or"):
        fwdlap.lap(jnp.sum, (jnp.ones(3),), (jnp.eye(3),), (None,), has_aux="yes")  # pyright: ignore[reportCallIssue, reportArgumentType]


def test_none_aux():
    lap, aux = fwdlap.laplacian(lambda x: (jnp.sum(jnp.sin(x)), None), has_aux=True)(X)
    np.testing.assert_allclose(lap, -jnp.sum(jnp.sin(X)), rtol=1e-13)
    assert aux is None
