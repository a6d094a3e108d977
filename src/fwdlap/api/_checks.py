"""Input validation for the pytree API: calling convention, structure, shapes, dtypes.

Everything here looks only at static information (tree structures, shapes and dtypes),
so under `jax.jit` it runs once, while the function is traced, and costs nothing in the
compiled program.

The checks come in two layers:

1. Explicit checks that produce the error messages users see. Each message is a full
   sentence naming the public function, the argument, the leaf path
   (`jax.tree_util.keystr`), what was expected, what was found, and the fix. These run
   first, so a mistake never reaches JAX (or a type checker) and ends in a traceback
   that is not ours.
2. A jaxtyping annotation, checked by beartype, that restates the contract on the
   canonical leaves the core receives: one tree structure `" T"` shared by primals,
   jacobians and laplacians, one number of directions `n` shared by every jacobian, and
   floating tangents. It guards the hand-off to the core; if it ever fails, the failure
   is reported in a sentence of ours too.
"""

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, TypeAlias, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax.tree_util import PyTreeDef
from jaxtyping import (
    Array,
    ArrayLike,
    Inexact,
    PyTree,  # pyright: ignore[reportUnknownVariableType]
    Shaped,
    TypeCheckError,
    jaxtyped,  # pyright: ignore[reportUnknownVariableType]
)

from .._core.evaluate import AUTO, ChunkSize
from .._core.zeros import Zero, zero_jacobian, zero_laplacian

ChunkSizeArg = SupportsIndex | Literal["auto"] | None
"""`chunk_size` as the public functions accept it: any integer type (anything
`operator.index` accepts, such as `np.int64`), "auto" or None."""

# --- public annotation aliases --------------------------------------------------------
#
# At run time these are jaxtyping types (shown by `help` and the API docs). A static
# type checker cannot see inside jaxtyping's `PyTree`, which it reads as unknown, so it
# gets the same containers with `Any` leaves instead.

if TYPE_CHECKING:
    JacobianLeaf: TypeAlias = Any
    LaplacianLeaf: TypeAlias = Any
    Primals: TypeAlias = Sequence[Any]
    FilteredPrimals: TypeAlias = Sequence[Any]
    Jacobians: TypeAlias = Sequence[Any]
    Laplacians: TypeAlias = Sequence[Any]
    OutTree: TypeAlias = Any
else:
    #: One jacobian leaf: `n` directions followed by the primal leaf's shape.
    JacobianLeaf = Shaped[Array, "n ..."] | Shaped[np.ndarray, "n ..."] | Zero | None
    #: One laplacian leaf: the primal leaf's shape.
    LaplacianLeaf = Shaped[ArrayLike, "..."] | Zero | None
    #: `primals` of `lap` / `lap_partial`: one pytree of arrays per argument.
    Primals = Sequence[PyTree[ArrayLike]]
    #: `primals` of `lap_filter`: one pytree per positional argument, any leaves.
    FilteredPrimals = Sequence[PyTree[Any]]
    #: `jacobians`: structure of `primals`, leaves shaped `(n, *primal_leaf.shape)`.
    Jacobians = Sequence[PyTree[JacobianLeaf]]
    #: `laplacians`: structure of `primals`, leaves shaped like their primal leaves.
    Laplacians = Sequence[PyTree[LaplacianLeaf]]
    #: An output pytree of `fun`, or its jacobian or laplacian.
    OutTree = PyTree[Any]

_F = TypeVar("_F", bound=Callable[..., Any])


def validates_own_inputs(fn: _F) -> _F:
    """Mark a public entry point as one that validates its inputs itself.

    The entry points check their arguments in a fixed order and raise messages of their
    own. Runtime type checkers applied from outside (the jaxtyping import hook, for
    one) honour `__no_type_check__`, the flag `typing.no_type_check` sets, and leave
    such a function to do its own checking rather than pre-empt it with a generic
    message.
    """
    setattr(fn, "__no_type_check__", True)  # noqa: B010
    return fn


# --- typed tree helpers ---------------------------------------------------------------
#
# `KeyPath` in jax.tree_util is a tuple of an unsolved TypeVar, unknown to a static
# checker; these casts give the two functions we use concrete types.

