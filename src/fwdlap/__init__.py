"""fwdlap: the Laplacian of a JAX function in one forward pass."""

import importlib.metadata

from ._compat import Zero as Zero
from ._core import zero_tangent_from_primal as zero_tangent_from_primal
from .api import lap as lap
from .api import lap_filter as lap_filter
from .api import lap_partial as lap_partial
from .api._biharmonic import biharmonic as biharmonic
from .api._register import register_rule as register_rule
from .api._sparsity import Densification as Densification
from .api._sparsity import DensificationError as DensificationError
from .api._sparsity import DensificationWarning as DensificationWarning
from .api._sparsity import Sparsity as Sparsity
from .api._sparsity import record_densifications as record_densifications
from .api._transforms import hessian_diagonal as hessian_diagonal
from .api._transforms import laplacian as laplacian
from .api._transforms import value_grad_and_laplacian as value_grad_and_laplacian

try:
    __version__ = importlib.metadata.version("fwdlap")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"

__all__ = ["Zero", "lap", "lap_partial", "zero_tangent_from_primal", "__version__"]
__all__ += ["lap_filter"]
__all__ += ["biharmonic"]
__all__ += [
    "hessian_diagonal",
    "laplacian",
    "register_rule",
    "value_grad_and_laplacian",
]
__all__ += [
    "Densification",
    "DensificationError",
    "DensificationWarning",
    "Sparsity",
    "record_densifications",
]
