"""Benchmark models: scalar functions of one configuration, in plain JAX.

Every builder returns a :class:`Model` whose ``fn`` maps one configuration ``x``
(shape ``(dim,)``) to a scalar: ``log|psi|`` for the wavefunction-shaped models,
``u(x)`` for the PINN. Parameters are drawn in float32 from a PRNG key and then
cast to the requested dtype, so a float64 reference process and a float32
timing process see the same numbers.
"""

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import faithful

Params = dict[str, jax.Array]

PINN_DIM = 50
"""Input dimension of the PINN model (it does not depend on ``N``)."""

NUCLEI = ((0.0, 0.0, -1.0), (0.0, 0.0, 1.0))
"""Positions of the two nuclei of the wavefunction-shaped models."""


@dataclass(frozen=True)
class Model:
    """A benchmark model bound to its parameters.

    Attributes:
        name: registry name of the model.
        n: number of electrons (``None`` for the PINN).
        dim: size of one flat configuration ``x``.
        fn: ``x -> scalar``.
        sample: ``(key, batch) -> (batch, dim)`` configurations.
        floor_fn: the same function written to do the least arithmetic, which the
            ``floor`` method evaluates instead of ``fn`` when set (FermiNet's layer
            products with the broadcast spin means split, as fwdlap does).
    """

    name: str
    n: int | None
    dim: int
    fn: Callable[[jax.Array], jax.Array]
    sample: Callable[[jax.Array, int], jax.Array]
    floor_fn: Callable[[jax.Array], jax.Array] | None = None


def method_input(model: Model, method: str) -> Callable[[jax.Array], jax.Array]:
    """The function ``method`` differentiates: ``floor_fn`` for ``floor`` if set."""
    if method == "floor" and model.floor_fn is not None:
        return model.floor_fn
    return model.fn


# --------------------------------------------------------------------------- helpers


def dense_init(key: jax.Array, fan_in: int, fan_out: int) -> Params:
    """Draws a float32 dense layer with ``1/sqrt(fan_in)`` scaled weights."""
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def dense(p: Params, h: jax.Array) -> jax.Array:
    """Applies a dense layer to the last axis of ``h``."""
    return h @ p["w"] + p["b"]


def cast_tree(tree, dtype):
    """Casts every floating leaf of ``tree`` to ``dtype``."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def safe_norm(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Euclidean norm over the last axis with a finite derivative at zero."""
    return jnp.sqrt(jnp.sum(v**2, axis=-1) + eps)


def pair_features(r: jax.Array) -> jax.Array:
    """Two-electron features ``(r_i - r_j, |r_i - r_j|)`` of shape ``(N, N, 4)``.

    The diagonal distance is masked rather than differentiated through ``sqrt(0)``:
    adding the identity under the square root keeps every derivative finite, and
    multiplying by ``1 - I`` sets the diagonal distance back to an exact zero.
    """
    n = r.shape[0]
    diff = r[:, None, :] - r[None, :, :]
    eye = jnp.eye(n, dtype=r.dtype)
    dist = jnp.sqrt(jnp.sum(diff**2, axis=-1) + eye) * (1.0 - eye)
    return jnp.concatenate([diff, dist[..., None]], axis=-1)