_tree_flatten_with_path = cast(
    Callable[..., tuple[list[tuple[tuple[Any, ...], Any]], PyTreeDef]],
    jax.tree_util.tree_flatten_with_path,  # pyright: ignore[reportUnknownMemberType]
)
_keystr = cast(
    Callable[[tuple[Any, ...]], str],
    jax.tree_util.keystr,  # pyright: ignore[reportUnknownMemberType]
)


def flatten_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[tuple[Any, ...], Any]], PyTreeDef]:
    """`jax.tree_util.tree_flatten_with_path`, typed for a static checker."""
    return _tree_flatten_with_path(tree, is_leaf=is_leaf)


def keystr(path: tuple[Any, ...]) -> str:
    """A leaf path as `jax.tree_util.keystr` writes it, e.g. `[0]['w']`."""
    return _keystr(path)


# --- descriptions used in messages ----------------------------------------------------


def is_array(x: object) -> bool:
    """Whether `x` is an array (a JAX array or tracer, or a NumPy array or scalar)."""
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def is_array_like(x: object) -> bool:
    """Whether `x` is an array or a Python scalar (`jax.typing.ArrayLike`)."""
    return is_array(x) or isinstance(x, bool | int | float | complex)


def is_tangent_leaf(x: object) -> bool:
    """`is_leaf` for tangent trees: `None` and symbolic zeros stand for one leaf."""
    return x is None or isinstance(x, Zero)


def shape_str(shape: Sequence[int | str]) -> str:
    """`(3, 2)`, `(3,)`, `()` or `(n, 3)`: a shape the way Python prints a tuple."""
    items = [str(d) for d in shape]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _describe(x: object) -> str:
    """A short phrase for an object, used in error messages."""
    if isinstance(x, Zero):
        aval: Any = x.aval
        return f"a symbolic zero of shape {shape_str(aval.shape)}"
    if is_array(x):
        arr: Any = x
        return f"an array of shape {shape_str(arr.shape)} and dtype {arr.dtype}"
    if isinstance(x, bool | int | float | complex):
        return f"the Python {type(x).__name__} {x!r}"
    if isinstance(x, str):
        text = x if len(x) <= 40 else x[:37] + "..."
        return f"the string {text!r}"
    if callable(x):
        name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None)
        if name is not None and not isinstance(x, type):
            return f"the function {name}"
        return f"a callable object of type {type(x).__name__}"
    return f"an object of type {type(x).__name__}"


def describe(x: object) -> str:
    """A short phrase for an object in an error message ("the string 'hi'", ...)."""
    return _describe(x)


# --- the checked result ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What the tangents of one primal leaf must look like."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    tangent_dtype: Any

    @property
    def differentiable(self) -> bool:
        return bool(jnp.issubdtype(self.tangent_dtype, jnp.inexact))


@dataclasses.dataclass(frozen=True)
class CheckedInputs:
    """Validated, flattened inputs, ready for the flat core.

    `dynamic[i]` says whether leaf `i` is traced; leaves that are not (only
    `lap_filter` has any) are closed over and have `None` tangents here. Tangents of
    dynamic leaves are dense arrays of the primal's tangent dtype, or symbolic zeros.
    """

    treedef: Any
    specs: tuple[LeafSpec | None, ...]
    primals: tuple[Any, ...]
    dynamic: tuple[bool, ...]
    jacobians: tuple[Any, ...]
    laplacians: tuple[Any, ...]
    n: int

    def dynamic_leaves(self) -> tuple[list[Any], list[Any], list[Any]]:
        """The primals, jacobians and laplacians of the traced leaves only."""
        keep = [i for i, d in enumerate(self.dynamic) if d]
        return (
            [self.primals[i] for i in keep],
            [self.jacobians[i] for i in keep],
            [self.laplacians[i] for i in keep],
        )


# --- calling convention ---------------------------------------------------------------


def check_fun(api: str, fun: object) -> None:
    """`fun` must be callable."""
    if not callable(fun):
        raise TypeError(
            f"{api} expects `fun` to be a callable as its first argument, but got "
            f"{_describe(fun)}. Call it as {api}(fun, primals, jacobians, laplacians)."
        )


