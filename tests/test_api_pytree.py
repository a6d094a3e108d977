"""`fwdlap.lap` and `fwdlap.lap_partial` on nested pytrees.

Every result is compared with an independent reference: the inputs are ravelled into
one vector with `jax.flatten_util.ravel_pytree`, and the jacobian and Hessian of the
ravelled function come from `jax.jacfwd` and `jax.hessian`. The directions are random,
so each leaf's jacobian slice matters, and the input laplacians are non-zero unless a
test is about zeros.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fwdlap

N = 3  # tangent directions


class Pair(NamedTuple):
    x: jax.Array
    s: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Config:
    scale: jax.Array
    offset: jax.Array


def random_jacobians(primals: Any, n: int, seed: int) -> Any:
    """Random directions with the structure of `primals`, leaves `(n, *leaf.shape)`."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=(n, *jnp.shape(p)))), primals
    )


def random_laplacians(primals: Any, seed: int) -> Any:
    """Random input laplacians with the structure and leaf shapes of `primals`."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=jnp.shape(p))), primals
    )


def _zeros_for_none(tangents: Any, primals: Any, lead: tuple[int, ...]) -> Any:
    """Dense zeros where a tangent leaf (or subtree) is None or a symbolic zero."""

    def fill(t: Any, p: Any) -> Any:
        if t is None or isinstance(t, fwdlap.Zero):
            return jax.tree_util.tree_map(
                lambda leaf: jnp.zeros((*lead, *jnp.shape(leaf))), p
            )
        return t

    return jax.tree_util.tree_map(
        fill,
        tangents,
        primals,
        is_leaf=lambda t: t is None or isinstance(t, fwdlap.Zero),
    )


@functools.partial(jax.jit, static_argnums=0)
def reference_lap(
    fun: Callable[..., Any], primals: tuple[Any, ...], jacobians: Any, laplacians: Any
) -> tuple[Any, Any, Any]:
    """`sum_k v_k^T H v_k + J lap` via jax.hessian of the ravelled function."""
    flat, unravel = ravel_pytree(primals)
    jacobians = _zeros_for_none(tuple(jacobians), primals, (N,))
    laplacians = _zeros_for_none(tuple(laplacians), primals, ())
    directions = jnp.stack(
        [
            ravel_pytree(jax.tree_util.tree_map(lambda j, k=k: j[k], jacobians))[0]
            for k in range(N)
        ]
    )
    lap_in = ravel_pytree(laplacians)[0]
    g = lambda v: fun(*unravel(v))
    out = g(flat)
    jac = jax.jacfwd(g)(flat)
    hess = jax.hessian(g)(flat)
    jac_out = jax.tree_util.tree_map(
        lambda j: jnp.moveaxis(j @ directions.T, -1, 0), jac
    )
    lap_out = jax.tree_util.tree_map(
        lambda h, j: (
            jnp.einsum("...ij,ki,kj->...", h, directions, directions) + j @ lap_in
        ),
        hess,
        jac,
    )
    return out, jac_out, lap_out


def jit_lap(
    fun: Callable[..., Any], primals: Any, jacobians: Any, laplacians: Any
) -> tuple[Any, Any, Any]:
    """`fwdlap.lap` under `jax.jit` (eager dispatch of many small ops is slow here)."""
    return jax.jit(functools.partial(fwdlap.lap, fun))(primals, jacobians, laplacians)


def assert_tree_allclose(actual: Any, expected: Any) -> None:
    actual_leaves, actual_tree = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten(expected)
    assert actual_tree == expected_tree, (actual_tree, expected_tree)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        assert jnp.shape(a) == jnp.shape(e)
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-10)


# --- functions of nested pytrees ------------------------------------------------------


def mlp_dict(params: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jnp.tanh(params["w1"] @ x + params["b1"])
    return jnp.sum(jnp.sin(params["w2"] @ h)) + jnp.sum(x**3)


def nested_dict_tuple(tree: dict[str, Any], pair: tuple[jax.Array, jax.Array]) -> Any:
    x, s = pair
    y = jnp.exp(tree["a"]["u"] * s) * jnp.cos(x[:2])
    z = tree["b"][0] @ x + jnp.sum(tree["b"][1] ** 2) * s
    return {"y": y, "z": z, "pair": (jnp.sum(y) * z, x * s**2)}


def named_and_dataclass(pair: Pair, config: Config) -> jax.Array:
    return config.scale * jnp.tanh(pair.x * pair.s) + config.offset**2


def equinox_linear(layer: eqx.nn.Linear, x: jax.Array) -> jax.Array:
    return jnp.sin(layer(x))


def _primals(name: str) -> tuple[Any, ...]:
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
    if name == "mlp_dict":
        params = {
            "w1": normal(2, 3) * 0.5,
            "b1": jnp.array([0.1, -0.2]),
            "w2": normal(2, 2),
        }
        return params, jnp.array([0.3, -0.4, 0.5])
    if name == "nested_dict_tuple":
        tree = {
            "a": {"u": jnp.array([0.2, -0.1])},
            "b": (normal(3), jnp.array([0.5, 0.7])),
        }
        return tree, (jnp.array([0.1, 0.2, 0.3]), jnp.array(0.9))
    if name == "named_and_dataclass":
        pair = Pair(x=jnp.array([0.4, -0.3]), s=jnp.array(1.3))
        return pair, Config(scale=jnp.array([1.5, 0.5]), offset=jnp.array(0.2))
    if name == "equinox_linear":
        return eqx.nn.Linear(3, 2, key=jax.random.key(4)), jnp.array([0.1, -0.5, 0.3])
    raise ValueError(name)


FUNCTIONS = {
    "mlp_dict": mlp_dict,
    "nested_dict_tuple": nested_dict_tuple,
    "named_and_dataclass": named_and_dataclass,
    "equinox_linear": equinox_linear,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_lap_on_pytrees_matches_hessian_reference(name: str) -> None:
    fun = FUNCTIONS[name]
    primals = _primals(name)
    jacobians = random_jacobians(primals, N, seed=1)
    laplacians = random_laplacians(primals, seed=2)
    out, jac, lap = jit_lap(fun, primals, jacobians, laplacians)
    ref = reference_lap(fun, primals, jacobians, laplacians)
    assert_tree_allclose((out, jac, lap), ref)


def bilinear(tree: dict[str, Any], x: jax.Array) -> jax.Array:
    """`sum(a * b) + sum(x**2)`: closed-form jacobian and Laplacian."""
    return jnp.sum(tree["a"] * tree["b"]) + jnp.sum(x**2)


def bilinear_reference(
    tree: dict[str, Any], x: jax.Array, jac: tuple[Any, Any], lap: tuple[Any, Any]
) -> tuple[Any, Any, Any]:
    """Closed form of `bilinear`; `None` tangents are zeros."""
    z = lambda t, like: like if t is None else t
    ja, jb = (z(jac[0][k], jnp.zeros((N, 2))) for k in ("a", "b"))
    jx = z(jac[1], jnp.zeros((N, 2)))
    la, lb = (z(lap[0][k], jnp.zeros(2)) for k in ("a", "b"))
    lx = z(lap[1], jnp.zeros(2))
    a, b = tree["a"], tree["b"]
    out = jnp.sum(a * b) + jnp.sum(x**2)
    jac_out = ja @ b + jb @ a + 2 * jx @ x
    lap_out = 2 * jnp.sum(ja * jb) + 2 * jnp.sum(jx**2) + b @ la + a @ lb + 2 * x @ lx
    return out, jac_out, lap_out


BILINEAR_TREE = {"a": jnp.array([0.5, -1.0]), "b": jnp.array([2.0, 0.3])}
BILINEAR_X = jnp.array([0.7, -0.2])


def test_lap_accepts_list_arguments() -> None:
    jac = random_jacobians((BILINEAR_TREE, BILINEAR_X), N, seed=3)
    lap = random_laplacians((BILINEAR_TREE, BILINEAR_X), seed=4)
    got = fwdlap.lap(bilinear, [BILINEAR_TREE, BILINEAR_X], list(jac), list(lap))
    expected = bilinear_reference(BILINEAR_TREE, BILINEAR_X, jac, lap)
    assert_tree_allclose(got, expected)


@pytest.mark.parametrize("zero", ["none", "symbolic", "dense"])
def test_zero_tangent_leaves(zero: str) -> None:
    """None, symbolic zeros and dense zeros for single leaves all mean zero."""
    tree, x = BILINEAR_TREE, BILINEAR_X
    jac_tree, jac_x = random_jacobians((tree, x), N, seed=5)
    lap_tree, lap_x = random_laplacians((tree, x), seed=6)

    def make(leaf: jax.Array, n: int | None) -> Any:
        if zero == "none":
            return None
        if zero == "symbolic":
            return fwdlap.zero_tangent_from_primal(leaf, n)
        return jnp.zeros(jnp.shape(leaf) if n is None else (n, *jnp.shape(leaf)))

    jacobians = ({"a": make(tree["a"], N), "b": jac_tree["b"]}, jac_x)
    laplacians = ({"a": lap_tree["a"], "b": make(tree["b"], None)}, make(x, None))
    got = fwdlap.lap(bilinear, (tree, x), jacobians, laplacians)
    expected = bilinear_reference(
        tree,
        x,
        ({"a": None, "b": jac_tree["b"]}, jac_x),
        ({**lap_tree, "b": None}, None),
    )
    assert_tree_allclose(got, expected)


def test_none_stands_for_a_whole_argument() -> None:
    """The usual call: differentiate in `x` only, holding the parameters fixed."""
    params, x = _primals("mlp_dict")
    eye = jnp.eye(3)[:N]
    got = jit_lap(mlp_dict, (params, x), (None, eye), (None, None))
    ref = reference_lap(mlp_dict, (params, x), (None, eye), (None, None))
    assert_tree_allclose(got, ref)
    # With all unit directions, the Laplacian in x: the trace of the Hessian in x.
    hess_x = jax.jit(jax.hessian(lambda x: mlp_dict(params, x)))(x)
    np.testing.assert_allclose(got[2], jnp.trace(hess_x), rtol=1e-9)


def test_pytree_outputs_and_independent_outputs() -> None:
    """Outputs mirror fun's output tree; outputs independent of the inputs get dense
    zeros, float0 for integer outputs."""

    def fun(tree: dict[str, Any], x: jax.Array) -> Any:
        return {
            "dep": (jnp.sin(tree["a"]) * x, jnp.sum(x**2)),
            "const": jnp.ones(2),
            "count": jnp.arange(3),
        }

    primals = ({"a": jnp.array([0.3, 0.6])}, jnp.array([1.0, 2.0]))
    jacobians = random_jacobians(primals, N, seed=7)
    laplacians = random_laplacians(primals, seed=8)
    out, jac, lap = jit_lap(fun, primals, jacobians, laplacians)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
        fun(*primals)
    )
    np.testing.assert_array_equal(jac["const"], np.zeros((N, 2)))
    np.testing.assert_array_equal(lap["const"], np.zeros(2))
    assert jac["count"].dtype == jax.dtypes.float0
    assert jac["count"].shape == (N, 3)
    float_fun = lambda tree, x: fun(tree, x)["dep"]
    ref = reference_lap(float_fun, primals, jacobians, laplacians)
    assert_tree_allclose((out["dep"], jac["dep"], lap["dep"]), ref)


def test_python_scalar_and_integer_primals() -> None:
    """Python scalars are array-like primals; integer primals take None or float0."""

    def fun(x: jax.Array, s: float, k: int) -> jax.Array:
        return jnp.sin(x * s) * k

    x = jnp.array([0.2, 0.4])
    jac_x = random_jacobians(x, N, seed=9)
    jac_s = jnp.array([1.0, -0.5, 0.25])
    for int_tangent in (None, np.zeros((N,), jax.dtypes.float0)):
        out, jac, lap = fwdlap.lap(
            fun, (x, 1.5, 3), (jac_x, jac_s, int_tangent), (None, 0.0, None)
        )
        ref = reference_lap(
            lambda x, s: fun(x, s, 3),
            (x, jnp.asarray(1.5)),
            (jac_x, jac_s),
            (None, None),
        )
        assert_tree_allclose((out, jac, lap), ref)


def test_complex_primal() -> None:
    """Complex primals take complex tangents; the Laplacian of a holomorphic function
    along complex directions is `f''(z) * sum_k v_k^2`."""
    z = jnp.array([0.3 + 0.2j, -0.1 + 0.5j])
    v = jnp.array([[1.0 + 0.5j, 0.0], [0.0, 0.5 - 1.0j]])
    out, jac, lap = fwdlap.lap(jnp.sin, (z,), (v,), (None,))
    np.testing.assert_allclose(out, jnp.sin(z), rtol=1e-12)
    np.testing.assert_allclose(jac, jnp.cos(z) * v, rtol=1e-12)
    np.testing.assert_allclose(lap, -jnp.sin(z) * jnp.sum(v**2, axis=0), rtol=1e-12)


def test_float32_tangents_for_float64_primal_are_cast() -> None:
    """Floating tangents of another precision are cast to the primal's dtype."""
    x = jnp.array([0.3, 0.7])
    out, jac, lap = fwdlap.lap(
        lambda x: jnp.sum(jnp.exp(x)), (x,), (jnp.eye(2, dtype=jnp.float32),), (None,)
    )
    assert jac.dtype == jnp.float64
    np.testing.assert_allclose(jac, jnp.exp(x), rtol=1e-12)
    np.testing.assert_allclose(lap, jnp.sum(jnp.exp(x)), rtol=1e-12)


