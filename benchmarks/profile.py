"""Where the time and the arithmetic go, per family of XLA operations.

For each method on one published network and system (:mod:`benchmarks.faithful`), it
compiles ``jit(vmap(laplacian))`` on a batch of 16 and reports:

- XLA's flop and byte counts (``cost_analysis``), with the flops of the matrix
  products (every ``dot`` in the optimised HLO: ``2 * output size * contracted
  size``) separated from the rest;
- the CPU time of each family of operations, summed over both threads, from a
  profile of ``--repeats`` calls (``jax.profiler``): matrix products (XLA's GEMM
  fusions and dots), layout copies and transposes, other fusions (elementwise
  and reductions), linear algebra (LU, triangular solves), and the rest;
- the wall time of one call.

This is the arithmetic floor behind a missed target: a method that does the same
matrix-product flops as the forward floor (``floor``: the network on ``n + 2``
configurations at once) cannot run faster than those products, and what it spends
beyond them is in the other families. Usage::

    python -m benchmarks.profile --model psiformer --system N \\
        --methods fwdlap,folx_dense,floor

The figures of ``benchmarks/README.md`` ("Profiles") come from this command. The
profiler needs jaxlib's ``ProfileData`` (JAX 0.4.36 and newer).
"""

import argparse
import collections
import glob
import re
import sys
import tempfile
import time

from benchmarks import faithful, methods, models
from benchmarks.published import MODELS, resolve_methods

FAMILIES = ("matrix products", "layout copies", "other fusions", "linear algebra")
"""The families of operations, in the order they are printed (then "other")."""

_SHAPE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(
    r"^\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\)"
    r".*lhs_contracting_dims=\{([\d,]*)\}"
)


def family(op_name: str) -> str:
    """The family of an XLA CPU operation, from its name in the profile."""
    base = re.sub(r"\.\d+$", "", op_name)
    if base.startswith(("ynn_fusion", "dot", "custom-call", "xnn_fusion")):
        return "matrix products"
    if "copy" in base or "transpose" in base:
        return "layout copies"
    if base.startswith(("lu", "triangular_solve", "cholesky", "eig")):
        return "linear algebra"
    if "fusion" in base:
        return "other fusions"
    return "other"


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def dot_flops(hlo: str) -> float:
    """The flops of every ``dot`` of an optimised HLO module (loop bodies once)."""
    shapes = {}
    for line in hlo.splitlines():
        match = _SHAPE.match(line)
        if match:
            shapes[match.group(1)] = _dims(match.group(3))
    total = 0.0
    for line in hlo.splitlines():
        match = _DOT.match(line)
        if not match:
            continue
        out, lhs, contracting = match.groups()
        lhs_shape = shapes.get(lhs)
        if lhs_shape is None:
            continue
        size = 1
        for d in _dims(out):
            size *= d
        for c in _dims(contracting):
            size *= lhs_shape[c]
        total += 2.0 * size
    return total


def op_times(compiled, xs, repeats: int) -> tuple[dict[str, float], float]:
    """Per-family CPU ms of one call (both threads) and the wall ms of one call."""
    import jax

    jax.block_until_ready(compiled(xs))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(compiled(xs))
        wall = (time.perf_counter() - start) / repeats
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    totals: dict[str, float] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "$")):
                    continue
                totals[family(event.name)] += event.duration_ns / 1e6 / repeats
    return dict(totals), 1e3 * wall


def profile_method(name: str, model, xs, repeats: int) -> dict:
    """Compiles and profiles one method; returns its row."""
    import jax

    from benchmarks.cell import xla_flops

    lap_fn = methods.make_laplacian(name, model.fn)
    compiled = jax.jit(jax.vmap(lap_fn)).lower(xs).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    times, wall = op_times(compiled, xs, repeats)
    flops = xla_flops(compiled) or 0.0
    gemm = dot_flops(compiled.as_text())
    return {
        "gemm_gflop": gemm / 1e9,
        "other_gflop": max(flops - gemm, 0.0) / 1e9,
        "gbytes": float(analysis.get("bytes accessed", 0.0)) / 1e9,
        "times": times,
        "wall_ms": wall,
    }


def print_rows(rows: dict[str, dict]) -> None:
    """The markdown table of the profiled methods."""
    names = [*FAMILIES, "other"]
    print(
        "\n| method | GEMM GFLOP | other GFLOP | GB accessed | "
        + " | ".join(f"{n} ms" for n in names)
        + " | op ms (both threads) | wall ms |"
    )
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for method, row in rows.items():
        times = row["times"]
        cells = [f"{times.get(n, 0.0):.1f}" for n in names]
        print(
            f"| {method} | {row['gemm_gflop']:.2f} | {row['other_gflop']:.2f} | "
            f"{row['gbytes']:.2f} | " + " | ".join(cells) + " | "
            f"{sum(times.values()):.1f} | {row['wall_ms']:.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument("--system", default="N", choices=sorted(faithful.SYSTEMS))
    p.add_argument("--model", default="psiformer", choices=sorted(MODELS))
    p.add_argument("--methods", default="fwdlap,fwdlap_sparse,folx_dense,floor")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    system = faithful.SYSTEMS[args.system]
    model = models.build(MODELS[args.model], system.n, args.seed)
    xs = models.sample_configs(model, 16, args.seed + 1)
    print(
        f"jax {jax.__version__}, {MODELS[args.model]}, {system.name} "
        f"({system.n} electrons), batch 16, float32"
    )
    rows = {}
    for name in resolve_methods(args.methods):
        rows[name] = profile_method(name, model, xs, args.repeats)
        print(f"  {name}: profiled", flush=True)
    print_rows(rows)


if __name__ == "__main__":
    main()