def _check_sequence(
    api: str, name: str, value: object, example: str | None = None
) -> tuple[Any, ...]:
    if isinstance(value, tuple | list):
        return tuple(cast(Sequence[Any], value))
    if is_array(value):
        found = f"a bare {_describe(value)[3:]}"
    else:
        found = _describe(value)
    if example is None:
        example = f"{api}(fun, (x,), (jacobian,), (laplacian,))"
    raise TypeError(
        f"{api} expects `{name}` to be a tuple or list with one entry per positional "
        f"argument of `fun`, but got {found}. Wrap it in a tuple, as for jax.jvp: "
        f"{example}."
    )


def check_arguments(
    api: str,
    primals: object,
    jacobians: object,
    laplacians: object,
    *,
    tangent_names: tuple[str, str] = ("jacobians", "laplacians"),
    example: str | None = None,
) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]:
    """`primals`, `jacobians` and `laplacians` must be tuples or lists of one length.

    `example` is the correct call that a message shows (by default `api(fun, (x,),
    (jacobian,), (laplacian,))`).
    """
    primals_t = _check_sequence(api, "primals", primals, example)
    jac_t = _check_sequence(api, tangent_names[0], jacobians, example)
    lap_t = _check_sequence(api, tangent_names[1], laplacians, example)
    for name, tangents in zip(tangent_names, (jac_t, lap_t), strict=True):
        if len(tangents) != len(primals_t):
            raise ValueError(
                f"{api} expects `{name}` to have one entry per entry of `primals`, but "
                f"`primals` has {len(primals_t)} and `{name}` has {len(tangents)}. "
                f"Give `{name}` one pytree (or None) per positional argument of `fun`."
            )
    return primals_t, jac_t, lap_t


# --- tree structure -------------------------------------------------------------------


class _NoTangent:
    """Marks a leaf covered by a `None` that stood for a whole subtree."""


_NO_TANGENT = _NoTangent()


def _expand_none_prefixes(tangents: Any, primals: Any) -> Any:
    """Replace each `None` standing for a subtree of `primals` by per-leaf markers."""

    def no_tangent(leaf: Any) -> _NoTangent:
        del leaf
        return _NO_TANGENT

    def expand(t: Any, sub: Any) -> Any:
        if t is None:
            return jax.tree_util.tree_map(no_tangent, sub)
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(sub)):
            return t
        raise ValueError("a tangent leaf stands where the primals have a subtree")

    return jax.tree_util.tree_map(expand, tangents, primals, is_leaf=is_tangent_leaf)


def _structure_difference(primals: Any, tangents: Any, name: str) -> str:
    """A clause naming the first leaf path at which two structures differ."""
    p_paths = [p for p, _ in flatten_with_paths(primals)[0]]
    t_flat = flatten_with_paths(tangents, is_leaf=is_tangent_leaf)[0]
    t_paths = [(p, t is None) for p, t in t_flat]
    for path in p_paths:
        covered = any(
            tp == path or (is_none and path[: len(tp)] == tp) for tp, is_none in t_paths
        )
        if not covered and any(tp[: len(path)] == path for tp, _ in t_paths):
            return (
                f" They differ at {name}{keystr(path)}: primals{keystr(path)} is a "
                f"leaf, but `{name}` has a subtree there, while a tangent leaf must "
                "be a single array (or None, or a symbolic zero)."
            )
        if not covered:
            return (
                f" They differ at {name}{keystr(path)}: primals"
                f"{keystr(path)} is a leaf, but `{name}` has no leaf "
                "(and no None) there."
            )
    p_set = set(p_paths)
    for path, is_none in t_paths:
        if not is_none and path not in p_set:
            return (
                f" They differ at {name}{keystr(path)}: `{name}` has a "
                f"leaf there, but `primals` has no leaf at that path."
            )
    return " They have the same leaf paths but differ in the type of a node."


