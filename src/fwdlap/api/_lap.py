"""`lap` and `lap_partial`: the forward Laplacian of functions of pytrees."""

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from .._core import evaluate
from .._core.zeros import Zero
from . import _checks, _sparsity
from ._checks import Jacobians, Laplacians, OutTree, Primals

_LAP = "fwdlap.lap"
_LAP_PARTIAL = "fwdlap.lap_partial"


def dense_zero(aval: Any, lead: tuple[int, ...] = ()) -> Any:
    """Dense zeros for the tangent of a value with abstract value `aval`.

    Integer and boolean values get float0 zeros, the tangent dtype JAX uses for them.
    """
    tangent_dtype = aval.to_tangent_aval().dtype
    shape = (*lead, *aval.shape)
    if tangent_dtype == jax.dtypes.float0:
        return np.zeros(shape, jax.dtypes.float0)
    return jnp.zeros(shape, tangent_dtype)


def _densify(aval: Any, tangent: Any, lead: tuple[int, ...]) -> Any:
    return dense_zero(aval, lead) if isinstance(tangent, Zero) else tangent


class _OutTree:
    """Holds the output structure of `fun`, which is known only once it has run.

    With `has_aux`, the flat outputs are the output's leaves followed by the leaves of
    the auxiliary data (`aux_treedef`); `num_out` says where the first part ends.
    """

    def __init__(self) -> None:
        self.treedef: Any = None
        self.aux_treedef: Any = None
        self.num_out: int = 0

    def split(self, leaves: Sequence[Any]) -> tuple[list[Any], Any]:
        """The output leaves, and the auxiliary data as a pytree (None without)."""
        outs = list(leaves[: self.num_out])
        if self.aux_treedef is None:
            return outs, None
        aux_leaves = list(leaves[self.num_out :])
        return outs, jax.tree_util.tree_unflatten(self.aux_treedef, aux_leaves)


def _flat_fun(
    api: str,
    fun: Callable[..., Any],
    treedef: Any,
    store: _OutTree,
    has_aux: bool = False,
) -> Callable[..., list[Any]]:
    def flat_fun(*leaves: Any) -> list[Any]:
        out = fun(*jax.tree_util.tree_unflatten(treedef, leaves))
        aux_leaves: list[Any] = []
        if has_aux:
            out, aux = _checks.split_aux(api, out)
            aux_leaves, store.aux_treedef = _checks.check_aux(api, aux)
        out_leaves, store.treedef = _checks.check_outputs(api, out)
        store.num_out = len(out_leaves)
        return out_leaves + aux_leaves

    return flat_fun


@overload
def lap(
    fun: Callable[..., Any],
    primals: Primals,
    jacobians: Jacobians,
    laplacians: Laplacians,
    *,
    sparsity: "_sparsity.Sparsity | int | bool | None" = None,
    chunk_size: _checks.ChunkSizeArg = "auto",
    has_aux: Literal[False] = False,
) -> tuple[OutTree, OutTree, OutTree]: ...


@overload
def lap(
    fun: Callable[..., Any],
    primals: Primals,
    jacobians: Jacobians,
    laplacians: Laplacians,
    *,
    sparsity: "_sparsity.Sparsity | int | bool | None" = None,
    chunk_size: _checks.ChunkSizeArg = "auto",
    has_aux: Literal[True],
) -> tuple[OutTree, OutTree, OutTree, Any]: ...


@overload
def lap(
    fun: Callable[..., Any],
    primals: Primals,
    jacobians: Jacobians,
    laplacians: Laplacians,
    *,
    sparsity: "_sparsity.Sparsity | int | bool | None" = None,
    chunk_size: _checks.ChunkSizeArg = "auto",
    has_aux: bool,
) -> tuple[Any, ...]: ...


