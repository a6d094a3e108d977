"""`fwdlap.biharmonic` against independent references (nested jacfwd, hessian)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fwdlap
from fwdlap._core.rules import families
from fwdlap._core.taylor4.moments import exact_design
from fwdlap._core.taylor4.series import Context
from fwdlap._core.taylor4.trace import taylor4_flat


def _reference_biharmonic(f, x):
    """`tr(jacfwd^2(tr(jacfwd^2 f)))` over the flattened `x` (forward mode: works
    through while loops), per output element."""
    flat, unravel = ravel_pytree(x)
    d = flat.size

    def g(y):
        return f(unravel(y))

    def lap(y):
        h = jax.jacfwd(jax.jacfwd(g))(y)
        return jnp.trace(h.reshape(*h.shape[:-2], d, d), axis1=-2, axis2=-1)

    h = jax.jacfwd(jax.jacfwd(lap))(flat)
    return jnp.trace(h, axis1=-2, axis2=-1)


reference_biharmonic = jax.jit(_reference_biharmonic, static_argnums=0)


def _mlp_params(key, sizes, dtype=jnp.float64):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            (jax.random.normal(k, (m, n)) / math.sqrt(m)).astype(dtype),
            (0.1 * jax.random.normal(k, (n,))).astype(dtype),
        )
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _mlp(params, x, act=jnp.tanh):
    for w, b in params[:-1]:
        x = act(x @ w + b)
    w, b = params[-1]
    return (x @ w + b)[0]


_P3 = _mlp_params(jax.random.key(0), [3, 6, 6, 1])
_P3_32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), _P3)


@jax.custom_jvp
def _smooth(x):
    return jnp.log1p(jnp.exp(x))


@_smooth.defjvp
def _smooth_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _smooth(x), jax.nn.sigmoid(x) * t


def _while(x):
    def body(c):
        y, i = c
        return jnp.sin(y) * x + 0.1, i + 1

    return jnp.sum(jax.lax.while_loop(lambda c: c[1] < 3, body, (x, 0))[0])


ZOO = {
    "elementwise": lambda x: jnp.sum(
        jnp.sin(x) + jnp.exp(x) + jnp.log1p(x**2) + jnp.cos(x) ** 3 + jnp.sinh(x)
    ),
    "special": lambda x: jnp.sum(
        jax.nn.sigmoid(x)
        + jnp.sqrt(2 + x)
        + jax.lax.rsqrt(2 + x)
        + jax.scipy.special.erf(x)
    ),
    "powers": lambda x: jnp.sum(x**5 + (1.5 + x) ** -2) + jnp.sum(jnp.abs(x) ** 2.5),
    "products": lambda x: x[0] * x[1] ** 2 * x[2] + jnp.prod(jnp.cosh(x)),
    "division": lambda x: jnp.sum(x**3 / (1 + x**2)) + 1 / jnp.sum(2 + x),
    "mlp_tanh": lambda x: _mlp(_P3, x),
    "mlp_sin": lambda x: _mlp(_P3, x, jnp.sin),
    "exp_quadratic": lambda x: jnp.exp(
        -x @ jnp.array([[2.0, 0.3, 0], [0.3, 1, 0.1], [0, 0.1, 0.5]]) @ x
    ),
    "generic": lambda x: (
        jnp.sum(jnp.arctan(x)) + jnp.max(x**2) + jnp.linalg.norm(x + 2)
    ),
    "custom_jvp": lambda x: jnp.sum(_smooth(x) + jax.nn.softplus(x) + jax.nn.gelu(x)),
    "logsumexp": lambda x: jax.nn.logsumexp(2 * x),
    "scan": lambda x: jax.lax.scan(
        lambda c, xi: (jnp.tanh(c * xi + 1.0), c**2), jnp.asarray(0.5, x.dtype), x
    )[0],
    "while": _while,
    "cond": lambda x: jax.lax.cond(
        x[0] > 0, lambda y: jnp.sum(jnp.sin(y) ** 2), lambda y: jnp.sum(y**4), x
    ),
    "jit_inside": lambda x: jax.jit(lambda y: jnp.sum(jnp.tanh(y) ** 3))(x),
    "checkpoint": lambda x: jnp.sum(jax.checkpoint(lambda y: jnp.exp(-(y**2)))(x)),
    "dot_both_sides": lambda x: jnp.sum((jnp.outer(x, x) @ jnp.sin(x)) ** 2),
}

_X3 = jnp.array([0.3, -0.7, 0.5])
# Also run in the direction layout (`chunk_size` below the number of directions).
BOTH_LAYOUTS = {"division", "generic", "custom_jvp", "scan", "while", "dot_both_sides"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_float64(name):
    f = ZOO[name]
    want = reference_biharmonic(f, _X3)
    got = jax.jit(fwdlap.biharmonic(f, chunk_size=None))(_X3)
    assert np.allclose(got, want, rtol=1e-9)
    if name not in BOTH_LAYOUTS:
        return
    # The direction layout (one block per sign) gives the same value.
    got = jax.jit(fwdlap.biharmonic(f, chunk_size=2))(_X3)
    assert np.allclose(got, want, rtol=1e-9)


FLOAT32_ZOO = {
    "mlp_tanh": lambda x: _mlp(_P3_32, x),
    "mlp_sin": lambda x: _mlp(_P3_32, x, jnp.sin),
    "exp_quadratic": lambda x: jnp.exp(
        -jnp.sum(x * x * jnp.array([2.0, 1.0, 0.5], jnp.float32))
    ),
    "scan": ZOO["scan"],
    "while": ZOO["while"],
}


@pytest.mark.parametrize("name", sorted(FLOAT32_ZOO))
def test_zoo_float32(name):
    f = FLOAT32_ZOO[name]
    x = _X3.astype(jnp.float32)
    want = reference_biharmonic(f, _X3)
    got = jax.jit(fwdlap.biharmonic(f))(x)
    assert got.dtype == jnp.float32
    assert np.allclose(got, want, rtol=2e-3, atol=2e-3 * abs(float(want)))


def test_cond_with_traced_index():
    f = ZOO["cond"]
    for x in (_X3, -_X3):
        want = reference_biharmonic(f, x)
        assert np.allclose(jax.jit(fwdlap.biharmonic(f))(x), want, rtol=1e-9)


@pytest.mark.parametrize("dim", [1, 2, 4, 5])
def test_dimensions(dim):
    """Every branch of the exact design, in both layouts."""
    x = jnp.linspace(-0.6, 0.8, dim)
    params = _mlp_params(jax.random.key(dim), [dim, 5, 1])

    def f(y):
        return _mlp(params, y) + jnp.exp(-jnp.sum(y**2)) * jnp.sum(jnp.sin(y))

    want = reference_biharmonic(f, x)
    got = jax.jit(fwdlap.biharmonic(f, chunk_size=None))(x)
    assert np.allclose(got, want, rtol=1e-9)
    got = jax.jit(fwdlap.biharmonic(f, chunk_size=3))(x)
    assert np.allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("dim", range(1, 8))
def test_exact_design_moments(dim):
    """sum_k w_k v_k^(x4) is the symmetrised delta x delta; the documented count."""
    v, w = exact_design(dim)
    eye = np.eye(dim)
    sym = (
        np.einsum("ij,kl->ijkl", eye, eye)
        + np.einsum("ik,jl->ijkl", eye, eye)
        + np.einsum("il,jk->ijkl", eye, eye)
    ) / 3
    moments = np.einsum("k,ki,kj,kl,km->ijlm", w, v, v, v, v)
    assert np.allclose(moments, sym, atol=1e-12)
    count = {1: 1, 2: 3, 3: 6, 4: 12}.get(dim, dim * dim)
    assert len(w) == count >= dim * (dim + 1) // 2


def test_signed_directions_in_one_pass():
    """The direction layout with signs (negative weights) collapses in one pass."""
    v, w = exact_design(5)
    rows = jnp.asarray(v * np.abs(w)[:, None] ** 0.25)
    signs = tuple(float(s) for s in np.sign(w))
    x = jnp.linspace(-0.5, 0.5, 5)
    f = ZOO["mlp_tanh"]
    params = _mlp_params(jax.random.key(3), [5, 4, 1])

    def g(y):
        return [_mlp(params, y) + f(y[:3])]

    @jax.jit
    def top(y):
        ctx = Context(25, signs)
        _, series = taylor4_flat(g, [y], [(rows, None, None, None)], ctx)
        return 24 * series[0][3]

    assert np.allclose(top(x), reference_biharmonic(lambda y: g(y)[0], x))


def test_quartic_form_exact_and_stochastic():
    """(x^T A x)^2 has the bilaplacian 8 tr(A)^2 + 16 |A|_F^2 everywhere."""
    a = jnp.array(
        [
            [2.0, 0.5, 0.0, 0.1],
            [0.5, 1.0, 0.2, 0],
            [0, 0.2, -1, 0.3],
            [0.1, 0, 0.3, 0.5],
        ]
    )
    f = lambda x: (x @ a @ x) ** 2  # noqa: E731
    want = 8 * jnp.trace(a) ** 2 + 16 * jnp.sum(a * a)
    x = jnp.array([0.3, -1.0, 2.0, 0.5])
    assert np.allclose(jax.jit(fwdlap.biharmonic(f))(x), want, rtol=1e-12)
    keys = jax.random.split(jax.random.key(0), 400)
    est = jax.jit(jax.vmap(lambda k: fwdlap.biharmonic(f, probes=3, key=k)(x)))(keys)
    stderr = float(jnp.std(est)) / math.sqrt(len(keys))
    assert abs(float(jnp.mean(est)) - float(want)) < 4 * stderr


def test_stochastic_unbiased_on_mlp():
    f = ZOO["mlp_tanh"]
    want = float(reference_biharmonic(f, _X3))
    keys = jax.random.split(jax.random.key(1), 400)
    est = jax.jit(jax.vmap(lambda k: fwdlap.biharmonic(f, probes=2, key=k)(_X3)))(keys)
    stderr = float(jnp.std(est)) / math.sqrt(len(keys))
    assert abs(float(jnp.mean(est)) - want) < 4 * stderr
    # More probes, less variance: the estimate's spread shrinks like 1/sqrt(k).
    many = jax.jit(jax.vmap(lambda k: fwdlap.biharmonic(f, probes=32, key=k)(_X3)))(
        keys[:100]
    )
    assert float(jnp.std(many)) < 0.5 * float(jnp.std(est))


def test_stochastic_chunked_matches_one_pass():
    f = ZOO["mlp_sin"]
    key = jax.random.key(7)
    one = jax.jit(fwdlap.biharmonic(f, probes=10, key=key, chunk_size=None))(_X3)
    blocks = jax.jit(fwdlap.biharmonic(f, probes=10, key=key, chunk_size=4))(_X3)
    assert np.allclose(one, blocks, rtol=1e-10)


def test_pytree_argument_and_argnums():
    def f(p, scale, x):
        return scale * jnp.sum(jnp.tanh(p["w"] @ x[0]) * x[1] ** 2)

    p = {"w": jnp.array([[0.5, -0.3], [0.2, 0.8]])}
    x = (jnp.array([0.1, -0.4]), jnp.array([0.7]))
    want = reference_biharmonic(lambda y: f(p, 2.0, y), x)
    got = jax.jit(fwdlap.biharmonic(f, argnums=2))(p, 2.0, x)
    assert np.allclose(got, want)
    # A tuple argnums: the coordinates of both arguments together.
    want_both = reference_biharmonic(lambda pw: f(pw[0], 2.0, pw[1]), (p, x))
    got = jax.jit(fwdlap.biharmonic(f, argnums=(0, 2)))(p, 2.0, x)
    assert np.allclose(got, want_both)


def test_pytree_output_and_integer_leaf():
    def f(x):
        return {"a": jnp.sin(x) * x[0], "b": (jnp.sum(x**4), jnp.arange(3))}

    out = jax.jit(fwdlap.biharmonic(f))(_X3)
    assert np.allclose(out["a"], reference_biharmonic(lambda y: f(y)["a"], _X3))
    assert np.allclose(out["b"][0], reference_biharmonic(lambda y: f(y)["b"][0], _X3))
    assert out["b"][1].dtype == jax.dtypes.float0


def test_constant_output_is_zero():
    params = _mlp_params(jax.random.key(0), [3, 4, 1])
    out = fwdlap.biharmonic(lambda p, x: _mlp(p, jnp.ones(3)), argnums=1)(params, _X3)
    assert out == 0


def test_jit_and_vmap():
    params = _mlp_params(jax.random.key(5), [2, 8, 8, 1])
    xs = jax.random.uniform(jax.random.key(6), (4, 2))
    bih = jax.jit(jax.vmap(fwdlap.biharmonic(_mlp, argnums=1), in_axes=(None, 0)))
    want = jax.jit(
        jax.vmap(lambda x: _reference_biharmonic(lambda y: _mlp(params, y), x))
    )(xs)
    assert np.allclose(bih(params, xs), want, rtol=1e-9)


def test_grad_with_respect_to_parameters():
    params = _mlp_params(jax.random.key(8), [2, 5, 5, 1])
    xs = jax.random.uniform(jax.random.key(9), (3, 2))

    def loss(p, bih):
        return jnp.mean(jax.vmap(lambda x: (bih(p, x) - 1.0) ** 2)(xs))

    def reference(p, x):
        lap = lambda y: jnp.trace(jax.hessian(_mlp, argnums=1)(p, y))  # noqa: E731
        return jnp.trace(jax.hessian(lap)(x))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got = grad(params, fwdlap.biharmonic(_mlp, argnums=1))
    want = grad(params, reference)
    for a, b in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        assert np.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_has_aux():
    def f(x):
        return jnp.sum(jnp.sin(x) ** 2), {"norm": jnp.linalg.norm(x)}

    value, aux = jax.jit(fwdlap.biharmonic(f, has_aux=True))(_X3)
    assert np.allclose(value, reference_biharmonic(lambda y: f(y)[0], _X3))
    assert np.allclose(aux["norm"], jnp.linalg.norm(_X3))
    value2, aux2 = jax.jit(fwdlap.biharmonic(f, has_aux=True, chunk_size=2))(_X3)
    assert np.allclose(value2, value) and np.allclose(aux2["norm"], aux["norm"])


_DERIVS = {
    "exp": jnp.exp, "log": jnp.log, "log1p": jnp.log1p, "expm1": jnp.expm1,
    "sin": jnp.sin, "cos": jnp.cos, "sinh": jnp.sinh, "cosh": jnp.cosh,
    "tanh": jnp.tanh, "logistic": jax.nn.sigmoid, "sqrt": jnp.sqrt,
    "rsqrt": jax.lax.rsqrt, "erf": jax.scipy.special.erf, "exp2": jnp.exp2,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_DERIVS))
def test_elementwise_derivative_tables(name):
    """The four derivatives each rule is built on, against nested `jax.grad`."""
    fn = _DERIVS[name]
    derivs = families.DERIVATIVES[getattr(jax.lax, f"{name}_p")]
    x = jnp.array([0.3, 0.9, 1.7])
    got = list(derivs(x, fn(x), {}))
    g = fn
    for k in range(4):
        g = jax.grad(g)
        want = jax.vmap(g)(x)
        assert np.allclose(got[k], want, rtol=1e-10), (name, k + 1)


def _inverse_and_special(x):
    y = 0.3 * x
    sp = jax.scipy.special
    return (
        jnp.sum(
            jnp.tan(y) + jnp.arctan(x) + jnp.arcsin(y) + jnp.arccos(y) + jnp.arcsinh(x)
        )
        + jnp.sum(jnp.arccosh(2 + y) + jnp.arctanh(y) + jnp.cbrt(2 + x) + sp.erfc(x))
        + jnp.sum(sp.erfinv(y) + sp.gammaln(2 + x) + sp.digamma(2 + x))
    )


def test_elementwise_rules_from_the_shared_tables():
    """Primitives whose fourth-order rule is built from their derivative table."""
    want = reference_biharmonic(_inverse_and_special, _X3)
    for chunk_size in (None, 2):  # the moments and the direction layout
        bih = fwdlap.biharmonic(_inverse_and_special, chunk_size=chunk_size)
        np.testing.assert_allclose(jax.jit(bih)(_X3), want, rtol=1e-9)


@pytest.mark.parametrize("power", [-3, -1, 2, 3, 5])
def test_integer_pow(power):
    f = lambda x: jnp.sum((1.2 + x) ** power)  # noqa: E731
    got = jax.jit(fwdlap.biharmonic(f))(_X3)
    assert np.allclose(got, reference_biharmonic(f, _X3))


def test_errors_name_the_argument():
    f = ZOO["mlp_tanh"]
    with pytest.raises(TypeError, match="fwdlap.biharmonic: `argnums`"):
        fwdlap.biharmonic(f, argnums="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a random key"):
        fwdlap.biharmonic(f, probes=4)
    with pytest.raises(TypeError, match="`key` was given without `probes`"):
        fwdlap.biharmonic(f, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`probes` must be a positive int"):
        fwdlap.biharmonic(f, probes=0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="biharmonic: `key` must be a JAX random"):
        fwdlap.biharmonic(f, probes=2, key=0)
    with pytest.raises(ValueError, match="`chunk_size`"):
        fwdlap.biharmonic(f, chunk_size=0)
    with pytest.raises(TypeError, match="`has_aux` must be True or False"):
        fwdlap.biharmonic(f, has_aux=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argnums=1 refers to positional argument 1"):
        fwdlap.biharmonic(f, argnums=1)(_X3)
    with pytest.raises(TypeError, match="dtype int"):
        fwdlap.biharmonic(lambda n: jnp.sum(n))(jnp.arange(3))
    with pytest.raises(TypeError, match="must return a pair"):
        fwdlap.biharmonic(f, has_aux=True)(_X3)
    with pytest.raises(TypeError, match="output"):
        fwdlap.biharmonic(lambda x: (jnp.sum(x), "text"))(_X3)


def test_custom_vjp_raises():
    @jax.custom_vjp
    def g(x):
        return jnp.sin(x)

    g.defvjp(lambda x: (jnp.sin(x), x), lambda x, ct: (jnp.cos(x) * ct,))
    with pytest.raises(NotImplementedError, match="custom_vjp"):
        fwdlap.biharmonic(lambda x: jnp.sum(g(x)))(_X3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's buffers")
def test_temp_memory_at_most_lap_of_lap():
    """Issue #22: the exact pass needs no more XLA temporary memory than the nested
    Laplacians on a PINN MLP of width 256 (it needed more while XLA fused the chain of
    `q` into one kernel at the end, keeping every layer's rows alive)."""
    dim = 5
    params = _mlp_params(jax.random.key(0), [dim, 256, 256, 256, 256, 1], jnp.float32)
    xs = jax.random.uniform(jax.random.key(2), (16, dim), jnp.float32)
    inner = fwdlap.laplacian(_mlp, argnums=1, chunk_size=None)
    fns = {
        "biharmonic": fwdlap.biharmonic(_mlp, argnums=1, chunk_size=None),
        "lap_of_lap": fwdlap.laplacian(inner, argnums=1, chunk_size=None),
    }
    temp = {}
    for name, fn in fns.items():
        batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
        analysis = batched.lower(params, xs).compile().memory_analysis()
        assert analysis is not None
        temp[name] = analysis.temp_size_in_bytes
    assert temp["biharmonic"] <= temp["lap_of_lap"], temp