def flatten_tangents(
    api: str, name: str, tangents: tuple[Any, ...], primals: tuple[Any, ...]
) -> list[Any]:
    """Flatten a tangent tree up to the leaves of `primals`.

    `None` may stand for any leaf or subtree (it means zero), and a symbolic zero for a
    leaf. Returns one entry per primal leaf: an array, a symbolic zero, `None`, or
    whatever else the user put there (checked later, leaf by leaf).
    """
    treedef = jax.tree_util.tree_structure(primals)
    try:
        return treedef.flatten_up_to(tangents)
    except (ValueError, TypeError):
        pass
    try:
        expanded = _expand_none_prefixes(tangents, primals)
        leaves = treedef.flatten_up_to(expanded)
    except (ValueError, TypeError):
        t_struct = jax.tree_util.tree_structure(tangents, is_leaf=is_tangent_leaf)
        raise ValueError(
            f"{api} expects `{name}` to have the tree structure of `primals` (with "
            "None or a symbolic zero for a leaf that has no tangent, or None for a "
            "whole subtree), but the structures differ."
            f"{_structure_difference(primals, tangents, name)} Give `{name}` the "
            "structure of `primals`.\n"
            f"  primals structure:   {treedef}\n"
            f"  {name} structure: {' ' * max(0, 9 - len(name))}{t_struct}"
        ) from None
    return [None if leaf is _NO_TANGENT else leaf for leaf in leaves]


# --- leaves ---------------------------------------------------------------------------


def leaf_spec(path: str, primal: Any) -> LeafSpec:
    """The shape and dtypes a primal leaf asks of its tangents."""
    aval: Any = jax.typeof(primal)
    return LeafSpec(
        path=path,
        shape=tuple(aval.shape),
        dtype=aval.dtype,
        tangent_dtype=aval.to_tangent_aval().dtype,
    )


def _jacobian_example(spec: LeafSpec) -> str:
    size = math.prod(spec.shape)
    if not spec.shape:
        return "jnp.ones((1,)) for one direction"
    if len(spec.shape) == 1:
        return f"jnp.eye({size}) for all {size} unit directions"
    return (
        f"jnp.eye({size}).reshape({size}, {', '.join(map(str, spec.shape))}) for all "
        f"{size} unit directions"
    )


def _check_tangent_leaf(
    api: str, kind: str, arg: str, spec: LeafSpec, tangent: Any
) -> tuple[int, ...] | None:
    """Check one jacobian (`kind="jacobian"`) or laplacian leaf; return its shape.

    Returns None for a `None` tangent. Checks the type, the trailing shape (the leading
    `n` of jacobians is checked across leaves by the caller) and the dtype.
    """
    if tangent is None:
        return None
    where = f"{arg}{spec.path}"
    primal_where = f"primals{spec.path}"
    zero_hint = (
        "fwdlap.zero_tangent_from_primal(primal, n)"
        if kind == "jacobian"
        else "fwdlap.zero_tangent_from_primal(primal)"
    )
    if isinstance(tangent, Zero):
        aval: Any = tangent.aval
        shape: tuple[int, ...] = tuple(aval.shape)
        dtype: Any = aval.dtype
    elif is_array(tangent) or (kind == "laplacian" and is_array_like(tangent)):
        t_aval: Any = jax.typeof(tangent)
        shape = tuple(t_aval.shape)
        dtype = t_aval.dtype
    else:
        raise TypeError(
            f"{api} expects each {kind} leaf to be an array, None or a symbolic zero "
            f"({zero_hint}), but {where} is {_describe(tangent)}. Convert it with "
            "jnp.asarray, or pass None if it is zero."
        )
    if kind == "jacobian":
        expected = ("n", *spec.shape)
        if len(shape) != len(spec.shape) + 1 or shape[1:] != spec.shape:
            raise ValueError(
                f"{api}: the jacobian at {where} has shape {shape_str(shape)}, but its "
                f"primal {primal_where} has shape {shape_str(spec.shape)}, so the "
                f"jacobian must have shape {shape_str(expected)}: a leading axis of n "
                "tangent directions followed by the primal's shape. Give "
                f"{where} shape {shape_str(expected)}, for example "
                f"{_jacobian_example(spec)}."
            )
    elif shape != spec.shape:
        raise ValueError(
            f"{api}: the laplacian at {where} has shape {shape_str(shape)}, but its "
            f"primal {primal_where} has shape {shape_str(spec.shape)}, and a laplacian "
            f"must have its primal's shape. Give {where} shape "
            f"{shape_str(spec.shape)}, or pass None if it is zero."
        )
    _check_tangent_dtype(api, kind, where, primal_where, spec, dtype, tangent)
    return shape


