"""Runs the benchmark grid and writes the table, JSON and plot.

Usage::

    python -m benchmarks.run            # N = 8, 16, 32, every model and method,
                                        # the published FermiNet and Psiformer at
                                        # 7, 10, 16 and 32 electrons (N, Ne, O2, Ge)
    python -m benchmarks.run --n64      # ... and N = 64
    python -m benchmarks.run --quick    # the < 3 minute smoke run (see README)

Each (model, N) cell runs in its own worker process (:mod:`benchmarks.cell`),
after a float64 reference computed in another process (cached on disk). A
worker that prints nothing for ``--timeout`` seconds is taken as hung: the
method it was on is recorded as ``timeout`` and the cell is rerun without it.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import apply_safe_xla_flags, report
from benchmarks.cell import EVENT_PREFIX
from benchmarks.faithful import SIZES as FAITHFUL_SIZES
from benchmarks.methods import METHODS
from benchmarks.models import BUILDERS, SIZE_FREE

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

HESSIAN_MAX_N = 16
"""Largest N at which batched ``jax.hessian`` runs (it hangs past it on CPU)."""

FAITHFUL = ("ferminet_paper", "psiformer_paper")
"""The published FermiNet and Psiformer (:mod:`benchmarks.faithful`)."""

FAITHFUL_METHODS = (
    "hessian",
    "ferminet_loop",
    "folx_dense",
    "folx_sparse",
    "fwdlap",
    "fwdlap_sparse",
    "floor",
)
"""Methods run on the published models when ``--methods`` is not given (the fwdlap
variants tuned on the small models are left out). ``hessian`` there gives only its
float32 error, from an unbatched run: see :func:`skipped_methods`."""

MODELS = ("mlp", "ferminet", "psiformer", "particle_mlp", "pinn", *FAITHFUL)
"""Models of a default run, in table order."""

MAX_RETRIES = 2
"""How many times a cell is rerun after a hang or crash, each without the culprit."""

JAX_ENV = (
    "BENCHMARKS_NO_CPU_XLA_FLAG",
    "CUDA_VISIBLE_DEVICES",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "JAX_PLATFORMS",
    "NVIDIA_TF32_OVERRIDE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
)
"""Environment variables that change what is measured, recorded in the metadata."""

PLUGINS = (
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
)
"""JAX accelerator plugins whose versions are recorded when installed."""


@dataclass(frozen=True)
class Config:
    """Settings of one benchmark run."""

    models: tuple[str, ...]
    sizes: tuple[int, ...]
    methods: tuple[str, ...]
    repeats: int
    batch: int
    seed: int
    timeout_s: float
    out_dir: Path
    stem: str
    mode: str
    use_cache: bool
    quick_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def sizes_for(self, model: str) -> tuple[int | None, ...]:
        """Electron counts to run ``model`` at (``(None,)`` for size-free models)."""
        if model in SIZE_FREE:
            return (None,)
        return self.quick_sizes.get(model, self.sizes)

    def methods_for(self, model: str) -> tuple[str, ...]:
        """Methods to run on ``model``: its own list if it has one, else ``methods``."""
        return self.model_methods.get(model, self.methods)


# ------------------------------------------------------------------ subprocesses


def child_env() -> dict[str, str]:
    """Environment of worker processes: safe XLA flags, repo and src importable."""
    env = dict(os.environ)
    apply_safe_xla_flags(env)
    paths = [str(REPO_ROOT)]
    if (REPO_ROOT / "src" / "fwdlap" / "__init__.py").exists():
        paths.append(str(REPO_ROOT / "src"))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclass
class WorkerResult:
    """What one worker process reported before it exited or was killed."""

    events: list[dict]
    finished: bool
    hung: bool
    returncode: int | None

    def in_flight(self) -> tuple[str | None, str | None]:
        """Method and phase of the last status event (what a hang was stuck in)."""
        for event in reversed(self.events):
            if event["event"] == "status":
                return event.get("method"), event.get("phase")
        return None, None


def read_events(stream, sink: queue.Queue) -> None:
    """Thread body: forwards parsed event lines of ``stream``; ``None`` at EOF."""
    for line in stream:
        if line.startswith(EVENT_PREFIX):
            try:
                sink.put(json.loads(line[len(EVENT_PREFIX) :]))
            except json.JSONDecodeError:
                pass
    sink.put(None)


def run_worker(
    args: list[str], timeout_s: float, log_path: Path, on_event
) -> WorkerResult:
    """Runs ``python -m benchmarks.cell ARGS``, streaming events to ``on_event``.

    The worker is killed when it prints no event for ``timeout_s`` seconds.
    Its stderr goes to ``log_path``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cell", *args],
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        sink: queue.Queue = queue.Queue()
        reader = threading.Thread(target=read_events, args=(proc.stdout, sink))
        reader.start()
        events, hung = [], False
        while True:
            try:
                event = sink.get(timeout=timeout_s)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if event is None:
                break
            events.append(event)
            on_event(event)
        proc.wait()
        reader.join()
    finished = any(e["event"] == "done" for e in events)
    return WorkerResult(events, finished, hung, proc.returncode)


