"""The rule table: one entry per primitive, its dense and sparse behaviour together."""

from typing import Any

import jax.extend.core
import pytest
from jax import lax

import fwdlap  # noqa: F401 - importing fwdlap registers the rules
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