def _check_tangent_dtype(
    api: str,
    kind: str,
    where: str,
    primal_where: str,
    spec: LeafSpec,
    dtype: Any,
    tangent: Any,
) -> None:
    float0 = jax.dtypes.float0
    if not spec.differentiable:
        if dtype == float0 or (isinstance(tangent, Zero)):
            return
        raise TypeError(
            f"{api}: the primal {primal_where} has dtype {spec.dtype}, which is not "
            f"differentiable, so its {kind} must be None (or a float0 array), but "
            f"{where} has dtype {dtype}. Pass None for {where}, or make the primal "
            "floating point if it should be differentiated."
        )
    complex_primal = bool(jnp.issubdtype(spec.dtype, jnp.complexfloating))
    if dtype == float0 or not jnp.issubdtype(dtype, jnp.inexact):
        wanted = "a floating or complex" if complex_primal else "a floating"
        raise TypeError(
            f"{api}: the primal {primal_where} has the inexact dtype {spec.dtype}, so "
            f"its {kind} must have {wanted} dtype, but {where} has dtype {dtype}. "
            f"Convert it, e.g. jnp.asarray(tangent, {spec.tangent_dtype}), or pass "
            "None if it is zero."
        )
    if not complex_primal and jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{api}: the primal {primal_where} is real ({spec.dtype}), so its {kind} "
            f"must be real too, but {where} has the complex dtype {dtype}. Pass the "
            "real part, or make the primal complex."
        )


def _check_shared_n(api: str, sizes: list[tuple[str, int]]) -> int:
    """All jacobian leaves must share the leading axis `n`; return it (0 if none)."""
    by_size: dict[int, list[str]] = {}
    for where, size in sizes:
        by_size.setdefault(size, []).append(where)
    if len(by_size) > 1:
        found = "; ".join(
            f"n = {size} at {', '.join(wheres)}" for size, wheres in by_size.items()
        )
        raise ValueError(
            f"{api} expects every jacobian leaf to have the same number n of tangent "
            f"directions along its leading axis, but found {found}. Give every "
            "jacobian leaf the same leading axis size n (the directions are shared by "
            "all inputs; use zeros for an input a direction does not move)."
        )
    return next(iter(by_size), 0)


def _canonical(tangent: Any, spec: LeafSpec, zero: Any) -> Any:
    """A dense array of the primal's tangent dtype, or a symbolic zero."""
    if tangent is None or isinstance(tangent, Zero) or not spec.differentiable:
        return zero
    aval: Any = jax.typeof(tangent)
    if aval.dtype == jax.dtypes.float0:
        return zero
    if isinstance(tangent, np.ndarray):
        # Stays NumPy: under jax.jit, jnp.asarray would turn it into a tracer and hide
        # its zero pattern from the sparse mode.
        array = cast(np.ndarray[Any, Any], tangent)
        return array.astype(spec.tangent_dtype, copy=False)
    return jnp.asarray(tangent, dtype=spec.tangent_dtype)


# --- the annotated contract -----------------------------------------------------------


if TYPE_CHECKING:

    def _annotated_contract(primals: Any, jacobians: Any, laplacians: Any) -> None: ...

else:

    @jaxtyped(typechecker=beartype)
    def _annotated_contract(
        primals: PyTree[ArrayLike, " T"],
        jacobians: PyTree[Inexact[Array | np.ndarray, "n ..."] | Zero, " T"],
        laplacians: PyTree[Inexact[Array | np.ndarray, "..."] | Zero, " T"],
    ) -> None:
        """The contract of the canonical leaves, checked by jaxtyping + beartype.

        `" T"` ties the three structures together and `n` is shared by every jacobian.
        (A static checker cannot read jaxtyping's `PyTree`; it sees the stub above.)
        """
        del primals, jacobians, laplacians


def _contract_detail(error: Exception) -> str:
    """The lines of a jaxtyping error that say which argument failed and how."""
    keep = ("The problem arose", "Actual value", "Expected type")
    lines = [ln.strip() for ln in str(error).splitlines()]
    picked = [ln.rstrip(".") for ln in lines if ln.startswith(keep)]
    return "; ".join(picked) if picked else (lines[0] if lines else repr(error))


