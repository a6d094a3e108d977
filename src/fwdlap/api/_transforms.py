r"""Function transforms: `laplacian`, `value_grad_and_laplacian`, `hessian_diagonal`.

They build the tangent seeds that `lap` and `lap_partial` take, so that users do not
have to. Every transform differentiates with respect to the arguments picked by
`argnums`, which may be pytrees; their leaves are flattened in `jax.tree_util` order,
each leaf in row-major order, into one coordinate vector $x \in \mathbb{R}^d$. The
other arguments and all keyword arguments are held fixed.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, SupportsIndex, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer

from .._core import evaluate
from .._core.evaluate import ChunkSize
from .._core.sparse import SparseSpec
from .._core.zeros import zero_laplacian, zero_tangent_from_primal
from ._checks import (
    ChunkSizeArg,
    as_positive_int,
    check_aux,
    check_chunk_size,
    check_has_aux,
    describe,
    is_array_like,
    split_aux,
)
from ._lap import _densify, _flat_fun, _OutTree  # pyright: ignore[reportPrivateUsage]
from ._lap import lap_partial as _lap_partial_fn
from ._sparsity import Sparsity, to_spec

# JAX's loops and `eval_shape`, typed for a static checker (their stubs leave the
# traced function's types unknown).
_lax_map = cast(Callable[..., Any], lax.map)  # pyright: ignore[reportUnknownMemberType]
_lax_cond = cast(Callable[..., Any], lax.cond)  # pyright: ignore[reportUnknownMemberType]
_eval_shape = cast(Callable[..., Any], jax.eval_shape)  # pyright: ignore[reportUnknownMemberType]

_LAPLACIAN = "fwdlap.laplacian"
_VGL = "fwdlap.value_grad_and_laplacian"
_HESS_DIAG = "fwdlap.hessian_diagonal"


# --- arguments -----------------------------------------------------------------------


class _Argument(NamedTuple):
    """The differentiated argument(s), flattened into one coordinate vector."""

    tree: Any
    leaves: list[jax.Array]
    treedef: Any
    sizes: list[int]
    dim: int
    dtype: Any


def _normalize_argnums(api: str, argnums: Any) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,), False
    if isinstance(argnums, Sequence) and not isinstance(argnums, str):
        items: list[Any] = list(argnums)  # pyright: ignore[reportUnknownArgumentType]
        if items and all(isinstance(a, int) and not isinstance(a, bool) for a in items):
            nums = tuple(int(a) for a in items)
            if len(set(nums)) != len(nums):
                raise ValueError(
                    f"{api}: `argnums` has repeated entries {nums}; list every "
                    "argument at most once."
                )
            return nums, True
    raise TypeError(
        f"{api}: `argnums` must be an int or a non-empty tuple of ints, got "
        f"{argnums!r}."
    )


def _bind(
    api: str,
    fun: Callable[..., Any],
    argnums: tuple[int, ...],
    is_tuple: bool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[_Argument, Callable[[Any], Any]]:
    """Split `args` into the differentiated argument and a function of it alone."""
    nargs = len(args)
    for a in argnums:
        if not -nargs <= a < nargs:
            raise TypeError(
                f"{api}: argnums={a} refers to positional argument {a}, but the "
                f"function was called with {nargs} positional argument(s). Pass the "
                "differentiated arguments positionally, or change `argnums`."
            )
    idx = [a % nargs for a in argnums]
    x: Any = tuple(args[i] for i in idx) if is_tuple else args[idx[0]]

    def f_x(value: Any) -> Any:
        new_args = list(args)
        values = value if is_tuple else (value,)
        for i, v in zip(idx, values, strict=True):
            new_args[i] = v
        return fun(*new_args, **kwargs)

    return _flatten_argument(api, argnums if is_tuple else argnums[0], x), f_x


def _split_aux(api: str, f_x: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`f_x` for `has_aux=True`, its pair and aux checked in the name of `api`."""

    def f_aux(x: Any) -> tuple[Any, Any]:
        out, aux = split_aux(api, f_x(x))
        check_aux(api, aux)
        return out, aux

    return f_aux


def _check_fun(api: str, fun: object) -> None:
    """`fun` must be callable, checked when the transform is built (as `jax.grad`)."""
    if not callable(fun):
        raise TypeError(
            f"{api} expects `fun` to be a callable as its first argument, but got "
            f"{describe(fun)}. Pass the function itself: {api}(fun)(*args)."
        )


def _non_array_leaf(api: str, argnums: Any, path: Any, leaf: Any) -> TypeError:
    where = _keystr(path)
    if not path:
        fix = (
            " If it is a class of yours, register it as a pytree (for instance with "
            "jax.tree_util.register_dataclass) or make it an equinox.Module, so that "
            "its array fields become leaves."
        )
    else:
        fix = ""
    return TypeError(
        f"{api}: the differentiated argument (argnums={argnums}) holds "
        f"{describe(leaf)} at path {where}, not an array. Every leaf of the "
        "arguments picked by `argnums` is differentiated, so each must be a real "
        f"floating-point array.{fix} To differentiate only the arrays of a "
        "structure that holds other values (strings, functions, static "
        "configuration), split it with `params, static = eqx.partition(arg, "
        "eqx.is_inexact_array)`, differentiate with respect to `params` and rebuild "
        "the structure with `eqx.combine(params, static)` inside the function; or "
        "use fwdlap.lap_filter, which holds leaves that are not arrays static."
    )


