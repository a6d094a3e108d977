"""The zoo in float32 with x64 off, as most users run it, against float64 references.

The rest of the suite runs with x64 on (conftest.py), so a compiler bug that only
float32 programs meet would pass it: jaxlib 0.10.2's CPU fusions miscompiled softmax's
tangent on blocks of more than 8 directions, for one. Here every case of the zoo runs
in float32 throughout (NumPy constants included) with 16 random directions, and the
value, jacobian and `sum_k v_k^T H v_k` are compared with float64 `jax.jacfwd` and
`jax.hessian` references.

x64 is a process-wide setting and JAX caches device copies of NumPy constants across
a switch, so the float32 side runs in a subprocess of its own.
"""

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from helpers import hessian_trace_weighted, reference_jacobian, reference_laplacian
from test_lap_zoo import ZOO, Case

NUM_DIRECTIONS = 16

_FLOAT32_RUN = """
import pickle, sys
import jax
import numpy as np

jax.config.update("jax_enable_x64", False)
import fwdlap
from test_lap_float32 import CASES, LAPLACIAN_MODES, SIZED

jax.config.update("jax_enable_x64", False)
directions = pickle.load(open(sys.argv[1], "rb"))
lap = jax.jit(fwdlap.lap, static_argnums=0)
part = sys.argv[3]
results = {}
for case in CASES if part == "zoo" else []:
    x = np.asarray(case.x, np.float32)
    v = np.asarray(directions[case.name], np.float32)
    try:
        got = lap(case.fun, (x,), (v,), (None,))
        results[case.name] = jax.tree.map(np.asarray, got)
    except Exception as e:
        results[case.name] = f"{type(e).__name__}: {e}"
for case in SIZED if part == "sized" else []:
    x = np.asarray(case.x, np.float32)
    for mode, options in LAPLACIAN_MODES.items():
        try:
            got = jax.jit(fwdlap.laplacian(case.fun, **options))(x)
            results[case.name, mode] = np.asarray(got)
        except Exception as e:
            results[case.name, mode] = f"{type(e).__name__}: {e}"
pickle.dump(results, open(sys.argv[2], "wb"))
"""


_RNG = np.random.default_rng(11)
_EMBED = _RNG.normal(size=(3, 16)) / 2
_HEADS = _RNG.normal(size=(16, 2, 4, 8)) / 4
_NORMED = _RNG.normal(size=(16, 32)) / 4
_ORBITALS = _RNG.normal(size=(2, 16, 8)) / 2


def _particles(x: jax.Array) -> jax.Array:
    return jnp.tanh(x.reshape(-1, 3) @ _EMBED)


def multihead_attention(x: jax.Array) -> jax.Array:
    # 32 particles, 4 heads: softmax tangents of shape (16, 4, 32, 32).
    h = _particles(x)
    q, k = jnp.einsum("pf,fshd->spdh", h, _HEADS)
    weights = jax.nn.softmax(jnp.einsum("pdh,qdh->hpq", q, k), axis=-1)
    return jnp.sum(jnp.tanh(weights @ h[None, :, :4]))


def layer_norm(x: jax.Array) -> jax.Array:
    h = _particles(x) @ _NORMED
    mean = jnp.mean(h, axis=-1, keepdims=True)
    normed = (h - mean) * lax.rsqrt(jnp.var(h, axis=-1, keepdims=True) + 1e-5)
    return jnp.sum(jnp.tanh(normed) ** 2)


def spin_determinants(x: jax.Array) -> jax.Array:
    # Two determinants per spin block, through slogdet, combined with logsumexp.
    h = _particles(x)
    orbitals = jnp.einsum("pf,dfo->dpo", h, _ORBITALS).reshape(2, 2, 4, 8)[..., :4]
    sign, logdet = jnp.linalg.slogdet(orbitals + 2 * jnp.eye(4))
    return jax.nn.logsumexp(jnp.sum(logdet, axis=0), b=jnp.prod(sign, axis=0))


SIZED = [
    Case("multihead_attention", multihead_attention, np.linspace(-1, 1, 96)),
    Case("layer_norm", layer_norm, np.cos(np.arange(48.0))),
    Case("spin_determinants", spin_determinants, np.sin(np.arange(24.0))),
]
"""Cases of working size, where the tangents have 3 or 4 axes after the directions."""