def _check_contract(api: str, checked: CheckedInputs) -> None:
    primals, jacobians, laplacians = checked.dynamic_leaves()
    try:
        _annotated_contract(tuple(primals), tuple(jacobians), tuple(laplacians))
    except TypeCheckError as e:
        raise TypeError(
            f"{api}: the validated inputs do not satisfy fwdlap's annotated contract "
            f"(one structure, one n, floating tangents): {_contract_detail(e)}. This "
            "is a bug in fwdlap's input checks; please report it with the call that "
            "raised it."
        ) from None


# --- entry point ----------------------------------------------------------------------


def check_inputs(
    api: str,
    fun: object,
    primals: object,
    jacobians: object,
    laplacians: object,
    *,
    filtered: bool,
) -> CheckedInputs:
    """Validate a call of `lap`, `lap_partial` or `lap_filter`; flatten its inputs.

    With `filtered=False` every primal leaf must be an array or Python scalar. With
    `filtered=True` (`lap_filter`) a leaf whose jacobian and laplacian are both `None`
    is static, and only static leaves may be something other than arrays.
    """
    check_fun(api, fun)
    primals_t, jac_t, lap_t = check_arguments(api, primals, jacobians, laplacians)
    p_flat, treedef = flatten_with_paths(primals_t)
    j_leaves = flatten_tangents(api, "jacobians", jac_t, primals_t)
    l_leaves = flatten_tangents(api, "laplacians", lap_t, primals_t)

    specs: list[LeafSpec | None] = []
    dynamic: list[bool] = []
    sizes: list[tuple[str, int]] = []
    for (key_path, primal), jac, lap in zip(p_flat, j_leaves, l_leaves, strict=True):
        path = keystr(key_path)
        static = filtered and jac is None and lap is None
        if not is_array_like(primal):
            if static:
                specs.append(None)
                dynamic.append(False)
                continue
            _raise_non_array_primal(api, path, primal, jac, lap, filtered)
        spec = leaf_spec(path, primal)
        jac_shape = _check_tangent_leaf(api, "jacobian", "jacobians", spec, jac)
        _check_tangent_leaf(api, "laplacian", "laplacians", spec, lap)
        if jac_shape is not None:
            sizes.append((f"jacobians{path}", jac_shape[0]))
        specs.append(None if static else spec)
        dynamic.append(not static)
    n = _check_shared_n(api, sizes)

    jacs: list[Any] = []
    laps: list[Any] = []
    leaves = (p for _, p in p_flat)
    for spec, primal, jac, lap in zip(specs, leaves, j_leaves, l_leaves, strict=True):
        if spec is None:
            jacs.append(None)
            laps.append(None)
        else:
            jacs.append(_canonical(jac, spec, zero_jacobian(primal, n)))
            laps.append(_canonical(lap, spec, zero_laplacian(primal)))
    checked = CheckedInputs(
        treedef=treedef,
        specs=tuple(specs),
        primals=tuple(p for _, p in p_flat),
        dynamic=tuple(dynamic),
        jacobians=tuple(jacs),
        laplacians=tuple(laps),
        n=n,
    )
    _check_contract(api, checked)
    return checked


def _raise_non_array_primal(
    api: str, path: str, primal: object, jac: object, lap: object, filtered: bool
) -> None:
    where = f"primals{path}"
    if filtered:
        given, tangent = ("jacobians", jac) if jac is not None else ("laplacians", lap)
        raise TypeError(
            f"{api}: the primal at {where} is {_describe(primal)}, not an array, so it "
            f"cannot have a tangent, but {given}{path} is {_describe(tangent)}. "
            f"Pass None as both its jacobian and its laplacian; {api} then holds it "
            "static."
        )
    raise TypeError(
        f"{api}: the primal at {where} is {_describe(primal)}, not an array. {api} "
        "differentiates every leaf of `primals`, so each leaf must be an array or a "
        "Python scalar. Use fwdlap.lap_filter, which holds leaves that are not arrays "
        "static, or close over the value in `fun`."
    )


