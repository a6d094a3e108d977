"""The public face of the block-sparse mode: `Sparsity` and densification reports."""

import contextlib
import dataclasses
from collections.abc import Generator
from typing import Literal

from .._core import sparse as _sparse
from .._core.sparse import Densification as Densification
from .._core.sparse import DensificationError as DensificationError
from .._core.sparse import DensificationWarning as DensificationWarning

OnDensify = Literal["ignore", "log", "warn", "raise"]


@dataclasses.dataclass(frozen=True)
class Sparsity:
    r"""Settings of the block-sparse mode of [`fwdlap.lap`][] and the transforms.

    In a many-particle function the first layers act on one particle at a time, so an
    intermediate value depends on only a few particles' coordinates. The sparse mode
    groups the $n$ tangent directions into blocks of `block_size` consecutive
    directions (one particle's coordinates) and stores, for each element of each
    intermediate, only the blocks it can depend on. Which blocks these are is worked
    out while tracing, from the function's structure, so it costs nothing at run
    time. Results equal the dense mode's up to floating-point reordering.

    An element whose jacobian needs more than the threshold's blocks (a sum over all
    particles, say) is stored dense from then on. Every such change is a
    [`fwdlap.Densification`][]: it is logged to the `fwdlap.sparse` logger at DEBUG
    level, collected by [`fwdlap.record_densifications`][], and, where it happened
    because fwdlap lacks a sparse rule (rather than because the values really depend
    on many blocks), handled as `on_densify` says: by default a
    [`fwdlap.DensificationWarning`][], once per primitive and line of your code in
    each trace, since such a densification is a gap in fwdlap, not a property of the
    model.

    Pass `sparsity=True` for the defaults, an integer `t` as shorthand for
    `Sparsity(threshold=t)` (the meaning of folx's `sparsity_threshold`), or an
    instance of this class.

    **Arguments:**

    - `block_size`: how many consecutive tangent directions form one block: 3 for
        particles in 3D. `None` picks 3 when the number of directions is a multiple
        of 3, else 1.
    - `threshold`: the largest number of tangent directions (counted in whole blocks)
        that one element's jacobian may depend on and stay sparse. `None` means half
        of all directions, the point past which the sparse layout saves little.
    - `on_densify`: what to do when a jacobian is made dense because no sparse rule
        applies (a primitive without one, indices only known at run time, a
        custom_jvp function whose rule is not elementwise, ...): `"ignore"`,
        `"log"` (DEBUG level only, like the threshold's densifications), `"warn"`
        (the default: a [`fwdlap.DensificationWarning`][] once per primitive and
        source line in each trace) or `"raise"` (a [`fwdlap.DensificationError`][]).

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    def f(x):  # four independent particles: each term sees one particle's 3 coords
        r = x.reshape(4, 3)
        return jnp.sum(jnp.tanh(r @ jnp.ones((3, 8))) ** 2)

    x = jnp.arange(12.0) / 10
    dense = fwdlap.laplacian(f)(x)
    sparse = fwdlap.laplacian(f, sparsity=fwdlap.Sparsity(block_size=3))(x)
    assert jnp.allclose(dense, sparse, rtol=1e-5)
    ```
    """

    block_size: int | None = None
    threshold: int | None = None
    on_densify: OnDensify = "warn"

    def __post_init__(self) -> None:
        for name in ("block_size", "threshold"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"fwdlap.Sparsity: `{name}` must be a positive int or None, got "
                    f"{value!r}."
                )
        if self.on_densify not in _sparse.ON_DENSIFY:
            raise ValueError(
                "fwdlap.Sparsity: `on_densify` must be one of "
                f"{', '.join(repr(m) for m in _sparse.ON_DENSIFY)}, got "
                f"{self.on_densify!r}."
            )


def to_spec(
    api: str, sparsity: "Sparsity | int | bool | None"
) -> _sparse.SparseSpec | None:
    """The core's spec for a user's `sparsity` argument (None for the dense mode)."""
    if sparsity is None or sparsity is False:
        return None
    if sparsity is True:
        sparsity = Sparsity()
    elif isinstance(sparsity, int):
        if sparsity < 1:
            raise ValueError(
                f"{api}: `sparsity={sparsity}` must be a positive threshold (the "
                "number of tangent directions an element may depend on and stay "
                "sparse), True, or a fwdlap.Sparsity."
            )
        sparsity = Sparsity(threshold=sparsity)
    if not isinstance(sparsity, Sparsity):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(
            f"{api}: `sparsity` must be None, True, a positive int threshold or a "
            f"fwdlap.Sparsity, got {type(sparsity).__name__}."
        )
    return _sparse.SparseSpec(
        sparsity.block_size, sparsity.threshold, sparsity.on_densify
    )


@contextlib.contextmanager
def record_densifications() -> Generator[list[Densification]]:
    """Collect the places where the sparse mode made a jacobian dense.

    Densifications happen while a function is traced, so trace (call, or
    `jax.jit(...).lower(...)`) inside the block. Each entry is a
    [`fwdlap.Densification`][] naming the primitive, the cause (`"threshold"` or
    `"rule"`), the reason, the shape and the user's source line.

    **Returns:**

    A context manager yielding the list that the events are appended to.

    **Example:**

    ```python
    import jax.numpy as jnp
    import fwdlap

    def f(x):
        r = x.reshape(4, 3)
        return jnp.sum(jnp.tanh(r) ** 2)  # the final sum depends on every particle

    with fwdlap.record_densifications() as events:
        fwdlap.laplacian(f, sparsity=True)(jnp.ones(12))
    assert events[0].primitive == "reduce_sum"
    assert events[0].cause == "threshold"
    ```
    """
    with _sparse.record_densifications() as events:
        yield events
