"""Partial stub for `jaxlib._jax`, JAX's compiled extension, which ships no stubs.

Only the names fwdlap's annotations meet are spelled out (the pytree module and
`Device`); every other attribute is `Any`, as it was without the stub.
"""

from typing import Any

from . import pytree as pytree

class Device:
    id: int
    platform: str
    device_kind: str
    def __getattr__(self, name: str) -> Any: ...

def __getattr__(name: str) -> Any: ...
