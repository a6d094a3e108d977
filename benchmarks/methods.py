"""Laplacian methods: ``make_laplacian(f) -> lap_fn(x) -> scalar``.

Each factory takes a scalar function ``f`` of one flat configuration ``x`` and
returns a function computing ``sum_i d^2 f / dx_i^2`` at ``x``. The runner
batches it with ``jax.vmap`` and compiles it with ``jax.jit``. A factory whose
backend is missing or lacks a feature raises :class:`Unavailable`; the runner
records that method as ``n/a`` and carries on.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

ScalarFn = Callable[[jax.Array], jax.Array]

FOLX_SPARSITY = 6
"""``sparsity_threshold`` of the sparse folx method."""


class Unavailable(Exception):
    """A method cannot run here (optional dependency missing, feature absent)."""


def hessian(f: ScalarFn) -> ScalarFn:
    """Trace of the dense Hessian from ``jax.hessian`` (forward over reverse)."""
    return lambda x: jnp.trace(jax.hessian(f)(x))


def ferminet_loop(f: ScalarFn) -> ScalarFn:
    """FermiNet's default: linearize the gradient, sum its diagonal in a loop.

    ``jax.linearize`` of ``grad f`` is evaluated once; a ``lax.fori_loop`` then
    pushes each unit vector ``e_i`` through the linear map and keeps entry ``i``.
    """
    grad_f = jax.grad(f)

    def lap_fn(x: jax.Array) -> jax.Array:
        _, dgrad_f = jax.linearize(grad_f, x)
        eye = jnp.eye(x.size, dtype=x.dtype)

        def body(i, acc):
            return acc + dgrad_f(eye[i])[i]

        return lax.fori_loop(0, x.size, body, jnp.zeros((), x.dtype))

    return lap_fn


def jvp_of_grad(f: ScalarFn) -> ScalarFn:
    """``sum_i e_i^T (d grad f) e_i`` with all directions vmapped at once."""
    grad_f = jax.grad(f)

    def lap_fn(x: jax.Array) -> jax.Array:
        def diag_entry(v: jax.Array) -> jax.Array:
            return jax.jvp(grad_f, (x,), (v,))[1] @ v

        return jax.vmap(diag_entry)(jnp.eye(x.size, dtype=x.dtype)).sum()

    return lap_fn


def _folx(sparsity_threshold: int) -> Callable[[ScalarFn], ScalarFn]:
    """Factory for folx's forward Laplacian with the given sparsity threshold."""

    def make(f: ScalarFn) -> ScalarFn:
        try:
            import folx
        except ImportError as err:
            raise Unavailable(f"folx not importable: {err}") from err
        fwd = folx.forward_laplacian(f, sparsity_threshold=sparsity_threshold)
        return lambda x: fwd(x).laplacian

    return make


