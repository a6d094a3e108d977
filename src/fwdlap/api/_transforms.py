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
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._core._jax import Tracer
from .._core.zeros import zero_tangent_from_primal
from . import _chunking
from ._checks import check_aux, check_has_aux, split_aux
from ._lap import lap as _lap_fn
from ._lap import lap_partial as _lap_partial_fn
from ._sparsity import Sparsity, to_spec

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


def _flatten_argument(api: str, argnums: Any, x: Any) -> _Argument:
    flat = cast(
        tuple[list[tuple[Any, Any]], Any],
        jax.tree_util.tree_flatten_with_path(x),  # pyright: ignore[reportUnknownMemberType]
    )
    path_leaves, treedef = flat
    leaves: list[jax.Array] = []
    for path, leaf in path_leaves:
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
    k = rows.shape[0]
    out: list[Any] = []
    offset = 0
    for leaf, size in zip(arg.leaves, arg.sizes, strict=True):
        piece = rows[:, offset : offset + size].reshape(k, *leaf.shape)
        out.append(piece.astype(np.dtype(leaf.dtype)))
        offset += size
    return jax.tree_util.tree_unflatten(arg.treedef, out)


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


def _block(seeds: _Seeds, start: Any, size: int, dim: int, dtype: Any) -> jax.Array:
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
    block = jax.nn.one_hot(coords, dim, dtype=dtype)
    if seeds.scale is not None:
        pad = jnp.zeros((padded - seeds.num,), seeds.scale.dtype)
        scale = jnp.concatenate([seeds.scale, pad])[rows]
        block = block * scale[:, None].astype(dtype)
    return block


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, Tracer)


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
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{api}: `{name}` must be a positive int or None, got {value!r}."
        )
    return value


