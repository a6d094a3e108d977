"""XLA's count of the arithmetic in each method's program, and the MLP's GEMM floor.

Where a target asks for a time ratio that no rewrite of the rules can reach, the
reason is arithmetic: two methods that compile to the same floating-point operations
run, at best, as fast as the machine multiplies matrices. This script shows it with
numbers anyone can reproduce::

    python -m benchmarks.flops [--models mlp ferminet psiformer] [--sizes 16 32]

For each (model, N) it compiles ``jit(vmap(laplacian))`` for a batch of 16 (float32,
as ``benchmarks.run`` does) with the loop-free variant of each method, and prints
``compiled.cost_analysis()["flops"]`` per batch (the last column is the ratio to
``fwdlap_single``). Loop-free, because XLA counts a
``while`` body once, not once per trip: ``fwdlap_single`` is the dense single pass
and ``fwdlap_sparse_single`` the block-sparse pass with ``chunk_size=None``, so
their ratio is the fraction of the dense arithmetic that block sparsity leaves.

``--floor`` (MLP only) also times, interleaved with ``folx_dense`` and ``fwdlap``,
the bare matrix products that both compile the MLP's Laplacian to: the jacobians of
the second and third hidden layers, ``(16 * 3N) x 256`` by ``256 x 256``. Their time
bounds any forward-Laplacian method from below on that model.
"""

import argparse
import time

# `python -m benchmarks.flops` imports the package `benchmarks` first, which sets the
# CPU XLA flag before JAX starts.
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import methods, models

BATCH = 16


def _variants(fwdlap) -> dict:
    """Loop-free variants of the methods, as ``make_laplacian``-style factories."""
    return {
        "folx_dense": methods.METHODS["folx_dense"],
        "fwdlap_single": methods.METHODS["fwdlap_single"],
        "fwdlap_sparse_single": lambda f: fwdlap.laplacian(
            f, sparsity=True, chunk_size=None
        ),
    }


def count_flops(name: str, n: int | None) -> dict[str, float]:
    """XLA's flop count per batch of each loop-free variant on one (model, N)."""
    import fwdlap

    model = models.build(name, n)
    xs = models.sample_configs(model, BATCH)
    counts = {}
    for method, factory in _variants(fwdlap).items():
        try:
            lap_fn = factory(model.fn)
        except methods.Unavailable as err:
            print(f"  {method}: n/a ({err})")
            continue
        compiled = jax.jit(jax.vmap(lap_fn)).lower(xs).compile()
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):  # older jaxlibs return one dict per device
            analysis = analysis[0]
        if not analysis or "flops" not in analysis:
            print(f"  {method}: XLA gave no flop count")
            continue
        counts[method] = float(analysis["flops"])
    return counts


def _median_ms(fn, *args, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return times


def mlp_floor(n: int, repeats: int) -> dict[str, float]:
    """Median ms per batch: folx_dense, fwdlap and the MLP's two jacobian GEMMs."""
    model = models.build("mlp", n)
    xs = models.sample_configs(model, BATCH)
    rows = BATCH * 3 * n
    key_a, key_b, key_c = jax.random.split(jax.random.key(0), 3)
    jac = jax.random.normal(key_a, (rows, 256), jnp.float32)
    w2 = jax.random.normal(key_b, (256, 256), jnp.float32) / 16
    w3 = jax.random.normal(key_c, (256, 256), jnp.float32) / 16

    def gemms(jac, w2, w3):
        # The same two products, dependent as in the network (the second layer's
        # jacobian feeds the third), and nothing else: no tanh' scaling, no primal.
        return (jac @ w2) @ w3

    programs = {
        "folx_dense": (
            jax.jit(jax.vmap(methods.make_laplacian("folx_dense", model.fn))),
            (xs,),
        ),
        "fwdlap": (
            jax.jit(jax.vmap(methods.make_laplacian("fwdlap", model.fn))),
            (xs,),
        ),
        "two GEMMs alone": (jax.jit(gemms), (jac, w2, w3)),
    }
    for fn, args in programs.values():
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):  # interleaved, so the machine's load falls on all alike
        for name, (fn, args) in programs.items():
            jax.block_until_ready(fn(*args))  # untimed call of the same program
            samples[name] += _median_ms(fn, *args, repeats=1)
    return {name: float(np.median(t)) for name, t in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "ferminet", "psiformer"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 32])
    parser.add_argument(
        "--floor", action="store_true", help="time the MLP's GEMM floor (N = 16)"
    )
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {BATCH}\n")
    print("| model | N | method | XLA flops per batch | vs folx_dense | vs single |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        sizes = [None] if name in models.SIZE_FREE else args.sizes
        for n in sizes:
            counts = count_flops(name, n)
            for method, flops in counts.items():
                folx = counts.get("folx_dense")
                folx_text = "-" if folx is None else f"{flops / folx:.2f}"
                single = counts.get("fwdlap_single")
                single_text = "-" if single is None else f"{flops / single:.2f}"
                print(
                    f"| {name} | {n if n is not None else '-'} | {method} | "
                    f"{flops / 1e6:,.1f} M | {folx_text} | {single_text} |"
                )
    if args.floor:
        times = mlp_floor(16, args.repeats)
        print(f"\nMLP, N = 16, median of {args.repeats} interleaved calls (ms/batch):")
        for name, ms in times.items():
            ratio = ms / times["folx_dense"]
            print(f"  {name:16s} {ms:7.3f}  ({ratio:.2f}x folx_dense)")


if __name__ == "__main__":
    main()
