"""Benchmarks of Laplacian methods on wavefunction- and PINN-shaped models.

Run ``python -m benchmarks.run [--quick]``; see ``benchmarks/README.md``.

Importing this package sets the XLA flag that avoids a CPU-backend hang of
jaxlib 0.10.2 on 2-core machines (see ``docs/installation.md``, "The CPU scheduler
flag"); the flag
only takes effect when JAX has not been imported yet, so import ``benchmarks``
(or any of its modules) first. Set ``BENCHMARKS_NO_CPU_XLA_FLAG=1`` to leave
``XLA_FLAGS`` alone, e.g. on a GPU machine whose jaxlib may not know the CPU flag
(an unknown flag in ``XLA_FLAGS`` is fatal to XLA).
"""

import os
import sys

SAFE_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""XLA flag set in every benchmark process before JAX is imported."""

NO_CPU_FLAG_ENV = "BENCHMARKS_NO_CPU_XLA_FLAG"
"""Environment variable that, set to a non-empty value other than ``0``, turns the
flag off (``XLA_FLAGS`` is then passed on unchanged)."""


def cpu_flag_disabled() -> bool:
    """Whether :data:`NO_CPU_FLAG_ENV` asks to leave ``XLA_FLAGS`` unchanged."""
    return os.environ.get(NO_CPU_FLAG_ENV, "").strip() not in ("", "0")


def with_safe_xla_flags(flags: str | None) -> str:
    """Returns ``flags`` with :data:`SAFE_XLA_FLAG` appended unless already there.

    Returns ``flags`` unchanged when :func:`cpu_flag_disabled`.
    """
    flags = (flags or "").strip()
    if cpu_flag_disabled() or "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return flags
    return f"{flags} {SAFE_XLA_FLAG}".strip()


def apply_safe_xla_flags(env) -> None:
    """Puts :data:`SAFE_XLA_FLAG` into ``env["XLA_FLAGS"]`` (``env``: a mapping).

    Does nothing when :func:`cpu_flag_disabled`.
    """
    if not cpu_flag_disabled():
        env["XLA_FLAGS"] = with_safe_xla_flags(env.get("XLA_FLAGS"))


def _set_safe_xla_flags() -> None:
    """Sets the flag in this process's environment (warns if JAX is loaded)."""
    if cpu_flag_disabled():
        return
    apply_safe_xla_flags(os.environ)
    if "jax" in sys.modules:
        print(
            "benchmarks: JAX was imported before `benchmarks`; XLA_FLAGS may not apply",
            file=sys.stderr,
        )


_set_safe_xla_flags()
