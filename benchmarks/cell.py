"""Subprocess worker: one (model, N) cell, or its float64 reference.

Two subcommands, both run by :mod:`benchmarks.run` in a fresh process each::

    python -m benchmarks.cell reference --model ferminet --n 16 --out ref.npz
    python -m benchmarks.cell time --model ferminet --n 16 --ref ref.npz \\
        --methods hessian,folx_dense,fwdlap --repeats 10

``reference`` enables float64 and saves ``f`` and the trace of ``jax.hessian``
for each configuration (one unbatched jitted call per configuration, which
avoids the batched-hessian hang). ``time`` runs every method of the cell in
this one process: build, trace (timed on its own), lower and compile
``jit(vmap(lap_fn))``, a warm-up
call that also gives the error against the reference, then the timed calls,
interleaved round-robin over methods so their ratios survive a noisy machine
(each timed call right after an untimed one of the same method, so that no method
inherits another's cache footprint).

Progress goes to stdout as ``BENCH {json}`` lines, one before each phase, so
the parent can tell which method was in flight if the process hangs.
"""

import argparse
import json
import os
import sys
import time
import traceback

from benchmarks import methods, models

EVENT_PREFIX = "BENCH "
"""Prefix of the event lines the worker prints and the runner parses."""

SIMULATE_HANG_ENV = "BENCHMARKS_SIMULATE_HANG"
"""Names a method whose compile step sleeps forever (tests the hang handling)."""


def emit(event: str, **fields) -> None:
    """Prints one event line for the parent process and flushes it."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def parse_n(text: str) -> int | None:
    """``--n`` value: an int, or ``none`` for size-free models."""
    return None if text.lower() == "none" else int(text)


def short_error(err: BaseException) -> str:
    """One line naming an exception, its message cut to 300 characters."""
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg[:300]}"


# ----------------------------------------------------------------------- reference


def run_reference(args: argparse.Namespace) -> None:
    """Saves float64 ``f(x)`` and ``tr(hessian f)(x)`` for the cell's batch.

    With ``--weight-noise`` the network's parameters are perturbed first
    (:func:`benchmarks.faithful.perturbed_weights`).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import faithful

    if args.weight_noise and args.model not in faithful.BUILDERS:
        raise SystemExit(
            f"--weight-noise perturbs the networks of benchmarks/faithful.py only "
            f"({sorted(faithful.BUILDERS)}), not {args.model!r}."
        )
    # The sampler depends on the system only: perturbed weights leave `xs` as it is.
    with faithful.perturbed_weights(args.weight_noise, args.noise_seed):
        model = models.build(args.model, args.n, args.seed, jnp.float64)
    xs = models.sample_configs(model, args.batch, args.seed + 1).astype(jnp.float64)
    lap_fn = jax.jit(methods.hessian(model.fn))
    f_fn = jax.jit(model.fn)
    laps, values = [], []
    for i, x in enumerate(xs):
        emit("status", method="reference", phase=f"config {i + 1}/{len(xs)}")
        laps.append(float(lap_fn(x)))
        values.append(float(f_fn(x)))
    np.savez(args.out, laplacian=np.array(laps), value=np.array(values))
    emit("done")


# -------------------------------------------------------------------------- timing


def relative_errors(lap, ref):
    """Per-configuration ``|lap - ref| / |ref|`` (``|ref|`` floored tiny)."""
    import numpy as np

    lap = np.asarray(lap, np.float64)
    floor = 1e-6 * float(np.max(np.abs(ref))) + 1e-30
    return np.abs(lap - ref) / np.maximum(np.abs(ref), floor)


def relative_error(lap, ref) -> float:
    """Max over the batch of :func:`relative_errors`."""
    import numpy as np

    return float(np.max(relative_errors(lap, ref)))


