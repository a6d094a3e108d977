"""Markdown table, JSON dump and plot of a benchmark run.

The runner hands over one ``results`` dict::

    {"meta": {...}, "cells": [{"model", "n", "dim", "methods": {name: record},
                               "hessian_f32_err", "notes"}, ...]}

where a method ``record`` has ``status`` (``ok``, ``n/a``, ``skipped``,
``error``, ``timeout``), ``reason`` when not ok, and ``compile_s``, ``run_ms``
(median per batch), ``temp_bytes`` and ``max_rel_err`` when ok.
"""

import json
import math
from pathlib import Path

COLUMNS = (
    "model",
    "N",
    "method",
    "trace s",
    "compile s",
    "run ms/batch",
    "GFLOP",
    "temp MiB",
    "max rel err",
    "err / hessian err",
    "ratio vs folx_dense",
    "ratio vs ferminet_loop",
    "ratio vs folx_sparse",
    "ratio vs fwdlap",
    "ratio vs fwdlap_single",
    "ratio vs floor",
    "start-up vs folx_sparse",
)
"""Columns of the markdown table, in order."""


def size_label(cell: dict) -> str:
    """``N`` column text: the electron count, or ``D=<dim>`` for size-free models."""
    return str(cell["n"]) if cell["n"] is not None else f"D={cell['dim']}"


def fmt(value, spec: str) -> str:
    """Formats a number with ``spec``, or ``-`` when it is missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return format(value, spec)


def ratio(cell: dict, record: dict, base: str, key: str = "run_ms") -> float | None:
    """``key`` (run time) of ``record`` over that of method ``base`` in the cell."""
    other = cell["methods"].get(base, {})
    if record.get(key) is None or not other.get(key):
        return None
    return record[key] / other[key]


def startup_key(record: dict) -> str:
    """``startup_s`` (trace + compile), or ``compile_s`` in results that predate it.

    Before the trace was timed on its own, ``compile_s`` held trace and compile.
    """
    return "startup_s" if "startup_s" in record else "compile_s"


def hessian_error(cell: dict) -> float | None:
    """Float32 ``jax.hessian`` error of a cell: its own row, else the unbatched run."""
    own = cell["methods"].get("hessian", {}).get("max_rel_err")
    return own if own is not None else cell.get("hessian_f32_err")


def table_row(cell: dict, name: str, record: dict) -> list[str]:
    """One markdown row for method ``name`` of ``cell``."""
    head = [cell["model"], size_label(cell), name]
    if record["status"] != "ok":
        reason = record.get("reason", "")
        text = f"{record['status']} ({reason})" if reason else record["status"]
        return head + ["-", "-", text.replace("|", "/")] + ["-"] * (len(COLUMNS) - 6)
    temp = record.get("temp_bytes")
    err = record.get("max_rel_err")
    href = hessian_error(cell)
    flops = record.get("flops")
    return head + [
        fmt(record.get("trace_s"), ".2f"),
        fmt(record.get("compile_s"), ".2f"),
        fmt(record.get("run_ms"), ".2f"),
        fmt(None if flops is None else flops / 1e9, ".2f"),
        fmt(None if temp is None else temp / 2**20, ".1f"),
        fmt(err, ".1e"),
        fmt(None if err is None or not href else err / href, ".2f"),
        fmt(ratio(cell, record, "folx_dense"), ".2f"),
        fmt(ratio(cell, record, "ferminet_loop"), ".2f"),
        fmt(ratio(cell, record, "folx_sparse"), ".2f"),
        fmt(ratio(cell, record, "fwdlap"), ".2f"),
        fmt(ratio(cell, record, "fwdlap_single"), ".2f"),
        fmt(ratio(cell, record, "floor"), ".2f"),
        fmt(ratio(cell, record, "folx_sparse", startup_key(record)), ".2f"),
    ]


def markdown_table(results: dict) -> str:
    """The results table alone (header, separator and one row per method)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for cell in results["cells"]:
        for name, record in cell["methods"].items():
            lines.append("| " + " | ".join(table_row(cell, name, record)) + " |")
    return "\n".join(lines)


def meta_lines(meta: dict) -> list[str]:
    """Bullet lines describing the run's machine, versions and settings."""
    keys = (
        "date",
        "mode",
        "duration_s",
        "cells_done",
        "device",
        "platform",
        "cpu_count",
        "load_avg_start",
        "load_avg_end",
        "versions",
        "xla_flags",
        "jax_env",
        "batch",
        "repeats",
        "sizes",
        "model_options",
    )
    return [f"- {key}: `{meta[key]}`" for key in keys if key in meta]