CASES = [*ZOO, *SIZED]

LAPLACIAN_MODES: dict[str, dict[str, Any]] = {
    "dense": {},
    "dense_chunks": {"chunk_size": 12},
    "sparse": {"sparsity": True},
    "sparse_windows": {"sparsity": True, "chunk_size": 12},
}
"""`fwdlap.laplacian` options the sized cases also run with (unit directions)."""


def _directions() -> dict[str, np.ndarray]:
    key = jax.random.key(7)
    return {
        c.name: np.asarray(
            jax.random.normal(key, (NUM_DIRECTIONS, *np.shape(c.x)), jnp.float64) / 4
        )
        for c in CASES
    }


def _run_float32(
    tmp_path: Path, directions: dict[str, np.ndarray], part: str
) -> dict[Any, Any]:
    """Run `part` ("zoo": every case with random directions through `fwdlap.lap`;
    "sized": the sized cases through `fwdlap.laplacian` in every mode) in float32."""
    given, taken = tmp_path / "directions.pkl", tmp_path / "results.pkl"
    given.write_bytes(pickle.dumps(directions))
    tests = Path(__file__).parent
    subprocess.run(
        [sys.executable, "-c", _FLOAT32_RUN, str(given), str(taken), part],
        cwd=tests,
        check=True,
        timeout=900,
    )
    return pickle.loads(taken.read_bytes())


def _references(fun: Any, x: jax.Array, v: jax.Array) -> tuple[Any, Any, Any]:
    """Value, jacobian rows along the directions `v`, and `sum_k v_k^T H v_k`."""
    flat_v = v.reshape(v.shape[0], -1)
    jac = jax.tree.map(
        lambda rows: jnp.tensordot(flat_v, rows, axes=1), reference_jacobian(fun, x)
    )
    return fun(x), jac, hessian_trace_weighted(fun, x, v)


def _mismatch(got: Any, ref: Any) -> str | None:
    """Why float32 `got` differs from float64 `ref` beyond float32 rounding, or None."""
    got_leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    if len(got_leaves) != len(ref_leaves):
        return f"{len(got_leaves)} outputs, expected {len(ref_leaves)}"
    for g, r in zip(got_leaves, ref_leaves, strict=True):
        if jnp.issubdtype(r.dtype, jnp.inexact) and g.dtype != np.float32:
            return f"dtype {g.dtype}, expected float32"
        scale = 1.0 + float(np.max(np.abs(r), initial=0.0))
        err = float(np.max(np.abs(np.asarray(g, np.float64) - r), initial=0.0))
        if not err <= 1e-4 * scale:
            return f"error {err:.2e} against a scale of {scale:.2e}"
    return None


def test_zoo_in_float32_with_many_directions(tmp_path: Path) -> None:
    directions = _directions()
    results = _run_float32(tmp_path, directions, "zoo")
    failures = []
    for case in CASES:
        got = results[case.name]
        if isinstance(got, str):
            failures.append(f"{case.name}: raised {got}")
            continue
        x = jnp.asarray(case.x)
        v = jnp.asarray(directions[case.name])
        ref = jax.jit(_references, static_argnums=0)(case.fun, x, v)
        parts = ("value", "jacobian", "laplacian")
        for part, g, r in zip(parts, got, ref, strict=True):
            why = _mismatch(g, r)
            if why is not None:
                failures.append(f"{case.name} ({part}): {why}")
    assert len(results) == len(CASES)
    assert not failures, "\n".join(failures)


def test_sized_cases_in_float32_in_every_laplacian_mode(tmp_path: Path) -> None:
    # A test of its own (and a subprocess of its own), so that pytest-xdist runs it
    # beside the zoo instead of after it.
    results = _run_float32(tmp_path, _directions(), "sized")
    failures = []
    for case in SIZED:
        x = jnp.asarray(case.x)
        ref = jax.jit(reference_laplacian, static_argnums=0)(case.fun, x)
        for mode in LAPLACIAN_MODES:
            got = results[case.name, mode]
            why = f"raised {got}" if isinstance(got, str) else _mismatch(got, ref)
            if why is not None:
                failures.append(f"{case.name} (laplacian, {mode}): {why}")
    assert len(results) == len(SIZED) * len(LAPLACIAN_MODES)
    assert not failures, "\n".join(failures)
