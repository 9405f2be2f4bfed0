"""`python -m adafuse_jax.bench` (see `cli.py`)."""

import sys

from adafuse_jax.bench.cli import main

if __name__ == "__main__":
  sys.exit(main())