# --- the flat calling convention of the original fwdlap -------------------------------


@pytest.mark.parametrize("symbolic", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_flat_calls_keep_working(symbolic: bool, jit: bool) -> None:
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2)
    x = jnp.array([0.1, -0.2, 0.3])
    eye = jnp.eye(3)
    zero = fwdlap.zero_tangent_from_primal(x) if symbolic else jnp.zeros(3)
    call = functools.partial(fwdlap.lap, f)
    if jit:
        call = jax.jit(call)
    out, jac, lap = call((x,), (eye,), (zero,))
    np.testing.assert_allclose(out, f(x), rtol=1e-12)
    np.testing.assert_allclose(jac, jax.grad(f)(x), rtol=1e-12)
    np.testing.assert_allclose(lap, jnp.trace(jax.hessian(f)(x)), rtol=1e-12)


# --- transformations around the pytree API --------------------------------------------


def test_jit_around_lap_on_pytrees() -> None:
    primals = _primals("nested_dict_tuple")
    jacobians = random_jacobians(primals, N, seed=10)
    laplacians = random_laplacians(primals, seed=11)
    run = jax.jit(lambda p, j, lp: fwdlap.lap(nested_dict_tuple, p, j, lp))
    got = run(primals, jacobians, laplacians)
    ref = reference_lap(nested_dict_tuple, primals, jacobians, laplacians)
    assert_tree_allclose(got, ref)


