"""Training expert pools + routers on a frozen backbone with optax, checkpointed with orbax.

Choices (stated, as the issue asks):
- The backbone is frozen and held in the device's dtype (bf16 on a GPU, f32 on the CPU); the
  adapter weights and the optimizer state are f32. The loss is computed in f32.
- AdamW, linear warm-up then cosine decay, global-norm clipping at 1.0.
- Loss = next-token cross-entropy + `aux_coef` x Switch-style load-balancing loss (mean over the
  routing decisions of the step: one for "pregated", one per adapted module and layer for
  "layerwise").
- Mixed-domain batches: row i of step s reads domain (i + s) mod D at an offset drawn from
  `default_rng([seed, s])`. The batch of a step depends on (seed, step) alone, so the data
  position is the step, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from adafuse_jax import parallel
from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.config import AdapterConfig
from adafuse_jax.errors import UserError
from adafuse_jax.file_digests import damaged_files, folder_digests
from adafuse_jax.adapters.pool import AdapterParam, RouterParam
from adafuse_jax.model.cache import KVCache
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.adapters.routing import load_balancing_loss
from adafuse_jax.paths import registry
from adafuse_jax.vocab import Mode, parse_mode

# Training recipes: an adapter mode, optionally with a variant of its pool (per-layer gates, a
# shared expert, routing at layer 1, the tied pool); names are built from the vocabulary.
_RECIPES: tuple[tuple[Mode, str], ...] = (
    (Mode.LORA, ""), (Mode.LAYERWISE, ""), (Mode.PREGATED, ""), (Mode.PREGATED, "plg"),
    (Mode.PREGATED, "shared"), (Mode.LAYERWISE, "shared"), (Mode.PREGATED, "ctx"),
    (Mode.PREGATED, "tied"), (Mode.LAYERWISE, "tied"))
TRAIN_MODES: tuple[str, ...] = tuple(f"{m.value}-{v}" if v else m.value for m, v in _RECIPES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. `mode` "pregated-plg" is pre-gating with per-layer gates; "-shared" modes
  split the pool's budget: a shared expert of rank E*r*f that every token uses, and E routed
  experts of rank r*(1-f), f = `shared_fraction` (default 1/2); "pregated-ctx" routes at layer 1
  (layer 0 carries no experts); "-tied" modes make the pool the shared expert
  (`AdapterConfig.tied_shared`). `router_lr_scale` scales the updates of the routers and of the
  tied pools' betas: Adam moves every router weight by about the learning rate per step
  whatever its gradient, and a router's logit sums `in` such moves. `route_context` (pre-gated
  modes; `lora` and layer-wise rows ignore it) is `AdapterConfig.route_context`. `seed` fixes
  the data order and, unless `init_seed` is given, the adapters' initialisation: two runs that
  differ in `init_seed` alone see the same batches in the same order. `clip_apart` clips the
  expert factors' gradients and the routing ones (routers, tied betas) each on its own norm
  instead of one global norm (`clip_by_group_norm`): an experiment, not a tested remedy."""

  mode: str = "pregated"
  modules: tuple[str, ...] = ("q", "k", "v", "o")
  num_experts: int = 8
  rank: int = 8
  top_k: int = 2
  steps: int = 400
  batch: int = 16
  seq_len: int = 256
  lr: float = 1e-3
  warmup: int = 40
  weight_decay: float = 0.01
  clip: float = 1.0
  clip_apart: bool = False
  shared_fraction: float = 0.5
  router_lr_scale: float = 1.0
  route_context: float = 0.0
  aux_coef: float = 0.01
  eval_every: int = 100
  eval_windows: int = 8
  checkpoint_every: int = 100
  keep: int = 3
  seed: int = 0
  init_seed: int | None = None

  def __post_init__(self) -> None:
    if self.mode not in TRAIN_MODES:
      raise UserError(f"unknown training mode {self.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
    import math
    for name in ("lr", "router_lr_scale"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name}={value} must be a positive finite number (e.g. 1e-3)")
    for name in ("aux_coef", "weight_decay", "route_context"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={value} must be a finite number >= 0")
    for name in ("steps", "batch", "seq_len", "eval_every", "checkpoint_every", "keep",
                 "num_experts", "rank", "top_k"):
      if getattr(self, name) < 1:
        raise UserError(f"{name}={getattr(self, name)} must be at least 1")
    routed = self.rank * (1 - self.shared_fraction)
    if self.mode.endswith("-shared") and (not 0 < self.shared_fraction < 1
                                          or abs(routed - round(routed)) > 1e-9 or routed < 1):
      raise UserError(f"shared_fraction={self.shared_fraction} must leave the routed experts a"
                      f" whole rank of at least 1: rank {self.rank} x (1 - f) = {routed:g}"
                      " (e.g. 0.5, 0.75 or 0.875 for rank 8)")

  def adapter_config(self) -> AdapterConfig:
    """The adapters this run trains. "lora" gets rank E*r (the pool's trainable budget, less the
    router's few parameters)."""
    if self.mode == "lora":
      return AdapterConfig(mode="lora", modules=self.modules, num_experts=1,
                           rank=self.rank * self.num_experts, top_k=1,
                           alpha=2.0 * self.rank * self.num_experts)
    rank, shared_rank = self.rank, 0
    if self.mode.endswith("-shared"):  # same trainable budget as the plain pool
      rank = round(self.rank * (1 - self.shared_fraction))
      shared_rank = self.num_experts * (self.rank - rank)
    return AdapterConfig(mode=parse_mode(self.mode.split("-")[0]), modules=self.modules,
                         num_experts=self.num_experts, rank=rank, top_k=self.top_k,
                         per_layer_gates=self.mode == "pregated-plg", alpha=2.0 * rank,
                         shared_rank=shared_rank, tied_shared=self.mode.endswith("-tied"),
                         route_context=self.route_context if self.mode.startswith("pregated")
                         else 0.0,
                         first_layer=1 if self.mode == "pregated-ctx" else 0)

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "modules": list(self.modules)}


def saved_setting(config: dict, key: str):
  """A setting of a run's saved config (`TrainConfig.to_json`); one missing from an older run's
  config is the default it ran with."""
  return config.get(key, _DEFAULTS.get(key))


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def batch_at(streams: dict[str, np.ndarray], step: int, batch: int, seq_len: int, seed: int
             ) -> np.ndarray:
  """The [batch, seq_len + 1] token windows of one step (depends on seed and step only)."""
  rng = np.random.default_rng([seed, step])
  names = sorted(streams)
  rows = []
  for i in range(batch):
    stream = streams[names[(i + step) % len(names)]]
    start = int(rng.integers(0, len(stream) - seq_len - 1))
    rows.append(stream[start:start + seq_len + 1])
  return np.stack(rows).astype(np.int32)


def eval_windows(stream: np.ndarray, count: int, seq_len: int) -> np.ndarray:
  """Evenly spaced [count, seq_len + 1] windows of a held-out stream (fixed across runs)."""
  count = max(1, min(count, (len(stream) - 1) // (seq_len + 1)))
  starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(int)
  return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def forward_loss(model: LlamaModel, adapters: MixtureOfLoRA | None, windows: jax.Array,
                 aux_coef: float = 0.0):
  """Mean next-token cross-entropy of windows [B, T+1] (+ aux loss); returns (loss, metrics)."""
  tokens, targets = windows[:, :-1], windows[:, 1:]
  cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
  if adapters is None:
    logits, _ = model(tokens, cache, all_logits=True)
    routes = []
  else:
    runtime = registry.runtime(adapters)
    logits, _ = model(tokens, cache, linear=runtime, all_logits=True)
    routes = runtime.routes
  token_ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  ce = token_ce.mean()
  num_experts = adapters.cfg.num_experts if adapters is not None else 1
  if routes:
    aux = jnp.mean(jnp.stack([load_balancing_loss(r.logits, r.experts) for r in routes]))
    load = jnp.mean(jnp.stack([jax.nn.one_hot(r.experts, num_experts).sum((0, 1)) / r.experts.size
                               for r in routes]), axis=0)
  else:
    aux, load = jnp.zeros(()), jnp.ones((num_experts,))
  return ce + aux_coef * aux, {"ce": ce, "aux": aux, "load": load,
                               "window_ce": token_ce.mean(axis=-1)}


def make_optimizer(adapters: MixtureOfLoRA, cfg: TrainConfig, wrt=AdapterParam) -> nnx.Optimizer:
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup, cfg.steps),
                                                max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1)
  clip = clip_by_group_norm(cfg.clip) if cfg.clip_apart else optax.clip_by_global_norm(cfg.clip)
  tx = optax.chain(clip, optax.adamw(schedule, weight_decay=cfg.weight_decay))
  if cfg.router_lr_scale != 1.0:
    tx = optax.chain(tx, scale_routing_updates(cfg.router_lr_scale))
  return nnx.Optimizer(adapters, tx, wrt=wrt)


def path_keys(path) -> list[str]:
  """The names along a pytree path (dict keys, attribute names, indices) as strings."""
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_routing_leaf(path) -> bool:
  """Whether a parameter path of MixtureOfLoRA's state is a router weight or a tied beta."""
  keys = path_keys(path)
  return "router" in keys or any(k.startswith("beta_") for k in keys)


def routing_params(state) -> dict[str, np.ndarray]:
  """The router weights and tied betas of an adapter state (any nesting of dicts, e.g.
  `nnx.to_pure_dict(nnx.state(adapters))` or a checkpoint's "adapters"), by dotted name (a
  checkpoint's trailing "value" level dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if is_routing_leaf(path):
      out[".".join(k for k in path_keys(path) if k != "value")] = np.asarray(leaf, np.float32)
  return out


def grad_norms(grads) -> dict[str, jax.Array]:
  """Global L2 norms of the expert factors' gradients and of the routing ones (routers, tied
  betas; 0 for a plain LoRA), before clipping: {"experts": [], "routing": []} f32. Logged per
  step: whether the routing gradients take a share of the clipped global norm."""
  sums = {"experts": jnp.zeros((), jnp.float32), "routing": jnp.zeros((), jnp.float32)}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    key = "routing" if is_routing_leaf(path) else "experts"
    sums[key] = sums[key] + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {k: jnp.sqrt(v) for k, v in sums.items()}


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` applied to the expert factors and to the routing parameters
  (`is_routing_leaf`) separately: a burst in the routing gradients (a tied beta's gradient does
  not shrink with beta) then cannot rescale the experts' step."""
  def update(updates, state, params=None):
    del params
    factor = {k: jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-12))
              for k, n in grad_norms(updates).items()}
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * factor["routing" if is_routing_leaf(path) else "experts"].astype(
            u.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_routing_updates(factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of router weights and tied betas by `factor` (others unchanged)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * factor if is_routing_leaf(path) else u, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@nnx.jit(static_argnums=(4,))
def train_step(model, adapters, optimizer, windows, aux_coef: float):
  def loss_fn(adapters):
    return forward_loss(model, adapters, windows, aux_coef)

  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True)
  (loss, metrics), grads = grad_fn(adapters)
  optimizer.update(adapters, grads)
  return loss, {**metrics, "grad_norm": grad_norms(grads)}


@nnx.jit
def window_ce(model, adapters, windows):
  """Mean next-token cross-entropy of each window [B, T+1] -> [B] f32."""
  return forward_loss(model, adapters, windows)[1]["window_ce"]


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or made for another configuration."""


class Trainer:
  """Trains one adapter configuration on a frozen model, checkpointing to `workdir`.

  Args:
    model: the frozen backbone.
    cfg: the run's settings.
    train_streams / heldout_streams: domain -> token stream.
    workdir: checkpoints (`ckpt/`) and the metrics log (`metrics.jsonl`).
    adapters: start from this pool (PEFT LoRAs made into experts, a saved pool).
    router_only: train the router(s) alone.
    mesh: a device mesh (`adafuse_jax.parallel.make_mesh(N, cfg, data=D)`): the model's and the
      pool's arrays are placed on it in place, split over "tp" as decoding splits them, and
      each batch is split over "dp"; checkpoints save and restore the split arrays (orbax).
  """

  def __init__(self, model: LlamaModel, cfg: TrainConfig, train_streams: dict[str, np.ndarray],
               heldout_streams: dict[str, np.ndarray], workdir: str | pathlib.Path, *,
               adapters: MixtureOfLoRA | None = None, router_only: bool = False,
               mesh: "jax.sharding.Mesh | None" = None):
    self.model, self.cfg = model, cfg
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    if self.mesh is not None:
      parallel.check_divisible(model.cfg, parallel.tensor_size(self.mesh))
      if cfg.batch % parallel.data_size(self.mesh):
        raise UserError(f"--batch {cfg.batch} does not split over {parallel.data_size(self.mesh)}"
                        " data-parallel groups; use a batch that --data-parallel divides")
    self.train_streams, self.heldout = train_streams, heldout_streams
    self.workdir = pathlib.Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    # Stacked pools whatever the backend: a Variable holding a per-layer tuple is not one leaf
    # for optax, and training is not the latency-bound path the "list" layout serves.
    # `adapters` starts training from a given pool (PEFT LoRAs made into experts, a saved
    # pool); `router_only` then trains its router(s) alone and keeps the experts as they are.
    if adapters is not None:
      self.adapters = adapters.with_layout("stacked")
    else:
      self.adapters = MixtureOfLoRA(model.cfg, cfg.adapter_config(), layout="stacked",
                                    seed=cfg.seed if cfg.init_seed is None else cfg.init_seed)
    if self.mesh is not None:
      # Weights and experts split over "tp" as decoding splits them; the optimizer's state,
      # made from the experts below, follows their layout; batches split over "dp".
      parallel.shard_module(model, self.mesh, parallel.model_axis)
      parallel.shard_module(self.adapters, self.mesh, parallel.adapter_axis)
    if router_only and self.adapters.router is None:
      raise UserError(f"a pool of mode {self.adapters.cfg.mode!r} has no router to train; train"
                      " its experts, or give several PEFT adapters (one pre-gated pool)")
    self.optimizer = make_optimizer(self.adapters, cfg, RouterParam if router_only else AdapterParam)
    self.step = 0
    try:
      # The manager reads every kept step's metadata file as it starts.
      self.manager = ocp.CheckpointManager(
          self.workdir / "ckpt",
          options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the folder and the cure
      raise CheckpointError(f"the checkpoints in {self.workdir / 'ckpt'} are unreadable"
                            f" ({type(e).__name__}: {str(e)[:120]}); move the damaged step's"
                            " folder aside, or use a fresh --workdir") from None
    self._eval_sets = {d: jnp.asarray(eval_windows(s, cfg.eval_windows, cfg.seq_len))
                       for d, s in heldout_streams.items()}

  # --- checkpoints ------------------------------------------------------------------------------
  def save(self) -> None:
    state = {"adapters": nnx.state(self.adapters, AdapterParam),
             "optimizer": nnx.state(self.optimizer.opt_state)}
    self.manager.save(self.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": self.step, "config": self.cfg.to_json(),
                                "data_position": self.step})))
    self.manager.wait_until_finished()
    # The step's files as written: `restore` checks them before orbax reads any.
    digests = self.workdir / "digests"
    digests.mkdir(exist_ok=True)
    (digests / f"{self.step}.json").write_text(json.dumps(
        folder_digests(self.workdir / "ckpt" / str(self.step)), indent=1))
    kept = {str(s) for s in self.manager.all_steps()}
    for old in digests.glob("*.json"):
      if old.stem not in kept:
        old.unlink()

  def restore(self, step: int | None = None) -> int:
    """Restores the latest (or the given) checkpoint; returns its step (0 when none exists)."""
    steps = self.manager.all_steps()
    if not steps:
      if step is not None:
        raise CheckpointError(f"no checkpoint in {self.workdir / 'ckpt'}; train first")
      return 0
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.workdir / 'ckpt'}; present:"
                            f" {sorted(steps)}")
    self._check_files(step, sorted(steps))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the file and the cure
      raise CheckpointError(f"checkpoint step {step} in {self.workdir / 'ckpt'} is unreadable"
                            f" ({type(e).__name__}); restore an earlier step with --resume-step"
                            f" (present: {sorted(steps)})") from None
    saved, ours = meta["config"], self.cfg.to_json()
    for key in ("mode", "modules", "num_experts", "rank", "top_k"):
      if saved.get(key) != ours.get(key):
        raise CheckpointError(f"checkpoint step {step} was trained with {key}={saved.get(key)!r}"
                              f" but this run has {key}={ours.get(key)!r}; use a fresh --workdir"
                              " or the same settings")
    target = {"adapters": nnx.state(self.adapters, AdapterParam),
              "optimizer": nnx.state(self.optimizer.opt_state)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint step {step} in {self.workdir / 'ckpt'} is corrupt"
                            f" ({type(e).__name__}: {str(e)[:120]}); restore an earlier step with"
                            f" --resume-step (present: {sorted(steps)})") from None
    nnx.update(self.adapters, state["adapters"])
    nnx.update(self.optimizer.opt_state, state["optimizer"])
    self.step = int(meta["step"])
    return self.step

  def _check_files(self, step: int, steps: list[int]) -> None:
    """CheckpointError if a file of the step differs from the digests written when it was
    saved (checkpoints saved without digests are left to orbax's own checks)."""
    record = self.workdir / "digests" / f"{step}.json"
    if not record.is_file():
      return
    try:
      recorded = json.loads(record.read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(f"the digests of checkpoint step {step} ({record}) are unreadable"
                            f" ({e}); restore an earlier step with --resume-step (present:"
                            f" {steps})") from None
    bad = damaged_files(self.workdir / "ckpt" / str(step), recorded)
    if bad:
      raise CheckpointError(f"checkpoint step {step} in {self.workdir / 'ckpt'} is corrupt:"
                            f" {len(bad)} file(s) differ from those saved ({', '.join(bad[:3])});"
                            f" restore an earlier step with --resume-step (present: {steps})")

  # --- training ---------------------------------------------------------------------------------
  def _place(self, windows: np.ndarray) -> jax.Array:
    """A batch of windows [B, T+1] on the device(s): rows split over the data-parallel axis."""
    if self.mesh is None:
      return jnp.asarray(windows)
    return jax.device_put(windows, parallel.batch_split(self.mesh))

  def evaluate(self) -> dict[str, float]:
    """Held-out perplexity per domain (through `window_ce`, the program the final table's
    evaluation also runs, so that a run compiles one evaluation program, not two)."""
    return {d: math.exp(float(np.mean(np.asarray(window_ce(self.model, self.adapters, w),
                                                 np.float64))))
            for d, w in self._eval_sets.items()}

  def fit(self, until: int | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Trains from the current step to `until` (default cfg.steps); returns the losses."""
    from tqdm import tqdm

    cfg = self.cfg
    until = cfg.steps if until is None else min(until, cfg.steps)
    losses = []
    with open(self.workdir / "metrics.jsonl", "a") as log, tqdm(
        total=until, initial=self.step, desc=f"train {cfg.mode}", disable=not progress,
        dynamic_ncols=True) as bar:
      t_last = time.perf_counter()
      while self.step < until:
        windows = self._place(batch_at(self.train_streams, self.step, cfg.batch, cfg.seq_len,
                                       cfg.seed))
        loss, metrics = train_step(self.model, self.adapters, self.optimizer, windows, cfg.aux_coef)
        loss = float(loss)
        if not math.isfinite(loss):
          raise UserError(f"loss became {loss} at step {self.step}; lower --lr (now {cfg.lr})")
        self.step += 1
        losses.append(loss)
        now = time.perf_counter()
        tok_s = cfg.batch * cfg.seq_len / max(now - t_last, 1e-9)
        t_last = now
        load = np.asarray(metrics["load"])
        record = {"step": self.step, "loss": loss, "ce": float(metrics["ce"]),
                  "aux": float(metrics["aux"]), "tokens_per_s": tok_s, "load": load.round(4).tolist(),
                  "grad_norm": {k: float(v) for k, v in metrics["grad_norm"].items()}}
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
          record["eval_ppl"] = self.evaluate()
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", max_load=f"{load.max():.2f}")
        bar.update(1)
        if on_step is not None:
          on_step(self.step, loss)
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
          self.save()
    return losses
