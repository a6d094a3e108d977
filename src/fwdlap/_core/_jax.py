"""The one module of fwdlap that touches JAX internals.

Everything fwdlap needs from `jax._src`, `jax.interpreters` and `jax.extend` is imported
here and re-exported under a stable local name, with the branches between JAX versions,
so that a JAX upgrade is a one-file fix. Algorithms live in the modules that use them.
The supported range is declared in `pyproject.toml`; both ends are tested in CI.
"""

import functools
import inspect
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.extend.linear_util as lu
from jax import core as jax_core
from jax._src import api_util as _api_util
from jax._src import core as src_core
from jax._src import sharding_impls as _sharding_impls
from jax._src import source_info_util as _source_info_util
from jax._src.ad_util import add_jaxvals_p
from jax._src.interpreters import partial_eval as src_pe
from jax._src.nn import functions as _nn_functions
from jax._src.numpy import linalg as _np_linalg
from jax._src.util import weakref_lru_cache as weakref_lru_cache  # keyed on jaxprs
from jax.custom_derivatives import SymbolicZero as SymbolicZero
from jax.interpreters import ad
from jax.interpreters import partial_eval as pe

JAX_VERSION: tuple[int, ...] = tuple(
    int(p) for p in jax.__version__.split(".")[:3] if p.isdigit()
)

# Trace / Tracer base classes.
Trace = jax_core.Trace
Tracer = jax_core.Tracer
ShapedArray = jax_core.ShapedArray
eval_jaxpr = jax_core.eval_jaxpr

# Trace context. `jax.extend.core` holds these from 0.10 on; 0.9 keeps them in `_src`.
TraceTag = getattr(jex_core, "TraceTag", None) or src_core.TraceTag
take_current_trace = (
    getattr(jex_core, "take_current_trace", None) or src_core.take_current_trace
)
set_current_trace = (
    getattr(jex_core, "set_current_trace", None) or src_core.set_current_trace
)
to_concrete_value = src_core.to_concrete_value

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
Var = jex_core.Var
jaxpr_as_fun = jex_core.jaxpr_as_fun
Primitive = jex_core.Primitive
primitives = jex_core.primitives

# Symbolic zeros and JAX's own JVP machinery.
Zero = ad.Zero
instantiate_zeros = ad.instantiate_zeros
primitive_jvps = ad.primitive_jvps
JVPTrace = ad.JVPTrace
JVPTracer = ad.JVPTracer

# Jaxpr tracing.
make_debug_info = jax.api_util.debug_info
PartialVal = pe.PartialVal
trace_to_jaxpr_nounits = pe.trace_to_jaxpr_nounits
trace_to_jaxpr_dynamic = pe.trace_to_jaxpr_dynamic
convert_constvars_jaxpr = src_pe.convert_constvars_jaxpr
wrap_init = lu.wrap_init
subjaxprs = src_core.subjaxprs  # the jaxprs in an equation's params, one level deep
UNSPECIFIED_SHARDING = _sharding_impls.UNSPECIFIED

# Higher-order primitives with dedicated rules.
jit_p = primitives.jit_p
scan_p = primitives.scan_p
while_p = primitives.while_p
linear_solve_p = primitives.linear_solve_p  # lax.custom_linear_solve
cond_p = primitives.cond_p
remat_p = primitives.remat_p
custom_jvp_call_p = primitives.custom_jvp_call_p
custom_vjp_call_p = primitives.custom_vjp_call_p

TRACER_INIT_TAKES_AVAL = "aval" in inspect.signature(Tracer.__init__).parameters


def init_tracer(tracer: Any, trace: Any, aval: Any) -> None:
    """Call `Tracer.__init__`, whose signature gained `aval` in JAX 0.10."""
    if TRACER_INIT_TAKES_AVAL:
        Tracer.__init__(tracer, trace, aval)
    else:
        Tracer.__init__(tracer, trace)  # pyright: ignore[reportCallIssue]


def bind_with_trace(primitive: Any, trace: Any, args: Any, params: dict) -> Any:
    """Bind `primitive` on `trace` (JAX >= 0.9 passes the avals explicitly)."""
    args = tuple(args)
    avals = tuple(jax.typeof(x) for x in args)
    return primitive.bind_with_trace(trace, args, avals, params)


