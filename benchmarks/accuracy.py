"""Float32 accuracy of the Laplacian methods on the published networks, many walkers.

::

    python -m benchmarks.accuracy --model both --system N Ne O2 --walkers 64

``benchmarks.published --check`` gives each method's largest relative error over the
16 walkers it times. That figure is set by one or two walkers where the Laplacian of
``log|psi|`` nearly cancels, and which walker, and by how much, changes with the order
of the float32 additions: between methods, and for one method between CPUs (XLA
vectorises reductions to the machine's vector width). This script measures the
distribution instead, over ``--walkers`` configurations (in batches of ``--batch``):

- each method's largest, root-mean-square and median relative error against a
  float64 ``jax.hessian`` reference;
- the ratios of its largest and root-mean-square errors to float32 ``jax.hessian``'s
  (computed unbatched; past 16 electrons, where that hangs, to the jvp-of-grad
  loop's), and the range of the largest-error ratio over the batches of 16, the
  statistic ``published --check`` prints;
- the conditioning, ``float64, weights +-2^-24``: the float64 reference recomputed
  with every weight multiplied by ``1 + u 2^-24`` (``u`` uniform in [-1, 1],
  float32's unit roundoff), ``--perturbations`` times; its errors are the largest
  change of the exact Laplacian per walker under rounding-sized changes of the
  weights alone (a float32 method also rounds every activation).

The float64 references run in subprocesses and are cached in
``benchmarks/results/cache`` like the runner's.
"""

import argparse
import sys

from benchmarks import faithful, methods, models, published
from benchmarks.cell import hessian_f32_laplacians, relative_errors

DEFAULT_METHODS = "fwdlap,fwdlap_sparse,folx_dense,folx_t6,loop"
"""Methods measured when ``--methods`` is not given (``published``'s aliases)."""

UNIT_ROUNDOFF = 2.0**-24
"""Float32's unit roundoff: the relative size of the weights' perturbations."""


def batched(fn, xs, batch: int):
    """``fn`` (a ``jit(vmap(...))``) on ``xs`` in batches of ``batch``."""
    import jax
    import numpy as np

    return np.concatenate(
        [
            np.asarray(jax.block_until_ready(fn(xs[i : i + batch])))
            for i in range(0, len(xs), batch)
        ]
    )


def method_errors(name: str, model, xs, ref, batch: int):
    """Per-walker errors of one method, or the reason it has none."""
    import jax

    if name == "hessian":
        return relative_errors(hessian_f32_laplacians(model, xs), ref)
    try:
        lap_fn = methods.make_laplacian(name, models.method_input(model, name))
    except methods.Unavailable as err:
        return f"n/a: {err}"
    return relative_errors(batched(jax.jit(jax.vmap(lap_fn)), xs, batch), ref)


def weight_sensitivity(args, model_name: str, n: int, ref):
    """Per-walker largest change of the float64 Laplacian, weights perturbed."""
    import numpy as np

    changes = [
        relative_errors(
            published.reference(
                model_name, n, args.walkers, args.seed, UNIT_ROUNDOFF, noise_seed
            ),
            ref,
        )
        for noise_seed in range(args.perturbations)
    ]
    return np.max(changes, axis=0)


def summary(errors, batch: int) -> dict:
    """Largest, RMS and median error, and the largest per batch of ``batch``."""
    import numpy as np

    per_batch = [
        float(np.max(errors[i : i + batch])) for i in range(0, len(errors), batch)
    ]
    return {
        "max": float(np.max(errors)),
        "rms": float(np.sqrt(np.mean(errors**2))),
        "median": float(np.median(errors)),
        "per_batch": np.array(per_batch),
    }


def ratio(value: float) -> str:
    """A ratio with two decimals, or in scientific notation below 0.01."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def print_table(rows: dict, reference_name: str | None) -> None:
    """One markdown table: a row per method, ratios to ``reference_name``'s row."""
    print(
        "\n| method | max rel err | RMS | median | max / ref max | RMS / ref RMS "
        "| max / ref max per batch (min-max) |"
    )
    print("|---|---|---|---|---|---|---|")
    ref = rows.get(reference_name) if reference_name else None
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"| {name} | {row} |" + " |" * 5)
            continue
        ratios = ["-", "-", "-"]
        if isinstance(ref, dict) and name != reference_name:
            per_batch = row["per_batch"] / ref["per_batch"]
            ratios = [
                ratio(row["max"] / ref["max"]),
                ratio(row["rms"] / ref["rms"]),
                f"{ratio(per_batch.min())}-{ratio(per_batch.max())}",
            ]
        print(
            f"| {name} | {row['max']:.1e} | {row['rms']:.1e} | {row['median']:.1e} | "
            + " | ".join(ratios)
            + " |"
        )


def measure(args, model_name: str, system_name: str) -> None:
    """Prints the accuracy table of one network on one system."""
    system = faithful.SYSTEMS[system_name]
    model = models.build(model_name, system.n, args.seed)
    xs = models.sample_configs(model, args.walkers, args.seed + 1)
    print(
        f"\n## {model_name}, {system.name} ({system.n} electrons), "
        f"{args.walkers} walkers, float32",
        flush=True,
    )
    ref = published.reference(model_name, system.n, args.walkers, args.seed)
    names = list(args.methods)
    with_hessian = system.n <= published.HESSIAN_MAX_ELECTRONS
    reference_name = "hessian" if with_hessian else "ferminet_loop"
    if with_hessian:
        names.insert(0, "hessian")
    rows: dict = {}
    for name in names:
        print(f"  {name} ...", flush=True)
        errors = method_errors(name, model, xs, ref, args.batch)
        rows[name] = errors if isinstance(errors, str) else summary(errors, args.batch)
    if args.perturbations:
        changes = weight_sensitivity(args, model_name, system.n, ref)
        rows["float64, weights +-2^-24"] = summary(changes, args.batch)
    print_table(rows, reference_name if reference_name in rows else None)
    print(f"\nref: {'float32 jax.hessian' if with_hessian else 'the loop'}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses the script's command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument(
        "--system",
        nargs="+",
        default=["N", "Ne", "O2"],
        choices=sorted(faithful.SYSTEMS),
    )
    p.add_argument(
        "--model", default="both", choices=[*published.MODELS, "both"], help="network"
    )
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--walkers", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--perturbations",
        type=int,
        default=3,
        help="float64 references with perturbed weights (0: no such row)",
    )
    args = p.parse_args(argv)
    args.methods = published.resolve_methods(args.methods)
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for model_name in published.chosen_models(args):
        for system_name in args.system:
            measure(args, model_name, system_name)


if __name__ == "__main__":
    main()
