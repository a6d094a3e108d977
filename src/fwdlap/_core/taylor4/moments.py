r"""The *moments* layout of the collapsed Taylor pass: exact $\Delta^2$ in fewer rows.

With an exact design ($\sum_k w_k v_k^{\otimes 4} = \operatorname{sym}(\delta\otimes
\delta) =: M$), collapsing only the fourth coefficient still carries coefficients 1-3
for every direction. But every coefficient is a polynomial in $v$:
$x_1(v) = \sum_i v_i g_i$, $x_2(v) = \sum_{ij} v_i v_j A_{ij}$ and
$x_3(v) = \sum_{ijk} v_i v_j v_k B_{ijk}$, and the collapsed sums only ever see them
through $M$. The third coefficient enters the fourth only as
$\sum_k w_k x_1 x_3 = \sum_a g_a c_a$ with $c_a = \sum_j B_{ajj}$, and $c$ itself
propagates in closed form. So each value carries

- `g`: $d$ rows, $g_i = \partial_i x$;
- `A`: $d(d+1)/2$ rows, the entries $i \le j$ of $A = \tfrac12 \nabla^2 x$;
- `c`: $d$ rows, $c = \tfrac16 \nabla \Delta x$;
- `q`: $\sum_k w_k x_4(v_k) = \Delta^2 x / 24$,

$d(d+1)/2 + 2d + 1$ rows instead of $3 d^2$ (the direction layout with the $d^2$
directions $e_i, e_i \pm e_j$). With $M_{ijkl} = (\delta_{ij}\delta_{kl} +
\delta_{ik}\delta_{jl} + \delta_{il}\delta_{jk})/3$ the contractions are
$\sum_k w_k x_2^2 = ((\operatorname{tr} A)^2 + 2\|A\|_F^2)/3$,
$\sum_k w_k x_1^2 x_2 = (|g|^2 \operatorname{tr} A + 2 g^\top A g)/3$ and
$\sum_k w_k x_1^4 = |g|^4$, which give the rules below (Faà di Bruno and the product
rule, contracted).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The unit vectors along the 6 axes of the icosahedron (through opposite vertices):
# a projective 4-design of R^3 (the 12 vertices are a spherical 5-design).
_GOLDEN = (1 + math.sqrt(5)) / 2
_ICOSAHEDRON_AXES = np.array(
    [
        [0, 1, _GOLDEN],
        [0, 1, -_GOLDEN],
        [1, _GOLDEN, 0],
        [1, -_GOLDEN, 0],
        [_GOLDEN, 0, 1],
        [-_GOLDEN, 0, 1],
    ]
) / math.sqrt(1 + _GOLDEN**2)


@functools.cache
def exact_design(dim: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Directions $v_k$ and weights $w_k$ with $\Delta^2 f = \sum_k w_k D^4_{v_k} f$.

    The identity holds for every $f$ exactly when $\sum_k w_k v_k^{\otimes 4}$ is the
    symmetrised $\delta \otimes \delta$ (the fourth-moment tensor of $|x|^4$):

    - $d = 1$: $v = e_1$, $w = 1$ (1 direction);
    - $d = 2$: the three lines at $0°, 60°, 120°$, $w = 8/9$ (3 directions);
    - $d = 3$: the six axes of the icosahedron, $w = 5/6$ (6 directions);
    - $d \ge 4$: $e_i \pm e_j$ ($i < j$) with $w = 1/6$ and, unless $d = 4$, $e_i$ with
      $w = (4 - d)/3$ ($d^2$ directions; 12 at $d = 4$).

    The last follows from
    $D^4_{e_i + e_j} + D^4_{e_i - e_j} = 2\partial_i^4 + 12\partial_i^2\partial_j^2
    + 2\partial_j^4$. Any such set has at least $d(d+1)/2$ directions; the first three
    reach that bound.
    """
    if dim == 1:
        return np.ones((1, 1)), np.ones(1)
    if dim == 2:
        angles = np.arange(3) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], 1), np.full(3, 8 / 9)
    if dim == 3:
        return _ICOSAHEDRON_AXES.copy(), np.full(6, 5 / 6)
    eye = np.eye(dim)
    rows: list[np.ndarray] = []
    weights: list[float] = []
    if dim != 4:
        rows.extend(eye)
        weights.extend([(4 - dim) / 3] * dim)
    for i in range(dim):
        for j in range(i + 1, dim):
            rows.extend([eye[i] + eye[j], eye[i] - eye[j]])
            weights.extend([1 / 6, 1 / 6])
    return np.stack(rows), np.asarray(weights)


