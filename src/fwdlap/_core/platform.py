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

    Values then carry the mesh in their types, and constants that the pass brings in
    must carry it too (`on_context_mesh`).
    """
    return not jax.sharding.get_abstract_mesh().empty


def on_context_mesh(constant: jax.Array) -> jax.Array:
    """`constant` replicated on the mesh set by `jax.set_mesh`, if one is set.

    A NumPy constant brought into a trace has no mesh in its type, and JAX's batching
    rules cannot combine it with values that carry one (explicitly sharded walkers
    under `jax.vmap`). Without a mesh, `constant` is returned as it is.
    """
    if not under_mesh():
        return constant
    return jax.sharding.reshard(constant, jax.sharding.PartitionSpec())
