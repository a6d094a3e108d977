"""The flat-argument forward-Laplacian core. It knows nothing of pytrees."""

from . import rules as rules
from .registry import register as register

# Importing a rule module registers its rules.
from .rules import (  # noqa: F401
    bilinear,
    control_flow,
    custom,
    elementwise,
    linalg,
    linear,
    reduction,
)

# The fourth-order loops and branches join the control-flow entries made above.
from .taylor4 import control_flow as taylor4_control_flow  # noqa: F401
from .trace import LapTrace as LapTrace
from .trace import LapTracer as LapTracer
from .transform import lap_flat as lap_flat
from .transform import lap_partial_flat as lap_partial_flat
from .zeros import Zero as Zero
from .zeros import zero_tangent_from_primal as zero_tangent_from_primal