@functools.cache
def pairs(
    dim: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(I, J, mult, full, diag)` of the packed entries `i <= j` of a symmetric matrix.

    `mult` is 1 on the diagonal and 2 off it; `full[i, j]` is the packed index of
    `(min, max)`; `diag` the packed indices of the diagonal.
    """
    i, j = np.triu_indices(dim)
    full = np.zeros((dim, dim), dtype=np.int32)
    full[i, j] = np.arange(i.size)
    full[j, i] = np.arange(i.size)
    mult = np.where(i == j, 1.0, 2.0)
    return i, j, mult, full, full[np.arange(dim), np.arange(dim)]


def _offsets(dim: int) -> list[int]:
    """Where row `i` (`(i, i)` to `(i, d-1)`) starts in the packed layout."""
    return [i * dim - i * (i - 1) // 2 for i in range(dim)]


def _rows_col(v: np.ndarray, like: Any) -> Any:
    """A constant vector over rows, shaped to broadcast against `like` (rows first)."""
    return jnp.asarray(v, like.dtype).reshape((-1,) + (1,) * (jnp.ndim(like) - 1))


# Static slices only: XLA's CPU backend is slow at gathers with constant indices.


def unpack(a: Any, dim: int) -> Any:
    """Packed `(P, ...)` to the full symmetric `(d, d, ...)`."""
    off = _offsets(dim)
    rows = []
    for r in range(dim):
        lower = [a[off[j] + r - j][None] for j in range(r)]
        rows.append(jnp.concatenate([*lower, a[off[r] : off[r] + dim - r]], axis=0))
    return jnp.stack(rows)


def matvec(a: Any, g: Any, dim: int) -> Any:
    """`(A g)_r = sum_j A_rj g_j` for packed `A` and rows `g`."""
    off = _offsets(dim)
    upper = jnp.stack(
        [jnp.sum(a[off[r] : off[r] + dim - r] * g[r:], axis=0) for r in range(dim)]
    )
    lower = []
    for j in range(dim - 1):
        # Row j's off-diagonal entries (j, j+1..d-1) times g_j, into rows j+1..d-1.
        part = a[off[j] + 1 : off[j] + dim - j] * g[j]
        lower.append(jnp.pad(part, [(j + 1, 0)] + [(0, 0)] * (part.ndim - 1)))
    return upper if not lower else upper + sum(lower[1:], lower[0])


def trace(a: Any, dim: int) -> Any:
    if a is None:
        return None
    off = _offsets(dim)
    return sum((a[off[i]] for i in range(1, dim)), a[off[0]])


def frobenius(a: Any, dim: int) -> Any:
    """`|A|_F^2` of packed `A`: twice the sum of all squares less the diagonal's."""
    # Not `sum(mult * a * a)`: XLA materialises the broadcast of a constant over rows.
    off = _offsets(dim)
    diag = sum((a[off[i]] * a[off[i]] for i in range(1, dim)), a[off[0]] * a[off[0]])
    return 2 * jnp.sum(a * a, axis=0) - diag


def pair_rows(x: Any, y: Any, dim: int) -> tuple[Any, Any]:
    """`(X, Y)` with `X[p] = x_i`, `Y[p] = y_j` for the packed pairs `p = (i, j)`."""
    xs = [jnp.broadcast_to(x[i], (dim - i, *x.shape[1:])) for i in range(dim)]
    return jnp.concatenate(xs, axis=0), jnp.concatenate(
        [y[i:] for i in range(dim)], axis=0
    )


def outer(g: Any, h: Any, dim: int) -> Any:
    """The packed symmetric part of `g_i h_j` (elementwise)."""
    if g is h:
        return jnp.concatenate([g[i] * g[i:] for i in range(dim)], axis=0)
    return 0.5 * jnp.concatenate(
        [g[i] * h[i:] + g[i:] * h[i] for i in range(dim)], axis=0
    )


def mul_all(*xs: Any) -> Any:
    """The product of `xs`, or None (a zero) if any of them is None."""
    out = None
    for x in xs:
        if x is None:
            return None
        out = x if out is None else out * x
    return out


def sum_present(*xs: Any) -> Any:
    """The sum of the `xs` that are not None (zeros), or None if all are."""
    out = None
    for x in xs:
        if x is not None:
            out = x if out is None else out + x
    return out


def _scale(c: float, x: Any) -> Any:
    return None if x is None else c * x


def elementwise(
    dim: int, derivs: Sequence[Any], g: Any, a: Any, c: Any, q: Any
) -> list[Any]:
    """`(g, A, c, q)` of `phi(x)` from phi's four derivatives at `x` (None: zero)."""
    d1, d2, d3, d4 = derivs
    g_out = mul_all(d1, g)
    gg = None if g is None else jnp.sum(g * g, axis=0)
    a_out = sum_present(
        mul_all(d1, a), mul_all(0.5 * d2, None if g is None else outer(g, g, dim))
    )
    tr = trace(a, dim)
    ag = None
    quad = None
    frob = None
    if a is not None:
        frob = frobenius(a, dim)
        if g is not None:
            ag = matvec(a, g, dim)
            quad = jnp.sum(ag * g, axis=0)
    c_out = sum_present(
        mul_all(d1, c),
        mul_all(d2 / 3, sum_present(mul_all(tr, g), _scale(2.0, ag))),
        mul_all(d3 / 6, gg, g),
    )
    gc = None if g is None or c is None else jnp.sum(g * c, axis=0)
    sq = sum_present(mul_all(tr, tr), _scale(2.0, frob))
    q_out = sum_present(
        mul_all(d1, q),
        mul_all(d2, sum_present(gc, _scale(1 / 6, sq))),
        mul_all(d3 / 6, sum_present(mul_all(gg, tr), _scale(2.0, quad))),
        mul_all(d4 / 24, gg, gg),
    )
    return [g_out, a_out, c_out, q_out]


def _row(x: Any) -> Any:
    """`x` as a single row (None stays None)."""
    return None if x is None else x[None]


def bilinear(
    dim: int,
    ops: Any,
    params: Any,
    a: Any,
    b: Any,
    sa: Sequence[Any],
    sb: Sequence[Any],
    stacked: Callable[..., list[Any]],
) -> tuple[Any, list[Any]]:
    """`f(a, b)` and its `(g, A, c, q)` for a bilinear `f` (`ops`: `BilinearOps`)."""
    mult = pairs(dim)[2]
    ga, aa, ca, qa = sa
    gb, ab, cb, qb = sb
    out = ops.plain(a, b, params)
    # `q` rides in the same call as the rows: on its own, `q`'s chain through the
    # layers (small products and reductions) is fused by XLA's CPU backend into one
    # kernel at the end of the pass, which keeps every layer's rows alive until then.
    left = stacked(lambda r: ops.rows_left(r, b, params), [ga, aa, ca, _row(qa)])
    right = stacked(lambda r: ops.rows_right(a, r, params), [gb, ab, cb, _row(qb)])

    def psum(x: Any, y: Any) -> Any:
        return None if x is None or y is None else ops.pairs_sum(x, y, params)

    def pair(x: Any, y: Any) -> Any:
        return None if x is None or y is None else ops.pairs(x, y, params)

    cross_a = None
    if ga is not None and gb is not None:
        x1, y1 = pair_rows(ga, gb, dim)
        y2, x2 = pair_rows(gb, ga, dim)
        cross_a = 0.5 * (pair(x1, y1) + pair(x2, y2))
    tra, trb = trace(aa, dim), trace(ab, dim)

    def mat_rows(m: Any, v: Any, m_left: bool) -> Any:
        """`sum_j f(M[a, j], v_j)` (or `f(v_j, M[a, j])`) for every row `a`."""
        if m is None or v is None:
            return None
        full = unpack(m, dim)
        if m_left:
            return jax.vmap(lambda row: ops.pairs_sum(row, v, params))(full)
        return jax.vmap(lambda row: ops.pairs_sum(v, row, params))(full)

    c_cross = sum_present(
        None if tra is None or gb is None else ops.rows_right(tra, gb, params),
        _scale(2.0, mat_rows(aa, gb, True)),
        None if trb is None or ga is None else ops.rows_left(ga, trb, params),
        _scale(2.0, mat_rows(ab, ga, False)),
    )
    q_cross = sum_present(
        None if tra is None or trb is None else ops.plain(tra, trb, params),
        _scale(2.0, psum(None if aa is None else _rows_col(mult, aa) * aa, ab)),
    )
    g_out = sum_present(left[0], right[0])
    a_out = sum_present(left[1], right[1], cross_a)
    c_out = sum_present(left[2], right[2], _scale(1 / 3, c_cross))
    q_out = sum_present(
        None if left[3] is None else left[3][0],
        None if right[3] is None else right[3][0],
        psum(ga, cb),
        psum(ca, gb),
        _scale(1 / 3, q_cross),
    )
    return out, [g_out, a_out, c_out, q_out]


def reciprocal_derivs(y: Any) -> tuple[Any, Any, Any, Any]:
    """The derivatives of `1 / x` at `x`, given `y = 1 / x`."""
    y2 = y * y
    return -y2, 2 * y2 * y, -6 * y2 * y2, 24 * y2 * y2 * y


def generic(
    dim: int,
    fun: Callable[..., list[Any]],
    primals: Sequence[Any],
    series: Sequence[Sequence[Any]],
    active: Sequence[int],
    floats: Sequence[bool],
    derivatives: Callable[..., list[Any]],
) -> list[list[Any]]:
    """Non-linear parts of `(g, A, c, q)` for any differentiable `fun` (float outputs).

    `A += 1/2 f''[g_i, g_j]` per pair; `q += sum_a f''[g_a, c_a]`; and, along each
    direction `v` of the exact design, the Taylor coefficients 3 and 4 of
    `t -> f(x + x1(v) t + x2(v) t^2)` give `c_a += sum_v w_v v_a T3(v)` and
    `q += sum_v w_v T4(v)` (the design's fourth moments are those of `M`).
    """
    i, j, mult = pairs(dim)[:3]
    v, w = exact_design(dim)

    def f_active(*xs: Any) -> list[Any]:
        full = list(primals)
        for k, x in zip(active, xs, strict=True):
            full[k] = x
        ys = fun(*full)
        return [y for y, f in zip(ys, floats, strict=True) if f]

    x0 = [primals[k] for k in active]

    def zeros_like_rows(k: int) -> Any:
        return jnp.zeros((dim, *jnp.shape(primals[k])), jax.typeof(primals[k]).dtype)

    gs = [
        series[k][0] if series[k][0] is not None else zeros_like_rows(k) for k in active
    ]
    a_s = [series[k][1] for k in active]
    cs = [series[k][2] for k in active]

    def second(u: list[Any], t: list[Any]) -> list[Any]:
        def inner(*xs: Any) -> list[Any]:
            return jax.jvp(f_active, tuple(xs), tuple(u))[1]

        return jax.jvp(inner, tuple(x0), tuple(t))[1]

    gi = [pair_rows(g, g, dim)[0] for g in gs]
    gj = [pair_rows(g, g, dim)[1] for g in gs]
    a_part = [0.5 * h for h in jax.vmap(second)(gi, gj)]
    q_part = None
    if any(c is not None for c in cs):
        cz = [
            c if c is not None else jnp.zeros_like(g)
            for c, g in zip(cs, gs, strict=True)
        ]
        q_part = [jnp.sum(h, axis=0) for h in jax.vmap(second)(gs, cz)]

    vi = np.asarray(v)
    quad_w = vi[:, i] * vi[:, j] * mult[None]

    def one(vrow: Any, qrow: Any) -> tuple[list[Any], list[Any]]:
        x1 = [jnp.tensordot(vrow.astype(g.dtype), g, 1) for g in gs]
        x2 = [
            None if a is None else jnp.tensordot(qrow.astype(a.dtype), a, 1)
            for a in a_s
        ]

        def path(t: Any) -> list[Any]:
            xs = []
            for p, c1, c2 in zip(x0, x1, x2, strict=True):
                tt = t.astype(c1.dtype)
                poly = c1 if c2 is None else c1 + tt * c2
                xs.append(p + tt * poly)
            return f_active(*xs)

        ds = derivatives(path, jnp.zeros((), x1[0].dtype), 4)
        return [y / 6 for y in ds[3]], [y / 24 for y in ds[4]]

    t3s, t4s = jax.vmap(one)(jnp.asarray(vi), jnp.asarray(quad_w))
    results: list[list[Any]] = []
    for m, (t3, t4) in enumerate(zip(t3s, t4s, strict=True)):
        coef = _rows_col(w, t4)
        c_extra = jnp.tensordot(jnp.asarray(vi.T, t3.dtype), coef * t3, 1)
        q_extra = jnp.sum(coef * t4, axis=0)
        q_m = q_extra if q_part is None else q_extra + q_part[m]
        results.append([None, a_part[m], c_extra, q_m])
    return results