@_checks.validates_own_inputs
def lap(
    fun: Callable[..., Any],
    primals: Primals,
    jacobians: Jacobians,
    laplacians: Laplacians,
    *,
    sparsity: "_sparsity.Sparsity | int | bool | None" = None,
    chunk_size: _checks.ChunkSizeArg = "auto",
    has_aux: bool = False,
) -> tuple[Any, ...]:
    r"""Evaluate a function with its jacobian and Laplacian in one forward pass.

    It is to the Laplacian what `jax.jvp` is to the derivative. Where `jax.jvp` pushes
    one tangent through `fun` and returns $J v$, `lap` pushes a batch of $n$ tangent
    directions $v_1, \dots, v_n$ *and* a laplacian through `fun`, and returns, for
    every output,

    $$
    \text{jacobians\_out}_k = J\,v_k, \qquad
    \text{laplacians\_out} = \sum_{k=1}^{n} v_k^\top \big(\nabla^2 f\big)\, v_k
        + J \,\text{laplacians},
    $$

    where $J$ and $\nabla^2 f$ are the jacobian and Hessian of `fun` at `primals`. With
    the $n$ unit vectors as directions and a zero input laplacian, `laplacians_out` is
    the Laplacian $\Delta f = \operatorname{tr} \nabla^2 f$ and `jacobians_out` is the
    full jacobian (directions first), at the cost of one forward pass rather than $n$
    Hessian-vector products.
    The laplacian input lets a Laplacian flow through a composition: feed in the
    outputs of an inner `lap` call and get the Laplacian of the composite function.

    `primals` is a tuple or list holding one pytree per positional argument of `fun`
    (dicts, tuples, NamedTuples, dataclasses registered as pytrees, Equinox modules,
    ...), and every leaf is differentiated, so every leaf must be an array or a Python
    scalar; use [`fwdlap.lap_filter`][] when some are not. `jacobians` and `laplacians`
    have the structure of `primals`. A tangent leaf may be `None` or a symbolic zero
    ([`fwdlap.zero_tangent_from_primal`][]), both meaning zero, and `None` may stand
    for a whole subtree. Integer and boolean leaves are not differentiated: their
    tangents must be `None`, symbolic zeros or float0 arrays.

    All inputs are checked while `fun` is traced, so under `jax.jit` the checks cost
    nothing at run time. A mistake raises a `TypeError` (calling convention, leaf
    types, dtypes) or a `ValueError` (structures and shapes) naming the leaf.

    **Arguments:**

    - `fun`: the function to differentiate. It takes `len(primals)` positional
        arguments and returns a pytree of arrays.
    - `primals`: a tuple or list of pytrees, the point at which to evaluate `fun`.
    - `jacobians`: the tangent directions, with the structure of `primals`. Each leaf
        has shape `(n, *primal_leaf.shape)`, with one `n` shared by every leaf of every
        argument: direction `k` is the `k`-th slice of every leaf.
    - `laplacians`: the input laplacian, with the structure of `primals`; each leaf
        has its primal leaf's shape. Usually all zero: pass `None` for each argument.
    - `sparsity`: `None` (the default) for dense jacobians, `False` for dense
        jacobians without the shortcut below, or the block-sparse mode: `True`, an
        int threshold or a [`fwdlap.Sparsity`][]. With `None` (and `chunk_size`
        `None` or `"auto"`; an int asks for dense chunks), jacobians known while
        tracing whose every element depends on one particle block (unit vectors:
        `np.eye(n)`, or `jnp.eye(n)` even inside `jax.jit`) are kept in those blocks
        until a value depends on more than one particle (more than two, pair
        features, from four particles up), so that the first layers of a
        many-particle function skip their zero rows; from there the pass is dense,
        nothing is reported, and results are the dense pass's up to floating-point
        reordering. The sparse mode reads
        the zero pattern of each jacobian leaf from its values, so they must be known
        while tracing: NumPy arrays, JAX arrays created outside `jax.jit`, or (with
        JAX >= 0.10) arrays computed inside `jax.jit` from constants only, such as
        `jnp.eye(n)`. A jacobian that is only known at run time (an argument of a
        jitted function, or batched by `jax.vmap`) is carried dense, and that is
        reported as a [`fwdlap.Densification`][]. [`fwdlap.laplacian`][] builds its
        identity itself and has no such caveat.
        The outputs are dense either way.
    - `chunk_size`: how many directions to push through at a time. `None` is one
        pass with all $n$. An int evaluates `fun` once and the directions in chunks of
        that many, in a `jax.lax.scan` over its linearisation (as
        [`fwdlap.lap_partial`][] does), so memory scales with the chunk instead of
        with $n$. `"auto"` (the default) uses chunks on the CPU backend when that
        pays: at least 32 directions whose jacobians would exceed about 6 MiB,
        estimated by tracing `fun` to a jaxpr once more. Each chunk then carries
        about 9 MiB of jacobians (8 to 32 directions). Elsewhere it is one pass.
        Results agree up to floating-point reordering. In the sparse mode it bounds
        the dense jacobians only (the block-sparse ones are computed once): an int
        is rounded down to whole particle blocks, and they are evaluated a window of
        that many directions at a time; `"auto"` makes windows of about 8 particle
        blocks where
        the dense jacobians of one pass would exceed about 6 MiB (9 MiB if loops
        carry them), on the CPU. A
        pass whose input jacobian is known only at run time cannot be windowed and
        is made whole.
    - `has_aux`: as in `jax.jvp`: `fun` returns a pair `(output, aux)`, and only
        `output` is differentiated. `aux` is any pytree of arrays (losses, intermediate
        values, ...); it is returned as computed, without tangents, and costs
        nothing in the forward-Laplacian pass.

    **Returns:**

    A 3-tuple `(out, jacobians_out, laplacians_out)`, each with the pytree structure of
    `fun`'s output: `out = fun(*primals)`; each leaf of `jacobians_out` has shape
    `(n, *out_leaf.shape)`; each leaf of `laplacians_out` has its output leaf's shape.
    Tangents of outputs that do not depend on the inputs come back as dense zeros.
    Integer and boolean outputs are not differentiable: as `jax.jvp` does, their
    jacobian and laplacian come back as zeros of dtype `jax.dtypes.float0` (shapes
    `(n, *out_leaf.shape)` and `out_leaf.shape`), which hold no data.
    With `has_aux=True`, a 4-tuple `(out, jacobians_out, laplacians_out, aux)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    def f(params, x):
        return jnp.tanh(params["w"] @ x + params["b"]).sum()

    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
    x = jnp.array([0.1, 0.2, 0.3])
    out, jac, lap = fwdlap.lap(
        f,
        (params, x),
        (None, jnp.eye(3)),  # differentiate with respect to x only
        (None, None),
    )
    # jac has shape (3,): the gradient of f in x; lap is the Laplacian of f in x.
    ```
    """
    spec = _sparsity.to_spec(_LAP, sparsity)
    chunk_size = _checks.check_chunk_size(_LAP, chunk_size)
    has_aux = _checks.check_has_aux(_LAP, has_aux)
    checked = _checks.check_inputs(
        _LAP, fun, primals, jacobians, laplacians, filtered=False
    )
    store = _OutTree()
    flat_fun = _flat_fun(_LAP, fun, checked.treedef, store, has_aux)
    args = (list(checked.primals), list(checked.jacobians), list(checked.laplacians))
    outs, jacs, laps = evaluate.lap_evaluate(
        flat_fun, *args, checked.n, chunk_size, spec, blocks=sparsity is not False
    )
    outs, aux = store.split(outs)
    jacs, laps = jacs[: store.num_out], laps[: store.num_out]
    avals = [jax.typeof(o) for o in outs]
    jacs = [_densify(a, j, (checked.n,)) for a, j in zip(avals, jacs, strict=True)]
    laps = [_densify(a, lp, ()) for a, lp in zip(avals, laps, strict=True)]
    unflatten = functools.partial(jax.tree_util.tree_unflatten, store.treedef)
    result = unflatten(outs), unflatten(jacs), unflatten(laps)
    return (*result, aux) if has_aux else result


