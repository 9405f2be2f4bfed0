"""Training and evaluation of expert pools + routers on a frozen backbone (`python -m adafuse_jax.train`).

Installed as `adafuse_jax.train` (pyproject maps this folder there), so no top-level `train`
name is added to a user's environment."""

from adafuse_jax.train import data  # noqa: E402
from adafuse_jax.train.eval import heatmap, routing_by_domain  # noqa: E402
from adafuse_jax.train.loop import TRAIN_MODES, TrainConfig, Trainer  # noqa: E402

__all__ = ["TRAIN_MODES", "TrainConfig", "Trainer", "data", "heatmap", "routing_by_domain"]
