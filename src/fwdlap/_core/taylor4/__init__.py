r"""Collapsed fourth-order Taylor mode: the biharmonic $\Delta^2 f$ in one forward pass.

A value $x$ inside the pass carries the Taylor coefficients of $x(x_0 + t v)$ in $t$
for each of $n$ directions $v_k$: coefficients 1 to 3 per direction (arrays with a
leading axis of $n$) and coefficient 4 *collapsed*, summed over the directions with
signs $s_k = \pm 1$ as the pass goes:

$$X_4 = \sum_k s_k\, x_4(v_k).$$

This works because the fourth coefficient of an output is linear in the inputs'
fourth coefficients (through the primitive's first derivative) plus terms in the
lower ones only, so the signed sum commutes with every primitive (Dangel et al.,
"Collapsing Taylor Mode Automatic Differentiation", NeurIPS 2025). For an input seeded
with $x(t) = x_0 + t v_k$, the output's $X_4$ is
$\sum_k s_k D^4_{v_k} f / 4!$.

The exact biharmonic uses the *moments* layout instead (`moments`): with a design
whose fourth moments are those of $|x|^4$, coefficients 1-3 are carried as the
gradient, the packed second-order tensor and the once-contracted third-order tensor,
$d(d+1)/2 + 2d$ rows, whatever the number of directions.

Modules:

- `trace`: `Taylor4Trace` / `Taylor4Tracer`, the flat driver `taylor4_flat` and the
  jaxpr transform `taylor4_jaxpr` used by the control-flow rules.
- `rules`: the rule table (`rules.RULES`) with the `def_linear`, `def_elementwise`,
  `def_bilinear` and `def_zero` helpers, the generic nested-JVP fallback and the
  custom_jvp rule.
- `moments`: the exact designs and the moments-layout rules (elementwise, bilinear,
  generic), which `rules` dispatches to when `Context.moments` is set.
- `control_flow`: `scan`, `while` and `cond` (bodies transformed, carries found by a
  fixpoint).

Symbolic zeros (`Zero`) are never instantiated inside the pass, and a value whose four
coefficients are all zero is not wrapped in a tracer.
"""

from . import control_flow as control_flow
from .trace import Context as Context
from .trace import Taylor4Trace as Taylor4Trace
from .trace import Taylor4Tracer as Taylor4Tracer
from .trace import taylor4_flat as taylor4_flat
from .trace import taylor4_jaxpr as taylor4_jaxpr