def notes_lines(results: dict) -> list[str]:
    """Bullet lines of per-cell notes (timeouts, warnings, reference failures)."""
    lines = []
    for cell in results["cells"]:
        for note in cell.get("notes", []):
            lines.append(f"- {cell['model']} {size_label(cell)}: {note}")
    return lines


def markdown_report(results: dict) -> str:
    """The full ``results.md``: settings, the table, notes and column legend."""
    parts = ["# Laplacian benchmark results", "", *meta_lines(results["meta"]), ""]
    parts += [markdown_table(results), ""]
    notes = notes_lines(results)
    if notes:
        parts += ["## Notes", "", *notes, ""]
    parts += [
        "Columns: trace is the time from Python to a jaxpr "
        "(`jax.jit(jax.vmap(lap_fn)).trace(xs)`), compile the XLA lowering and "
        "compilation that follow (in results written before the trace was timed "
        "apart, compile holds both); "
        "run time is the median over repeats of one `jit(vmap(lap_fn))` "
        "call on the whole batch (float32); GFLOP is XLA's `cost_analysis` count "
        "for the batch (a loop body counts once); "
        "temp is XLA's temporary buffer size; "
        "max rel err is against a float64 `jax.hessian` reference; "
        "err / hessian err divides it by float32 `jax.hessian`'s own error "
        "(batched row, or an unbatched run where the batched one is skipped); "
        "the ratio columns divide run times measured in the same process "
        '(`fwdlap` is `fwdlap.lap` as called, whose `chunk_size="auto"` may split '
        "the directions into blocks; `fwdlap_single` is one pass with all of "
        "them); `floor` is not a Laplacian but the model evaluated on n + 2 "
        "configurations at once, the arithmetic of a forward pass with n "
        "directions; start-up vs folx_sparse divides trace + compile times.",
        "",
    ]
    return "\n".join(parts)


def plot(results: dict, path: Path) -> None:
    """Time per configuration against N, one panel per model, one line per method.

    Size-free models (the PINN) get a bar panel, one bar per method. A method
    keeps its colour in every panel; one legend serves the whole figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    models = list(dict.fromkeys(cell["model"] for cell in cells))
    timed = [
        name
        for name in method_names(cells)
        if any(c["methods"].get(name, {}).get("run_ms") for c in cells)
    ]
    colors = {name: f"C{i}" for i, name in enumerate(timed)}
    fig, axes = plt.subplots(
        1, len(models), figsize=(4.2 * len(models), 4.0), squeeze=False
    )
    batch = results["meta"].get("batch", 16)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [c for c in cells if c["model"] == model]
        if mine[0]["n"] is None:
            plot_bars(ax, mine[0], batch, colors)
            ax.set_title(f"{model} (D={mine[0]['dim']})")
        else:
            plot_lines(ax, mine, batch, colors)
            ax.set_title(model)
        ax.set_ylabel("ms per configuration")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o") for c in colors.values()]
    fig.legend(handles, list(colors), loc="lower center", ncol=max(1, len(colors)))
    fig.suptitle(f"Laplacian time per configuration (batch of {batch} / {batch})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_names(cells: list[dict]) -> list[str]:
    """Method names of ``cells`` in first-seen order."""
    return list(dict.fromkeys(name for c in cells for name in c["methods"]))


def plot_lines(ax, cells: list[dict], batch: int, colors: dict[str, str]) -> None:
    """Log-log lines of ms per configuration against N for each method."""
    from matplotlib.ticker import NullLocator

    for name in colors:
        points = [
            (c["n"], c["methods"][name]["run_ms"] / batch)
            for c in cells
            if c["methods"].get(name, {}).get("run_ms") is not None
        ]
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", color=colors[name], label=name)
    sizes = sorted({c["n"] for c in cells})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("N (electrons)")


def plot_bars(ax, cell: dict, batch: int, colors: dict[str, str]) -> None:
    """Bars of ms per configuration for each method of one size-free cell."""
    names = [n for n, r in cell["methods"].items() if r.get("run_ms") is not None]
    values = [cell["methods"][n]["run_ms"] / batch for n in names]
    ax.bar(range(len(names)), values, color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)


def write_all(
    results: dict, out_dir: Path, stem: str, with_plot: bool = True
) -> dict[str, Path]:
    """Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``.

    ``with_plot=False`` skips the plot (the runner's partial writes after each cell).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    exts = ("json", "md", "png") if with_plot else ("json", "md")
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in exts}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown_report(results))
    if with_plot:
        plot(results, paths["png"])
    return paths