def _flatten_argument(api: str, argnums: Any, x: Any) -> _Argument:
    flat = cast(
        tuple[list[tuple[Any, Any]], Any],
        jax.tree_util.tree_flatten_with_path(x),  # pyright: ignore[reportUnknownMemberType]
    )
    path_leaves, treedef = flat
    leaves: list[jax.Array] = []
    for path, leaf in path_leaves:
        if not is_array_like(leaf):
            raise _non_array_leaf(api, argnums, path, leaf)
        arr = jnp.asarray(leaf)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"{api}: the differentiated argument (argnums={argnums}) has a leaf at "
                f"path {_keystr(path)} with dtype {arr.dtype}; "
                "only real floating-point arrays can be differentiated. Convert it "
                "with `.astype(float)`, or move it out of `argnums`."
            )
        leaves.append(arr)
    if not leaves:
        raise ValueError(
            f"{api}: the differentiated argument (argnums={argnums}) has no array "
            "leaves, so there is nothing to differentiate."
        )
    sizes = [int(math.prod(leaf.shape)) for leaf in leaves]
    dtype = jnp.result_type(*leaves)
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return _Argument(tree, leaves, treedef, sizes, sum(sizes), dtype)


def _keystr(path: Any) -> str:
    text: str = jax.tree_util.keystr(path)  # pyright: ignore[reportUnknownMemberType]
    return text or "<root>"


def _split_rows(rows: Any, arg: _Argument) -> Any:
    """Seeds `(k, d)` as a pytree of jacobians `(k, *leaf.shape)` shaped like `arg`.

    NumPy seeds stay NumPy: concrete seeds are what the sparse mode reads.
    """
    return jax.tree_util.tree_unflatten(arg.treedef, _split_rows_flat(rows, arg))


def _split_rows_flat(rows: Any, arg: _Argument) -> list[Any]:
    """Seeds `(k, d)` as the flat jacobians `(k, *leaf.shape)` of `arg`'s leaves."""
    k = rows.shape[0]
    out: list[Any] = []
    offset = 0
    for leaf, size in zip(arg.leaves, arg.sizes, strict=True):
        piece = rows[:, offset : offset + size].reshape(k, *leaf.shape)
        out.append(piece.astype(np.dtype(leaf.dtype)))
        offset += size
    return out


def _split_vector(vec: jax.Array, arg: _Argument, lead: tuple[int, ...]) -> Any:
    """A vector `(*lead, d)` as a pytree of `(*lead, *leaf.shape)` shaped like `arg`."""
    out: list[jax.Array] = []
    offset = 0
    for leaf, size in zip(arg.leaves, arg.sizes, strict=True):
        piece = vec[..., offset : offset + size].reshape(*lead, *leaf.shape)
        out.append(piece)
        offset += size
    return jax.tree_util.tree_unflatten(arg.treedef, out)


def _zero_laplacians(arg: _Argument) -> Any:
    return jax.tree_util.tree_map(zero_tangent_from_primal, arg.tree)


# --- seeds ---------------------------------------------------------------------------


class _Seeds(NamedTuple):
    """`num` tangent directions whose second-order terms are summed with `sign`.

    Either scaled unit vectors, row `j` being `scale[j] * e_{index[j]}` (`index=None`
    means `j`, `scale=None` means 1), or the explicit rows of `dense` `(num, d)`.
    """

    num: int
    sign: float
    index: Any = None
    scale: Any = None
    dense: Any = None


def _seed_chunk(
    seeds: _Seeds, start: Any, size: int, dim: int, dtype: Any
) -> jax.Array:
    """Rows `start .. start + size` of the seeds (zero past `num`): `(size, d)`."""
    padded = -(-seeds.num // size) * size
    if seeds.dense is not None:
        dense = seeds.dense
        if padded > seeds.num:
            pad = jnp.zeros((padded - seeds.num, dim), dense.dtype)
            dense = jnp.concatenate([dense, pad])
        if isinstance(start, int) and start == 0 and size == padded:
            return dense.astype(dtype)
        return lax.dynamic_slice_in_dim(dense, start, size, axis=0).astype(dtype)
    rows = jnp.arange(size) + start
    coords = rows
    if seeds.index is not None:
        # Padding rows point past the last coordinate: their one-hot row is zero.
        pad = jnp.full((padded - seeds.num,), dim, seeds.index.dtype)
        coords = jnp.concatenate([seeds.index, pad])[rows]
    chunk = jax.nn.one_hot(coords, dim, dtype=dtype)
    if seeds.scale is not None:
        pad = jnp.zeros((padded - seeds.num,), seeds.scale.dtype)
        scale = jnp.concatenate([seeds.scale, pad])[rows]
        chunk = chunk * scale[:, None].astype(dtype)
    return chunk


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, Tracer)


def _check_weights_dtype(api: str, weights: Any) -> None:
    """`weights` must be real numbers: an array or array-like of a real dtype."""
    try:
        dtype = jnp.result_type(weights)
    except TypeError:
        dtype = None
    if dtype is None or not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.bool_)
    ):
        what = describe(weights) if dtype is None else f"dtype {dtype}"
        raise TypeError(
            f"{api}: `weights` must be a real array (a vector of per-coordinate "
            f"weights or a matrix), but got {what}. The Laplacian "
            "tr(A H) of a real function is real; for complex weights compute the real "
            "and imaginary parts as two weighted Laplacians and combine them."
        )


def _check_probes(api: str, probes: Any, key: Any) -> int | None:
    """The number of probes (None for the exact operator), checked with `key`."""
    num_probes = _check_positive_int(api, "probes", probes)
    if num_probes is not None and key is None:
        raise TypeError(
            f"{api}: `probes={num_probes}` needs a random key: pass "
            "`key=jax.random.key(seed)`."
        )
    if num_probes is None and key is not None:
        raise TypeError(
            f"{api}: `key` was given without `probes`; pass `probes=k` for a "
            "stochastic estimate with k probe vectors, or drop `key`."
        )
    if key is not None:
        _check_key(api, key)
    return num_probes


