"""Quick timing of Laplacian methods on the published FermiNet and Psiformer.

For work on the library: one system, a few methods, all in ONE process, timed
interleaved (each timed call right after an untimed one of the same method), so the
ratios hold on a loaded machine::

    python -m benchmarks.published --system N --model ferminet \\
        --methods fwdlap_dense,folx_t6,floor --repeats 20

For every method it prints the trace time (Python to jaxpr; the network itself is
traced and compiled once first, so that no method pays for the others' JAX caches),
the XLA lower + compile time, XLA's flop count (``cost_analysis``; a loop body counts
once, so it undercounts ``ferminet_loop`` and chunked passes), the temporary memory,
the median and minimum run time of one ``jit(vmap(lap_fn))`` call on a batch of 16,
and the ratios to the better folx row and to the forward floor (``floor``: the network
on ``n + 2`` configurations at once, the arithmetic no forward pass can go below).

``--check`` also measures each method's largest relative error against a float64
``jax.hessian`` reference (computed once in a subprocess, cached in
``benchmarks/results/cache`` like the runner's), and its ratio to float32
``jax.hessian``'s error (past 16 electrons, where that hangs, to the error of the
``loop`` row, if timed). That largest error over 16 walkers is set by one walker and
moves with the order of float32 additions (between CPUs too): ``benchmarks.accuracy``
measures errors over more walkers. ``--densifications`` lists where
fwdlap's sparse mode made jacobians dense (``fwdlap.record_densifications``).
``--profile DIR`` writes a ``jax.profiler`` trace of 3 calls of each method (per-op
times, for Perfetto).

Systems: ``N`` (7 electrons), ``Ne`` (10), ``O2`` (16), ``Ge`` (32), ``Li`` (3).
Method names are those of ``benchmarks.methods`` plus the aliases ``fwdlap_dense``
(``fwdlap``), ``folx_t6`` (``folx_sparse``, threshold 6) and ``loop``
(``ferminet_loop``).
"""

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import faithful, methods, models
from benchmarks.cell import relative_error, short_error, xla_flops

ALIASES = {
    "fwdlap_dense": "fwdlap",
    "folx_t6": "folx_sparse",
    "folx_threshold6": "folx_sparse",
    "loop": "ferminet_loop",
}
"""Short method names accepted on the command line."""

DEFAULT_METHODS = ("fwdlap", "fwdlap_sparse", "folx_dense", "folx_sparse", "floor")
"""Methods timed when ``--methods`` is not given."""

MODELS = {"ferminet": "ferminet_paper", "psiformer": "psiformer_paper"}
"""``--model`` choices -> model registry names."""


def resolve_methods(text: str) -> list[str]:
    """Comma-separated method names (aliases allowed) -> registry names."""
    names = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:
        known = sorted([*methods.METHODS, *ALIASES])
        raise SystemExit(f"unknown method(s) {unknown}; choose from {known}")
    return names