def xla_flops(compiled) -> float | None:
    """XLA's flop count of a compiled program (a loop body counts once)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, list):  # older jaxlibs: one dict per device
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def prepare_method(name: str, model, xs, ref) -> tuple[dict, object]:
    """Builds, compiles and checks one method; returns (record, compiled fn).

    The compiled function is ``None`` when the method is unavailable or failed;
    the record then says why.
    """
    import jax

    emit("status", method=name, phase="trace")
    if os.environ.get(SIMULATE_HANG_ENV) == name:
        time.sleep(10**6)
    try:
        lap_fn = methods.make_laplacian(name, models.method_input(model, name))
    except methods.Unavailable as err:
        return {"status": "n/a", "reason": str(err)}, None
    try:
        start = time.perf_counter()
        traced = jax.jit(jax.vmap(lap_fn)).trace(xs)
        trace_s = time.perf_counter() - start
        emit("status", method=name, phase="lower+compile")
        start = time.perf_counter()
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - start
    except Exception as err:
        traceback.print_exc()
        return {"status": "error", "reason": f"compile: {short_error(err)}"}, None
    record: dict = {
        "status": "ok",
        "trace_s": trace_s,
        "compile_s": compile_s,
        "startup_s": trace_s + compile_s,
    }
    mem = compiled.memory_analysis()
    record["temp_bytes"] = None if mem is None else int(mem.temp_size_in_bytes)
    record["flops"] = xla_flops(compiled)
    emit("status", method=name, phase="warmup")
    try:
        lap = jax.block_until_ready(compiled(xs))
    except Exception as err:
        traceback.print_exc()
        return {"status": "error", "reason": f"run: {short_error(err)}"}, None
    not_lap = name in methods.NOT_LAPLACIAN
    record["max_rel_err"] = None if ref is None or not_lap else relative_error(lap, ref)
    return record, compiled


def time_round_robin(compiled: dict, xs, repeats: int) -> dict[str, list[float]]:
    """Times every compiled method ``repeats`` times, interleaved; ms per call.

    Each timed call follows an untimed call of the same method. Without it a
    method's time depends on which method ran just before: a memory-hungry
    predecessor (``jvp_of_grad``) evicted the next method's buffers from the caches
    and slowed it by up to 40% (measured on ``folx_dense``, FermiNet N = 16).
    """
    import jax

    times: dict[str, list[float]] = {name: [] for name in compiled}
    for rep in range(repeats):
        for name, fn in compiled.items():
            emit("status", method=name, phase=f"run {rep + 1}/{repeats}")
            jax.block_until_ready(fn(xs))
            start = time.perf_counter()
            jax.block_until_ready(fn(xs))
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def hessian_f32_laplacians(model, xs) -> list[float]:
    """Float32 ``jax.hessian`` Laplacians, one jitted call per configuration.

    Unbatched: the batched Hessian of the larger networks hangs.
    """
    import jax

    lap_fn = jax.jit(methods.hessian(model.fn))
    laps = []
    for i, x in enumerate(xs):
        emit("status", method="hessian_f32_err", phase=f"config {i + 1}/{len(xs)}")
        laps.append(float(lap_fn(x)))
    return laps


def hessian_f32_error(model, xs, ref) -> float:
    """Float32 ``jax.hessian`` error, unbatched (for cells that skip the method)."""
    return relative_error(hessian_f32_laplacians(model, xs), ref)


def load_reference(path: str | None):
    """Loads ``(laplacian, value)`` float64 arrays, or ``(None, None)``."""
    import numpy as np

    if not path:
        return None, None
    data = np.load(path)
    return data["laplacian"], data["value"]


def check_reference_inputs(model, xs, ref_value) -> None:
    """Emits a warning if float32 ``f`` disagrees with the saved float64 ``f``.

    A mismatch would mean the two processes built different parameters or
    configurations, which would make every error in the cell meaningless.
    """
    import jax
    import numpy as np

    if ref_value is None:
        return
    values = np.asarray(jax.jit(jax.vmap(model.fn))(xs), np.float64)
    diff = float(np.max(np.abs(values - ref_value) / (np.abs(ref_value) + 1e-6)))
    if diff > 1e-3:
        emit("warning", message=f"float32 f differs from reference f by {diff:.2e}")


def device_info() -> dict:
    """Backend, device kind and count, and matmul precision of this process."""
    import jax

    devices = jax.devices()
    precision = getattr(jax.config, "jax_default_matmul_precision", None)
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "default_matmul_precision": None if precision is None else str(precision),
    }


def run_timing(args: argparse.Namespace) -> None:
    """Prepares every requested method, then times the ones that compiled."""
    try:
        emit("device", **device_info())
    except Exception as err:
        emit("warning", message=f"device query failed: {short_error(err)}")
    model = models.build(args.model, args.n, args.seed)
    xs = models.sample_configs(model, args.batch, args.seed + 1)
    ref, ref_value = load_reference(args.ref)
    check_reference_inputs(model, xs, ref_value)
    compiled = {}
    for name in args.methods:
        record, fn = prepare_method(name, model, xs, ref)
        emit("method", method=name, **record)
        if fn is not None:
            compiled[name] = fn
    emit("timing", times_ms=time_round_robin(compiled, xs, args.repeats))
    if args.hessian_f32_err and ref is not None:
        emit("hessian_f32_err", value=hessian_f32_error(model, xs, ref))
    emit("done")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the worker's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cell")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("reference", "time"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, choices=sorted(models.BUILDERS))
        p.add_argument("--n", type=parse_n, required=True)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
    reference = sub.choices["reference"]
    reference.add_argument("--out", required=True)
    reference.add_argument(
        "--weight-noise",
        type=float,
        default=0.0,
        help="multiply each parameter of a faithful network by 1 + this * U(-1, 1)",
    )
    reference.add_argument("--noise-seed", type=int, default=0)
    timing = sub.choices["time"]
    timing.add_argument("--ref", default=None, help="npz from `reference`")
    timing.add_argument(
        "--methods", type=lambda s: s.split(","), default=list(methods.METHODS)
    )
    timing.add_argument("--repeats", type=int, default=10)
    timing.add_argument(
        "--hessian-f32-err",
        action="store_true",
        help="also measure float32 jax.hessian's error, unbatched",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the worker process."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "reference":
        run_reference(args)
    else:
        run_timing(args)


if __name__ == "__main__":
    main()
