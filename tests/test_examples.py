"""The scripts in `examples/` run to completion (`make demo` runs the first).

Each script checks its own results against an independent reference (`jax.hessian`,
or the unsharded computation) and exits non-zero when they disagree.
"""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["kinetic_energy.py", "sharded_kinetic_energy.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
