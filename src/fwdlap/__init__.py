"""fwdlap: the Laplacian of a JAX function in one forward pass."""

import importlib.metadata

from ._core import Zero as Zero
from ._core import zero_tangent_from_primal as zero_tangent_from_primal
from .api import lap as lap
from .api import lap_partial as lap_partial

try:
    __version__ = importlib.metadata.version("fwdlap")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"

__all__ = ["Zero", "lap", "lap_partial", "zero_tangent_from_primal", "__version__"]
