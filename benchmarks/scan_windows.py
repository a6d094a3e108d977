"""Sparse windows through a `lax.scan` over layers, against one sparse pass.

A model whose layers run in a `lax.scan` (per-particle features plus their mean over
the particles, so the carry turns dense in the first layer) is timed in the sparse
mode with one window, with windows of 8 particles, with `chunk_size="auto"`, and,
for comparison, written as a Python loop. Usage::

    python -m benchmarks.scan_windows 32 40 64

prints, per particle count, the median time per batch of 16 (interleaved rounds, each
timed call after an untimed one of the same method), XLA's temporary memory, and the
largest relative difference from the dense mode.
"""

import argparse
import os
import time

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fwdlap  # noqa: E402

WIDTH, LAYERS, BATCH = 64, 3, 16


def build(n: int) -> tuple[dict, jax.Array]:
    """`n`-particle scan and Python-loop versions of one model, and a batch."""
    rng = np.random.default_rng(0)
    embed = jnp.asarray(rng.normal(size=(3, WIDTH)) / 2, jnp.float32)
    layers = jnp.asarray(rng.normal(size=(LAYERS, WIDTH, WIDTH)) * 0.15, jnp.float32)

    def layer(h: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.tanh(h @ w + jnp.mean(h, axis=0))

    def scanned(x: jax.Array) -> jax.Array:
        h = jnp.tanh(x.reshape(n, 3) @ embed)
        h, _ = jax.lax.scan(lambda h, w: (layer(h, w), None), h, layers)
        return jnp.sum(h**2)

    def unrolled(x: jax.Array) -> jax.Array:
        h = jnp.tanh(x.reshape(n, 3) @ embed)
        for w in layers:
            h = layer(h, w)
        return jnp.sum(h**2)

    methods = {
        "scan, dense": fwdlap.laplacian(scanned),
        "scan, sparse, one window": fwdlap.laplacian(
            scanned, sparsity=True, chunk_size=None
        ),
        "scan, sparse, windows of 8": fwdlap.laplacian(
            scanned, sparsity=True, chunk_size=24
        ),
        'scan, sparse, "auto"': fwdlap.laplacian(scanned, sparsity=True),
        "unrolled, sparse, one window": fwdlap.laplacian(
            unrolled, sparsity=True, chunk_size=None
        ),
        "unrolled, sparse, windows of 8": fwdlap.laplacian(
            unrolled, sparsity=True, chunk_size=24
        ),
    }
    xs = jnp.asarray(rng.normal(size=(BATCH, 3 * n)), jnp.float32)
    return methods, xs


def run(n: int, rounds: int) -> None:
    methods, xs = build(n)
    compiled = {k: jax.jit(jax.vmap(f)).lower(xs).compile() for k, f in methods.items()}
    reference = compiled["scan, dense"](xs)
    times: dict[str, list[float]] = {k: [] for k in compiled}
    for _ in range(rounds):
        for name, fn in compiled.items():
            fn(xs).block_until_ready()  # as in cell.py: warm the caches for it
            start = time.perf_counter()
            fn(xs).block_until_ready()
            times[name].append(time.perf_counter() - start)
    print(f"\n{n} particles")
    print("| method | ms per batch | temp MiB | max rel diff vs dense |")
    print("|---|---|---|---|")
    for name, fn in compiled.items():
        temp = fn.memory_analysis().temp_size_in_bytes / 2**20
        diff = float(jnp.max(jnp.abs(fn(xs) - reference) / jnp.abs(reference)))
        ms = 1e3 * float(np.median(times[name]))
        print(f"| {name} | {ms:.2f} | {temp:.1f} | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*", default=[32, 40, 64])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for n in args.sizes:
        run(n, args.rounds)


if __name__ == "__main__":
    main()