# -------------------------------------------------------------------- references


def reference_path(cfg: Config, model: str, n: int | None) -> Path:
    """Cache file of a cell's reference, keyed by the model code and settings."""
    digest = hashlib.sha1((BENCH_DIR / "models.py").read_bytes())
    digest.update((BENCH_DIR / "faithful.py").read_bytes())
    digest.update(importlib.metadata.version("jax").encode())
    tag = f"{model}-{n}-b{cfg.batch}-s{cfg.seed}-{digest.hexdigest()[:10]}"
    return RESULTS_DIR / "cache" / f"ref-{tag}.npz"


def ensure_reference(
    cfg: Config, model: str, n: int | None, on_event
) -> tuple[Path | None, str | None]:
    """Computes (or reuses) a cell's float64 reference; returns (path, problem)."""
    path = reference_path(cfg, model, n)
    if cfg.use_cache and path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    args = ["reference", "--model", model, "--n", str(n), "--batch", str(cfg.batch)]
    args += ["--seed", str(cfg.seed), "--out", str(tmp)]
    log = cfg.out_dir / "logs" / f"ref-{model}-{n}.log"
    result = run_worker(args, cfg.timeout_s, log, on_event)
    if not result.finished or not tmp.exists():
        why = "hung" if result.hung else f"exit code {result.returncode}"
        return None, f"float64 reference failed ({why}; see {log.name})"
    tmp.replace(path)
    return path, None


# ------------------------------------------------------------------------- cells


def skipped_methods(cfg: Config, model: str, n: int | None) -> dict[str, dict]:
    """Methods of a cell not run at all, with the reason.

    Where ``hessian`` is skipped, its float32 error is still measured unbatched.
    """
    if "hessian" not in cfg.methods_for(model):
        return {}
    if n is not None and n > HESSIAN_MAX_N:
        reason = f"N > {HESSIAN_MAX_N}: batched jax.hessian hangs on the CPU backend"
        return {"hessian": {"status": "skipped", "reason": reason}}
    if model in FAITHFUL:
        reason = (
            "batched jax.hessian takes seconds per batch on the published models "
            "(4.8 s at N = 7); its error is measured unbatched"
        )
        return {"hessian": {"status": "skipped", "reason": reason}}
    return {}


def collect(result: WorkerResult) -> tuple[dict[str, dict], dict, list[str]]:
    """Method records, timings and notes from one worker's events."""
    records: dict[str, dict] = {}
    extra: dict = {}
    notes: list[str] = []
    for event in result.events:
        kind = event["event"]
        if kind == "method":
            records[event["method"]] = {
                k: v for k, v in event.items() if k not in ("event", "method")
            }
        elif kind == "timing":
            for name, times in event["times_ms"].items():
                records[name]["run_ms"] = statistics.median(times)
                records[name]["run_ms_min"] = min(times)
                records[name]["run_ms_all"] = times
        elif kind == "hessian_f32_err":
            extra["hessian_f32_err"] = event["value"]
        elif kind == "device":
            extra["device"] = {k: v for k, v in event.items() if k != "event"}
        elif kind == "warning":
            notes.append(event["message"])
    return records, extra, notes


def failure_record(result: WorkerResult) -> tuple[str | None, dict]:
    """The in-flight method of a failed worker and the record blaming it."""
    method, phase = result.in_flight()
    status = "timeout" if result.hung else "error"
    why = (
        "no progress" if result.hung else f"worker died, exit code {result.returncode}"
    )
    return method, {"status": status, "reason": f"{why} during {phase}"}


