"""Bad input to the pytree API fails loudly, in a sentence of ours, naming the leaf.

Each case asserts the exception type, that the message comes from fwdlap (it names the
public function), and that it names the argument and leaf path (`jax.tree_util.keystr`)
together with what was expected and what was found. Every check runs before `fun` is
traced, so `fun` here records whether it was ever called.
"""

import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdlap

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
X = jnp.array([0.1, 0.2, 0.3])
EYE = jnp.eye(3)


class Recorder:
    """A function of (params, x) that records whether it was called."""

    def __init__(self) -> None:
        self.called = False

    def __call__(self, params: dict[str, Any], x: jax.Array) -> jax.Array:
        self.called = True
        return jnp.sum(jnp.tanh(params["w"] @ x + params["b"]))


def zero_jac(x: Any, n: int) -> Any:
    return fwdlap.zero_tangent_from_primal(x, n)


# Each case: (jacobians, laplacians, exception, fragments the message must contain).
CASES: dict[str, tuple[Any, Any, type[Exception], list[str]]] = {
    "jacobian_trailing_shape": (
        ({"w": jnp.ones((6, 3, 2)), "b": None}, None),
        (None, None),
        ValueError,
        ["jacobians[0]['w']", "(6, 3, 2)", "(n, 2, 3)", "primals[0]['w']"],
    ),
    "jacobian_missing_direction_axis": (
        (None, jnp.ones(3)),
        (None, None),
        ValueError,
        ["jacobians[1]", "(3,)", "(n, 3)"],
    ),
    "jacobian_symbolic_zero_wrong_shape": (
        ({"w": zero_jac(jnp.ones(2), 6), "b": None}, None),
        (None, None),
        ValueError,
        ["jacobians[0]['w']", "(6, 2)", "(n, 2, 3)"],
    ),
    "laplacian_shape": (
        (None, EYE),
        ({"w": None, "b": jnp.ones(3)}, None),
        ValueError,
        ["laplacians[0]['b']", "(3,)", "(2,)"],
    ),
    "n_differs": (
        ({"w": jnp.ones((4, 2, 3)), "b": jnp.ones((5, 2))}, EYE),
        (None, None),
        ValueError,
        ["n = 4 at jacobians[0]['w']", "n = 5 at jacobians[0]['b']", "jacobians[1]"],
    ),
    "structure_missing_key": (
        ({"w": jnp.ones((3, 2, 3))}, EYE),
        (None, None),
        ValueError,
        [
            "jacobians[0]['b']",
            "PyTreeDef(({'b': *, 'w': *}, *))",
            "PyTreeDef(({'w': *}",
        ],
    ),
    "structure_extra_key": (
        (None, EYE),
        ({"w": None, "b": None, "c": jnp.ones(2)}, None),
        ValueError,
        ["laplacians[0]['c']", "PyTreeDef"],
    ),
    "structure_node_type": (
        ([jnp.ones((3, 2, 3)), jnp.ones((3, 2))], EYE),
        (None, None),
        ValueError,
        ["jacobians", "PyTreeDef(({'b': *, 'w': *}, *))", "PyTreeDef(([*, *], *))"],
    ),
    "array_for_a_subtree": (
        (jnp.ones((3, 2, 3)), EYE),
        (None, None),
        ValueError,
        ["jacobians", "PyTreeDef(({'b': *, 'w': *}, *))"],
    ),
    "argument_count": (
        (EYE,),
        (None, None),
        ValueError,
        ["`jacobians`", "`primals` has 2", "has 1"],
    ),
    "integer_jacobian_for_float_primal": (
        (None, jnp.eye(3, dtype=jnp.int32)),
        (None, None),
        TypeError,
        ["jacobians[1]", "int32", "float64"],
    ),
    "complex_laplacian_for_real_primal": (
        (None, EYE),
        (None, jnp.ones(3, dtype=jnp.complex128)),
        TypeError,
        ["laplacians[1]", "complex128"],
    ),
    "float0_jacobian_for_float_primal": (
        (None, np.zeros((3, 3), jax.dtypes.float0)),
        (None, None),
        TypeError,
        ["jacobians[1]", "float0"],
    ),
    "jacobian_leaf_is_a_list": (
        (None, [[1.0, 0.0, 0.0]]),
        (None, None),
        ValueError,  # a list where primals have a leaf is a structure mismatch
        ["jacobians[1]", "subtree", "PyTreeDef((*, [[*, *, *]]))"],
    ),
    "jacobian_leaf_is_a_string": (
        ({"w": "eye", "b": None}, None),
        (None, None),
        TypeError,
        ["jacobians[0]['w']", "string"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("api", ["lap", "lap_partial", "lap_filter"])
def test_bad_tangents(api: str, name: str) -> None:
    jacobians, laplacians, error, fragments = CASES[name]
    fun = Recorder()
    call: Callable[..., Any] = getattr(fwdlap, api)
    with pytest.raises(error) as info:
        call(fun, (PARAMS, X), jacobians, laplacians)
    message = str(info.value)
    assert message.startswith(f"fwdlap.{api}"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not fun.called


@pytest.mark.parametrize("api", ["lap", "lap_partial", "lap_filter"])
def test_bare_array_as_primals(api: str) -> None:
    call: Callable[..., Any] = getattr(fwdlap, api)
    with pytest.raises(TypeError, match=r"`primals` to be a tuple or list.*bare array"):
        call(jnp.sin, X, EYE, None)


@pytest.mark.parametrize("argument", ["jacobians", "laplacians"])
def test_bare_array_as_tangents(argument: str) -> None:
    tangents = {"jacobians": (EYE,), "laplacians": (None,)}
    tangents[argument] = EYE if argument == "jacobians" else jnp.zeros(3)
    with pytest.raises(TypeError, match=rf"`{argument}` to be a tuple or list"):
        fwdlap.lap(jnp.sin, (X,), tangents["jacobians"], tangents["laplacians"])


def test_fun_not_callable() -> None:
    with pytest.raises(TypeError, match=r"`fun` to be a callable.*\(x,\)|`fun`"):
        fwdlap.lap((X,), (EYE,), (None,), (None,))  # pyright: ignore[reportArgumentType]


def test_non_array_leaf_given_to_lap() -> None:
    """lap differentiates every leaf; a function-valued leaf points to lap_filter."""
    fun = lambda config, x: config["act"](x)
    with pytest.raises(TypeError) as info:
        fwdlap.lap(fun, ({"act": jnp.sin}, X), (None, EYE), (None, None))
    message = str(info.value)
    assert "primals[0]['act']" in message and "fwdlap.lap_filter" in message


def test_equinox_mlp_given_to_lap_points_to_lap_filter() -> None:
    mlp = eqx.nn.MLP(3, 1, width_size=2, depth=1, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"primals\[0\]\.activation.*lap_filter"):
        fwdlap.lap(lambda m, x: m(x), (mlp, X), (None, EYE), (None, None))


def test_non_array_output_of_lap() -> None:
    with pytest.raises(TypeError, match=r"output\[1\].*lap_filter"):
        fwdlap.lap(lambda x: (jnp.sin(x), "label"), (X,), (EYE,), (None,))


def test_tangent_for_a_float_given_to_an_integer_primal() -> None:
    fun = lambda k, x: x * k
    with pytest.raises(TypeError, match=r"primals\[0\].*int.*jacobians\[0\]"):
        fwdlap.lap(fun, (jnp.array(2), X), (jnp.ones((3,)), EYE), (None, None))


def test_lap_filter_tangent_for_a_non_array_leaf() -> None:
    fun = lambda config, x: config["act"](x)
    with pytest.raises(TypeError, match=r"primals\[0\]\['act'\].*None as both"):
        fwdlap.lap_filter(fun, ({"act": jnp.sin}, X), ({"act": EYE}, EYE), (None, None))


def test_errors_are_ours_under_jit() -> None:
    """Checks run at trace time, so under jit the message is the same sentence."""
    run = jax.jit(lambda x, j: fwdlap.lap(jnp.sin, (x,), (j,), (None,)))
    with pytest.raises(ValueError, match=r"jacobians\[0\].*\(n, 3\)"):
        run(X, jnp.ones((3, 4)))


# --- lap_pe ---------------------------------------------------------------------------


def _lap_pe() -> Any:
    fun = lambda params, x: jnp.sum(jnp.tanh(params["w"] @ x + params["b"]))
    _, lap_pe = fwdlap.lap_partial(fun, (PARAMS, X), (None, EYE), (None, None))
    return lap_pe


@pytest.mark.parametrize(
    "jacobians, laplacians, error, pattern",
    [
        ((None, jnp.ones((4, 3))), (None, None), ValueError, r"n = 3.*n = 4"),
        (
            (None, jnp.ones((3, 2))),
            (None, None),
            ValueError,
            r"jacobians\[1\].*\(n, 3\)",
        ),
        (
            ({"w": jnp.ones((3, 2, 3)), "b": None}, EYE),
            (None, None),
            ValueError,
            r"primals\[0\]\['w'\] was zero.*jacobians\[0\]\['w'\] is an array",
        ),
        (
            (None, EYE),
            (None, jnp.ones(3)),
            ValueError,
            r"primals\[1\] was zero.*laplacians\[1\] is an array",
        ),
        ((None, EYE), (None,), ValueError, r"`laplacians`.*one entry per entry"),
        (EYE, (None, None), TypeError, r"`jacobians` to be a tuple or list"),
    ],
)
def test_lap_pe_rejects_tangents_it_was_not_traced_for(
    jacobians: Any, laplacians: Any, error: type[Exception], pattern: str
) -> None:
    lap_pe = _lap_pe()
    with pytest.raises(error) as info:
        lap_pe(jacobians, laplacians)
    message = str(info.value)
    assert message.startswith("lap_pe (the function returned by fwdlap.lap_partial)")
    assert re.search(pattern, message, flags=re.S), (pattern, message)


# --- the jaxtyping layer --------------------------------------------------------------


def test_annotated_contract_rejects_what_it_states() -> None:
    """The jaxtyping + beartype contract on the canonical leaves is live: one n for all
    jacobians, one structure for all three trees, inexact tangents."""
    from jaxtyping import TypeCheckError

    from fwdlap.api import _checks

    x = jnp.ones(2)
    zero = fwdlap.zero_tangent_from_primal(x, 3)
    lap_zero = fwdlap.zero_tangent_from_primal(x)
    _checks._annotated_contract((x, x), (jnp.ones((3, 2)), zero), (x, lap_zero))
    bad = [
        ((x, x), (jnp.ones((3, 2)), jnp.ones((4, 2))), (x, x)),  # n differs
        ((x, x), (jnp.ones((3, 2)),), (x, x)),  # structure differs
        ((x, x), (jnp.ones((3, 2), jnp.int32), jnp.ones((3, 2))), (x, x)),  # dtype
    ]
    for primals, jacobians, laplacians in bad:
        with pytest.raises(TypeCheckError):
            _checks._annotated_contract(primals, jacobians, laplacians)


def test_outer_jaxtyping_checker_defers_to_our_messages() -> None:
    """With jaxtyping's import hook (or any `jaxtyped` wrapper) around the public
    functions, the message is still ours: they are marked to check themselves."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    wrapped = jaxtyped(typechecker=beartype)(fwdlap.lap)
    with pytest.raises(TypeError, match=r"^fwdlap\.lap expects `primals`"):
        wrapped(jnp.sin, X, EYE, None)  # pyright: ignore[reportArgumentType]


def test_lap_pe_bare_array_hint_shows_how_lap_pe_is_called() -> None:
    """lap_pe takes `(jacobians, laplacians)` only: its hint must not show `fun`."""
    with pytest.raises(TypeError) as info:
        _lap_pe()(EYE, (None, None))
    message = str(info.value)
    assert "lap_pe((jacobian,), (laplacian,))" in message
    assert "(fun, (x,)" not in message


# --- the transforms -------------------------------------------------------------------

TRANSFORMS = {
    "laplacian": fwdlap.laplacian,
    "value_grad_and_laplacian": fwdlap.value_grad_and_laplacian,
    "hessian_diagonal": fwdlap.hessian_diagonal,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_of_a_non_callable_raises_at_once(name: str) -> None:
    """As `jax.grad(3)` does: the mistake is reported where it is made."""
    with pytest.raises(TypeError, match=rf"^fwdlap\.{name} expects `fun` to be a call"):
        TRANSFORMS[name](3)  # pyright: ignore[reportArgumentType]


class _Unregistered:
    """A class that is not a pytree: JAX sees it as one opaque leaf."""

    def __init__(self, w: jax.Array) -> None:
        self.w = w


class _WithFunction(eqx.Module):
    w: jax.Array
    act: Callable[[jax.Array], jax.Array]


NON_ARRAY_ARGUMENTS: dict[str, tuple[Any, Callable[[Any], jax.Array], str, str]] = {
    "string_in_dict": (
        {"x": X, "label": "hi"},
        lambda a: jnp.sum(a["x"] ** 2),
        "the string 'hi' at path ['label']",
        "eqx.partition",
    ),
    "unregistered_class": (
        _Unregistered(X),
        lambda a: jnp.sum(a.w**2),
        "an object of type _Unregistered at path <root>",
        "register_dataclass",
    ),
    "equinox_function_field": (
        _WithFunction(X, jnp.tanh),
        lambda m: jnp.sum(m.act(m.w)),
        "the function tanh at path .act",
        "fwdlap.lap_filter",
    ),
}


@pytest.mark.parametrize("case", sorted(NON_ARRAY_ARGUMENTS))
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_names_the_non_array_leaf_of_the_argument(
    name: str, case: str
) -> None:
    argument, fun, leaf, fix = NON_ARRAY_ARGUMENTS[case]
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name](fun)(argument)
    message = str(info.value)
    assert message.startswith(f"fwdlap.{name}: the differentiated argument")
    assert leaf in message and fix in message, message


@pytest.mark.parametrize(
    ("key", "found"),
    [
        (0, "the Python int 0"),
        (jnp.float32(1.5), "dtype float32"),
        (jax.random.split(jax.random.key(0), 2), "array of keys of shape (2,)"),
    ],
    ids=["python_int", "float_array", "two_keys"],
)
def test_probe_key_must_be_one_random_key(key: Any, found: str) -> None:
    with pytest.raises(TypeError) as info:
        fwdlap.laplacian(jnp.sum, probes=2, key=key)
    message = str(info.value)
    assert message.startswith("fwdlap.laplacian: `key` must be")
    assert found in message, message


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(3)])
def test_probe_key_typed_and_raw_keys_are_accepted(key: Any) -> None:
    # Rademacher probes are exact for a diagonal Hessian: sum(x**3) has 6 x_i on it.
    got = fwdlap.laplacian(lambda x: jnp.sum(x**3), probes=2, key=key)(X)
    np.testing.assert_allclose(got, 6 * jnp.sum(X), rtol=1e-12)


@pytest.mark.parametrize(
    "weights",
    [jnp.array([1.0 + 1.0j, 1.0, 1.0]), np.eye(3, dtype=complex), "heavy"],
    ids=["complex_vector", "complex_matrix", "string"],
)
def test_weights_must_be_real(weights: Any) -> None:
    with pytest.raises(
        TypeError, match=r"^fwdlap\.laplacian: `weights` must be a real"
    ):
        fwdlap.laplacian(jnp.sum, weights=weights)


# --- custom_vjp under jit -------------------------------------------------------------


@jax.custom_vjp
def _user_named_square(x: jax.Array) -> jax.Array:
    return x**2


_user_named_square.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_custom_vjp_error_names_the_users_function(jit: bool) -> None:
    fun = lambda x: jnp.sum(_user_named_square(x))
    with pytest.raises(NotImplementedError) as info:
        fwdlap.laplacian(jax.jit(fun) if jit else fun)(X)
    message = str(info.value)
    assert "'_user_named_square'" in message and "jaxpr_as_fun" not in message
