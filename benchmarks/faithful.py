"""FermiNet and Psiformer at their published sizes, on real atoms and molecules.

The models of :mod:`benchmarks.models` are small networks of the same shape; these
follow the papers' descriptions at their default sizes, written here from the
papers (no project's code was copied):

- **FermiNet** (Pfau, Spencer, Matthews and Foulkes, Phys. Rev. Research 2, 033429,
  2020), in the later "full determinant" form: a one-electron stream of width 256 and
  a two-electron stream of width 32, 4 layers of tanh units with residual connections
  where the widths match. The one-electron stream starts from the electron-nucleus
  vectors and distances, the two-electron stream from the electron-electron vectors
  and distances. Each layer's one-electron input concatenates ``h_i``, the spin-up
  and spin-down means of the one-electron stream (broadcast to every electron with
  ``jnp.tile``, as the FermiNet code does) and the spin-wise means over ``j`` of the
  two-electron stream ``h_ij``. 16 determinants, each of one ``N x N`` orbital
  matrix (spin blocks not separated), orbitals times isotropic exponential envelopes
  ``sum_I pi_I exp(-|sigma_I| |r_i - R_I|)``, and ``log|sum_k det_k|`` from
  ``slogdet`` and a signed ``logsumexp``.
- **Psiformer** (von Glehn, Spencer and Pfau, ICLR 2023): electron-nucleus vectors
  and distances log-rescaled (``r -> r log(1 + |r|) / |r|``) and the electron's
  spin, projected to width 256; 4 layers of multi-head self-attention (4 heads of
  64) and a tanh MLP of width 256, each with a residual connection followed by a
  layer norm; the same 16 full determinants with envelopes; times a cusp-style
  electron-electron Jastrow factor
  ``exp(-sum_{i<j} c a^2 / (a + r_ij))`` with ``c = 1/4, a = a_par`` for
  same-spin pairs and ``c = 1/2, a = a_anti`` for opposite-spin pairs.

Every function benchmarked is ``log|psi|(x)`` for ``x`` of shape ``(3N,)``.
Parameters are drawn in float32 (with NumPy, seeded from a JAX key) and cast to the
requested dtype, as in :mod:`benchmarks.models`, so a float64 reference process sees
the same numbers.
The orbital and envelope parameters are drawn near the papers' initialisation
(``pi = sigma = 1``) with a 10% spread so that the determinants are not degenerate.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Params = dict


@dataclass(frozen=True)
class System:
    """Nuclei (positions in bohr, charges) and the numbers of up and down electrons."""

    name: str
    positions: tuple[tuple[float, float, float], ...]
    charges: tuple[int, ...]
    n_up: int
    n_down: int

    @property
    def n(self) -> int:
        """Number of electrons."""
        return self.n_up + self.n_down


O2_BOND = 2.28
"""O=O bond length of O2 in bohr (1.21 angstrom)."""

SYSTEMS: dict[str, System] = {
    "Li": System("Li", ((0.0, 0.0, 0.0),), (3,), 2, 1),
    "N": System("N", ((0.0, 0.0, 0.0),), (7,), 5, 2),
    "Ne": System("Ne", ((0.0, 0.0, 0.0),), (10,), 5, 5),
    "O2": System(
        "O2",
        ((0.0, 0.0, -O2_BOND / 2), (0.0, 0.0, O2_BOND / 2)),
        (8, 8),
        9,
        7,
    ),
    "Ge": System("Ge", ((0.0, 0.0, 0.0),), (32,), 17, 15),
}
"""Ground-state spin splits: N quartet, Ne singlet, O2 triplet, Ge triplet."""

SYSTEM_BY_N = {system.n: name for name, system in SYSTEMS.items()}
"""Electron count -> system of the benchmark grid (7: N, 10: Ne, 16: O2, 32: Ge)."""

SIZES = (7, 10, 16, 32)
"""Electron counts of the full benchmark grid."""


def system_for(n: int) -> System:
    """The named system with ``n`` electrons, else a neutral atom of charge ``n``.

    The fallback atom gets ``ceil(n/2)`` up electrons (a singlet or doublet): it keeps
    ``--sizes`` usable with any electron count.
    """
    if n in SYSTEM_BY_N:
        return SYSTEMS[SYSTEM_BY_N[n]]
    return System(f"Z={n}", ((0.0, 0.0, 0.0),), (n,), (n + 1) // 2, n // 2)


def electron_sites(system: System) -> np.ndarray:
    """The nucleus each electron starts near, distributed by nuclear charge.

    Up and down electrons are placed separately, each spin filling the nuclei in
    turn up to about half of each nucleus's charge, as a neutral molecule's
    atoms would hold them; the down electrons start their round one nucleus
    further on, so that O2's 9 up and 7 down electrons sit 8 and 8.
    """
    sites = []
    n_atom = len(system.charges)
    for spin, count in enumerate((system.n_up, system.n_down)):
        remaining = [(z + 1) // 2 for z in system.charges]
        order = [(spin + k) % n_atom for k in range(n_atom)]
        placed = 0
        while placed < count:
            progressed = False
            for atom in order:
                left = remaining[atom]
                if placed < count and left > 0:
                    sites.append(atom)
                    remaining[atom] -= 1
                    placed += 1
                    progressed = True
            if not progressed:  # more electrons than half-charges: wrap around
                remaining = [1] * len(system.charges)
    return np.asarray(sites, np.int32)


def sampler(
    system: System, scale: float = 1.0
) -> Callable[[jax.Array, int], jax.Array]:
    """Walkers: each electron in a Gaussian of width ``scale`` bohr at its nucleus."""
    nuclei = jnp.asarray(system.positions, jnp.float32)
    centres = nuclei[jnp.asarray(electron_sites(system))]  # (N, 3)

    def sample(key: jax.Array, batch: int) -> jax.Array:
        off = scale * jax.random.normal(key, (batch, system.n, 3), jnp.float32)
        return (centres[None] + off).reshape(batch, 3 * system.n)

    return sample


# --------------------------------------------------------------------------- helpers


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key.

    Parameters are drawn with NumPy: drawing them with ``jax.random`` compiles one
    small XLA program per shape, which took longer than the models' own
    compilation.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 draws."""
    return rng.standard_normal(shape, dtype=np.float32)