def _array_leaves(tree: Any) -> tuple[list[Any], Any, tuple[str, Any] | None]:
    """The leaves and structure of `tree`, and the path and value of its first leaf
    that is not an array or a Python scalar (None if every leaf is one)."""
    flat, treedef = flatten_with_paths(tree)
    bad = next(((keystr(p), x) for p, x in flat if not is_array_like(x)), None)
    return [leaf for _, leaf in flat], treedef, bad


def check_outputs(api: str, out: Any) -> tuple[list[Any], Any]:
    """Flatten `fun`'s output; every leaf must be an array or a Python scalar."""
    leaves, out_tree, bad = _array_leaves(out)
    if bad is not None:
        path, leaf = bad
        raise TypeError(
            f"{api}: `fun` returned {_describe(leaf)} at output{path}, but every "
            "output leaf must be an array or a Python scalar. Use fwdlap.lap_filter, "
            "which passes leaves that are not arrays through unchanged, or return "
            "only arrays."
        )
    return leaves, out_tree


def check_has_aux(api: str, has_aux: object) -> bool:
    """`has_aux` as a bool, or a `TypeError` naming the API."""
    if not isinstance(has_aux, bool):
        raise TypeError(f"{api}: `has_aux` must be True or False, got {has_aux!r}.")
    return has_aux


def split_aux(api: str, result: Any) -> tuple[Any, Any]:
    """`(output, aux)` from what a function called with `has_aux=True` returned."""
    if isinstance(result, tuple | list):
        items = cast(Sequence[Any], result)
        if len(items) == 2:
            return items[0], items[1]
        what = f"a {type(items).__name__} of length {len(items)}"
    else:
        what = _describe(result)
    raise TypeError(
        f"{api}: with `has_aux=True` the function must return a pair "
        f"`(output, aux)`, but it returned {what}. Return a 2-tuple whose second "
        "element is the auxiliary data, or drop `has_aux=True`."
    )


def check_aux(api: str, aux: Any) -> tuple[list[Any], Any]:
    """Flatten the auxiliary output; every leaf must be an array or a Python scalar.

    The leaves are not wrapped in `jax.lax.stop_gradient`, which would also hide them
    from transformations outside fwdlap (`jax.grad` of the aux through the call):
    their tangents are dropped instead, and `jax.jit` removes the work.
    """
    leaves, aux_tree, bad = _array_leaves(aux)
    if bad is not None:
        path, leaf = bad
        raise TypeError(
            f"{api}: the auxiliary output holds {_describe(leaf)} at aux{path}, but "
            "with `has_aux=True` every leaf of aux must be an array or a Python "
            "scalar. Return only arrays as aux, or close over the other values."
        )
    return leaves, aux_tree


# --- lap_pe ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartialSpec:
    """What `lap_pe` (returned by `lap_partial`) accepts, recorded from the examples."""

    treedef: Any
    skeleton: Any
    specs: tuple[LeafSpec, ...]
    n: int
    jac_nonzero: tuple[bool, ...]
    lap_nonzero: tuple[bool, ...]


def partial_spec(checked: CheckedInputs) -> PartialSpec:
    """Record the example tangents' structure, shapes, `n` and zero pattern."""
    specs = tuple(s for s in checked.specs if s is not None)
    skeleton = jax.tree_util.tree_unflatten(checked.treedef, list(range(len(specs))))
    return PartialSpec(
        treedef=checked.treedef,
        skeleton=skeleton,
        specs=specs,
        n=checked.n,
        jac_nonzero=tuple(not isinstance(j, Zero) for j in checked.jacobians),
        lap_nonzero=tuple(not isinstance(lp, Zero) for lp in checked.laplacians),
    )


_LAP_PE = "lap_pe (the function returned by fwdlap.lap_partial)"


