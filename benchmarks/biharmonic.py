"""Benchmark: the biharmonic of a PINN MLP, `fwdlap.biharmonic` against nested methods.

Run from the repository root (see the last section of benchmarks/README.md):

    .venv/bin/python -m benchmarks.biharmonic [--dims 2 5 10 50] [--width 128]
        [--depth 4] [--batch 16] [--probes 16] [--repeats 10] [--float64]

Model: u(x) = MLP(x), `depth` tanh layers of `width`, scalar output, x in R^D; the
biharmonic of each of `batch` points (`jax.vmap`), compiled with `jax.jit`. Methods:

- `biharmonic`: `fwdlap.biharmonic` (exact; `chunk_size=None`, one pass);
- `biharmonic_probes`: `fwdlap.biharmonic(probes=k)`, the stochastic estimate;
- `lap_of_lap`: `fwdlap.laplacian(fwdlap.laplacian(u))`;
- `hessian_of_hessian`: `trace(jax.hessian(x -> trace(jax.hessian(u)(x))))`;
- `jet`: `jax.experimental.jet` with the exact mode's directions vmapped, each giving
  the 4th derivative along one direction, summed with the same weights.

Exact methods are checked against each other before timing. Methods are timed
interleaved (one call of each per round; the median of the rounds), XLA's
temporary memory is `compiled.memory_analysis().temp_size_in_bytes` and its flop
count `compiled.cost_analysis()["flops"]` (compared with the nested method that
does the fewest: the arithmetic a method's time cannot go below). The nested
methods are skipped at D = 50, where only the stochastic estimate is timed.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import jet  # noqa: E402

import fwdlap  # noqa: E402
from benchmarks.cell import xla_flops  # noqa: E402
from fwdlap._core.taylor4.moments import exact_design  # noqa: E402


def init_mlp(key: Any, dim: int, width: int, depth: int) -> list[Any]:
    sizes = [dim, *([width] * depth), 1]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / np.sqrt(m), 0.1 * jax.random.normal(k, (n,)))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params: Any, x: Any) -> Any:
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return (x @ w + b)[0]


def methods(dim: int, probes: int) -> dict[str, Callable[[Any, Any], Any]]:
    key = jax.random.key(1)
    out: dict[str, Callable[[Any, Any], Any]] = {}
    out["biharmonic"] = fwdlap.biharmonic(mlp, argnums=1, chunk_size=None)
    out["biharmonic_probes"] = fwdlap.biharmonic(
        mlp, argnums=1, probes=probes, key=key, chunk_size=None
    )
    if dim <= 10:
        inner = fwdlap.laplacian(mlp, argnums=1, chunk_size=None)
        out["lap_of_lap"] = fwdlap.laplacian(inner, argnums=1, chunk_size=None)

        def hess_lap(params: Any, x: Any) -> Any:
            return jnp.trace(jax.hessian(mlp, argnums=1)(params, x))

        def hessian_of_hessian(params: Any, x: Any) -> Any:
            return jnp.trace(jax.hessian(hess_lap, argnums=1)(params, x))

        out["hessian_of_hessian"] = hessian_of_hessian
        v, w = exact_design(dim)

        def jet_sum(params: Any, x: Any) -> Any:
            def along(direction: Any) -> Any:
                zero = jnp.zeros_like(direction)
                _, series = jet.jet(
                    lambda y: mlp(params, y),
                    (x,),
                    ((direction, zero, zero, zero),),
                )
                return series[3]

            d4 = jax.vmap(along)(jnp.asarray(v, x.dtype))
            return jnp.sum(jnp.asarray(w, x.dtype) * d4)

        out["jet"] = jet_sum
    return out


def compile_batched(fn: Callable[[Any, Any], Any], params: Any, xs: Any) -> Any:
    batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
    return batched.lower(params, xs).compile()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dtype = jnp.float64 if args.float64 else jnp.float32
    for dim in args.dims:
        params = init_mlp(jax.random.key(0), dim, args.width, args.depth)
        params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
        xs = jax.random.uniform(jax.random.key(2), (args.batch, dim), dtype)
        compiled: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for name, fn in methods(dim, args.probes).items():
            start = time.perf_counter()
            compiled[name] = compile_batched(fn, params, xs)
            values[name] = jax.block_until_ready(compiled[name](params, xs))
            compile_s = time.perf_counter() - start
            mem = compiled[name].memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", float("nan"))
            flops = xla_flops(compiled[name])
            rows.append(
                dict(
                    dim=dim,
                    method=name,
                    compile_s=compile_s,
                    temp_bytes=temp,
                    gflop=float("nan") if flops is None else flops / 1e9,
                )
            )
        exact = [k for k in values if k != "biharmonic_probes"]
        for name in exact[1:]:
            err = float(
                jnp.max(jnp.abs(values[name] - values[exact[0]]))
                / jnp.max(jnp.abs(values[exact[0]]))
            )
            print(f"D={dim}: max relative difference {name} vs {exact[0]}: {err:.1e}")
        times: dict[str, list[float]] = {k: [] for k in compiled}
        for _ in range(args.repeats):
            for name, fn in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, xs))
                times[name].append(time.perf_counter() - start)
        for row in rows:
            if row["dim"] == dim:
                row["ms"] = 1e3 * statistics.median(times[row["method"]])
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"PINN MLP, width {args.width}, depth {args.depth}, tanh; batch {args.batch}; "
        f"{'float64' if args.float64 else 'float32'}; {args.probes} probes; "
        f"median of {args.repeats} interleaved rounds; backend {jax.default_backend()}",
        "",
        "| D | method | time (ms) | vs best nested | GFLOP | vs fewest nested "
        "| XLA temp (MiB) | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nested = ("lap_of_lap", "hessian_of_hessian", "jet")
    for dim in sorted({r["dim"] for r in rows}):
        group = [r for r in rows if r["dim"] == dim]
        best = min((r["ms"] for r in group if r["method"] in nested), default=None)
        fewest = min((r["gflop"] for r in group if r["method"] in nested), default=None)
        for r in group:
            ratio = f"{r['ms'] / best:.2f}x" if best else "-"
            flop_ratio = f"{r['gflop'] / fewest:.2f}x" if fewest else "-"
            lines.append(
                f"| {dim} | {r['method']} | {r['ms']:.2f} | {ratio} | "
                f"{r['gflop']:.3f} | {flop_ratio} | "
                f"{r['temp_bytes'] / 2**20:.2f} | {r['compile_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10, 50])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--float64", action="store_true")
    args = parser.parse_args()
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    print(table(run(args), args))


if __name__ == "__main__":
    main()