def linear_init(
    rng: np.random.Generator, fan_in: int, fan_out: int, bias: bool = True
) -> Params:
    """A float32 dense layer with ``1/sqrt(fan_in)``-scaled normal weights."""
    p = {"w": normal(rng, (fan_in, fan_out)) / np.float32(np.sqrt(fan_in))}
    if bias:
        p["b"] = np.zeros((fan_out,), np.float32)
    return p


def linear(p: Params, h: jax.Array) -> jax.Array:
    """Applies a dense layer to the last axis of ``h``."""
    out = h @ p["w"]
    return out + p["b"] if "b" in p else out


_WEIGHT_NOISE: list[tuple[float, np.random.Generator]] = []
"""The active :func:`perturbed_weights` setting, if any (innermost last)."""


@contextlib.contextmanager
def perturbed_weights(relative: float, seed: int) -> Iterator[None]:
    """Networks built inside have every parameter multiplied by ``1 + relative * u``.

    ``u`` is uniform in ``[-1, 1]``, drawn per entry from ``seed``. With ``relative``
    the float32 unit roundoff, evaluating such a network in float64 shows how much
    the Laplacian moves under rounding-sized changes of the weights alone, a measure
    of its conditioning (``benchmarks.accuracy``). A ``relative`` of 0 changes
    nothing.
    """
    if not relative:
        yield
        return
    _WEIGHT_NOISE.append((relative, np.random.default_rng(seed)))
    try:
        yield
    finally:
        _WEIGHT_NOISE.pop()


def cast(tree, dtype):
    """Casts every leaf of ``tree`` to ``dtype`` (perturbed in `perturbed_weights`)."""
    if not _WEIGHT_NOISE:
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)
    relative, rng = _WEIGHT_NOISE[-1]

    def perturb(a):
        a = np.asarray(a, np.float64)
        return jnp.asarray(a * (1 + relative * rng.uniform(-1, 1, a.shape)), dtype)

    return jax.tree_util.tree_map(perturb, tree)


