"""Benchmarks of Laplacian methods on wavefunction- and PINN-shaped models.

Run ``python -m benchmarks.run [--quick]``; see ``benchmarks/README.md``.

Importing this package sets the XLA flag that avoids a CPU-backend hang of
jaxlib 0.10.2 on 2-core machines (see ``DESIGN.md``, "Known hazards"); the flag
only takes effect when JAX has not been imported yet, so import ``benchmarks``
(or any of its modules) first.
"""

import os
import sys

SAFE_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""XLA flag set in every benchmark process before JAX is imported."""


def with_safe_xla_flags(flags: str | None) -> str:
    """Returns ``flags`` with :data:`SAFE_XLA_FLAG` appended unless already there."""
    flags = (flags or "").strip()
    if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return flags
    return f"{flags} {SAFE_XLA_FLAG}".strip()


def _set_safe_xla_flags() -> None:
    """Sets the flag in this process's environment (warns if JAX is loaded)."""
    os.environ["XLA_FLAGS"] = with_safe_xla_flags(os.environ.get("XLA_FLAGS"))
    if "jax" in sys.modules:
        print(
            "benchmarks: JAX was imported before `benchmarks`; XLA_FLAGS may not apply",
            file=sys.stderr,
        )


_set_safe_xla_flags()
