"""Decode paths: the ways of applying a pool's chosen experts in a forward pass.

`base.py` is the seam (routing once / per layer / SERE, shared by every path; the `DecodePath`
interface), one module per path (`xla.py`, `packed.py`, `gathered.py`, `merged.py`), and
`registry.py` the one place that lists them, checks them against a configuration, holds their
size thresholds and the candidates of `auto`.
"""