def run_cell(cfg: Config, model: str, n: int | None, on_event) -> dict:
    """Runs one (model, N) cell with retries; returns its results entry."""
    from benchmarks.models import PINN_DIM

    cell: dict = {
        "model": model,
        "n": n,
        "dim": PINN_DIM if n is None else 3 * n,
        "notes": [],
    }
    ref, problem = ensure_reference(cfg, model, n, on_event)
    if problem:
        cell["notes"].append(problem)
    blamed = skipped_methods(cfg, model, n)
    want_hessian_err = "hessian" in blamed
    result, records, extra, notes = None, {}, {}, []
    cell_methods = cfg.methods_for(model)
    for _ in range(MAX_RETRIES + 1):
        todo = [m for m in cell_methods if m not in blamed]
        if not todo:
            break
        args = ["time", "--model", model, "--n", str(n), "--batch", str(cfg.batch)]
        args += ["--seed", str(cfg.seed), "--repeats", str(cfg.repeats)]
        args += ["--methods", ",".join(todo)]
        args += ["--ref", str(ref)] if ref else []
        args += ["--hessian-f32-err"] if want_hessian_err else []
        log = cfg.out_dir / "logs" / f"{model}-{n}.log"
        result = run_worker(args, cfg.timeout_s, log, on_event)
        records, extra, notes = collect(result)
        if result.finished or ("timing" in {e["event"] for e in result.events}):
            break
        method, record = failure_record(result)
        if method not in todo:
            break
        blamed[method] = record
        cell["notes"].append(f"{method}: {record['reason']}; cell rerun without it")
    if result is not None and not result.finished:
        method, record = failure_record(result)
        cell["notes"].append(f"worker stopped in {method}: {record['reason']}")
    cell["methods"] = {
        m: records.get(m) or blamed.get(m) or {"status": "error", "reason": "no result"}
        for m in cell_methods
    }
    cell["hessian_f32_err"] = extra.get("hessian_f32_err")
    cell["device"] = extra.get("device")
    cell["notes"] += notes
    return cell


# ------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar over cells if tqdm is installed, else plain text lines."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True) if tqdm else None
        self.total, self.done, self.label = total, 0, ""

    def start(self, label: str) -> None:
        """Marks the start of a cell."""
        self.label = label
        self.status(None)

    def status(self, event: dict | None) -> None:
        """Shows the worker's current method and phase."""
        detail = ""
        if event and event["event"] == "status":
            detail = f" {event.get('method')}: {event.get('phase')}"
        elif event:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label}{detail}")
        elif not detail or "run" not in detail:
            print(f"[{self.done}/{self.total}] {self.label}{detail}", flush=True)

    def finish(self, summary: str) -> None:
        """Marks the end of a cell and prints its one-line summary."""
        self.done += 1
        if self.bar is not None:
            self.bar.write(summary)
            self.bar.update(1)
        else:
            print(summary, flush=True)

    def close(self) -> None:
        """Closes the bar."""
        if self.bar is not None:
            self.bar.close()


def cell_summary(cell: dict) -> str:
    """``model N: method=ms ...`` for the progress output."""
    parts = []
    for name, rec in cell["methods"].items():
        value = (
            f"{rec['run_ms']:.1f}ms" if rec.get("run_ms") is not None else rec["status"]
        )
        parts.append(f"{name}={value}")
    return f"{cell['model']} {report.size_label(cell)}: " + " ".join(parts)


# ---------------------------------------------------------------------- driver


