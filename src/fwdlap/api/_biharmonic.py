r"""`biharmonic`: $\Delta^2 f$ in one collapsed fourth-order Taylor pass."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core import evaluate
from .._core.taylor4.moments import exact_design
from .._core.taylor4.series import Context
from .._core.taylor4.trace import taylor4_flat
from .._core.zeros import is_zero
from ._checks import check_chunk_size, check_has_aux, check_outputs
from ._lap import dense_zero
from ._transforms import (
    _Argument,  # pyright: ignore[reportPrivateUsage]
    _bind,  # pyright: ignore[reportPrivateUsage]
    _check_probes,  # pyright: ignore[reportPrivateUsage]
    _normalize_argnums,  # pyright: ignore[reportPrivateUsage]
    _split_aux,  # pyright: ignore[reportPrivateUsage]
    _split_rows,  # pyright: ignore[reportPrivateUsage]
)

_BIHARMONIC = "fwdlap.biharmonic"


def exact_directions(dim: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Directions and weights with $\Delta^2 f = \sum_k w_k D^4_{v_k} f$."""
    v, w = exact_design(dim)
    return v.copy(), w.copy()


def _folded(v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(|w|^(1/4) v, sign(w))`: the weights moved into the directions."""
    return v * np.abs(w)[:, None] ** 0.25, np.sign(w)


def _evaluate(
    f_x: Callable[[Any], Any],
    arg: _Argument,
    rows: Any,
    signs: tuple[float, ...] | None,
    has_aux: bool,
    moments: bool = False,
) -> tuple[Any, Any]:
    """One pass with the direction `rows` `(n, d)`: `(24 X4 per output leaf, aux)`.

    With `moments`, `rows` is the identity and the pass runs in the moments layout.
    """
    n = int(rows.shape[0])
    jac_leaves = jax.tree_util.tree_leaves(_split_rows(rows, arg))
    store: dict[str, Any] = {}

    def flat(*leaves: Any) -> list[Any]:
        result = f_x(jax.tree_util.tree_unflatten(arg.treedef, leaves))
        out, aux = result if has_aux else (result, None)
        out_leaves, store["tree"] = check_outputs(_BIHARMONIC, out)
        aux_leaves, store["aux_tree"] = jax.tree_util.tree_flatten(aux)
        store["num"] = len(out_leaves)
        return [*out_leaves, *aux_leaves]

    series = [(j, None, None, None) for j in jac_leaves]
    outs, out_series = taylor4_flat(
        flat, arg.leaves, series, Context(n, signs, moments)
    )
    num = store["num"]
    values: list[Any] = []
    for o, s in zip(outs[:num], out_series[:num], strict=True):
        top = s[3]
        values.append(dense_zero(jax.typeof(o)) if is_zero(top) else 24 * top)
    result = jax.tree_util.tree_unflatten(store["tree"], values)
    aux = jax.tree_util.tree_unflatten(store["aux_tree"], outs[num:])
    return result, aux


def _evaluate_chunks(
    f_x: Callable[[Any], Any],
    arg: _Argument,
    rows: Any,
    signs: np.ndarray,
    size: int,
    has_aux: bool,
) -> tuple[Any, Any]:
    """The pass in chunks of `size` directions, in a `lax.scan` per sign."""
    total: list[Any] | None = None
    for sign in (1.0, -1.0):
        sel = np.flatnonzero(signs == sign)
        if sel.size == 0:
            continue
        group = rows[sel]
        num_chunks = -(-int(sel.size) // size)
        pad = num_chunks * size - int(sel.size)
        if pad:
            group = jnp.concatenate([group, jnp.zeros((pad, arg.dim), group.dtype)])
        chunks = group.reshape(num_chunks, size, arg.dim)

        def one_chunk(chunk_rows: Any) -> Any:
            value, _ = _evaluate(f_x, arg, chunk_rows, None, has_aux)
            return _float_leaves(value)

        stacked = evaluate.stacked_map(one_chunk, chunks)
        part = [_signed_sum(x, sign) for x in stacked]
        total = (
            part if total is None else [a + b for a, b in zip(total, part, strict=True)]
        )
    # The value and aux once, outside the loop (the value only for its structure).
    result = f_x(arg.tree)
    out, aux = result if has_aux else (result, None)
    leaves, treedef = check_outputs(_BIHARMONIC, out)
    it = iter(total or [])
    values = [
        next(it) if _is_float(leaf) else dense_zero(jax.typeof(leaf)) for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, values), aux


def _signed_sum(stacked: Any, sign: float) -> Any:
    total = jnp.sum(stacked, axis=0)
    return total if sign > 0 else -total


def _float_leaves(tree: Any) -> list[Any]:
    return [x for x in jax.tree_util.tree_leaves(tree) if _is_float(x)]


def _is_float(x: Any) -> bool:
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def biharmonic(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    probes: int | None = None,
    key: Any = None,
    chunk_size: evaluate.ChunkSize = "auto",
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""The biharmonic $\Delta^2 f$ of `fun`, in one forward pass, as a function.

    `biharmonic(fun)` is a function with `fun`'s signature. It returns, for every leaf
    of `fun`'s output, the bilaplacian with respect to the argument(s) picked by
    `argnums` (pytrees are flattened into one coordinate vector $x \in \mathbb{R}^d$,
    as in [`fwdlap.laplacian`][]):

    $$\Delta^2 f = \sum_{i=1}^{d} \sum_{j=1}^{d}
    \frac{\partial^4 f}{\partial x_i^2 \, \partial x_j^2}.$$

    It is computed by collapsed fourth-order Taylor mode: every intermediate value
    carries its first three Taylor coefficients along each of $n$ directions $v_k$
    and one fourth coefficient already summed over the directions, which is all the
    identity $\Delta^2 f = \sum_k w_k D^4_{v_k} f$ needs ($D^4_v f$ is the fourth
    derivative along $v$). Nothing of order four is formed per direction, and
    symbolic zeros (arguments outside `argnums`, parameters) cost nothing.

    **Exact mode** (the default) uses a fixed set of directions and weights:

    | $d$ | directions | weights |
    |---|---|---|
    | 1 | $e_1$ | 1 |
    | 2 | 3 lines at $0°, 60°, 120°$ | $8/9$ |
    | 3 | the 6 axes of the icosahedron | $5/6$ |
    | 4 | $e_i \pm e_j$, $i < j$ (12) | $1/6$ |
    | $\ge 5$ | $e_i$ and $e_i \pm e_j$, $i<j$ ($d^2$) | $(4-d)/3$ and $1/6$ |

    The general row follows from
    $D^4_{e_i+e_j} + D^4_{e_i-e_j} = 2\partial_i^4 + 12\,\partial_i^2\partial_j^2
    + 2\partial_j^4$: summing $\tfrac16$ of it over the pairs gives
    $2\sum_{i<j}\partial_i^2\partial_j^2 + \tfrac{d-1}{3}\sum_i \partial_i^4$, and the
    unit vectors add the missing $\tfrac{4-d}{3}\sum_i\partial_i^4$. The small
    dimensions use projective 4-designs, which reach the lower bound of $d(d+1)/2$
    directions that any such identity needs.

    Because every such design has the fourth moments of $|x|^4$, the collapse can go
    further than the fourth coefficient: the third enters the fourth only through its
    contraction $\tfrac16 \nabla \Delta$, and the first two are polynomials in $v$
    shared by all directions. So the exact pass carries, per value, the gradient,
    the $d(d+1)/2$ distinct Hessian entries, $\nabla\Delta$ and the collapsed fourth
    coefficient: $d(d+1)/2 + 2d + 1$ rows (76 at $d = 10$) instead of three per
    direction ($3 d^2$), and fewer than a Laplacian of a Laplacian ($(d+2)^2$).

    **Stochastic mode** (`probes=k` with a `key`): for a standard Gaussian vector $z$,
    $\mathbb{E}[D^4_z f] = 3\,\Delta^2 f$, so
    $\frac{1}{3k}\sum_{j=1}^{k} D^4_{z_j} f$ is an unbiased estimate from $k$ random
    directions, whatever $d$. Its cost is that of $k$ directions ($3k + 1$ rows).

    **Arguments:**

    - `fun`: the function to differentiate. Its output is any pytree of arrays.
    - `argnums`: which positional argument(s) to differentiate with respect to: an int
        or a tuple of ints. The arguments must hold real floating-point arrays.
    - `probes`: `None` for the exact value, or the number $k$ of Gaussian probe
        directions of the stochastic estimate; `key` is then required.
    - `key`: a `jax.random` key for the probes.
    - `chunk_size`: an int below the number of directions evaluates them in chunks
        of this many inside a `jax.lax.scan` (each chunk a full pass in the direction
        layout, one loop per sign of the weights), so that memory scales with the
        chunk instead of with the number of directions; `None` is one pass. `"auto"`
        (the default) uses chunks on the CPU where one pass would carry large
        coefficient arrays, as [`fwdlap.laplacian`][] does, and one pass otherwise.
    - `has_aux`: as in `jax.grad`: `fun` returns a pair `(output, aux)`, only `output`
        is differentiated, and `aux` (any pytree of arrays) is returned as computed.

    **Returns:**

    A function taking the same arguments as `fun` and returning a pytree shaped like
    `fun`'s output: $\Delta^2$ of every output leaf. With `has_aux=True` it returns
    the pair `(biharmonic, aux)`. It composes with `jax.jit`, `jax.vmap` and
    `jax.grad` (with respect to other arguments, such as network parameters).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import fwdlap

    f = lambda x: jnp.sum(x**2) ** 2          # |x|^4, whose bilaplacian is 8 d (d + 2)
    x = jnp.array([0.3, -1.0, 2.0])
    fwdlap.biharmonic(f)(x)                   # 120.0
    fwdlap.biharmonic(f, probes=64, key=jax.random.key(0))(x)  # about 120
    ```
    """
    nums, is_tuple = _normalize_argnums(_BIHARMONIC, argnums)
    chunk = check_chunk_size(_BIHARMONIC, chunk_size)
    has_aux = check_has_aux(_BIHARMONIC, has_aux)
    num_probes = _check_probes(_BIHARMONIC, probes, key)
    probe_key: Any = key

    @functools.wraps(fun)
    def biharmonic_fun(*args: Any, **kwargs: Any) -> Any:
        arg, f_x = _bind(_BIHARMONIC, fun, nums, is_tuple, args, kwargs)
        if has_aux:
            f_x = _split_aux(_BIHARMONIC, f_x)
        if num_probes is None:
            v, w = exact_design(arg.dim)
            v, s = _folded(v, w)
            rows: Any = jnp.asarray(v, arg.dtype)
        else:
            z = jax.random.normal(probe_key, (num_probes, arg.dim), arg.dtype)
            rows = z * (1 / (3 * num_probes)) ** 0.25
            s = np.ones(num_probes)
        n = int(rows.shape[0])
        moment_rows = None if num_probes is not None else _moment_rows(arg.dim)
        per_chunk = _chunk_size(chunk, f_x, arg, n, has_aux, moment_rows)
        if per_chunk is None and moment_rows is not None:
            eye = jnp.eye(arg.dim, dtype=arg.dtype)
            value, aux = _evaluate(f_x, arg, eye, None, has_aux, moments=True)
        elif per_chunk is None:
            value, aux = _evaluate(f_x, arg, rows, None, has_aux)
        else:
            value, aux = _evaluate_chunks(f_x, arg, rows, s, per_chunk, has_aux)
        return (value, aux) if has_aux else value

    return biharmonic_fun


def _moment_rows(dim: int) -> int:
    """Rows the moments layout carries per value: `g`, packed `A`, `c` and `q`."""
    return dim * (dim + 1) // 2 + 2 * dim + 1


def _chunk_size(
    chunk: evaluate.ChunkSize,
    f_x: Callable[[Any], Any],
    arg: _Argument,
    n: int,
    has_aux: bool,
    moment_rows: int | None,
) -> int | None:
    """Directions per chunk, or None for one pass (the core's `"auto"` policy).

    A pass in the direction layout carries 3 rows per direction; the exact mode's
    single pass (the moments layout) carries `moment_rows`.
    """
    if chunk is None:
        return None
    if chunk != evaluate.AUTO:
        return None if chunk >= n else int(chunk)

    def value_only(x: Any) -> Any:
        result = f_x(x)
        return result[0] if has_aux else result

    if moment_rows is not None and (
        evaluate.chunk_size_for(chunk, value_only, (arg.tree,), moment_rows) is None
    ):
        return None
    rows = evaluate.chunk_size_for(chunk, value_only, (arg.tree,), 3 * n)
    if rows is None:
        return None
    per_chunk = max(1, rows // 3)
    return None if per_chunk >= n else per_chunk