def test_vmap_around_lap_on_pytrees() -> None:
    params, _ = _primals("mlp_dict")
    xs = jnp.asarray(np.random.default_rng(12).normal(size=(4, 3)))
    eye = jnp.eye(3)[:N]

    def laplacian_at(x: jax.Array) -> Any:
        return fwdlap.lap(mlp_dict, (params, x), (None, eye), (None, None))

    out, jac, lap = jax.vmap(laplacian_at)(xs)
    assert lap.shape == (4,) and jac.shape == (4, N)
    for i in range(4):
        ref = reference_lap(mlp_dict, (params, xs[i]), (None, eye), (None, None))
        assert_tree_allclose((out[i], jac[i], lap[i]), ref)


# --- lap_partial ----------------------------------------------------------------------


def test_lap_partial_on_pytrees_matches_reference() -> None:
    primals = _primals("nested_dict_tuple")
    jacobians = random_jacobians(primals, N, seed=13)
    laplacians = random_laplacians(primals, seed=14)
    example_jac = jax.tree_util.tree_map(jnp.zeros_like, jacobians)
    # lap_pe is returned from, and passed into, jax.jit.
    partial = jax.jit(functools.partial(fwdlap.lap_partial, nested_dict_tuple))
    out, lap_pe = partial(primals, example_jac, laplacians)
    assert isinstance(lap_pe, jax.tree_util.Partial)
    jac, lap = jax.jit(lambda pe, j, lp: pe(j, lp))(lap_pe, jacobians, laplacians)
    ref = reference_lap(nested_dict_tuple, primals, jacobians, laplacians)
    assert_tree_allclose((out, jac, lap), ref)