def check_partial_tangents(
    spec: PartialSpec, jacobians: object, laplacians: object
) -> tuple[list[Any], list[Any]]:
    """Validate the tangents passed to `lap_pe`; return them flat and canonical.

    They must match the structure, shapes and `n` of the examples given to
    `lap_partial`, and be zero wherever the examples were zero: `lap_pe` was traced for
    that zero pattern and cannot take a tangent where it assumed none.
    """
    skeleton: tuple[Any, ...] = spec.skeleton
    _, jac_t, lap_t = check_arguments(
        _LAP_PE,
        skeleton,
        jacobians,
        laplacians,
        example="lap_pe((jacobian,), (laplacian,)), with one entry per positional "
        "argument of the `fun` given to fwdlap.lap_partial (lap_pe itself takes no "
        "`fun` and no primals)",
    )
    j_leaves = flatten_tangents(_LAP_PE, "jacobians", jac_t, skeleton)
    l_leaves = flatten_tangents(_LAP_PE, "laplacians", lap_t, skeleton)
    sizes: list[tuple[str, int]] = []
    for leaf, jac, lap in zip(spec.specs, j_leaves, l_leaves, strict=True):
        jac_shape = _check_tangent_leaf(_LAP_PE, "jacobian", "jacobians", leaf, jac)
        _check_tangent_leaf(_LAP_PE, "laplacian", "laplacians", leaf, lap)
        if jac_shape is not None:
            sizes.append((f"jacobians{leaf.path}", jac_shape[0]))
    n = _check_shared_n(_LAP_PE, sizes)
    if sizes and n != spec.n:
        raise ValueError(
            f"{_LAP_PE} was traced for n = {spec.n} tangent directions, the leading "
            f"axis of the example jacobians given to fwdlap.lap_partial, but its "
            f"jacobians have n = {n}. Pass jacobians with {spec.n} directions, or call "
            f"fwdlap.lap_partial again with examples of {n} directions."
        )
    jacs: list[Any] = []
    laps: list[Any] = []
    for leaf, jac, lap, j_nz, l_nz in zip(
        spec.specs, j_leaves, l_leaves, spec.jac_nonzero, spec.lap_nonzero, strict=True
    ):
        jacs.append(_partial_tangent("jacobian", leaf, jac, j_nz, (spec.n,)))
        laps.append(_partial_tangent("laplacian", leaf, lap, l_nz, ()))
    return jacs, laps


def _partial_tangent(
    kind: str, leaf: LeafSpec, tangent: Any, nonzero: bool, lead: tuple[int, ...]
) -> Any:
    shape = (*lead, *leaf.shape)
    dense_zero = tangent is None or isinstance(tangent, Zero)
    if not dense_zero:
        aval: Any = jax.typeof(tangent)
        dense_zero = aval.dtype == jax.dtypes.float0
    if not nonzero:
        if dense_zero or not leaf.differentiable:
            return None
        raise ValueError(
            f"{_LAP_PE}: the example {kind} given to fwdlap.lap_partial for "
            f"primals{leaf.path} was zero (None or a symbolic zero), so lap_pe was "
            f"traced without that {kind} and cannot use one, but {kind}s{leaf.path} "
            f"is {_describe(tangent)}. Pass None there, or call fwdlap.lap_partial "
            f"with an array as the example {kind} for primals{leaf.path}."
        )
    if dense_zero or not leaf.differentiable:
        return jnp.zeros(shape, leaf.tangent_dtype)
    return jnp.asarray(tangent, dtype=leaf.tangent_dtype)


# --- chunk_size ----------------------------------------------------------------------


def as_positive_int(value: Any) -> int | None:
    """`value` as a Python int if it is a positive integer, else None.

    Anything `operator.index` accepts counts (`np.int64(2)`, a concrete JAX integer
    scalar), except booleans.
    """
    if isinstance(value, bool | np.bool_):
        return None
    try:
        number = operator.index(value)
    except TypeError:  # also JAX's error for a traced integer
        return None
    return number if number >= 1 else None


def check_chunk_size(api: str, chunk_size: Any) -> ChunkSize:
    """`chunk_size` after checking it is a positive integer, "auto" or None.

    An integer of another type (a NumPy or concrete JAX integer scalar) comes back as a
    Python int.
    """
    if chunk_size is None or (isinstance(chunk_size, str) and chunk_size == AUTO):
        return chunk_size
    number = as_positive_int(chunk_size)
    if number is None:
        raise ValueError(
            f'{api}: `chunk_size` must be a positive int, "auto" or None, got '
            f"{chunk_size!r}. Any integer type works (a Python int, np.int64, a "
            "concrete JAX integer scalar), but not a traced value: the chunk size "
            "fixes the shapes of the compiled program."
        )
    return number