def source_version() -> str | None:
    """Version in this checkout's ``pyproject.toml`` (``None`` if unreadable)."""
    try:
        import tomllib

        text = (REPO_ROOT / "pyproject.toml").read_text()
        return tomllib.loads(text)["project"]["version"]
    except Exception:
        return None


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter to the numbers.

    Workers import ``fwdlap`` from this checkout's ``src/`` when it has one, so
    that is what is recorded for it, installed or not. Accelerator plugins are
    listed only when installed.
    """
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "folx", "fwdlap", *PLUGINS):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in PLUGINS:
                out[name] = "not installed"
    if (REPO_ROOT / "src" / "fwdlap" / "__init__.py").exists():
        out["fwdlap"] = f"{source_version() or '?'} (this checkout's src/)"
    return out


def run(cfg: Config) -> dict:
    """Runs every cell of ``cfg`` and returns the results dict."""
    cells = [(m, n) for m in cfg.models for n in cfg.sizes_for(m)]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": cfg.mode,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_env": {k: v for k, v in sorted(os.environ.items()) if k in JAX_ENV},
        "batch": cfg.batch,
        "repeats": cfg.repeats,
        "sizes": {m: list(cfg.sizes_for(m)) for m in cfg.models},
    }
    start = time.perf_counter()
    progress = Progress(len(cells))
    results: dict = {"meta": meta, "cells": []}
    try:
        for model, n in cells:
            progress.start(f"{model} {'D' if n is None else f'N={n}'}")
            cell_start = time.perf_counter()
            cell = run_cell(cfg, model, n, progress.status)
            cell["wall_s"] = round(time.perf_counter() - cell_start, 1)
            results["cells"].append(cell)
            if cell.get("device") and "device" not in meta:
                meta["device"] = cell["device"]
            progress.finish(cell_summary(cell))
            meta["cells_done"] = f"{len(results['cells'])}/{len(cells)}"
            meta["duration_s"] = round(time.perf_counter() - start, 1)
            # Partial results (no plot), so a run killed midway still leaves data;
            # `--report-only` draws the plot from them.
            report.write_all(results, cfg.out_dir, cfg.stem, with_plot=False)
    finally:
        progress.close()
    meta["duration_s"] = round(time.perf_counter() - start, 1)
    meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


QUICK_FAITHFUL_METHODS = ("hessian", "folx_dense", "fwdlap", "fwdlap_sparse", "floor")
"""Methods of ``--quick`` on the published FermiNet (folx_sparse alone traces 30 s)."""

QUICK = {
    "models": ("mlp", "ferminet", "psiformer", "particle_mlp", "pinn", FAITHFUL[0]),
    "sizes": (8, 16),
    "quick_sizes": {
        "ferminet": (8,),
        "psiformer": (8,),
        "particle_mlp": (32,),
        "ferminet_paper": (7,),
    },
    "model_methods": {"ferminet_paper": QUICK_FAITHFUL_METHODS},
    "methods": tuple(
        m
        for m in METHODS
        if m
        not in (
            "folx_sparse",
            "jvp_of_grad",
            "floor",
            "fwdlap_sparse_chunked",
            "fwdlap_plain",
        )
    ),
    "repeats": 3,
    "timeout_s": 120.0,
}
"""Overrides of ``--quick`` (documented in README.md)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the runner's command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    p.add_argument("--n64", action="store_true", help="add N = 64")
    p.add_argument("--sizes", type=int, nargs="+", help="electron counts")
    p.add_argument("--models", nargs="+", choices=sorted(BUILDERS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS))
    p.add_argument("--repeats", type=int, help="timed calls per method")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, help="seconds without progress = hang")
    p.add_argument(
        "--out", "--out-dir", type=Path, default=RESULTS_DIR, help="output folder"
    )
    p.add_argument(
        "--stem",
        help="output file names <stem>.{md,json,png} "
        "(default: results, or results_quick with --quick)",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute references")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table and plot from the existing JSON",
    )
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """Merges defaults, ``--quick`` overrides and explicit flags."""
    base = {
        "models": MODELS,
        "sizes": (8, 16, 32),
        "quick_sizes": {m: FAITHFUL_SIZES for m in FAITHFUL},
        "model_methods": {m: FAITHFUL_METHODS for m in FAITHFUL},
        "methods": tuple(METHODS),
        "repeats": 10,
        "timeout_s": 600.0,
    }
    if args.quick:
        base.update(QUICK)
    if args.n64:
        base["sizes"] = (*base["sizes"], 64)
    for key, value in (
        ("models", args.models),
        ("sizes", args.sizes),
        ("methods", args.methods),
        ("repeats", args.repeats),
        ("timeout_s", args.timeout),
    ):
        if value is not None:
            base[key] = tuple(value) if isinstance(value, list) else value
    if args.sizes is not None:
        base["quick_sizes"] = {}
    if args.methods is not None:
        base["model_methods"] = {}
    return Config(
        batch=args.batch,
        seed=args.seed,
        out_dir=args.out,
        stem=args.stem or ("results_quick" if args.quick else "results"),
        mode="quick" if args.quick else "full",
        use_cache=not args.no_cache,
        **base,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the grid (or only the report) and write the outputs."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    if args.report_only:
        results = json.loads((cfg.out_dir / f"{cfg.stem}.json").read_text())
    else:
        apply_safe_xla_flags(os.environ)
        results = run(cfg)
    paths = report.write_all(results, cfg.out_dir, cfg.stem)
    print(report.markdown_table(results))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