def closed_call_primitives() -> tuple[Any, ...]:
    """`CallPrimitive`s whose bodies fwdlap simply inlines."""
    return (primitives.closed_call_p, src_core.call_p)


def replace_jaxpr_binders(closed: Any, invars: list[Any], outvars: list[Any]) -> Any:
    """A `ClosedJaxpr` with its input and output binders reordered."""
    jaxpr = closed.jaxpr.replace(invars=invars, outvars=outvars)
    return ClosedJaxpr(jaxpr, closed.consts)


def close_jaxpr(jaxpr: Any) -> Any:
    """Close an open jaxpr that has no constvars."""
    return ClosedJaxpr(jaxpr, ())


# `add_any` is what JAX's own AD emits to sum tangents; it is linear.
add_any_p = add_jaxvals_p

# --- custom_jvp functions with dedicated rules ---------------------------------------
# `jnp.linalg.slogdet` and `jnp.linalg.det` are jitted wrappers around these private
# `jax.custom_jvp` objects; fwdlap ships rules for them (rules/linalg.py).
# `_slogdet_small` (JAX >= 0.10, 1x1 and 2x2 closed forms) keeps JAX's dense path (it
# is cheap); only its block-sparse variant is registered.
fun_sourceinfo = _api_util.fun_sourceinfo
slogdet_custom_jvps: tuple[Any, ...] = tuple(
    f
    for f in (getattr(_np_linalg, n, None) for n in ("_slogdet_lu", "_slogdet_qr"))
    if f is not None
)
det_custom_jvp: Any = getattr(_np_linalg, "_det", None)
# JAX >= 0.10 computes 1x1 and 2x2 slogdets in closed form (`_slogdet_small`).
slogdet_small_custom_jvp: Any = getattr(_np_linalg, "_slogdet_small", None)


# `jax.nn.softmax` under `jax_softmax_custom_jvp=True`: a custom_jvp with
# `nondiff_argnums=(1,)` (the axis), recognised by the source info of its call.
softmax_custom_jvp: Any = getattr(_nn_functions, "_softmax", None)

# `custom_jvp_call` identification (rules/custom.py) reads how JAX wrapped `fun`: the
# names of the output-flattening transformation, and the function `jaxpr_as_fun`
# partially applies to a closed jaxpr.
FLATTEN_TRANSFORMS = frozenset({"_flatten_fun_nokwargs", "flatten_fun_nokwargs"})


def _jaxpr_as_fun_impl() -> Any:
    # `jaxpr_as_fun` is curried: `jaxpr_as_fun(closed)` is `partial(impl, closed)`.
    probe = src_core.jaxpr_as_fun(None)
    return probe.func if isinstance(probe, functools.partial) else None


JAXPR_AS_FUN_IMPL = _jaxpr_as_fun_impl()


def varying_axes(aval: Any) -> frozenset[Any]:
    """Mesh axes an abstract value varies over inside `shard_map` (empty elsewhere)."""
    mat = getattr(aval, "mat", None)  # JAX >= 0.10: the manual-axis type
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.9


def match_varying(x: Any, aval: Any) -> Any:
    """Mark `x` as varying over the mesh axes `aval` varies over (`jax.lax.pcast`).

    Inside `shard_map`, a jaxpr traced for device-varying tangents rejects tangents
    built from constants (`jnp.eye`), which do not vary.
    """
    missing = varying_axes(aval) - varying_axes(jax.typeof(x))
    if not missing:
        return x
    return jax.lax.pcast(x, tuple(sorted(missing, key=str)), to="varying")


# --- where tracers come from (constants.py, densification reports) ------------------

is_user_filename = _source_info_util.is_user_filename  # for densification reports


def producing_equation(tracer: Any) -> Any:
    """The equation that made a staged tracer, or None (JAX >= 0.10 records it).

    Returns an object with `primitive`, `params`, `in_tracers`, `outvars` and
    `effects`; `tracer_var(tracer)` is among its `outvars`.
    """
    return getattr(tracer, "parent", None)


def tracer_var(tracer: Any) -> Any:
    """The jaxpr variable a staged tracer stands for."""
    return getattr(tracer, "val", None)


def tracer_constant(tracer: Any) -> Any:
    """The value of a tracer that stands for a constant, or None."""
    get_const = getattr(tracer, "get_const", None)
    return None if get_const is None else get_const()
