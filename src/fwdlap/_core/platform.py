"""Which platform the pass being traced targets: one decision for every tuned choice."""

import jax


def targets_cpu() -> bool:
    """Whether the pass being traced is meant to run on a CPU.

    Decided at trace time, from the device JAX places a computation on by default
    (`jax.default_device`, else the default backend): what a jitted call runs on.
    An AOT lowering for another platform is not seen; it gets the CPU's choice, which
    is correct there too, only tuned for the CPU.
    """
    device = jax.config.jax_default_device  # pyright: ignore[reportAttributeAccessIssue]
    if isinstance(device, str):
        return device == "cpu"
    if device is not None:
        return getattr(device, "platform", None) == "cpu"
    return jax.default_backend() == "cpu"


def under_mesh() -> bool:
    """Whether the pass is traced under a mesh (`jax.set_mesh`, explicit sharding).

    Values then carry sharding in their types, which the block-sparse layout does not
    follow: the default pass stays dense there (`sparse.seed_blocks`).
    """
    return not jax.sharding.get_abstract_mesh().empty
