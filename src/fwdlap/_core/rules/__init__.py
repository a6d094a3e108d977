"""Forward-Laplacian rules, one module per family; importing one registers its rules.

`fwdlap._core` imports them all. This package imports none of them itself, so that
the core modules (the trace, the registry) may import the few they use without a
cycle.
"""