def _check_key(api: str, key: Any) -> None:
    """`key` must be one `jax.random` key: typed (shape `()`) or raw (uint32)."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and shape is not None:
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            if tuple(shape) == ():
                return
            raise TypeError(
                f"{api}: `key` must be one random key, but got an array of keys of "
                f"shape {tuple(shape)}. Pass a single key (for example `keys[0]`), "
                "or jax.vmap the Laplacian over the keys."
            )
        if dtype == np.uint32 and len(shape) == 1:
            return
    seed = f"{key!r}" if isinstance(key, int) and not isinstance(key, bool) else "0"
    raise TypeError(
        f"{api}: `key` must be a JAX random key, as made by jax.random.key(seed) "
        f"(or a raw key from jax.random.PRNGKey(seed)), but got {describe(key)}. "
        f"Pass, for example, key=jax.random.key({seed})."
    )


def _weight_seeds(api: str, weights: Any, arg: _Argument) -> list[_Seeds]:
    """Seeds for `tr(A H)`: `A = diag(w)` for a vector, else `sum_k l_k u_k u_k^T`."""
    dim, dtype = arg.dim, arg.dtype
    shape = tuple(jnp.shape(weights))
    if shape not in ((dim,), (dim, dim)):
        raise ValueError(
            f"{api}: `weights` must have shape ({dim},) (one weight per coordinate) "
            f"or ({dim}, {dim}) (a symmetric matrix), where {dim} is the total size of "
            f"the differentiated argument; got shape {shape}."
        )
    if dim == 0:
        return []
    if _is_concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim == 1:
            groups = [
                _Seeds(
                    int(sel.size),
                    sign,
                    index=jnp.asarray(sel),
                    scale=jnp.asarray(np.sqrt(sign * w[sel]), dtype),
                )
                for sign in (1.0, -1.0)
                if (sel := np.flatnonzero(sign * w > 0)).size
            ]
        else:
            lam, u = np.linalg.eigh((w + w.T) / 2)
            tol = dim * np.finfo(np.float64).eps * float(np.max(np.abs(lam), initial=0))
            groups: list[_Seeds] = []
            for sign in (1.0, -1.0):
                sel = np.flatnonzero(sign * lam > tol)
                if sel.size:
                    rows = (u[:, sel] * np.sqrt(sign * lam[sel])).T
                    groups.append(
                        _Seeds(int(sel.size), sign, dense=jnp.asarray(rows, dtype))
                    )
        # All-zero weights: one zero direction gives the (zero) result its shapes.
        return groups or [_Seeds(1, 1.0, scale=jnp.zeros((1,), dtype))]
    w = jnp.asarray(weights, dtype)
    if w.ndim == 1:
        return [
            _Seeds(dim, sign, scale=jnp.sqrt(jnp.maximum(sign * w, 0)))
            for sign in (1.0, -1.0)
        ]
    eig = cast(tuple[jax.Array, jax.Array], jnp.linalg.eigh(w))  # symmetrizes w
    lam, u = eig
    return [
        _Seeds(dim, sign, dense=(u * jnp.sqrt(jnp.maximum(sign * lam, 0))).T)
        for sign in (1.0, -1.0)
    ]


class _Nonfinite(NamedTuple):
    """The weights that are NaN or infinite, as entries `values[e]` at `(rows[e],
    cols[e])` of the weight matrix (`rows == cols` for a vector), counted where `mask`
    is true. `any` is None when the entries are known to exist (concrete weights), or
    the traced predicate "some weight is not finite"."""

    rows: Any
    cols: Any
    values: Any
    mask: Any
    any: Any


def _split_nonfinite(weights: Any, dtype: Any) -> tuple[Any, _Nonfinite | None]:
    """`weights` with NaN and infinite entries set to 0, and those entries.

    For concrete weights the entries are found now (None if there are none); for
    traced weights every entry is a candidate, masked by `isfinite` at run time.
    """
    ndim = len(jnp.shape(weights))
    if ndim not in (1, 2):
        return weights, None  # the shape check that follows explains the mistake
    if _is_concrete(weights):
        w = np.asarray(weights, dtype=np.float64)
        bad = ~np.isfinite(w)
        if not bad.any():
            return weights, None
        index = np.nonzero(bad)
        rows, cols = (index[0], index[0]) if ndim == 1 else index
        entries = _Nonfinite(
            jnp.asarray(rows),
            jnp.asarray(cols),
            jnp.asarray(w[bad], dtype),
            jnp.ones(rows.shape, bool),
            None,
        )
        return np.where(bad, 0.0, w), entries
    w = jnp.asarray(weights, dtype)
    bad = ~jnp.isfinite(w)
    if ndim == 1:
        rows = cols = jnp.arange(w.shape[0])
    else:
        rows, cols = (i.ravel() for i in jnp.indices(w.shape))
    entries = _Nonfinite(rows, cols, w.ravel(), bad.ravel(), jnp.any(bad))
    return jnp.where(bad, jnp.zeros((), dtype), w), entries


def _add_nonfinite(
    f_x: Callable[[Any], Any],
    arg: _Argument,
    entries: _Nonfinite,
    lap_out: Any,
    has_aux: bool,
) -> Any:
    """`lap_out` plus `sum_e values[e] * H[rows[e], cols[e]]` over the non-finite
    weights, so that they propagate as in `tr(A H)` (NaN, or an infinity whose sign
    follows the Hessian entry's, NaN where that entry is 0).

    Each Hessian entry comes from two one-direction passes, by polarisation:
    `H_ij = (q(e_i + e_j) - q(e_i - e_j)) / 4` with `q(v) = v^T H v` (for `i == j`,
    `q(2 e_i) / 4`, exact). They run one after the other in a `jax.lax.map`, and for
    traced weights under a `jax.lax.cond` that takes them only when some weight is
    not finite.
    """
    leaves, treedef = jax.tree_util.tree_flatten(lap_out)
    live = [i for i, leaf in enumerate(leaves) if not _is_float0(leaf)]
    dim, dtype = arg.dim, arg.dtype

    def terms() -> list[jax.Array]:
        zero_laps = _zero_laplacians(arg)
        example = _split_rows(jnp.zeros((1, dim), dtype), arg)
        partial_out = _lap_partial_fn(
            f_x, (arg.tree,), (example,), (zero_laps,), has_aux=has_aux
        )
        pe = partial_out[1]

        def q(v: jax.Array) -> list[jax.Array]:
            _, lap = pe((_split_rows(v[None], arg),), (zero_laps,))
            flat = jax.tree_util.tree_leaves(lap)
            return [flat[i] for i in live]

        def term(entry: tuple[Any, Any, Any, Any]) -> list[jax.Array]:
            i, j, value, keep = entry
            e_i = jax.nn.one_hot(i, dim, dtype=dtype)
            e_j = jax.nn.one_hot(j, dim, dtype=dtype)
            plus, minus = q(e_i + e_j), q(e_i - e_j)
            return [
                jnp.where(keep, value.astype(p.dtype) * ((p - m) / 4), 0).astype(
                    p.dtype
                )
                for p, m in zip(plus, minus, strict=True)
            ]

        stacked: list[jax.Array] = _lax_map(
            term, (entries.rows, entries.cols, entries.values, entries.mask)
        )
        return [jnp.sum(t, axis=0) for t in stacked]

    if entries.any is None:
        extra = terms()
    else:

        def nothing() -> list[jax.Array]:
            return [jnp.zeros(jnp.shape(leaves[i]), leaves[i].dtype) for i in live]

        extra = _lax_cond(entries.any, terms, nothing)
    out = list(leaves)
    for i, value in zip(live, extra, strict=True):
        out[i] = leaves[i] + value
    return jax.tree_util.tree_unflatten(treedef, out)


def _probe_seeds(
    api: str,
    groups: list[_Seeds],
    probes: int,
    key: Any,
    distribution: str,
    arg: _Argument,
) -> list[_Seeds]:
    """Map `probes` random vectors through each group's seeds: `z S_g^T / sqrt(k)`."""
    shape = (probes, arg.dim)
    if distribution == "rademacher":
        z = jax.random.rademacher(key, shape, dtype=arg.dtype)
    elif distribution == "gaussian":
        z = jax.random.normal(key, shape, dtype=arg.dtype)
    else:
        raise ValueError(
            f"{api}: `probe_distribution` must be 'rademacher' or 'gaussian', got "
            f"{distribution!r}."
        )
    z = z / jnp.sqrt(jnp.asarray(probes, arg.dtype))
    out: list[_Seeds] = []
    for g in groups:
        if g.dense is not None:
            # dense = S_g^T (r, d) with S_g S_g^T = A_g: seeds S_g z, r-dim probes z.
            rows = z[:, : g.num] @ g.dense
        else:
            # Scaled unit seeds: S_g^T = diag(scale) restricted to `index`.
            cols = jnp.arange(arg.dim) if g.index is None else g.index
            rows = z[:, cols]
            if g.scale is not None:
                rows = rows * g.scale
            if g.index is not None:
                rows = jnp.zeros(shape, arg.dtype).at[:, cols].set(rows)
        out.append(_Seeds(probes, g.sign, dense=rows))
    return out


# --- evaluation ----------------------------------------------------------------------


def _check_positive_int(api: str, name: str, value: Any) -> int | None:
    if value is None:
        return None
    number = as_positive_int(value)
    if number is None:
        raise ValueError(
            f"{api}: `{name}` must be a positive int or None, got {value!r}. Any "
            "integer type works (a Python int, np.int64, a concrete JAX integer "
            "scalar), but not a traced value: it fixes the shapes of the program."
        )
    return number


def _evaluate(
    api: str,
    f_x: Callable[[Any], Any],
    arg: _Argument,
    groups: list[_Seeds],
    chunk_size: ChunkSize,
    want_jacobian: bool,
    sparsity: Any = None,
    has_aux: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """`(out, sum_g sign_g sum_k s_k^T H s_k, jacobian rows or None, aux)`, all seeds.

    With `want_jacobian` (only for a single group) the jacobian rows of the outputs come
    back as one array `(num, *out.shape)` per output leaf, in seed order. With
    `has_aux`, `f_x` returns `(output, aux)` and `aux` comes back as computed (else
    None). The core evaluates the seeds (`evaluate.lap_flat_rows`) in one pass or in
    chunks; the unit vectors of the sparse mode go to `evaluate.lap_evaluate`.
    """
    store = _OutTree()
    treedef = jax.tree_util.tree_structure((arg.tree,))
    flat_fun = _flat_fun(api, f_x, treedef, store, has_aux)
    zero_laps = [zero_laplacian(leaf) for leaf in arg.leaves]
    if arg.dim == 0:
        # No coordinates: zero laplacians and jacobians without rows, whatever the
        # weights, probes, chunks or sparsity asked for.
        rows = np.zeros((0, 0), np.dtype(arg.dtype))
        jacs_in = _split_rows_flat(rows, arg)
        outs, jacs, laps = evaluate.lap_evaluate(
            flat_fun, arg.leaves, jacs_in, zero_laps, 0, None
        )
        num = 0
    elif (spec := _sparse_spec(api, sparsity, groups, arg, chunk_size)) is not None:
        # Identity seeds only (checked by the callers), block-sparse.
        eye = np.eye(arg.dim, dtype=np.dtype(arg.dtype))
        outs, jacs, laps = evaluate.lap_evaluate(
            flat_fun,
            arg.leaves,
            _split_rows_flat(eye, arg),
            zero_laps,
            arg.dim,
            chunk_size,
            spec,
        )
        num = arg.dim
    else:
        row_groups = [_row_group(g, arg) for g in groups]
        outs, laps, jacs = evaluate.lap_flat_rows(
            flat_fun, arg.leaves, row_groups, chunk_size, want_jacobian
        )
        num = groups[-1].num
    outs, aux = store.split(outs)
    avals = [jax.typeof(o) for o in outs]
    unflatten = functools.partial(jax.tree_util.tree_unflatten, store.treedef)
    laps = [_densify(a, lp, ()) for a, lp in zip(avals, laps, strict=False)]
    rows_out = None
    if want_jacobian and jacs is not None:
        jacs = [_densify(a, j, (num,)) for a, j in zip(avals, jacs, strict=False)]
        rows_out = unflatten(jacs)
    return unflatten(outs), unflatten(laps), rows_out, aux


def _sparse_spec(
    api: str,
    sparsity: Any,
    groups: list[_Seeds],
    arg: _Argument,
    chunk_size: ChunkSize,
) -> SparseSpec | None:
    """The sparse mode of a pass: the user's, or the seeds' particle blocks.

    Without `sparsity` (None) the unit-vector seeds of a plain Laplacian keep their
    particle blocks until values mix more than two particles
    (`evaluate.seed_blocks`), unless an int `chunk_size` asks for dense chunks;
    `sparsity=False` asks for the plain dense pass.
    """
    if sparsity is False:
        return None
    if sparsity is not None:
        return to_spec(api, sparsity)
    if (
        groups != [_Seeds(arg.dim, 1.0)]
        or arg.dim > _SEED_BLOCKS_MAX_DIM
        or chunk_size not in (None, evaluate.AUTO)
    ):
        return None
    eye = np.eye(arg.dim, dtype=np.dtype(arg.dtype))
    return evaluate.seed_blocks(_split_rows_flat(eye, arg), arg.dim)


_SEED_BLOCKS_MAX_DIM = 1024
"""Past this many coordinates the identity is not built to find its blocks."""


def _row_group(seeds: _Seeds, arg: _Argument) -> evaluate.RowGroup:
    """The seeds as the core's row group: flat jacobians, a chunk of rows at a time."""

    def chunk(start: Any, size: int) -> list[Any]:
        rows = _seed_chunk(seeds, start, size, arg.dim, arg.dtype)
        return _split_rows_flat(rows, arg)

    return evaluate.RowGroup(seeds.num, seeds.sign, chunk)


def _aux(result: tuple[Any, ...], index: int) -> Any:
    """The auxiliary data at `result[index]`, or None where `has_aux` was off."""
    return result[index] if len(result) > index else None


def _is_float0(x: Any) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


# --- public transforms ---------------------------------------------------------------


def laplacian(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    weights: Any = None,
    chunk_size: ChunkSizeArg = "auto",
    probes: SupportsIndex | None = None,
    key: Any = None,
    probe_distribution: Literal["rademacher", "gaussian"] = "rademacher",
    sparsity: Sparsity | int | bool | None = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""The Laplacian of `fun` with respect to one or more arguments, as a function.

    `laplacian(fun)` is a function with `fun`'s signature. It returns, for every leaf
    of `fun`'s output (any pytree of arrays), the Laplacian of that leaf with respect to
    the argument(s) picked by `argnums`:

    $$\nabla^2 f = \sum_{i=1}^{d} \frac{\partial^2 f}{\partial x_i^2},$$

    summed over every coordinate $x_i$ of every leaf of those arguments (pytrees are
    fine; with a tuple `argnums` the sum runs over all of them). It is computed by one
    forward-Laplacian pass (`fwdlap.lap`) with the $d$ unit vectors as tangent
    directions, without forming the Hessian.

    **Arguments:**

    - `fun`: the function to differentiate. Its output is any pytree of arrays.
    - `argnums`: which positional argument(s) to differentiate with respect to: an int
        or a tuple of ints. The arguments must hold real floating-point arrays.
    - `weights`: `None` (the plain Laplacian), a vector $w$ of length $d$ for
        $\sum_i w_i \, \partial^2 f / \partial x_i^2$ (per-coordinate weights, such as
        inverse particle masses), or a $d \times d$ matrix $A$ for
        $\operatorname{tr}(A \nabla^2 f)$ (anisotropic diffusion). $A$ may be
        indefinite; only its symmetric part matters, as the Hessian is symmetric.
        Coordinates are ordered as `jax.flatten_util.ravel_pytree` orders them: the
        chosen arguments' leaves in `jax.tree_util` order, each leaf row-major.
    - `chunk_size`: an int evaluates the tangent directions in chunks of this many
        inside a `jax.lax.scan` (through `fwdlap.lap_partial`, so the primal is
        computed once). The number of directions need not be a multiple of it (the
        last chunk is padded with zero directions). XLA's temporary memory then scales
        with `chunk_size` instead of with $d$, at the price of a sequential loop.
        `None` is one pass with all directions. `"auto"` (the default) uses chunks
        of 8 to 32 on the CPU backend when the jacobians of one pass would be large
        (at least 32 directions and about 6 MiB; see [`fwdlap.lap`][]), where the
        chunks run faster because they stay in cache, and one pass otherwise. In the
        sparse mode it bounds only the dense jacobians, to windows of whole
        particles (see `sparsity`); `"auto"` traces the single sparse pass once to a
        jaxpr and, where its dense jacobians take more than about 6 MiB (9 MiB if
        loops carry them), makes windows of about 8 particles.
    - `probes`: if given, the number $k$ of random probe vectors of a stochastic
        (Hutchinson) estimate; `key` is then required.
    - `sparsity`: `None` (the default) for the dense pass, `False` for the dense pass
        without its first-layer shortcut, or the block-sparse mode: `True`, an int
        threshold or a [`fwdlap.Sparsity`][]. By default (`None`, without `weights`
        or `probes`, and with `chunk_size` `None` or `"auto"`; an int asks for dense
        chunks of directions) the unit directions keep their particle blocks (of 3
        coordinates when their number is a multiple of 3, else 1) until a value
        depends on more than one particle (more than two, pair features, from four
        particles up), and the pass is dense from there: the first layers of a
        many-particle function skip their zero rows. Nothing is
        reported and the results are the dense pass's up to floating-point
        reordering; `False` turns this off. The block-sparse mode pays off when the
        function's early layers act on one particle (block of coordinates) at a time,
        as in FermiNet- or Psiformer-shaped wavefunctions. It cannot be combined with
        `weights` or `probes`. With `chunk_size` as well, there is still one sparse
        pass, but the jacobians that became dense (of values depending on most
        particles) hold the directions of a window of whole particles at a time
        (`chunk_size` rounded down to a multiple of the particle block size), in a
        `jax.lax.scan` over the windows; the primal and the block-sparse jacobians
        are computed once, before it.
    - `key`: a `jax.random` key for the probes.
    - `probe_distribution`: `"rademacher"` (entries $\pm 1$, the default) or
        `"gaussian"` (standard normal entries).
    - `has_aux`: as in `jax.grad`: `fun` returns a pair `(output, aux)`, only `output`
        is differentiated, and `aux` (any pytree of arrays) is returned as computed.

    **Returns:**

    A function taking the same arguments as `fun` and returning a pytree shaped like
    `fun`'s output: the Laplacian of every output leaf. An integer or boolean output
    leaf gets a float0 zero, as its tangent from `jax.jvp` would be. An argument
    without coordinates (a leaf of shape `(0,)`) gives zeros. With `has_aux=True` it
    returns the pair `(laplacian, aux)`.

    **Weights and their cost.** Let $d$ be the number of coordinates. Without weights
    the pass uses the $d$ unit vectors as directions. A weight vector scales them:
    direction $\sqrt{|w_i|}\, e_i$. A matrix is eigendecomposed,
    $A = \sum_k \lambda_k u_k u_k^\top$ (`eigh`, $O(d^3)$ once per call), and the
    directions are $\sqrt{|\lambda_k|}\, u_k$, so that
    $\operatorname{tr}(A \nabla^2 f) = \sum_k \lambda_k u_k^\top \nabla^2 f\, u_k$.
    A forward-Laplacian pass can only add up its second-order terms, so positive and
    negative weights are two passes (sharing the primal computation) whose results are
    subtracted. When `weights` is a concrete array (not traced by `jax.jit`), zero
    weights are dropped and a sign that does not occur costs nothing: a non-negative
    weight vector with $m$ non-zero entries costs one pass with $m$ directions. When it
    is traced, its signs are unknown at trace time and the cost is two passes of $d$
    directions each.

    **NaN and infinite weights** propagate as they do through
    $\operatorname{tr}(A \nabla^2 f) = \sum_{ij} A_{ij} \partial_i \partial_j f$: a NaN
    weight makes the result NaN, and an infinite weight $A_{ij}$ contributes
    $A_{ij} \cdot \partial_i \partial_j f$ in IEEE arithmetic ($\pm\infty$ with the
    sign of the product, NaN where that second derivative is 0), the same eagerly
    and under `jax.jit`, for concrete and traced weights alike. The finite weights
    make the pass described above; each non-finite entry adds the Hessian entry it
    multiplies, from two passes with one direction each. Concrete weights without
    such entries cost nothing more; for traced weights those passes sit in a
    `jax.lax.cond` that runs them only when some weight is not finite (both branches
    run if the weights themselves are batched by `jax.vmap`).

    **Stochastic estimate and its variance.** With `probes=k` the Laplacian is
    estimated from $k$ random vectors $z_j$ with $\mathbb{E}[z z^\top] = I$:

    $$\widehat{\nabla^2 f} = \frac{1}{k} \sum_{j=1}^{k} z_j^\top M z_j,
    \qquad \mathbb{E}\,\widehat{\nabla^2 f} = \operatorname{tr} M,$$

    which is unbiased. Here $M = \nabla^2 f$ without weights; with weights
    $A = S_+ S_+^\top - S_- S_-^\top$ (the positive and negative parts, which share the
    probes), $M = S_+^\top \nabla^2 f\, S_+ - S_-^\top \nabla^2 f\, S_-$ and
    $\operatorname{tr} M = \operatorname{tr}(A \nabla^2 f)$. The variance is

    $$\operatorname{Var} = \frac{2}{k}\Big(\|M\|_F^2 - \sum_i M_{ii}^2\Big)
    \ \text{(Rademacher)}, \qquad
    \operatorname{Var} = \frac{2}{k}\,\|M\|_F^2 \ \text{(Gaussian)},$$

    so Rademacher probes are never worse, and exact for a diagonal $M$. The cost is one
    pass with $k$ directions (two with indefinite weights), independent of $d$. Each
    output leaf gets its own estimate, all from the same probes.

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    f = lambda x: jnp.sum(x**3)
    x = jnp.arange(3.0)
    fwdlap.laplacian(f)(x)  # 6 * sum(x) = 18
    fwdlap.laplacian(f, weights=jnp.array([1.0, 0.0, 2.0]))(x)  # 6 * (0 + 2*2) = 24
    fwdlap.laplacian(f, chunk_size=2)(x)  # 18, two directions at a time
    ```
    """
    _check_fun(_LAPLACIAN, fun)
    nums, is_tuple = _normalize_argnums(_LAPLACIAN, argnums)
    chunk = check_chunk_size(_LAPLACIAN, chunk_size)
    if weights is not None:
        _check_weights_dtype(_LAPLACIAN, weights)
    has_aux = check_has_aux(_LAPLACIAN, has_aux)
    num_probes = _check_probes(_LAPLACIAN, probes, key)
    sparse = _check_sparsity(
        _LAPLACIAN,
        sparsity,
        weights=weights is not None,
        probes=num_probes is not None,
    )
    if probe_distribution not in ("rademacher", "gaussian"):
        raise ValueError(
            f"{_LAPLACIAN}: `probe_distribution` must be 'rademacher' or 'gaussian', "
            f"got {probe_distribution!r}."
        )

    @functools.wraps(fun)
    def laplacian_fun(*args: Any, **kwargs: Any) -> Any:
        arg, f_x = _bind(_LAPLACIAN, fun, nums, is_tuple, args, kwargs)
        if has_aux:
            f_x = _split_aux(_LAPLACIAN, f_x)
        nonfinite = None
        if weights is None:
            groups = [_Seeds(arg.dim, 1.0)]
        else:
            finite, nonfinite = _split_nonfinite(weights, arg.dtype)
            groups = _weight_seeds(_LAPLACIAN, finite, arg)
        if num_probes is not None:
            groups = _probe_seeds(
                _LAPLACIAN, groups, num_probes, key, probe_distribution, arg
            )
        _, lap_out, _, aux = _evaluate(
            _LAPLACIAN,
            f_x,
            arg,
            groups,
            chunk,
            want_jacobian=False,
            sparsity=sparse,
            has_aux=has_aux,
        )
        if nonfinite is not None and arg.dim:
            lap_out = _add_nonfinite(f_x, arg, nonfinite, lap_out, has_aux)
        return (lap_out, aux) if has_aux else lap_out

    return laplacian_fun


def value_grad_and_laplacian(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    chunk_size: ChunkSizeArg = "auto",
    sparsity: Sparsity | int | bool | None = None,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any, Any]]:
    r"""The value, gradient and Laplacian of a scalar function, in one forward pass.

    This is the building block of the kinetic energy of a wavefunction $\psi$: with
    $f = \log|\psi|$,
    $\frac{\nabla^2 \psi}{\psi} = \nabla^2 f + \|\nabla f\|^2$.

    The gradient is not computed by reverse mode: it is the jacobian that the
    forward-Laplacian pass carries anyway, one entry per unit direction.

    **Arguments:**

    - `fun`: a function returning a real scalar (a shape `()` array).
    - `argnums`: which positional argument(s) to differentiate with respect to: an int
        or a tuple of ints; the arguments may be pytrees of real floating-point arrays.
    - `chunk_size`: as in `fwdlap.laplacian`: an int evaluates the directions in
        chunks of this many inside a loop, so that memory no longer grows with the
        number of coordinates; `None` is one pass; `"auto"` (the default) picks
        chunks of 8 to 32 where one pass's jacobians would be large, on the CPU
        (and, in the sparse mode, windows of about 8 particles for the dense
        jacobians where those are large).
    - `sparsity`: as in `fwdlap.laplacian`: `None` (dense, the unit directions
        kept in particle blocks until values mix more than two particles),
        `False` (dense throughout), or `True`, an int threshold or a
        [`fwdlap.Sparsity`][] for the block-sparse mode; it combines with
        `chunk_size`.
    - `has_aux`: as in `jax.value_and_grad`: `fun` returns a pair `(value, aux)` with
        a real scalar `value`, only `value` is differentiated, and `aux` (any pytree
        of arrays) is returned as computed.

    **Returns:**

    A function with `fun`'s signature returning `(value, grad, laplacian)`: `value` is
    `fun`'s output, `grad` has the structure of the differentiated argument (a tuple of
    them for a tuple `argnums`, as with `jax.grad`) and `laplacian` is
    $\sum_i \partial^2 f / \partial x_i^2$ over all their coordinates. With
    `has_aux=True` it returns `((value, aux), grad, laplacian)`, as
    `jax.value_and_grad` returns `((value, aux), grad)`.

    **Why no `weights` or `probes`.** The gradient is read from the jacobian rows of
    the $d$ unit directions, which are also the directions of the plain Laplacian: the
    gradient comes for free. Probes would replace them by $k < d$ random directions,
    which determine neither the gradient nor anything the unit directions do not
    already give exactly. Weights would replace them by the directions
    $\sqrt{|\lambda_k|}\, u_k$ of $A$, whose rows are $S^\top \nabla f$, from which
    the gradient cannot be recovered where $A$ is singular (a zero weight). For a
    weighted Laplacian together with the gradient, call
    [`fwdlap.laplacian`][] with `weights` and `jax.grad` (under one `jax.jit` the
    primal is shared).

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    log_psi = lambda r: -jnp.sqrt(jnp.sum(r**2))   # hydrogen ground state, log|psi|
    r = jnp.array([0.3, -0.4, 1.2])
    f, g, lap = fwdlap.value_grad_and_laplacian(log_psi)(r)
    kinetic = -0.5 * (lap + jnp.sum(g**2))         # -1/2 (lap psi) / psi
    ```
    """
    _check_fun(_VGL, fun)
    nums, is_tuple = _normalize_argnums(_VGL, argnums)
    chunk = check_chunk_size(_VGL, chunk_size)
    sparse = _check_sparsity(_VGL, sparsity)
    has_aux = check_has_aux(_VGL, has_aux)

    @functools.wraps(fun)
    def vgl_fun(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        arg, f_x = _bind(_VGL, fun, nums, is_tuple, args, kwargs)
        if has_aux:
            f_x = _split_aux(_VGL, f_x)

        def scalar_f(x: Any) -> Any:
            result: Any = f_x(x)
            out, aux = result if has_aux else (result, None)
            if not _is_real_scalar(out):
                what = (
                    "the first element of the function's pair must be"
                    if has_aux
                    else "the function must return"
                )
                raise TypeError(
                    f"{_VGL}: {what} a real floating-point scalar "
                    f"(an array of shape ()), got {_describe(out)}. Reduce the output "
                    "to a scalar first, or use fwdlap.laplacian for array outputs."
                )
            return (out, aux) if has_aux else out

        out, lap_out, rows, aux = _evaluate(
            _VGL,
            scalar_f,
            arg,
            [_Seeds(arg.dim, 1.0)],
            chunk,
            want_jacobian=True,
            sparsity=sparse,
            has_aux=has_aux,
        )
        flat_grad = rows.reshape(arg.dim)
        pieces = _split_vector(flat_grad, arg, ())

        def cast_leaf(g: Any, leaf: Any) -> Any:
            return g.astype(leaf.dtype)

        grad = jax.tree_util.tree_map(cast_leaf, pieces, arg.tree)
        return ((out, aux) if has_aux else out), grad, lap_out

    return vgl_fun


def _check_sparsity(api: str, sparsity: Any, **others: bool) -> Any:
    """`sparsity` if the sparse mode is on (validated), else None or False."""
    if to_spec(api, sparsity) is None:
        return False if sparsity is False else None
    clashes = [name for name, given in others.items() if given]
    if clashes:
        raise ValueError(
            f"{api}: `sparsity` cannot be combined with `{clashes[0]}`: the sparse "
            "mode pushes the unit vectors (the identity) through the function, and "
            "reads their zero pattern while tracing. Drop one of the two."
        )
    return sparsity


def _is_real_scalar(out: Any) -> bool:
    if not isinstance(out, jax.Array | np.ndarray | float | np.floating):
        return False
    value = cast(Any, out)
    return jnp.shape(value) == () and bool(
        jnp.issubdtype(jnp.result_type(out), jnp.floating)
    )


def _describe(out: Any) -> str:
    leaves = jax.tree_util.tree_leaves(out)
    if isinstance(out, jax.Array | np.ndarray):
        arr = cast(Any, out)
        return f"an array of shape {arr.shape} and dtype {arr.dtype}"
    return f"a {type(out).__name__} with {len(leaves)} leaves"


def _map_in_chunks(fn: Callable[[Any], Any], xs: jax.Array, chunk: int) -> Any:
    """`jax.vmap(fn)(xs)`, evaluated `chunk` entries at a time by `jax.lax.map`.

    Float0 leaves (the tangents of integer outputs) stay out of the loop, which
    cannot carry them, and come back as float0 zeros.
    """
    shapes = _eval_shape(fn, xs[0])
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    live = [i for i, leaf in enumerate(leaves) if leaf.dtype != jax.dtypes.float0]

    def live_leaves(x: Any) -> list[Any]:
        flat = jax.tree_util.tree_leaves(fn(x))
        return [flat[i] for i in live]

    mapped = iter(_lax_map(live_leaves, xs, batch_size=chunk))
    out: list[Any] = [
        next(mapped)
        if i in live
        else np.zeros((xs.shape[0], *leaf.shape), jax.dtypes.float0)
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def hessian_diagonal(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    chunk_size: ChunkSizeArg = "auto",
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""The Hessian's diagonal, $\partial^2 f / \partial x_i^2$ for every coordinate.

    Computed in forward mode without forming the Hessian: the primal is computed once
    (`fwdlap.lap_partial`), then the tangent part is `jax.vmap`-ed over the $d$ unit
    directions, each a forward-Laplacian pass with one direction, whose second-order
    term is $e_i^\top \nabla^2 f\, e_i$. The cost is about that of `fwdlap.laplacian`
    ($d$ directions), with memory for $d$ separate second-order terms instead of their
    sum; the Hessian's $d^2$ entries are never formed.

    **Arguments:**

    - `fun`: the function. Its output is any pytree of arrays.
    - `argnums`: which positional argument(s) to differentiate with respect to: an int
        or a tuple of ints; the arguments may be pytrees of real floating-point arrays.
    - `chunk_size`: as in `fwdlap.laplacian`: an int evaluates the directions in
        chunks of this many (`jax.lax.map` with `batch_size`, the chunks one after
        the other), so that memory grows with the chunk instead of with $d$; `None`
        is one `jax.vmap` over all $d$ directions; `"auto"` (the default) uses chunks
        of 8 to 32 on the CPU where the $d$ directions' jacobians would take more
        than about 6 MiB, and one `vmap` otherwise.
    - `has_aux`: as in `jax.hessian`: `fun` returns a pair `(output, aux)`, only
        `output` is differentiated, and `aux` (any pytree of arrays) is returned as
        computed.

    **Returns:**

    A function with `fun`'s signature. For a scalar-valued `fun` it returns an array
    (pytree) shaped like the differentiated argument (a tuple of them for a tuple
    `argnums`). For array outputs it follows `jax.hessian`'s layout: each output leaf
    of shape `s` is replaced by the argument's structure with leaves of shape
    `(*s, *leaf.shape)`, holding the diagonal of `jax.hessian`'s result. With
    `has_aux=True` it returns the pair `(diagonal, aux)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    f = lambda x: jnp.sum(jnp.sin(x)) + x[0] * x[1]
    fwdlap.hessian_diagonal(f)(jnp.array([0.5, 1.0]))   # -sin(x)
    ```
    """
    _check_fun(_HESS_DIAG, fun)
    nums, is_tuple = _normalize_argnums(_HESS_DIAG, argnums)
    chunk = check_chunk_size(_HESS_DIAG, chunk_size)
    has_aux = check_has_aux(_HESS_DIAG, has_aux)

    @functools.wraps(fun)
    def hessian_diagonal_fun(*args: Any, **kwargs: Any) -> Any:
        arg, f_x = _bind(_HESS_DIAG, fun, nums, is_tuple, args, kwargs)
        if has_aux:
            f_x = _split_aux(_HESS_DIAG, f_x)
        zero_laps = _zero_laplacians(arg)
        example = _split_rows(jnp.zeros((1, arg.dim), arg.dtype), arg)
        partial_out = _lap_partial_fn(
            f_x, (arg.tree,), (example,), (zero_laps,), has_aux=has_aux
        )
        pe = partial_out[1]

        def one_direction(i: Any) -> Any:
            seed = jax.nn.one_hot(i[None], arg.dim, dtype=arg.dtype)
            _, lap_out = pe((_split_rows(seed, arg),), (zero_laps,))
            return lap_out

        directions = jnp.arange(arg.dim)
        per_chunk = evaluate.chunk_size_for(chunk, f_x, (arg.tree,), arg.dim)
        if per_chunk is None:
            per_direction = jax.vmap(one_direction)(directions)
        else:
            per_direction = _map_in_chunks(one_direction, directions, per_chunk)

        def arrange(d: Any) -> Any:
            out_shape = tuple(d.shape[1:])
            if _is_float0(d):
                pieces = [
                    np.zeros((*out_shape, *leaf.shape), jax.dtypes.float0)
                    for leaf in arg.leaves
                ]
                return jax.tree_util.tree_unflatten(arg.treedef, pieces)
            return _split_vector(jnp.moveaxis(d, 0, -1), arg, out_shape)

        diagonal = jax.tree_util.tree_map(arrange, per_direction)
        return (diagonal, _aux(partial_out, 2)) if has_aux else diagonal

    return hessian_diagonal_fun
