"""Dynamic adapters as weights: expert pools, routers, the mixture that holds them, SERE's
expert similarity, and saving/loading (orbax). Applying them in a forward pass is
`adafuse_jax.paths`' business."""