def nuclear_offsets(r: jax.Array, nuclei: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Electron-nucleus vectors ``(N, A, 3)`` and distances ``(N, A)``."""
    diff = r[:, None, :] - nuclei[None, :, :]
    return diff, safe_norm(diff)


def sample_electrons(
    nuclei: jax.Array, n: int
) -> Callable[[jax.Array, int], jax.Array]:
    """Returns a sampler placing electrons in unit Gaussians around the nuclei."""

    def sample(key: jax.Array, batch: int) -> jax.Array:
        k_atom, k_off = jax.random.split(key)
        atom = jax.random.randint(k_atom, (batch, n), 0, nuclei.shape[0], jnp.int32)
        off = jax.random.normal(k_off, (batch, n, 3), jnp.float32)
        return (nuclei[atom] + off).reshape(batch, n * 3)

    return sample


# ------------------------------------------------------------ orbitals + determinants


def init_orbitals(key: jax.Array, width: int, n_spin: int, n_atom: int, n_det: int):
    """Draws orbital and envelope parameters for one spin block."""
    k_w, k_pi, k_sig = jax.random.split(key, 3)
    n_orb = n_det * n_spin
    return {
        "lin": dense_init(k_w, width, n_orb),
        "pi": 1.0 + 0.1 * jax.random.normal(k_pi, (n_atom, n_orb), jnp.float32),
        "sigma": 1.0 + 0.1 * jax.random.normal(k_sig, (n_atom, n_orb), jnp.float32),
    }


def orbital_logdets(p, h: jax.Array, dist: jax.Array, n_det: int):
    """Signs and log|det| of the ``n_det`` orbital matrices of one spin block.

    ``h`` holds the block's electron features ``(n_s, width)`` and ``dist`` their
    distances to the nuclei ``(n_s, A)``. Each orbital is a linear map of ``h``
    times an exponential envelope ``sum_I pi_I exp(-sigma_I |r_i - R_I|)``.
    """
    n_s = h.shape[0]
    env = jnp.exp(-jnp.abs(p["sigma"])[None] * dist[:, :, None])  # (n_s, A, n_orb)
    env = jnp.sum(p["pi"][None] * env, axis=1)
    orb = (dense(p["lin"], h) * env).reshape(n_s, n_det, n_s)
    return jnp.linalg.slogdet(jnp.transpose(orb, (1, 0, 2)))


def combine_determinants(blocks) -> jax.Array:
    """``log|sum_k prod_s det_{k,s}|`` from per-block ``(sign, logdet)`` pairs."""
    sign = jnp.prod(jnp.stack([s for s, _ in blocks]), axis=0)
    logdet = jnp.sum(jnp.stack([ld for _, ld in blocks]), axis=0)
    if logdet.shape[0] == 1:
        return logdet[0]
    return jax.nn.logsumexp(logdet, b=sign, return_sign=True)[0]


def spin_counts(n: int) -> tuple[int, int]:
    """Numbers of up and down electrons (``N/2`` each, up gets the odd one)."""
    return (n + 1) // 2, n // 2


# ------------------------------------------------------------------------- models


def init_mlp(key: jax.Array, sizes: list[int]) -> list[Params]:
    """Draws the float32 dense layers of an MLP with layer ``sizes``."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    keys = jax.random.split(key, len(pairs))
    return [dense_init(k, a, b) for k, (a, b) in zip(keys, pairs, strict=True)]


def apply_mlp(params: list[Params], x: jax.Array) -> jax.Array:
    """A tanh MLP with a linear last layer, returning a scalar."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(dense(layer, h))
    return dense(params[-1], h)[0]


def build_mlp(n: int, key: jax.Array, dtype, width: int = 256, depth: int = 3):
    """A tanh MLP on the ``3N`` coordinates (``depth`` hidden layers)."""
    dim = 3 * n
    params = cast_tree(init_mlp(key, [dim] + [width] * depth + [1]), dtype)
    nuclei = jnp.asarray(NUCLEI, jnp.float32)
    return Model(
        "mlp", n, dim, lambda x: apply_mlp(params, x), sample_electrons(nuclei, n)
    )


def build_particle_mlp(n: int, key: jax.Array, dtype, width: int = 128, depth: int = 3):
    """A per-particle tanh MLP: ``sum_i MLP(r_i)``, each term sees one electron.

    The extreme case for block-sparse jacobians: every intermediate depends on one
    electron's 3 coordinates until the final sum.
    """
    params = cast_tree(init_mlp(key, [3] + [width] * depth + [1]), dtype)
    nuclei = jnp.asarray(NUCLEI, jnp.float32)

    def fn(x: jax.Array) -> jax.Array:
        h = x.reshape(n, 3)
        for layer in params[:-1]:
            h = jnp.tanh(dense(layer, h))
        return jnp.sum(dense(params[-1], h))

    return Model("particle_mlp", n, 3 * n, fn, sample_electrons(nuclei, n))


def build_pinn(n: int | None, key: jax.Array, dtype):
    """A PINN-style tanh MLP ``D -> 768 -> 768 -> 512 -> 512 -> 1`` with ``D = 50``."""
    del n
    params = cast_tree(init_mlp(key, [PINN_DIM, 768, 768, 512, 512, 1]), dtype)

    def sample(key: jax.Array, batch: int) -> jax.Array:
        return jax.random.uniform(key, (batch, PINN_DIM), jnp.float32, -1.0, 1.0)

    return Model("pinn", None, PINN_DIM, lambda x: apply_mlp(params, x), sample)


def build_ferminet(
    n: int,
    key: jax.Array,
    dtype,
    layers: int = 3,
    width1: int = 64,
    width2: int = 16,
    n_det: int = 2,
):
    """A FermiNet-shaped ``log|psi|`` for ``n`` electrons around two nuclei.

    One-electron stream: ``(r_i - R_I, |r_i - R_I|)``; two-electron stream:
    ``(r_i - r_j, |r_i - r_j|)``. Each layer feeds the spin-wise means of both
    streams into the one-electron stream, then orbitals with exponential
    envelopes go through ``slogdet`` per spin block and ``n_det`` determinants
    are summed with their signs.
    """
    nuclei = jnp.asarray(NUCLEI, jnp.float32)
    n_atom = nuclei.shape[0]
    n_up, n_down = spin_counts(n)
    k_layers, k_up, k_down = jax.random.split(key, 3)
    in1, in2 = 4 * n_atom, 4
    layer_params = []
    for k in jax.random.split(k_layers, layers):
        k1, k2 = jax.random.split(k)
        layer_params.append(
            {
                "one": dense_init(k1, 3 * in1 + 2 * in2, width1),
                "two": dense_init(k2, in2, width2),
            }
        )
        in1, in2 = width1, width2
    params = cast_tree(
        {
            "layers": layer_params,
            "up": init_orbitals(k_up, width1, n_up, n_atom, n_det),
            "down": init_orbitals(k_down, width1, n_down, n_atom, n_det),
        },
        dtype,
    )
    nuc = nuclei.astype(dtype)

    def spin_means(h: jax.Array, axis: int) -> list[jax.Array]:
        """Means of ``h`` over the up and the down electrons along ``axis``."""
        up, down = jnp.split(h, [n_up], axis=axis)
        means = [jnp.mean(up, axis=axis)]
        if n_down:
            means.append(jnp.mean(down, axis=axis))
        else:
            means.append(jnp.zeros_like(means[0]))
        return means

    def fn(x: jax.Array) -> jax.Array:
        r = x.reshape(n, 3)
        diff, dist = nuclear_offsets(r, nuc)
        h1 = jnp.concatenate([diff, dist[..., None]], axis=-1).reshape(n, -1)
        h2 = pair_features(r)
        for p in params["layers"]:
            g1 = [jnp.broadcast_to(m, h1.shape) for m in spin_means(h1, 0)]
            g2 = spin_means(h2, 1)
            f = jnp.concatenate([h1, *g1, *g2], axis=-1)
            new1 = jnp.tanh(dense(p["one"], f))
            new2 = jnp.tanh(dense(p["two"], h2))
            h1 = new1 + h1 if new1.shape == h1.shape else new1
            h2 = new2 + h2 if new2.shape == h2.shape else new2
        blocks = [orbital_logdets(params["up"], h1[:n_up], dist[:n_up], n_det)]
        if n_down:
            blocks.append(
                orbital_logdets(params["down"], h1[n_up:], dist[n_up:], n_det)
            )
        return combine_determinants(blocks)

    return Model("ferminet", n, 3 * n, fn, sample_electrons(nuclei, n))


def init_attention(key: jax.Array, width: int) -> Params:
    """Draws the query/key/value/output projections and the MLP of one block."""
    kq, kk, kv, ko, km = jax.random.split(key, 5)
    return {
        "q": dense_init(kq, width, width)["w"],
        "k": dense_init(kk, width, width)["w"],
        "v": dense_init(kv, width, width)["w"],
        "o": dense_init(ko, width, width)["w"],
        "mlp": dense_init(km, width, width),
    }


def self_attention(p: Params, h: jax.Array, heads: int) -> jax.Array:
    """Multi-head self-attention over electrons (``h`` is ``(N, width)``)."""
    n, width = h.shape
    d = width // heads

    def split(w: jax.Array) -> jax.Array:
        return (h @ w).reshape(n, heads, d)

    q, k, v = split(p["q"]), split(p["k"]), split(p["v"])
    scores = jnp.einsum("ihd,jhd->hij", q, k) / np.sqrt(d)
    attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hij,jhd->ihd", attn, v).reshape(n, width)
    return out @ p["o"]


def build_psiformer(
    n: int,
    key: jax.Array,
    dtype,
    blocks: int = 2,
    width: int = 64,
    heads: int = 4,
    n_det: int = 2,
):
    """A Psiformer-shaped ``log|psi|`` for ``n`` electrons around two nuclei.

    Per-electron embedding of rescaled electron-nucleus vectors, distances and
    spin; ``blocks`` layernorm-free blocks of multi-head self-attention and a tanh
    MLP, both residual; orbitals with exponential envelopes and ``slogdet`` per
    spin block.
    """
    nuclei = jnp.asarray(NUCLEI, jnp.float32)
    n_atom = nuclei.shape[0]
    n_up, n_down = spin_counts(n)
    k_emb, k_blocks, k_up, k_down = jax.random.split(key, 4)
    params = cast_tree(
        {
            "embed": dense_init(k_emb, 4 * n_atom + 1, width),
            "blocks": [
                init_attention(k, width) for k in jax.random.split(k_blocks, blocks)
            ],
            "up": init_orbitals(k_up, width, n_up, n_atom, n_det),
            "down": init_orbitals(k_down, width, n_down, n_atom, n_det),
        },
        dtype,
    )
    nuc = nuclei.astype(dtype)
    spins = jnp.concatenate([jnp.ones(n_up), -jnp.ones(n_down)]).astype(dtype)

    def fn(x: jax.Array) -> jax.Array:
        r = x.reshape(n, 3)
        diff, dist = nuclear_offsets(r, nuc)
        scale = jnp.log1p(dist)
        feats = jnp.concatenate(
            [(diff * (scale / dist)[..., None]).reshape(n, -1), scale, spins[:, None]],
            axis=-1,
        )
        h = dense(params["embed"], feats)
        for p in params["blocks"]:
            h = h + self_attention(p, h, heads)
            h = h + jnp.tanh(dense(p["mlp"], h))
        det_blocks = [orbital_logdets(params["up"], h[:n_up], dist[:n_up], n_det)]
        if n_down:
            det_blocks.append(
                orbital_logdets(params["down"], h[n_up:], dist[n_up:], n_det)
            )
        return combine_determinants(det_blocks)

    return Model("psiformer", n, 3 * n, fn, sample_electrons(nuclei, n))


BUILDERS = {
    "mlp": build_mlp,
    "ferminet": build_ferminet,
    "psiformer": build_psiformer,
    "particle_mlp": build_particle_mlp,
    "pinn": build_pinn,
    **faithful.BUILDERS,
}
"""Model name -> builder ``(n, key, dtype) -> Model``."""

SIZE_FREE = frozenset({"pinn"})
"""Models whose size does not depend on ``N`` (run once, at a fixed ``D``)."""


def build(name: str, n: int | None, seed: int = 0, dtype=jnp.float32) -> Model:
    """Builds model ``name`` for ``n`` electrons from ``seed`` in ``dtype``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[name](n, jax.random.key(seed), dtype)


def sample_configs(model: Model, batch: int, seed: int = 1) -> jax.Array:
    """Draws ``batch`` float32 configurations for ``model`` from ``seed``."""
    return model.sample(jax.random.key(seed), batch)
