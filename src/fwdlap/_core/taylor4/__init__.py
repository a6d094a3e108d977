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

It is a pass of the same core as the forward Laplacian: its rules are the `taylor4`
field of the one rule table (`registry.rules`), registered by the same family helpers
(`rules.families`) from the same descriptions of a primitive (an elementwise
primitive's one derivative table, a linear primitive's map, a product's operands).

Modules:

- `series`: the pass's `Context` (the layout of the coefficients) and the symbolic
  zeros of a series.
- `trace`: `Taylor4Trace` / `Taylor4Tracer`, the flat driver `taylor4_flat` and the
  jaxpr transform `taylor4_jaxpr` used by the control-flow rules.
- `rules`: the fourth-order rules of the families (linear, piecewise constant,
  elementwise, bilinear, `div`), which the family helpers register.
- `generic`: the rule of a primitive without one (nested JVPs); `custom`: that of a
  `custom_jvp` function (its JVP rule differentiated).
- `moments`: the exact designs and the moments-layout rules (elementwise, bilinear,
  generic), which the rules dispatch to when `Context.moments` is set.
- `control_flow`: `scan`, `while` and `cond` (bodies transformed, carries found by a
  fixpoint), added to the control-flow entries of the table on import.

Symbolic zeros (`Zero`) are never instantiated inside the pass, and a value whose four
coefficients are all zero is not wrapped in a tracer.

As for `rules`, this package imports none of its modules itself: the family helpers
import `rules` while the table is being filled, before the trace can be imported.
"""