def _import_fwdlap():
    """Imports ``fwdlap`` or raises :class:`Unavailable` with the reason."""
    try:
        import fwdlap
    except Exception as err:  # a half-written library can fail in many ways
        raise Unavailable(
            f"fwdlap not importable: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(fwdlap, "lap"):
        raise Unavailable("fwdlap has no `lap`")
    return fwdlap


def _fwdlap_call(fwdlap, f: ScalarFn, x: jax.Array, **kwargs) -> jax.Array:
    """Laplacian of ``f`` at ``x`` from ``fwdlap.lap`` with a dense identity."""
    eye = jnp.eye(x.size, dtype=x.dtype)
    zero = fwdlap.zero_tangent_from_primal(x)
    _, _, lap = fwdlap.lap(f, (x,), (eye,), (zero,), **kwargs)
    return lap


def fwdlap_dense(f: ScalarFn) -> ScalarFn:
    """This library's forward Laplacian with a dense identity jacobian, as called.

    ``fwdlap.lap`` with its defaults: ``chunk_size="auto"`` keeps one pass where the
    jacobians are small and evaluates blocks of 8 to 32 directions (one primal pass, a
    loop over the linearisation) where they would outgrow the CPU caches.
    """
    fwdlap = _import_fwdlap()
    return lambda x: _fwdlap_call(fwdlap, f, x)


def fwdlap_single(f: ScalarFn) -> ScalarFn:
    """``fwdlap.lap`` forced to one pass with all directions (``chunk_size=None``)."""
    fwdlap = _import_fwdlap()
    return lambda x: _fwdlap_call(fwdlap, f, x, chunk_size=None)


def fwdlap_plain(f: ScalarFn) -> ScalarFn:
    """``fwdlap.lap`` with ``sparsity=False``: the plain dense pass.

    Without ``sparsity``, ``fwdlap.lap`` keeps the unit-vector seeds' particle
    blocks apart until a value depends on more than two particles (one past three
    particles); ``sparsity=False`` carries every direction from the start, as the
    library did before. Timed beside ``fwdlap`` to show what the blocks are worth.
    """
    fwdlap = _import_fwdlap()
    return lambda x: _fwdlap_call(fwdlap, f, x, sparsity=False)


CHUNK_SIZE = 16
"""Directions per block for ``fwdlap_chunked`` (3 blocks at N = 16, 6 at N = 32)."""


def fwdlap_chunked(f: ScalarFn) -> ScalarFn:
    """This library's ``laplacian`` transform, directions in blocks of ``CHUNK_SIZE``.

    The primal pass runs once (``lap_partial``); a ``lax`` loop then pushes blocks of
    directions through the saved linearisation, so the jacobian intermediates stay
    small enough for the CPU caches. This is the configuration we recommend for
    kinetic energies.
    """
    fwdlap = _import_fwdlap()
    if not hasattr(fwdlap, "laplacian"):
        raise Unavailable("fwdlap has no `laplacian` transform")
    return fwdlap.laplacian(f, chunk_size=CHUNK_SIZE)


def fwdlap_sparse(f: ScalarFn) -> ScalarFn:
    """This library's forward Laplacian with block-sparse jacobians.

    ``fwdlap.laplacian(f, sparsity=True)``: blocks of 3 coordinates (one electron),
    the default threshold (an element stays sparse while it depends on at most half
    of the electrons) and the default ``chunk_size="auto"``, which evaluates the
    dense jacobians (values that depend on most electrons) in windows of 8 electrons
    where they are large, and the block-sparse ones once.
    """
    fwdlap = _import_fwdlap()
    if not hasattr(fwdlap, "Sparsity"):
        raise Unavailable("fwdlap has no sparse mode (fwdlap.Sparsity)")
    return fwdlap.laplacian(f, sparsity=True)


SPARSE_CHUNK_SIZE = 24
"""Directions per window for ``fwdlap_sparse_chunked`` (8 electrons)."""


def fwdlap_sparse_chunked(f: ScalarFn) -> ScalarFn:
    """The block-sparse mode with windows of ``SPARSE_CHUNK_SIZE`` directions.

    ``fwdlap.laplacian(f, sparsity=True, chunk_size=24)``: one sparse pass whose
    dense jacobians (after attention, or FermiNet's means over the two-electron
    stream) carry 24 directions at a time, which the CPU caches hold, whatever their
    size; the block-sparse jacobians are computed once.
    """
    fwdlap = _import_fwdlap()
    if not hasattr(fwdlap, "Sparsity"):
        raise Unavailable("fwdlap has no sparse mode (fwdlap.Sparsity)")
    return fwdlap.laplacian(f, sparsity=True, chunk_size=SPARSE_CHUNK_SIZE)


def forward_floor(f: ScalarFn) -> ScalarFn:
    """Not a Laplacian: ``f`` evaluated at ``n + 2`` configurations at once.

    A forward-Laplacian pass carries, through every layer, the primal, ``n``
    jacobian rows and the Laplacian: ``n + 2`` rows where the network has one. Its
    arithmetic cannot go below the network evaluated on ``n + 2`` inputs (``vmap``
    of ``f`` over ``x`` and ``n + 1`` shifted copies, summed so that nothing is
    dead code), which is what this method times. Its value is meaningless, so the
    runner reports no error for it.
    """

    def lap_fn(x: jax.Array) -> jax.Array:
        n = x.size
        shifts = jnp.concatenate(
            [jnp.eye(n, dtype=x.dtype), jnp.zeros((2, n), x.dtype)]
        )
        shifts = shifts.at[n + 1].set(1.0)
        return jnp.sum(jax.vmap(f)(x[None] + 1e-3 * shifts))

    return lap_fn


NOT_LAPLACIAN = frozenset({"floor"})
"""Methods whose value is not a Laplacian (timed, but no error is reported)."""


METHODS: dict[str, Callable[[ScalarFn], ScalarFn]] = {
    "hessian": hessian,
    "ferminet_loop": ferminet_loop,
    "jvp_of_grad": jvp_of_grad,
    "folx_dense": _folx(0),
    "folx_sparse": _folx(FOLX_SPARSITY),
    "fwdlap": fwdlap_dense,
    "fwdlap_single": fwdlap_single,
    "fwdlap_plain": fwdlap_plain,
    "fwdlap_chunked": fwdlap_chunked,
    "fwdlap_sparse": fwdlap_sparse,
    "fwdlap_sparse_chunked": fwdlap_sparse_chunked,
    "floor": forward_floor,
}
"""Method name -> ``make_laplacian`` factory, in table order."""


def make_laplacian(name: str, f: ScalarFn) -> ScalarFn:
    """Returns method ``name``'s laplacian function of ``f`` (may raise Unavailable)."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {list(METHODS)}")
    return METHODS[name](f)
