"""Test configuration: runs before JAX is imported by any test module."""

import os

# Four simulated CPU devices for the sharding tests, and the scheduler flag that
# avoids a jaxlib 0.10 CPU-backend hang (see docs/installation.md). Both must be set
# before JAX initialises its backend.
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in (
    "--xla_force_host_platform_device_count=4",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from typing import Any  # noqa: E402

import pytest  # noqa: E402

from fwdlap._core.rules import custom  # noqa: E402


@pytest.fixture
def softmax_rule_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of `jax.nn.softmax`'s dedicated rule that it answered."""
    calls: list[int] = []
    rule = custom.softmax_rule

    def counted(*args: Any, **kwargs: Any) -> Any:
        outs = rule(*args, **kwargs)
        if outs is not None:
            calls.append(1)
        return outs

    monkeypatch.setattr(custom, "softmax_rule", counted)
    return calls
