"""Start-up time of each method as a user meets it: in a fresh process.

A job that restarts pays, before its first step, the tracing of its kinetic energy
(Python to jaxpr) and XLA's compilation of it. Timed in one process after other
methods (``benchmarks.published``), a method finds JAX's caches warm: the first one
traced pays for the others. Here every method runs in a process of its own, as in a
restarted job, ``--repeats`` times, and the medians are printed::

    python -m benchmarks.startup --model psiformer --system N \\
        --methods fwdlap,folx_dense,folx_t6,floor,network --repeats 3

Besides the methods of ``benchmarks.methods`` (and the aliases of
``benchmarks.published``) there is ``network``: the network itself, jitted and
vmapped, without any derivative. ``network`` and ``floor`` (the network on ``n + 2``
configurations at once) bound from below what any forward-Laplacian program costs to
start: it holds the network's operations at least once. For every method the table
gives the optimised HLO's instruction and fusion counts (what XLA compiles), and the
ratios of the total to folx dense and to folx with ``sparsity_threshold=6`` ("t6"),
FermiNet's setting.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys

from benchmarks import faithful, methods, models
from benchmarks.published import (
    add_network_arguments,
    chosen_models,
    resolve_methods,
    trace_and_compile,
)

NETWORK = "network"
"""The pseudo-method that compiles the network alone (no derivative)."""


def measure(model_name: str, system_name: str, method: str, batch: int) -> dict:
    """Traces and compiles one method in this process; returns the timings."""

    system = faithful.SYSTEMS[system_name]
    model = models.build(model_name, system.n, 0)
    xs = models.sample_configs(model, batch, 1)
    if method == NETWORK:
        fn = model.fn
    else:
        fn = methods.make_laplacian(method, models.method_input(model, method))
    compiled, trace_s, compile_s = trace_and_compile(fn, xs)
    hlo = compiled.as_text() or ""
    return {
        "trace_s": trace_s,
        "compile_s": compile_s,
        "instructions": len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", hlo, re.M)),
        "fusions": hlo.count("kind=k"),
    }


def in_fresh_process(model_name: str, system: str, method: str, batch: int) -> dict:
    """`measure` in a new Python process (its JSON line on stdout)."""
    from benchmarks import run

    cmd = [sys.executable, "-m", "benchmarks.startup", "--worker"]
    cmd += ["--model-name", model_name, "--system", system, "--methods", method]
    cmd += ["--batch", str(batch)]
    done = subprocess.run(
        cmd, env=run.child_env(), cwd=run.REPO_ROOT, capture_output=True, text=True
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("STARTUP ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"note": f"failed: {' '.join(tail)[:120]}"}
    return json.loads(lines[-1].removeprefix("STARTUP "))


def table(model_name: str, args: argparse.Namespace) -> None:
    """Runs every method `args.repeats` times, rounds interleaved; prints medians."""
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            runs[method].append(
                in_fresh_process(model_name, args.system, method, args.batch)
            )
    rows = {}
    for method, results in runs.items():
        good = [r for r in results if "note" not in r]
        if not good:
            rows[method] = {"note": results[0]["note"]}
            continue
        rows[method] = {
            key: statistics.median(r[key] for r in good)
            for key in ("trace_s", "compile_s", "instructions", "fusions")
        }
        rows[method]["total_s"] = statistics.median(
            r["trace_s"] + r["compile_s"] for r in good
        )
    system = faithful.SYSTEMS[args.system]
    print(
        f"\n## {model_name}, {system.name} ({system.n} electrons), batch "
        f"{args.batch}, start-up in a fresh process, median of {args.repeats}"
    )
    print(
        "\n| method | trace s | compile s | total s | HLO instructions | fusions "
        "| vs folx dense | vs folx t6 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    refs = [rows.get(m, {}).get("total_s") for m in ("folx_dense", "folx_sparse")]
    for method, row in rows.items():
        if "note" in row:
            print(f"| {method} | {row['note']} |" + " |" * 6)
            continue
        ratios = ["-" if ref is None else f"{row['total_s'] / ref:.2f}" for ref in refs]
        print(
            f"| {method} | {row['trace_s']:.2f} | {row['compile_s']:.2f} | "
            f"{row['total_s']:.2f} | {row['instructions']:.0f} | "
            f"{row['fusions']:.0f} | {ratios[0]} | {ratios[1]} |"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the script's command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.startup",
        description=(__doc__ or "").splitlines()[0],
    )
    add_network_arguments(p)
    p.add_argument("--methods", default="fwdlap,folx_dense,folx_t6,floor,network")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    others = ",".join(m for m in names if m != NETWORK)
    resolved = resolve_methods(others) if others else []
    args.methods = [NETWORK if m == NETWORK else resolved.pop(0) for m in names]
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        row = measure(args.model_name, args.system, args.methods[0], args.batch)
        print("STARTUP " + json.dumps(row), flush=True)
        return
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for model_name in chosen_models(args):
        table(model_name, args)


if __name__ == "__main__":
    main()
