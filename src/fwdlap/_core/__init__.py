"""The flat-argument forward-Laplacian core. It knows nothing of pytrees.

Glossary:

- *direction*: one tangent vector pushed through a pass; a jacobian has a leading
  axis of `n` directions.
- *row*: a direction as the transforms build it, one row of a seed matrix (a unit
  vector, a weighted one, a probe); `evaluate.RowGroup` makes them a chunk at a time.
- *chunk*: a group of directions evaluated together, in one step of a `lax.scan`
  over the linearised pass (`evaluate.lap_flat_chunked`, `chunk_size`).
- *particle block*: the directions of one particle (its 3 coordinates, say), the unit
  of the block-sparse mode (`Sparsity(block_size=3)`, `sparse.SparseJac`).
- *window*: the particle blocks whose directions the dense jacobians of a sparse pass
  hold at a time (`evaluate.lap_flat_windowed`, `sparse.Window`).
"""

from . import evaluate as evaluate
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