@overload
def lap_partial(
    fun: Callable[..., Any],
    primals: Primals,
    example_jacobians: Jacobians,
    example_laplacians: Laplacians,
    *,
    has_aux: Literal[False] = False,
) -> tuple[OutTree, Partial]: ...


@overload
def lap_partial(
    fun: Callable[..., Any],
    primals: Primals,
    example_jacobians: Jacobians,
    example_laplacians: Laplacians,
    *,
    has_aux: Literal[True],
) -> tuple[OutTree, Partial, Any]: ...


@overload
def lap_partial(
    fun: Callable[..., Any],
    primals: Primals,
    example_jacobians: Jacobians,
    example_laplacians: Laplacians,
    *,
    has_aux: bool,
) -> tuple[Any, ...]: ...


@_checks.validates_own_inputs
def lap_partial(
    fun: Callable[..., Any],
    primals: Primals,
    example_jacobians: Jacobians,
    example_laplacians: Laplacians,
    *,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    r"""Evaluate a function now and its forward Laplacian later, for many tangents.

    It is to [`fwdlap.lap`][] what `jax.linearize` is to `jax.jvp`: it evaluates `fun`
    at `primals` once and returns the output together with `lap_pe`, a function that
    maps tangents `(jacobians, laplacians)` to `(jacobians_out, laplacians_out)`
    without evaluating `fun` again. Use it to push many chunks of directions through
    one network evaluation, for example in a `jax.lax.fori_loop` over chunks of the
    identity when the whole $n \times n$ jacobian does not fit in memory; the Laplacian
    is then the sum of the chunks' laplacians (with the input laplacian in one chunk
    only).

    The examples fix what `lap_pe` accepts: the structure of `primals`, the number of
    directions `n`, and the zero pattern. A leaf whose example jacobian (or laplacian)
    is `None` or a symbolic zero is traced as zero, and `lap_pe` raises a `ValueError`
    if it is later given an array there; the example values themselves are not used.
    `lap_pe` is a `jax.tree_util.Partial`, so it can be passed into and returned from
    `jax.jit` and used inside `jax.lax` loops.

    **Arguments:**

    - `fun`: the function to differentiate, as for [`fwdlap.lap`][].
    - `primals`: a tuple or list of pytrees of arrays at which to evaluate `fun`.
    - `example_jacobians`: tangents with the structure of `primals` and leaves shaped
        `(n, *primal_leaf.shape)`; only their shapes and zero pattern are used.
    - `example_laplacians`: the same for the laplacians (leaves shaped like the primal
        leaves).
    - `has_aux`: as in `jax.linearize`: `fun` returns a pair `(output, aux)`, only
        `output` is differentiated, and `aux` is returned as computed.

    **Returns:**

    A 2-tuple `(out, lap_pe)`: `out = fun(*primals)`, and `lap_pe(jacobians,
    laplacians) -> (jacobians_out, laplacians_out)`, which takes tangents shaped like
    the examples and returns what [`fwdlap.lap`][] would. With `has_aux=True`, a
    3-tuple `(out, lap_pe, aux)`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import fwdlap

    f = lambda x: jnp.sin(x).sum()
    x = jnp.arange(4.0)
    eye = jnp.eye(4).reshape(2, 2, 4)  # 2 chunks of 2 directions
    out, lap_pe = fwdlap.lap_partial(f, (x,), (eye[0],), (None,))

    def add_chunk(i, total):
        _, lap_chunk = lap_pe((eye[i],), (None,))
        return total + lap_chunk

    laplacian = jax.lax.fori_loop(0, 2, add_chunk, 0.0)  # == -jnp.sin(x).sum()
    ```
    """
    has_aux = _checks.check_has_aux(_LAP_PARTIAL, has_aux)
    checked = _checks.check_inputs(
        _LAP_PARTIAL,
        fun,
        primals,
        example_jacobians,
        example_laplacians,
        filtered=False,
    )
    store = _OutTree()
    flat_fun = _flat_fun(_LAP_PARTIAL, fun, checked.treedef, store, has_aux)
    outs, pe_fn = evaluate.linearize(
        flat_fun,
        list(checked.primals),
        list(checked.jacobians),
        list(checked.laplacians),
        checked.n,
    )
    outs, aux = store.split(outs)
    out_avals = tuple(jax.typeof(o) for o in outs)
    apply = functools.partial(
        _apply_lap_pe, _checks.partial_spec(checked), store.treedef, out_avals
    )
    out = jax.tree_util.tree_unflatten(store.treedef, outs)
    lap_pe = Partial(apply, pe_fn)
    return (out, lap_pe, aux) if has_aux else (out, lap_pe)


def _apply_lap_pe(
    spec: _checks.PartialSpec,
    out_tree: Any,
    out_avals: Sequence[Any],
    pe_fn: Callable[..., tuple[list[Any], list[Any]]],
    jacobians: Any,
    laplacians: Any,
) -> tuple[Any, Any]:
    flat_j, flat_l = _checks.check_partial_tangents(spec, jacobians, laplacians)
    jacs, laps = pe_fn(flat_j, flat_l)
    # Outputs come first; the auxiliary leaves after them have no tangents to return.
    jacs, laps = jacs[: len(out_avals)], laps[: len(out_avals)]
    jacs = [_densify(a, j, (spec.n,)) for a, j in zip(out_avals, jacs, strict=True)]
    laps = [_densify(a, lp, ()) for a, lp in zip(out_avals, laps, strict=True)]
    unflatten = functools.partial(jax.tree_util.tree_unflatten, out_tree)
    return unflatten(jacs), unflatten(laps)
