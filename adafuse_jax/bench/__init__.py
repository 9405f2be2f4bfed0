"""`python -m adafuse_jax.bench`: the decode benchmark. `cli.py` is the command, `measure.py` the
measurement library (bytes, floors, timed decode and prefill of one configuration). The library
never imports this package."""