def _evaluate(
    f_x: Callable[[Any], Any],
    arg: _Argument,
    groups: list[_Seeds],
    chunk_size: "_chunking.ChunkSize",
    want_jacobian: bool,
    sparsity: Any = None,
    has_aux: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """`(out, sum_g sign_g sum_k s_k^T H s_k, jacobian rows or None, aux)`, all seeds.

    With `want_jacobian` (only for a single group) the jacobian rows of the outputs come
    back as one array `(num, *out.shape)` per output leaf, in seed order. With
    `has_aux`, `f_x` returns `(output, aux)` and `aux` comes back as computed (else
    None).
    """
    dim, dtype = arg.dim, arg.dtype
    if sparsity is not None:  # identity seeds only (checked by the callers)
        return _evaluate_sparse(f_x, arg, chunk_size, want_jacobian, sparsity, has_aux)

    most = max(g.num for g in groups)
    block = _chunking.resolve_chunk_size(chunk_size, f_x, (arg.tree,), most)
    size = most if block is None else block
    zero_laps = _zero_laplacians(arg)

    if len(groups) == 1 and groups[0].num == size:
        g = groups[0]
        jac = _split_rows(_block(g, 0, size, dim, dtype), arg)
        result = _lap_fn(
            f_x,
            (arg.tree,),
            (jac,),
            (zero_laps,),
            chunk_size=None,
            has_aux=has_aux,
        )
        out, jac_out, lap_out = result[:3]
        if g.sign < 0:
            lap_out = _negate(lap_out)
        return out, lap_out, jac_out if want_jacobian else None, _aux(result, 3)

    example = _split_rows(jnp.zeros((size, dim), dtype), arg)
    partial_out = _lap_partial_fn(
        f_x, (arg.tree,), (example,), (zero_laps,), has_aux=has_aux
    )
    out, pe = partial_out[:2]
    total: Any = None
    jacobian: Any = None
    for g in groups:

        def tangents(start: Any, g: _Seeds = g) -> tuple[Any, Any]:
            jac = _split_rows(_block(g, start, size, dim, dtype), arg)
            return pe((jac,), (zero_laps,))

        num_blocks = -(-g.num // size)

        def body(carry: None, start: Any, tangents: Any = tangents) -> tuple[None, Any]:
            jac_out, lap_out = tangents(start)
            return carry, (lap_out, jac_out if want_jacobian else None)

        # All blocks in one scan without a carry: the tangent map is compiled once,
        # and stacked outputs need no initial value (whose types would have to match
        # the body's exactly, shardings included, under explicitly sharded meshes).
        starts = jnp.arange(num_blocks) * size
        _, (lap_blocks, row_blocks) = lax.scan(body, None, starts)
        lap_g = jax.tree_util.tree_map(_sum_blocks, lap_blocks)
        rows = None
        if want_jacobian:

            def join(stacked: Any, num: int = g.num) -> Any:
                return stacked.reshape(-1, *stacked.shape[2:])[:num]

            rows = jax.tree_util.tree_map(join, row_blocks)
        if g.sign < 0:
            lap_g = _negate(lap_g)
        total = lap_g if total is None else _add(total, lap_g)
        jacobian = rows
    return out, total, jacobian, _aux(partial_out, 2)


def _aux(result: tuple[Any, ...], index: int) -> Any:
    """The auxiliary data at `result[index]`, or None where `has_aux` was off."""
    return result[index] if len(result) > index else None


def _evaluate_sparse(
    f_x: Callable[[Any], Any],
    arg: _Argument,
    chunk_size: "_chunking.ChunkSize",
    want_jacobian: bool,
    sparsity: Any,
    has_aux: bool,
) -> tuple[Any, Any, Any, Any]:
    """`_evaluate` for the unit vectors in the block-sparse mode.

    One sparse pass, whose dense jacobians `lap` evaluates in windows of whole
    particles as `chunk_size` says (the block-sparse ones once).
    """
    eye = np.eye(arg.dim, dtype=np.dtype(arg.dtype))
    result = _lap_fn(
        f_x,
        (arg.tree,),
        (_split_rows(eye, arg),),
        (_zero_laplacians(arg),),
        sparsity=sparsity,
        chunk_size=chunk_size,
        has_aux=has_aux,
    )
    out, rows, total = result[:3]
    return out, total, rows if want_jacobian else None, _aux(result, 3)


def _sum_blocks(stacked: Any) -> Any:
    return jnp.sum(stacked, axis=0)


def _add(a: Any, b: Any) -> Any:
    """Sum of two laplacian trees (float0 leaves, of integer outputs, stay zero)."""

    def add_leaf(x: Any, y: Any) -> Any:
        return x if _is_float0(x) else x + y

    return jax.tree_util.tree_map(add_leaf, a, b)


def _negate(a: Any) -> Any:
    def negate_leaf(x: Any) -> Any:
        return x if _is_float0(x) else -x

    return jax.tree_util.tree_map(negate_leaf, a)


def _is_float0(x: Any) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


# --- public transforms ---------------------------------------------------------------


def laplacian(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    weights: Any = None,
    chunk_size: _chunking.ChunkSize = "auto",
    probes: int | None = None,
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
    - `chunk_size`: an int evaluates the tangent directions in blocks of this many
        inside a `jax.lax.scan` (through `fwdlap.lap_partial`, so the primal is
        computed once). The number of directions need not be a multiple of it (the
        last block is padded with zero directions). XLA's temporary memory then scales
        with `chunk_size` instead of with $d$, at the price of a sequential loop.
        `None` is one pass with all directions. `"auto"` (the default) uses blocks
        of 8 to 32 on the CPU backend when the jacobians of one pass would be large
        (at least 32 directions and about 6 MiB; see [`fwdlap.lap`][]), where the
        blocks run faster because they stay in cache, and one pass otherwise. In the
        sparse mode it bounds only the dense jacobians, to windows of whole
        particles (see `sparsity`); `"auto"` traces the single sparse pass once to a
        jaxpr and, where its dense jacobians take more than about 6 MiB (9 MiB if
        loops carry them), makes windows of about 8 particles.
    - `probes`: if given, the number $k$ of random probe vectors of a stochastic
        (Hutchinson) estimate; `key` is then required.
    - `sparsity`: `None` (the default) for the dense pass, or the block-sparse mode:
        `True`, an int threshold or a [`fwdlap.Sparsity`][]. It pays off when the
        function's early layers act on one particle (block of coordinates) at a time,
        as in FermiNet- or Psiformer-shaped wavefunctions. It cannot be combined with
        `weights` or `probes`. With `chunk_size` as well, there is still one sparse
        pass, but the jacobians that became dense (of values depending on most
        particles) hold the directions of a window of whole particles at a time
        (`chunk_size` rounded down to a multiple of the block size), in a
        `jax.lax.scan` over the windows; the primal and the block-sparse jacobians
        are computed once, before it.
    - `key`: a `jax.random` key for the probes.
    - `probe_distribution`: `"rademacher"` (entries $\pm 1$, the default) or
        `"gaussian"` (standard normal entries).
    - `has_aux`: as in `jax.grad`: `fun` returns a pair `(output, aux)`, only `output`
        is differentiated, and `aux` (any pytree of arrays) is returned as computed.

    **Returns:**

    A function taking the same arguments as `fun` and returning a pytree shaped like
    `fun`'s output: the Laplacian of every output leaf. With `has_aux=True` it returns
    the pair `(laplacian, aux)`.

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
    nums, is_tuple = _normalize_argnums(_LAPLACIAN, argnums)
    chunk = _chunking.check_chunk_size(_LAPLACIAN, chunk_size)
    has_aux = check_has_aux(_LAPLACIAN, has_aux)
    num_probes = _check_positive_int(_LAPLACIAN, "probes", probes)
    sparse = _check_sparsity(
        _LAPLACIAN,
        sparsity,
        weights=weights is not None,
        probes=num_probes is not None,
    )
    if num_probes is not None and key is None:
        raise TypeError(
            f"{_LAPLACIAN}: `probes={num_probes}` needs a random key: pass "
            "`key=jax.random.key(seed)`."
        )
    if num_probes is None and key is not None:
        raise TypeError(
            f"{_LAPLACIAN}: `key` was given without `probes`; pass `probes=k` for a "
            "stochastic estimate with k probe vectors, or drop `key`."
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
        if weights is None:
            groups = [_Seeds(arg.dim, 1.0)]
        else:
            groups = _weight_seeds(_LAPLACIAN, weights, arg)
        if num_probes is not None:
            groups = _probe_seeds(
                _LAPLACIAN, groups, num_probes, key, probe_distribution, arg
            )
        _, lap_out, _, aux = _evaluate(
            f_x,
            arg,
            groups,
            chunk,
            want_jacobian=False,
            sparsity=sparse,
            has_aux=has_aux,
        )
        return (lap_out, aux) if has_aux else lap_out

    return laplacian_fun


def value_grad_and_laplacian(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    chunk_size: _chunking.ChunkSize = "auto",
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
        blocks of this many inside a loop, so that memory no longer grows with the
        number of coordinates; `None` is one pass; `"auto"` (the default) picks
        blocks of 8 to 32 where one pass's jacobians would be large, on the CPU
        (and, in the sparse mode, windows of about 8 particles for the dense
        jacobians where those are large).
    - `sparsity`: as in `fwdlap.laplacian`: `None`, `True`, an int threshold or a
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
    nums, is_tuple = _normalize_argnums(_VGL, argnums)
    chunk = _chunking.check_chunk_size(_VGL, chunk_size)
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
    """`sparsity` if the sparse mode is on (validated), else None."""
    if to_spec(api, sparsity) is None:
        return None
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


def hessian_diagonal(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
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
    nums, is_tuple = _normalize_argnums(_HESS_DIAG, argnums)
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

        per_direction = jax.vmap(one_direction)(jnp.arange(arg.dim))

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
