"""`chunk_size` of fwdlap.lap and the transforms: directions in blocks, and "auto".

References: `reference_triple` (jax.jacfwd and the trace of jax.jacfwd(jax.jacfwd(f)))
and `jax.hessian`; the tangent map of an input laplacian is checked against
`jax.jvp`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fwdlap
from fwdlap._core import LapTracer, evaluate
from helpers import identity_jacobian, reference_triple, tree_allclose, window_count

N = 37  # a prime: no block size divides it
X = np.linspace(-1.1, 0.9, N)
W = np.cos(np.arange(5 * N, dtype=np.float64).reshape(5, N))
WIDE = np.sin(np.arange(1, 401, dtype=np.float64) / 7.0)  # 400 hidden units


def _f(x: jax.Array) -> jax.Array:
    h = jnp.tanh(W @ x)
    return jnp.sum(h**2) + jnp.prod(jnp.cos(x[:3]))


def _arrays(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # An array output, a scalar one and one that does not depend on x.
    return jnp.sin(W @ x) * x[0], jnp.sum(x**3), jnp.ones(3)


def _wide(x: jax.Array) -> jax.Array:
    """A function of 48 coordinates whose intermediates hold 48 x 400 values each.

    The mean makes every value depend on every coordinate: the jacobians are dense.
    """
    h = jnp.tanh(x[:, None] * WIDE[None, :] + jnp.mean(x))
    return jnp.sum(jnp.sin(h) * h) + jnp.sum(x**2)


def _has_scan(fun: Any, *args: Any) -> bool:
    return "scan" in str(jax.make_jaxpr(fun)(*args))


# Every block size under jit; eager (op by op, slow to dispatch) for two of them.
CHUNKED_CASES = [(c, True) for c in [1, 5, 16, 36, 37, 100, None]] + [
    (5, False),
    (None, False),
]


@pytest.mark.parametrize(("chunk_size", "jit"), CHUNKED_CASES)
@pytest.mark.parametrize("fun", [_f, _arrays], ids=["scalar", "tuple"])
def test_lap_chunked_matches_reference(fun: Any, chunk_size: Any, jit: bool) -> None:
    x = jnp.asarray(X)

    def run(x: jax.Array) -> Any:
        return fwdlap.lap(
            fun, (x,), (identity_jacobian(x),), (None,), chunk_size=chunk_size
        )

    out, jac, lap = (jax.jit(run) if jit else run)(x)
    ref_out, ref_jac, ref_lap = reference_triple(fun, x)
    assert tree_allclose(out, ref_out)
    assert tree_allclose(jac, ref_jac)
    assert tree_allclose(lap, ref_lap, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [4, 10])
def test_lap_chunked_input_laplacian_counts_once(chunk_size: int) -> None:
    # lap_out = sum_k v_k^T H v_k + J lap_in: the input laplacian goes with one block.
    x = jnp.asarray(X)
    lap_in = jnp.sin(3.0 * x)

    @jax.jit
    def run(x: jax.Array, lap_in: jax.Array) -> Any:
        eye = identity_jacobian(x)
        return fwdlap.lap(_f, (x,), (eye,), (lap_in,), chunk_size=chunk_size)[2]

    lap = run(x, lap_in)
    hess_trace = jnp.trace(jax.hessian(_f)(x))
    _, directional = jax.jvp(_f, (x,), (lap_in,))
    np.testing.assert_allclose(lap, hess_trace + directional, rtol=1e-10)


def test_lap_chunked_pytrees_zero_tangents_and_integer_leaves() -> None:
    def fun(params: dict[str, Any], x: jax.Array, count: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(params["w"] @ x) ** 2) * count

    params = {"w": jnp.asarray(W)}
    x = jnp.asarray(X)
    count = jnp.asarray(3)
    eye = identity_jacobian(x)
    got = fwdlap.lap(
        fun, (params, x, count), (None, eye, None), (None, None, None), chunk_size=8
    )
    single = fwdlap.lap(
        fun, (params, x, count), (None, eye, None), (None, None, None), chunk_size=None
    )
    assert tree_allclose(got, single, rtol=1e-10, atol=1e-12)
    hess_trace = jnp.trace(jax.hessian(lambda x: fun(params, x, count))(x))
    np.testing.assert_allclose(got[2], hess_trace, rtol=1e-10)


def test_lap_chunked_under_vmap_and_grad() -> None:
    xs = jnp.stack([jnp.asarray(X), jnp.asarray(X[::-1])])

    def loss(scale: jax.Array, chunk_size: Any) -> jax.Array:
        f = lambda x: _f(scale * x)  # noqa: E731

        def lap_one(x: jax.Array) -> jax.Array:
            eye = identity_jacobian(x)
            return fwdlap.lap(f, (x,), (eye,), (None,), chunk_size=chunk_size)[2]

        return jnp.sum(jax.vmap(lap_one)(xs))

    def reference(scale: jax.Array) -> jax.Array:
        f = lambda x: _f(scale * x)  # noqa: E731
        return jnp.sum(jax.vmap(lambda x: jnp.trace(jax.hessian(f)(x)))(xs))

    scale = jnp.asarray(0.8)
    chunked = jax.jit(jax.value_and_grad(loss), static_argnums=1)(scale, 6)
    expected = jax.jit(jax.value_and_grad(reference))(scale)
    np.testing.assert_allclose(chunked[0], expected[0], rtol=1e-10)
    np.testing.assert_allclose(chunked[1], expected[1], rtol=1e-9)


def test_auto_splits_large_jacobians_and_keeps_small_ones_whole() -> None:
    x = jnp.linspace(-1.0, 1.0, 48)

    def lap_of(fun: Any) -> Any:
        return lambda x: fwdlap.lap(fun, (x,), (identity_jacobian(x),), (None,))[2]

    # 48 directions x ~10 intermediates of 48 x 400 float64 values: about 70 MiB.
    assert _has_scan(lap_of(_wide), x)
    np.testing.assert_allclose(
        jax.jit(lap_of(_wide))(x), jnp.trace(jax.hessian(_wide)(x)), rtol=1e-10
    )
    small = lambda x: jnp.sum(jnp.tanh(x) ** 2)  # noqa: E731
    assert not _has_scan(lap_of(small), x)
    # chunk_size=None forces one pass whatever the size.
    single = lambda x: fwdlap.lap(  # noqa: E731
        _wide, (x,), (identity_jacobian(x),), (None,), chunk_size=None
    )[2]
    assert not _has_scan(single, x)


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: fwdlap.laplacian(f),
        lambda f: lambda x: fwdlap.value_grad_and_laplacian(f)(x)[2],
    ],
    ids=["laplacian", "value_grad_and_laplacian"],
)
def test_transforms_default_to_auto(transform: Any) -> None:
    x = jnp.linspace(-1.0, 1.0, 48)
    assert _has_scan(transform(_wide), x)
    np.testing.assert_allclose(
        jax.jit(transform(_wide))(x), jnp.trace(jax.hessian(_wide)(x)), rtol=1e-10
    )
    small = lambda x: jnp.sum(jnp.tanh(x) ** 2)  # noqa: E731
    assert not _has_scan(transform(small), x)


def test_auto_is_one_pass_on_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    x = jnp.linspace(-1.0, 1.0, 48)
    block = evaluate.chunk_size_for("auto", _wide, (x,), 48)
    assert block is not None and block < 48
    monkeypatch.setattr(evaluate, "targets_cpu", lambda: False)
    assert evaluate.chunk_size_for("auto", _wide, (x,), 48) is None


def test_auto_follows_the_default_device() -> None:
    # "auto" is tuned for where a jitted call runs: the default device when one is
    # set (`jax.default_device`), not only the default backend.
    x = jnp.linspace(-1.0, 1.0, 48)
    with jax.default_device(jax.devices("cpu")[0]):
        assert evaluate.chunk_size_for("auto", _wide, (x,), 48) is not None
    with jax.default_device("gpu"):  # only read, never used to place anything
        assert evaluate.chunk_size_for("auto", _wide, (x,), 48) is None
        assert evaluate.auto_window_rows(40 * 2**20, 96, 3) is None


def test_chunked_transforms_with_integer_outputs() -> None:
    # An integer output has float0 tangents; chunks leave them out of the loop.
    def fun(x: jax.Array) -> Any:
        return _arrays(x), jnp.arange(3)

    x = jnp.asarray(X)
    got = fwdlap.laplacian(fun, chunk_size=5)(x)
    want = fwdlap.laplacian(fun, chunk_size=None)(x)
    assert tree_allclose(got[0], want[0])
    assert got[1].dtype == jax.dtypes.float0 and got[1].shape == (3,)


@pytest.mark.parametrize(
    ("n", "block"), [(32, 16), (37, 13), (48, 16), (50, 13), (96, 16), (100, 15)]
)
def test_auto_blocks_are_balanced(n: int, block: int) -> None:
    assert evaluate.balanced_chunk(n) == block
    blocks = -(-n // block)
    assert blocks == -(-n // evaluate.AUTO_CHUNK)  # no more blocks than needed
    assert blocks * block - n < blocks  # padding under one row per block


MIB = 2**20


@pytest.mark.parametrize(
    ("n", "mib_per_direction", "block"),
    [
        (96, 1.2, 8),  # FermiNet-shaped, N = 32: 9 MiB fit 7.5 directions; at least 8
        (96, 0.49, 16),  # Psiformer-shaped, N = 32: 18 directions, balanced to 16
        (48, 0.36, 24),  # FermiNet-shaped, N = 16: 25 directions, balanced to 24
        (96, 0.05, 32),  # small jacobians: at most 32 per block
        (40, 0.3, 20),  # 30 directions, balanced over 40
    ],
)
def test_auto_blocks_carry_about_nine_mib(
    n: int, mib_per_direction: float, block: int
) -> None:
    nbytes = int(n * mib_per_direction * MIB)
    assert evaluate.auto_chunk(n, nbytes) == block
    low, high = evaluate.AUTO_CHUNK_RANGE
    assert low <= block <= high
    if low < block < high:  # within a block's worth of the byte target
        assert abs(block * mib_per_direction * MIB - evaluate.AUTO_CHUNK_BYTES) < (
            block * mib_per_direction * MIB
        )


def test_auto_probe_failure_means_one_pass() -> None:
    # A function that only the forward-Laplacian trace accepts cannot be sized:
    # the call must go on as one pass rather than fail.
    def picky(x: jax.Array) -> jax.Array:
        if not isinstance(x, LapTracer):
            raise TypeError("only traced by fwdlap")
        return jnp.sum(jnp.tanh(x[:, None] * WIDE[None, :]))

    x = jnp.linspace(-1.0, 1.0, 48)
    assert evaluate.jacobian_bytes(picky, (x,), 48) == 0


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "big"])
@pytest.mark.parametrize(
    ("api", "call"),
    [
        (
            "fwdlap.lap",
            lambda c: fwdlap.lap(_f, (X,), (np.eye(N),), (None,), chunk_size=c),
        ),
        ("fwdlap.laplacian", lambda c: fwdlap.laplacian(_f, chunk_size=c)),
        (
            "fwdlap.value_grad_and_laplacian",
            lambda c: fwdlap.value_grad_and_laplacian(_f, chunk_size=c),
        ),
    ],
    ids=["lap", "laplacian", "value_grad_and_laplacian"],
)
def test_bad_chunk_size_raises(api: str, call: Any, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{api}: `chunk_size` must be a positive"):
        call(bad)


def test_lap_chunk_size_with_sparsity_makes_windows() -> None:
    # An int chunk_size bounds the dense jacobians of the sparse pass to windows of
    # whole particles; the jacobian comes back with all its rows.
    y = jnp.asarray(X)
    got = fwdlap.lap(_f, (X,), (np.eye(N),), (None,), sparsity=True, chunk_size=6)
    want_jac = jax.jacfwd(_f)(y)
    np.testing.assert_allclose(got[1], want_jac, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got[2], jnp.trace(jax.hessian(_f)(y)), rtol=1e-12)
    # "auto" (the default) means one sparse pass for a small function.
    small = lambda x: jnp.sum(jnp.tanh(x) ** 2 * x)  # noqa: E731
    got = fwdlap.lap(small, (X[:9],), (np.eye(9),), (None,), sparsity=True)[2]
    want = jnp.trace(jax.hessian(small)(jnp.asarray(X[:9])))
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --- the sparse mode ------------------------------------------------------------------

PARTICLES = 16
W_IN = np.cos(np.arange(3 * 256, dtype=np.float64).reshape(3, 256)) / 2
W_HID = np.sin(np.arange(256 * 256, dtype=np.float64).reshape(256, 256)) / 16


def _attention(x: jax.Array) -> jax.Array:
    """Per-particle features, then attention that mixes every particle into each."""
    h = jnp.tanh(x.reshape(PARTICLES, 3) @ W_IN)
    attn = jax.nn.softmax(h @ h.T / 16.0, axis=-1)
    h = h + attn @ h
    for _ in range(3):
        h = jnp.tanh(h @ W_HID)
    return jnp.sum(h**2)


def _per_particle(x: jax.Array) -> jax.Array:
    h = jnp.tanh(x.reshape(PARTICLES, 3) @ W_IN)
    return jnp.sum(jnp.tanh(h @ W_HID) ** 2)


def _count(primitive: str, fun: Any, x: jax.Array) -> int:
    jaxpr = str(jax.make_jaxpr(fun)(x))
    return jaxpr.count(f" {primitive}[") + jaxpr.count(f" {primitive} ")


def _windows(fun: Any, x: jax.Array) -> int:
    """The length of the top-level scan over window starts (1 without one)."""
    return window_count(jax.make_jaxpr(fun)(x).jaxpr)


def test_sparse_auto_windows_mostly_dense_passes() -> None:
    # After the softmax every value depends on every particle: the dense jacobians
    # are large, so "auto" evaluates them in windows of 8 particles (2 here), while
    # the primal and the block-sparse jacobians are computed once.
    x = jnp.linspace(-1.0, 1.0, 3 * PARTICLES)
    auto = fwdlap.laplacian(_attention, sparsity=True)
    single = fwdlap.laplacian(_attention, sparsity=True, chunk_size=None)
    assert _windows(auto, x) == 2
    assert _windows(single, x) == 1
    assert _count("tanh", auto, x) == _count("tanh", single, x)
    np.testing.assert_allclose(
        jax.jit(auto)(x), jnp.trace(jax.hessian(_attention)(x)), rtol=1e-9
    )


def test_sparse_auto_keeps_sparse_passes_whole() -> None:
    x = jnp.linspace(-1.0, 1.0, 3 * PARTICLES)
    auto = fwdlap.laplacian(_per_particle, sparsity=True)
    single = fwdlap.laplacian(_per_particle, sparsity=True, chunk_size=None)
    assert _windows(auto, x) == 1
    assert _count("tanh", auto, x) == _count("tanh", single, x)
    np.testing.assert_allclose(
        auto(x), jnp.trace(jax.hessian(_per_particle)(x)), rtol=1e-9
    )


def test_sparse_auto_probe_reports_nothing_itself() -> None:
    # The probe trace is muted: densifications come from the real passes only, and
    # on_densify="raise" still raises from them.
    x = jnp.linspace(-1.0, 1.0, 3 * PARTICLES)
    single = fwdlap.laplacian(_attention, sparsity=True, chunk_size=6 * PARTICLES)
    with fwdlap.record_densifications() as one_pass:
        jax.eval_shape(single, x)
    with fwdlap.record_densifications() as auto_passes:
        jax.eval_shape(fwdlap.laplacian(_attention, sparsity=True), x)
    assert one_pass and auto_passes == one_pass

    def custom(x: jax.Array) -> jax.Array:  # cholesky has no sparse rule
        return jnp.sum(jnp.linalg.cholesky(jnp.eye(3) + jnp.outer(x[:3], x[:3])))

    strict = fwdlap.Sparsity(on_densify="raise")
    with pytest.raises(fwdlap.DensificationError):
        fwdlap.laplacian(lambda x: custom(x) + _attention(x), sparsity=strict)(x)


@pytest.mark.parametrize(
    ("dense", "dim", "loops", "rows"),
    [
        (40 * 2**20, 96, False, 24),  # large dense jacobians: 4 windows of 24
        (40 * 2**20, 60, False, 21),  # 20 particles in 3 windows of 7
        (2**20, 96, False, None),  # small
        (40 * 2**20, 45, False, None),  # under two windows' worth of directions
        (7 * 2**20, 96, False, 24),
        (7 * 2**20, 96, True, None),  # loops rerun per window: not yet worth it
        (40 * 2**20, 96, True, 24),
    ],
)
def test_sparse_auto_rows(dense: int, dim: int, loops: bool, rows: Any) -> None:
    assert evaluate.auto_window_rows(dense, dim, 3, loops) == rows


def test_lap_filter_uses_auto_blocks() -> None:
    # Static leaves (a string, a function) and outputs that are not arrays or do not
    # depend on x come back with None tangents, in blocks as in one pass.
    x = jnp.linspace(-1.0, 1.0, 48)

    def fun(config: dict[str, Any], x: jax.Array) -> dict[str, Any]:
        value = config["activation"](_wide(x))
        return {"value": value, "name": config["name"], "constant": jnp.ones(2)}

    config = {"name": "wide", "activation": jnp.sin}
    run = lambda x: fwdlap.lap_filter(  # noqa: E731
        fun, (config, x), (None, identity_jacobian(x)), (None, None)
    )
    assert _has_scan(lambda x: run(x)[2]["value"], x)
    out, jac, lap = run(x)
    assert out["name"] == "wide" and jac["name"] is None and lap["constant"] is None
    target = lambda x: jnp.sin(_wide(x))  # noqa: E731
    np.testing.assert_allclose(jac["value"], jax.grad(target)(x), rtol=1e-10)
    np.testing.assert_allclose(
        lap["value"], jnp.trace(jax.hessian(target)(x)), rtol=1e-10
    )


def test_loops_carrying_dense_jacobians_are_found() -> None:
    # `"auto"` asks for larger dense jacobians before it windows a sparse pass whose
    # loops carry dense ones: every window runs those loops again.
    def carries_rows(x: jax.Array) -> Any:
        return lax.scan(lambda c, w: (jnp.tanh(c * w), None), x, jnp.ones(3))[0]

    def nested(x: jax.Array) -> Any:
        return jax.jit(carries_rows)(x)

    def carries_other(x: jax.Array) -> Any:
        return lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c), x[0])

    rows = jnp.ones((12, 5))
    for fun, found in [(carries_rows, True), (nested, True), (carries_other, False)]:
        jaxpr = jax.make_jaxpr(fun)(rows).jaxpr
        assert evaluate.loops_carry_dense(jaxpr, 12) is found