def electron_nucleus(r: jax.Array, nuclei: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Vectors ``r_i - R_I`` ``(N, A, 3)`` and distances ``(N, A)``."""
    ae = r[:, None, :] - nuclei[None, :, :]
    return ae, jnp.sqrt(jnp.sum(ae**2, axis=-1))


def electron_electron(r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Vectors ``r_i - r_j`` ``(N, N, 3)`` and distances ``(N, N)``.

    The distance of an electron to itself is zero, but ``sqrt`` has no derivative
    at zero: adding the identity under the root and masking the diagonal back to
    zero keeps every derivative finite.
    """
    n = r.shape[0]
    ee = r[:, None, :] - r[None, :, :]
    eye = jnp.eye(n, dtype=r.dtype)
    return ee, jnp.sqrt(jnp.sum(ee**2, axis=-1) + eye) * (1.0 - eye)


# ------------------------------------------------------------ orbitals + determinants


def init_orbitals(
    rng: np.random.Generator, width: int, system: System, n_det: int
) -> Params:
    """Per-spin orbital layers and envelopes for ``n_det`` full determinants."""
    n, n_atom = system.n, len(system.charges)
    params = {}
    for spin in ("up", "down"):
        params[spin] = {
            "lin": linear_init(rng, width, n_det * n),
            "pi": 1.0 + 0.1 * normal(rng, (n_atom, n_det * n)),
            "sigma": 1.0 + 0.1 * normal(rng, (n_atom, n_det * n)),
        }
    return params


def full_determinants(
    p: Params, h: jax.Array, r_ae: jax.Array, system: System, n_det: int
) -> tuple[jax.Array, jax.Array]:
    """``log|sum_k det_k|`` over ``n_det`` full ``N x N`` orbital matrices.

    Orbital ``j`` of determinant ``k`` at electron ``i`` is
    ``(w_kj . h_i + b_kj) * sum_I pi_kjI exp(-|sigma_kjI| r_iI)``, with weights
    chosen by electron ``i``'s spin; every electron enters every orbital, so each
    determinant is of one ``N x N`` matrix. The determinants are summed in log
    space with their signs; returns ``(sign, log|sum|)``.
    """
    n, n_up = system.n, system.n_up
    rows = []
    for spin, sl in (("up", slice(0, n_up)), ("down", slice(n_up, n))):
        if sl.stop - sl.start == 0:
            continue
        q = p[spin]
        env = jnp.exp(-jnp.abs(q["sigma"])[None] * r_ae[sl][:, :, None])
        env = jnp.sum(q["pi"][None] * env, axis=1)  # (n_s, n_det * N)
        rows.append(linear(q["lin"], h[sl]) * env)
    orb = jnp.concatenate(rows, axis=0).reshape(n, n_det, n)
    sign, logdet = jnp.linalg.slogdet(jnp.transpose(orb, (1, 0, 2)))
    logabs, total_sign = jax.nn.logsumexp(logdet, b=sign, return_sign=True)
    return total_sign, logabs


# ------------------------------------------------------------------------- FermiNet


def build_ferminet_paper(
    n: int,
    key: jax.Array,
    dtype,
    layers: int = 4,
    width1: int = 256,
    width2: int = 32,
    n_det: int = 16,
    system: System | None = None,
    signed: bool = False,
):
    """The published FermiNet (full determinants) for the system with ``n`` electrons.

    ``layers``, ``width1``, ``width2`` and ``n_det`` default to the paper's values;
    tests use smaller ones. ``system`` overrides :func:`system_for`. With
    ``signed=True`` the model's ``fn`` returns ``(sign psi, log|psi|)``.
    """
    from benchmarks.models import Model

    system = system or system_for(n)
    n, n_up = system.n, system.n_up
    n_atom = len(system.charges)
    rng = numpy_rng(key)
    in1, in2 = 4 * n_atom, 4
    layer_params = []
    for i in range(layers):
        entry = {"one": linear_init(rng, 3 * in1 + 2 * in2, width1)}
        # The last layer's two-electron output would feed nothing: the orbitals
        # read the one-electron stream only.
        if i < layers - 1:
            entry["two"] = linear_init(rng, in2, width2)
        layer_params.append(entry)
        in1, in2 = width1, width2
    params = cast(
        {
            "layers": layer_params,
            "orbitals": init_orbitals(rng, width1, system, n_det),
        },
        dtype,
    )
    nuclei = jnp.asarray(system.positions, dtype)

    def symmetric_features(h1: jax.Array, h2: jax.Array) -> jax.Array:
        """``[h_i, mean_up h, mean_down h, mean_up_j h_ij, mean_down_j h_ij]``."""
        parts = [h1]
        for sl in (slice(0, n_up), slice(n_up, n)):
            if sl.stop > sl.start:
                g = jnp.mean(h1[sl], axis=0, keepdims=True)
            else:
                g = jnp.zeros((1, h1.shape[1]), h1.dtype)
            parts.append(jnp.tile(g, (n, 1)))
        for sl in (slice(0, n_up), slice(n_up, n)):
            if sl.stop > sl.start:
                parts.append(jnp.mean(h2[:, sl], axis=1))
            else:
                parts.append(jnp.zeros((n, h2.shape[2]), h2.dtype))
        return jnp.concatenate(parts, axis=-1)

    def split_layer(p: Params, h1: jax.Array, h2: jax.Array) -> jax.Array:
        """``linear(p, symmetric_features(h1, h2))`` with the product split.

        The spin means of ``h1`` are the same for every electron: multiplied by
        their rows of the weights before broadcasting, they cost one row each
        instead of ``N``. This is the floor's FermiNet (see ``Model.floor_fn``).
        """
        w, b = p["w"], p["b"]
        d1, d2 = h1.shape[1], h2.shape[2]
        out = h1 @ w[:d1] + b
        for k, sl in enumerate((slice(0, n_up), slice(n_up, n))):
            if sl.stop > sl.start:
                g = jnp.mean(h1[sl], axis=0, keepdims=True)
                out = out + g @ w[(k + 1) * d1 : (k + 2) * d1]
                start = 3 * d1 + k * d2
                out = out + jnp.mean(h2[:, sl], axis=1) @ w[start : start + d2]
        return out

    def network(x: jax.Array, split: bool):
        r = x.reshape(n, 3)
        ae, r_ae = electron_nucleus(r, nuclei)
        ee, r_ee = electron_electron(r)
        h1 = jnp.concatenate([ae, r_ae[..., None]], axis=-1).reshape(n, 4 * n_atom)
        h2 = jnp.concatenate([ee, r_ee[..., None]], axis=-1)
        for p in params["layers"]:
            if split:
                new1 = jnp.tanh(split_layer(p["one"], h1, h2))
            else:
                new1 = jnp.tanh(linear(p["one"], symmetric_features(h1, h2)))
            h1 = new1 + h1 if new1.shape == h1.shape else new1
            if "two" in p:
                new2 = jnp.tanh(linear(p["two"], h2))
                h2 = new2 + h2 if new2.shape == h2.shape else new2
        sign, logabs = full_determinants(params["orbitals"], h1, r_ae, system, n_det)
        return (sign, logabs) if signed else logabs

    def fn(x: jax.Array):
        return network(x, split=False)

    def floor_fn(x: jax.Array):
        return network(x, split=True)

    return Model("ferminet_paper", n, 3 * n, fn, sampler(system), floor_fn)


# ------------------------------------------------------------------------ Psiformer


def layer_norm(p: Params, h: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Layer norm over the last axis with a learned scale and offset."""
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.var(h, axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["offset"]


def multi_head_attention(p: Params, h: jax.Array, heads: int) -> jax.Array:
    """Self-attention over the electrons; ``h`` is ``(N, width)``."""
    n, width = h.shape
    d = p["q"].shape[1] // heads
    q = (h @ p["q"]).reshape(n, heads, d)
    k = (h @ p["k"]).reshape(n, heads, d)
    v = (h @ p["v"]).reshape(n, heads, d)
    weights = jax.nn.softmax(jnp.einsum("ihd,jhd->hij", q, k) / np.sqrt(d), axis=-1)
    out = jnp.einsum("hij,jhd->ihd", weights, v).reshape(n, heads * d)
    return out @ p["o"]


def build_psiformer_paper(
    n: int,
    key: jax.Array,
    dtype,
    layers: int = 4,
    width: int = 256,
    heads: int = 4,
    head_dim: int = 64,
    mlp_width: int = 256,
    n_det: int = 16,
    system: System | None = None,
    signed: bool = False,
):
    """The published Psiformer for the system with ``n`` electrons.

    The defaults are the paper's; tests use smaller ones. ``mlp_width`` must equal
    ``width`` for the MLP's residual connection (the paper's choice). With
    ``signed=True`` the model's ``fn`` returns ``(sign psi, log|psi|)``.
    """
    from benchmarks.models import Model

    system = system or system_for(n)
    n, n_up = system.n, system.n_up
    n_atom = len(system.charges)
    rng = numpy_rng(key)
    embed = linear_init(rng, 4 * n_atom + 1, width, bias=False)
    layer_params = []
    for _ in range(layers):
        layer_params.append(
            {
                "q": linear_init(rng, width, heads * head_dim, bias=False)["w"],
                "k": linear_init(rng, width, heads * head_dim, bias=False)["w"],
                "v": linear_init(rng, width, heads * head_dim, bias=False)["w"],
                "o": linear_init(rng, heads * head_dim, width, bias=False)["w"],
                "ln1": {"scale": np.ones(width), "offset": np.zeros(width)},
                "mlp": linear_init(rng, width, mlp_width),
                "ln2": {"scale": np.ones(width), "offset": np.zeros(width)},
            }
        )
    params = cast(
        {
            "embed": embed,
            "layers": layer_params,
            "orbitals": init_orbitals(rng, width, system, n_det),
            "jastrow": 1.0 + 0.1 * normal(rng, (2,)),
        },
        dtype,
    )
    nuclei = jnp.asarray(system.positions, dtype)
    spins = np.concatenate([np.ones(n_up), -np.ones(n - n_up)])
    spin_col = jnp.asarray(spins[:, None], dtype)
    upper = np.triu(np.ones((n, n)), k=1)
    same = upper * (spins[:, None] == spins[None, :])
    same_mask = jnp.asarray(same, dtype)
    anti_mask = jnp.asarray(upper - same, dtype)

    def jastrow(r_ee: jax.Array) -> jax.Array:
        """``-sum_{i<j} c a^2 / (a + r_ij)``: the electron-electron cusps."""
        a_par, a_anti = params["jastrow"][0], params["jastrow"][1]
        par = -0.25 * a_par**2 / (a_par + r_ee)
        anti = -0.5 * a_anti**2 / (a_anti + r_ee)
        return jnp.sum(same_mask * par + anti_mask * anti)

    def fn(x: jax.Array) -> jax.Array:
        r = x.reshape(n, 3)
        ae, r_ae = electron_nucleus(r, nuclei)
        log_r = jnp.log1p(r_ae)
        scaled = ae * (log_r / r_ae)[..., None]
        feats = jnp.concatenate(
            [jnp.concatenate([scaled, log_r[..., None]], -1).reshape(n, -1), spin_col],
            axis=-1,
        )
        h = linear(params["embed"], feats)
        for p in params["layers"]:
            h = layer_norm(p["ln1"], h + multi_head_attention(p, h, heads))
            h = layer_norm(p["ln2"], h + jnp.tanh(linear(p["mlp"], h)))
        _, r_ee = electron_electron(r)
        sign, logdet = full_determinants(params["orbitals"], h, r_ae, system, n_det)
        logabs = logdet + jastrow(r_ee)
        return (sign, logabs) if signed else logabs

    return Model("psiformer_paper", n, 3 * n, fn, sampler(system))


BUILDERS = {
    "ferminet_paper": build_ferminet_paper,
    "psiformer_paper": build_psiformer_paper,
}
"""Model name -> builder ``(n, key, dtype) -> Model`` (registered in ``models``)."""
