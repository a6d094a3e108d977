"""Forward-Laplacian rules, one module per family; importing registers them."""

from . import bilinear, control_flow, custom, elementwise, generic, linear, reduction
from . import linalg as linalg
from . import sparse_control_flow as sparse_control_flow

__all__ = [
    "bilinear",
    "control_flow",
    "custom",
    "elementwise",
    "generic",
    "linear",
    "reduction",
]
