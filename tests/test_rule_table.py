"""The rule table: one entry per primitive, its behaviour in every pass together."""

from typing import Any

import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap  # importing fwdlap registers the rules
from fwdlap._core import _jax, registry
from fwdlap._core.rules import families


def _prim(name: str) -> Any:
    return getattr(lax, f"{name}_p", None)


def test_elementwise_and_linear_rules_have_sparse_behaviour() -> None:
    """A primitive added to a family gets its sparse rule, or says it densifies."""
    missing = [
        key
        for key, rule in registry.rules.items()
        if rule.kind in ("elementwise", "linear")
        and rule.sparse is None
        and key not in families.DENSE_ONLY
    ]
    assert not missing


def test_elementwise_rules_align_their_operands() -> None:
    elementwise = [k for k, r in registry.rules.items() if r.kind == "elementwise"]
    assert elementwise
    assert set(elementwise) <= families.ELEMENTWISE


def test_dense_only_primitives_are_the_known_few() -> None:
    """Densifying on purpose is a choice made in one place, visible here."""
    names = {p.name for p in families.DENSE_ONLY}
    assert names <= {
        "scatter-sub",
        "scatter_sub",
        "reduce_window_sum",
        "sharding_constraint",
        "device_put",
        "psum",
        "psum_invariant",
        "all_gather",
        "ppermute",
        "all_to_all",
        "fft",
        "conv_general_dilated",
    }


# Every primitive that had a sparse rule before the table was one (by JAX name).
SPARSE_BEFORE = [
    "add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "neg", "sign",
    "floor", "ceil", "round", "nextafter", "select_n", "clamp",
    "convert_element_type", "copy", "reduce_precision", "exp", "exp2", "log",
    "log1p", "expm1", "sin", "cos", "tan", "sinh", "cosh", "tanh", "logistic",
    "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "abs", "atan", "asin", "acos",
    "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv", "lgamma", "digamma",
    "real", "imag", "conj", "complex", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_prod", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort",
    "eq", "ne", "lt", "le", "gt", "ge", "argmax", "argmin", "is_finite", "and",
    "or", "not", "xor", "reduce_and", "reduce_or", "reduce_xor", "population_count",
    "stop_gradient", "broadcast_in_dim", "reshape", "transpose", "squeeze", "slice",
    "rev", "tile", "concatenate", "split", "stack", "unstack", "pad", "gather",
    "dynamic_slice", "dynamic_update_slice", "scatter", "scatter_add",
    "scatter_min", "scatter_max", "scatter_mul", "dot_general",
]  # fmt: skip


@pytest.mark.parametrize("name", SPARSE_BEFORE)
def test_sparse_rules_are_kept(name: str) -> None:
    prim = _prim(name)
    if prim is None:
        pytest.skip(f"no lax.{name}_p in this JAX")
    assert registry.rules[prim].sparse is not None


def test_higher_order_primitives_have_both_modes() -> None:
    for prim in (_jax.scan_p, _jax.while_p, _jax.cond_p, _jax.linear_solve_p):
        assert registry.rules[prim].sparse is not None
    for prim in (_jax.jit_p, _jax.remat_p):  # inlined in the sparse mode
        assert registry.rules[prim].rewrite is not None


def test_custom_jvp_functions_are_in_the_same_table() -> None:
    softmax = registry.rules[registry.key_of(_jax.softmax_custom_jvp)]
    assert softmax.by_source and softmax.sparse is not None
    for fn in (*_jax.slogdet_custom_jvps, _jax.det_custom_jvp):
        rule = registry.rules[registry.key_of(fn)]
        assert rule.kind == "custom_jvp" and rule.sparse is not None


def test_a_family_helper_asks_for_the_sparse_behaviour() -> None:
    prim = jax.extend.core.Primitive("fwdlap_test_linear")
    with pytest.raises(TypeError, match="sparse mode"):
        families.def_linear(prim)
    assert prim not in registry.rules


def test_state_fingerprints_the_table() -> None:
    prim = jax.extend.core.Primitive("fwdlap_test_state")
    before = registry.state()
    families.def_zero(prim)
    try:
        assert registry.state() != before
    finally:
        registry.unregister(prim)
    assert registry.state() == before


# --- the fourth-order pass ------------------------------------------------------------

# Family primitives whose fourth-order pass takes its generic rule (nested JVPs) on
# purpose: elementwise with several operands and no rule of their own, for which the
# forward Laplacian differentiates JAX's JVP rule as well.
GENERIC_FOURTH_ORDER = {"max", "min", "pow", "atan2", "rem", "clamp"}


def test_family_primitives_have_fourth_order_behaviour() -> None:
    """A primitive added to a family gets its fourth-order rule, or is listed above."""
    missing = [
        key.name
        for key, rule in registry.rules.items()
        if rule.kind in ("elementwise", "linear", "zero", "bilinear")
        and rule.taylor4 is None
        and key.name not in GENERIC_FOURTH_ORDER
    ]
    assert not missing


def test_generic_fourth_order_list_is_current() -> None:
    for name in sorted(GENERIC_FOURTH_ORDER):
        prim = _prim(name)
        if prim is not None:
            assert registry.rules[prim].taylor4 is None, name


