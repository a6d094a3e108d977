"""The typed pytree API over the flat core."""

from ._filter import lap_filter as lap_filter
from ._lap import lap as lap
from ._lap import lap_partial as lap_partial