def reference(
    model_name: str,
    n: int,
    batch: int,
    seed: int,
    weight_noise: float = 0.0,
    noise_seed: int = 0,
):
    """Float64 Laplacians of the batch (cached), computed in a subprocess.

    With ``weight_noise`` the network's weights are perturbed first (see
    :func:`benchmarks.faithful.perturbed_weights`).
    """
    import numpy as np

    from benchmarks import run

    cfg = argparse.Namespace(batch=batch, seed=seed)
    path = run.reference_path(cfg, model_name, n)  # type: ignore[arg-type]
    noise_args = []
    if weight_noise:
        path = path.with_name(f"{path.stem}-noise{weight_noise:.3g}-{noise_seed}.npz")
        noise_args = ["--weight-noise", repr(weight_noise)]
        noise_args += ["--noise-seed", str(noise_seed)]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        print(f"computing the float64 reference ({path.name}) ...", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.cell", "reference"]
        cmd += ["--model", model_name, "--n", str(n), "--batch", str(batch)]
        cmd += ["--seed", str(seed), "--out", str(tmp), *noise_args]
        subprocess.run(
            cmd, check=True, env=run.child_env(), cwd=run.REPO_ROOT, stdout=sys.stderr
        )
        tmp.replace(path)
    return np.load(path)["laplacian"]


HESSIAN_MAX_ELECTRONS = 16
"""The most electrons at which float32 `jax.hessian`'s error is computed (it hangs past
them); larger systems compare with the loop's error instead."""

REF_ERROR_SOURCE = (
    "float32 jax.hessian's largest relative error (unbatched)",
    "the float32 jvp-of-grad loop's (jax.hessian hangs past 16 electrons)",
)
"""What the errors are compared with, at up to 16 electrons and past them."""


def reference_error(model, xs, ref, rows: dict, n: int) -> float | None:
    """The float32 error each method's is compared with, or None without `--check`.

    Float32 `jax.hessian`'s error, computed unbatched, up to 16 electrons; past them
    (where it hangs) the error of the jvp-of-grad loop's row, when it was timed.
    """
    from benchmarks.cell import hessian_f32_error

    if ref is None:
        return None
    if n <= HESSIAN_MAX_ELECTRONS:
        return hessian_f32_error(model, xs, ref)
    return rows.get("ferminet_loop", {}).get("err")


def densifications(model) -> None:
    """Prints where fwdlap's dense-default and sparse modes densified while tracing."""
    import jax

    try:
        import fwdlap
    except ImportError as err:
        print(f"densifications: fwdlap not importable ({err})")
        return
    xs = models.sample_configs(model, 2)
    for label, lap in (("sparse", fwdlap.laplacian(model.fn, sparsity=True)),):
        with fwdlap.record_densifications() as events:
            jax.jit(jax.vmap(lap)).trace(xs)
        print(f"\nfwdlap {label}: {len(events)} densification(s) while tracing")
        seen: dict[tuple, int] = {}
        for e in events:
            key = (e.primitive, e.cause, e.source, tuple(e.shape))
            seen[key] = seen.get(key, 0) + 1
        for (prim, cause, source, shape), count in seen.items():
            where = source or "?"
            print(f"  {count}x {prim} ({cause}) shape {shape} at {where}")


def trace_and_compile(fn, xs) -> tuple[Any, float, float]:
    """`jit(vmap(fn))` compiled for `xs`, its trace seconds and its compile seconds."""
    import jax

    start = time.perf_counter()
    traced = jax.jit(jax.vmap(fn)).trace(xs)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = traced.lower().compile()
    return compiled, trace_s, time.perf_counter() - start


def time_model(args, model_name: str) -> None:
    """Prepares and times every method on one model; prints the table."""
    import jax
    import numpy as np

    system = faithful.SYSTEMS[args.system]
    model = models.build(model_name, system.n, args.seed)
    xs = models.sample_configs(model, args.batch, args.seed + 1)
    print(
        f"\n## {model_name}, {system.name} ({system.n} electrons: "
        f"{system.n_up} up, {system.n_down} down), batch {args.batch}, float32"
    )
    ref = reference(model_name, system.n, args.batch, args.seed) if args.check else None
    rows: dict[str, dict] = {}
    compiled = {}
    # JAX caches the traces of the network's own operations: trace the network once so
    # that the first method timed does not pay for the others (`benchmarks.startup`
    # times each method in a fresh process instead).
    jax.jit(jax.vmap(model.fn)).trace(xs).lower().compile()
    for name in args.methods:
        row: dict = {}
        rows[name] = row
        try:
            lap_fn = methods.make_laplacian(name, models.method_input(model, name))
        except methods.Unavailable as err:
            row["note"] = f"n/a: {err}"
            continue
        try:
            fn, trace_s, compile_s = trace_and_compile(lap_fn, xs)
        except Exception as err:  # a half-finished rule should cost one row only
            row["note"] = f"error: {short_error(err)}"
            print(f"  {name}: {row['note']}", flush=True)
            continue
        row["trace_s"], row["compile_s"] = trace_s, compile_s
        row["flops"] = xla_flops(fn)
        mem = fn.memory_analysis()
        row["temp_mib"] = None if mem is None else mem.temp_size_in_bytes / 2**20
        lap = jax.block_until_ready(fn(xs))
        if ref is not None and name not in methods.NOT_LAPLACIAN:
            row["err"] = relative_error(np.asarray(lap), ref)
        compiled[name] = fn
        print(
            f"  {name}: trace {row['trace_s']:.2f} s, compile {row['compile_s']:.2f} s",
            flush=True,
        )
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            jax.block_until_ready(fn(xs))
            start = time.perf_counter()
            jax.block_until_ready(fn(xs))
            times[name].append(1e3 * (time.perf_counter() - start))
    for name, ts in times.items():
        rows[name]["ms"] = statistics.median(ts)
        rows[name]["ms_min"] = min(ts)
    folx = [
        rows[m]["ms"] for m in ("folx_dense", "folx_sparse") if "ms" in rows.get(m, {})
    ]
    best_folx = min(folx) if folx else None
    floor = rows.get("floor", {}).get("ms")
    folx_start = [
        rows[m]["trace_s"] + rows[m]["compile_s"]
        for m in ("folx_dense", "folx_sparse")
        if "trace_s" in rows.get(m, {})
    ]
    best_folx_start = min(folx_start) if folx_start else None
    ref_err = reference_error(model, xs, ref, rows, system.n)

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        "\n| method | trace s | compile s | GFLOP | temp MiB | ms median | ms min "
        "| vs best folx | vs floor | start-up vs best folx | max rel err "
        "| err / ref err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if "note" in row:
            print(f"| {name} | {row['note']} |" + " |" * 10)
            continue
        ms = row.get("ms")
        start_up = row["trace_s"] + row["compile_s"]
        print(
            f"| {name} | {row['trace_s']:.2f} | {row['compile_s']:.2f} | "
            f"{f(None if row['flops'] is None else row['flops'] / 1e9, '.2f')} | "
            f"{f(row['temp_mib'], '.1f')} | {f(ms, '.1f')} | "
            f"{f(row.get('ms_min'), '.1f')} | "
            f"{f(ms / best_folx if ms and best_folx else None, '.2f')} | "
            f"{f(ms / floor if ms and floor else None, '.2f')} | "
            f"{f(start_up / best_folx_start if best_folx_start else None, '.2f')} | "
            f"{f(row.get('err'), '.1e')} | "
            f"{f(row['err'] / ref_err if ref_err and 'err' in row else None, '.2f')} |"
        )
    if ref_err:
        source = REF_ERROR_SOURCE[system.n > HESSIAN_MAX_ELECTRONS]
        print(f"\nerr / ref err: against {ref_err:.1e}, {source}")
    if args.profile:
        profile(compiled, xs, args.profile, model_name)
    if args.densifications:
        densifications(model)


def profile(compiled: dict, xs, out_dir: str, model_name: str) -> None:
    """Writes a ``jax.profiler`` trace of 3 calls of each method under ``out_dir``.

    Open ``<out_dir>/<model>-<method>/plugins/profile/*/*.trace.json.gz`` in
    Perfetto (ui.perfetto.dev) for the time of each XLA op.
    """
    import jax

    for name, fn in compiled.items():
        path = f"{out_dir}/{model_name}-{name}"
        with jax.profiler.trace(path):
            for _ in range(3):
                jax.block_until_ready(fn(xs))
        print(f"profile of {name}: {path}")


def add_network_arguments(p: argparse.ArgumentParser) -> None:
    """`--system` and `--model` (a network, or `both`), shared with `startup`."""
    p.add_argument("--system", default="N", choices=sorted(faithful.SYSTEMS))
    p.add_argument(
        "--model", default="ferminet", choices=[*MODELS, "both"], help="network"
    )


def chosen_models(args: argparse.Namespace) -> list[str]:
    """The model registry names that `--model` names."""
    return list(MODELS.values()) if args.model == "both" else [MODELS[args.model]]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the script's command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.published",
        description=(__doc__ or "").splitlines()[0],
    )
    add_network_arguments(p)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--check", action="store_true", help="errors vs a float64 jax.hessian"
    )
    p.add_argument(
        "--profile", metavar="DIR", help="write jax.profiler traces of each method"
    )
    p.add_argument(
        "--densifications",
        action="store_true",
        help="list where fwdlap's sparse mode densified",
    )
    args = p.parse_args(argv)
    args.methods = resolve_methods(args.methods)
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for model_name in chosen_models(args):
        time_model(args, model_name)


if __name__ == "__main__":
    main()