def test_unary_elementwise_primitives_have_one_derivative_table() -> None:
    unary = [p for p, r in registry.rules.items() if p in families.DERIVATIVES]
    assert {p.name for p in unary} >= {"exp", "tanh", "integer_pow", "erf_inv"}
    for prim in unary:
        assert registry.rules[prim].kind == "elementwise"
        assert registry.rules[prim].taylor4 is not None


def test_control_flow_has_fourth_order_rules() -> None:
    for prim in (_jax.scan_p, _jax.while_p, _jax.cond_p):
        rule = registry.rules[prim]
        assert rule.taylor4 is not None and rule.sparse is not None


def test_the_laplacian_takes_two_derivatives() -> None:
    """The forward Laplacian never computes the third and fourth derivative."""
    taken: list[int] = []

    def counting(x: Any, y: Any, params: Any) -> Any:
        for k, d in enumerate(families.DERIVATIVES[lax.tanh_p](x, y, params)):
            taken.append(k + 1)
            yield d

    rule = families.unary_rule(lax.tanh_p, counting)
    x = jnp.linspace(0.1, 0.5, 3)
    rule(None, [x], [jnp.ones((2, 3))], [jnp.zeros(3)], accuracy=None)
    assert taken == [1, 2]


def test_set_pass_rule_keeps_the_laplacian_rules() -> None:
    before = registry.rules[lax.sin_p]
    ran: list[bool] = []

    def spy(ctx: Any, primals: Any, series: Any, **params: Any) -> Any:
        ran.append(True)
        return before.taylor4(ctx, primals, series, **params)  # type: ignore[misc]

    registry.set_pass_rule(lax.sin_p, taylor4=spy)
    try:
        after = registry.rules[lax.sin_p]
        assert (after.dense, after.sparse, after.kind) == (
            before.dense,
            before.sparse,
            before.kind,
        )
        fwdlap.biharmonic(lambda x: jnp.sum(jnp.sin(x)))(jnp.ones(2))
        assert ran  # the fourth-order pass looks its rules up in the one table
    finally:
        registry.register(lax.sin_p, before)
    with pytest.raises(KeyError, match="register its Laplacian rules first"):
        registry.set_pass_rule(jax.extend.core.Primitive("fwdlap_test_t4"), taylor4=spy)


# Reference functions and points inside their domains, for the derivative tables.
_TABLE_REFERENCES = {
    "exp": (jnp.exp, 0.3), "exp2": (jnp.exp2, 0.3), "log": (jnp.log, 0.7),
    "log1p": (jnp.log1p, 0.4), "expm1": (jnp.expm1, 0.3), "sin": (jnp.sin, 0.3),
    "cos": (jnp.cos, 0.3), "tan": (jnp.tan, 0.4), "sinh": (jnp.sinh, 0.3),
    "cosh": (jnp.cosh, 0.3), "tanh": (jnp.tanh, 0.4),
    "logistic": (jax.nn.sigmoid, 0.4), "sqrt": (jnp.sqrt, 0.7),
    "rsqrt": (lax.rsqrt, 0.7), "cbrt": (jnp.cbrt, 0.7), "square": (jnp.square, 0.3),
    "abs": (jnp.abs, -0.3), "atan": (jnp.arctan, 0.4), "asin": (jnp.arcsin, 0.4),
    "acos": (jnp.arccos, 0.4), "asinh": (jnp.arcsinh, 0.4),
    "acosh": (jnp.arccosh, 1.6), "atanh": (jnp.arctanh, 0.4),
    "erf": (jax.scipy.special.erf, 0.4), "erfc": (jax.scipy.special.erfc, 0.4),
    "erf_inv": (jax.scipy.special.erfinv, 0.4),
    "lgamma": (jax.scipy.special.gammaln, 1.7),
    "digamma": (jax.scipy.special.digamma, 1.7),
}  # fmt: skip


def _check_table(prim: Any, fn: Any, x0: float, params: dict[str, Any]) -> None:
    x = jnp.array([x0, x0 + 0.1])
    got = list(families.DERIVATIVES[prim](x, fn(x), params))
    assert len(got) == 4
    g = fn
    for k in range(4):
        g = jax.grad(g)
        want = jax.vmap(g)(x)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, err_msg=f"order {k + 1}")


def test_every_derivative_table_has_a_reference() -> None:
    names = {p.name for p in families.DERIVATIVES} - {"integer_pow"}
    assert names == set(_TABLE_REFERENCES)


@pytest.mark.parametrize("name", sorted(_TABLE_REFERENCES))
def test_derivative_tables(name: str) -> None:
    """The four derivatives of every table, against nested `jax.grad`."""
    fn, x0 = _TABLE_REFERENCES[name]
    _check_table(_prim(name), fn, x0, {})


@pytest.mark.parametrize("k", [-3, -1, 0, 1, 2, 3, 5])
def test_integer_pow_derivative_table(k: int) -> None:
    fn = lambda x: lax.integer_pow(x, k)  # noqa: E731
    _check_table(lax.integer_pow_p, fn, 0.7, {"y": k})