def test_lap_partial_blocks_in_fori_loop() -> None:
    """Summing the laplacians of blocks of directions in a fori_loop gives the full
    Laplacian; the input laplacian enters through None (zero) here."""
    params, x = _primals("mlp_dict")
    blocks = jnp.eye(3).reshape(3, 1, 3)
    _, lap_pe = fwdlap.lap_partial(
        mlp_dict, (params, x), (None, blocks[0]), (None, None)
    )

    def add_block(i: jax.Array, total: jax.Array) -> jax.Array:
        return total + lap_pe((None, blocks[i]), (None, None))[1]

    total = jax.lax.fori_loop(0, 3, add_block, jnp.zeros(()))
    hess_x = jax.jit(jax.hessian(lambda x: mlp_dict(params, x)))(x)
    np.testing.assert_allclose(total, jnp.trace(hess_x), rtol=1e-9)


def test_lap_pe_accepts_zeros_where_the_example_was_nonzero() -> None:
    x = jnp.array([0.2, 0.5])
    f = lambda x: jnp.sum(jnp.sin(x))
    _, lap_pe = fwdlap.lap_partial(f, (x,), (jnp.eye(2),), (jnp.ones(2),))
    jac, lap = lap_pe((jnp.eye(2),), (None,))
    np.testing.assert_allclose(jac, jnp.cos(x), rtol=1e-12)
    np.testing.assert_allclose(lap, -jnp.sum(jnp.sin(x)), rtol=1e-12)
