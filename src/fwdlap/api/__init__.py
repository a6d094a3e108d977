"""The typed pytree API over the flat core."""

from ._lap import lap as lap
from ._lap import lap_partial as lap_partial
