"""`python -m adafuse_jax.train`: train and evaluate adapter pools (see `cli.py`).

From a checkout, the earlier `python -m train` runs the same command."""

import sys

from adafuse_jax.train.cli import main

if __name__ == "__main__":
  sys.exit(main())
