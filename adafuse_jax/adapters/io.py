"""Saving and loading an expert pool + router checkpoint (orbax), with config checks.

A checkpoint folder holds `adapter_config.json` (the AdapterConfig, the model shapes it was
made for, a SHA-256 digest of the arrays and one of every file under `state/`) and `state/`
(orbax). Loading into a model of other shapes fails naming the mismatch; a damaged file (one
whose bytes differ from those saved, checked before orbax reads it; non-finite values; arrays
whose digest differs) fails naming the checkpoint, never loads silently.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from adafuse_jax.adapters import peft
from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.errors import ModelFileError, UserError
from adafuse_jax.file_digests import damaged_files, folder_digests
from adafuse_jax.model.llama import default_layout
from adafuse_jax.vocab import Mode

CONFIG_FILE = "adapter_config.json"
_SHAPE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn")


def model_fingerprint(cfg: ModelConfig) -> dict[str, int]:
  return {f: getattr(cfg, f) for f in _SHAPE_FIELDS}


def save_adapters(path: str | pathlib.Path, adapters: MixtureOfLoRA,
                  dtype: jnp.dtype | None = None) -> pathlib.Path:
  """Writes the adapters to a new folder `path` (absolute or relative); `dtype` casts the stored
  weights (bf16 halves a shipped pool; loading casts back to the dtype asked for)."""
  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  # Checkpoints always hold the stacked layout, so they load on any backend.
  state = nnx.state(adapters.with_layout("stacked"))
  if dtype is not None:
    state = jax.tree.map(lambda x: x.astype(dtype), state)
  meta = {"adapter": adapters.cfg.to_dict(), "model": model_fingerprint(adapters.model_cfg),
          "digest": state_digest(state)}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / "state", state, force=True)
    ckpt.wait_until_finished()
  meta["files"] = folder_digests(path / "state")
  (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
  return path


def state_digest(state) -> str:
  """SHA-256 over every array of a pool's state as float32 (exact for the bf16/f16/f32 it is
  stored in), in key order: what a load recomputes to know the files are the ones saved."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for key, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(key).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return "sha256:" + h.hexdigest()


def read_adapter_config(path: str | pathlib.Path) -> tuple[AdapterConfig, dict]:
  path = pathlib.Path(path)
  if not (path / CONFIG_FILE).is_file():
    raise ModelFileError(f"{str(path)!r} is not an adapter checkpoint (no {CONFIG_FILE}); pass a"
                         " folder written by save_adapters or the training command")
  try:
    meta = json.loads((path / CONFIG_FILE).read_text())
    return AdapterConfig.from_dict(meta["adapter"]), meta["model"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ModelFileError(f"{str(path / CONFIG_FILE)!r} is corrupt ({e})") from None


def model_mismatch(saved_shapes: dict, model_cfg: ModelConfig) -> list[str]:
  """How a checkpoint's recorded model shape (`read_adapter_config`'s second value) differs from
  `model_cfg`: one "field: checkpoint X vs model Y" per field; empty when it was made for it."""
  return [f"{k}: checkpoint {saved_shapes.get(k)} vs model {v}"
          for k, v in model_fingerprint(model_cfg).items() if saved_shapes.get(k) != v]


def load_adapters(path: str | pathlib.Path, model_cfg: ModelConfig, *,
                  dtype: jnp.dtype = jnp.float32, mesh=None) -> MixtureOfLoRA:
  """Restores adapters saved by `save_adapters` for a model of config `model_cfg`; with a
  tensor-parallel `mesh` (`adafuse_jax.parallel`), straight onto it, split as the weights they
  adapt, whatever device count saved them."""
  path = pathlib.Path(path).absolute()
  cfg, shapes = read_adapter_config(path)
  diffs = model_mismatch(shapes, model_cfg)
  if diffs:
    raise UserError(f"adapter checkpoint {str(path)!r} was made for another model ("
                    + "; ".join(diffs) + "); load it with the model it was trained on")
  check_files(path)
  # Restored as float32 (exact for what is stored), checked, then cast to `dtype`.
  abstract = nnx.eval_shape(lambda: MixtureOfLoRA(model_cfg, cfg, dtype=jnp.float32,
                                                  layout="stacked"))
  graphdef, abstract_state = nnx.split(abstract)
  # Restore onto this machine's device(s) whatever saved it (a GPU-trained pool on a CPU, a
  # pool saved from 4 devices onto 1 or 2).
  if mesh is not None and mesh.size > 1:
    from adafuse_jax.parallel import adapter_shardings
    abstract_state = adapter_shardings(abstract_state, mesh)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(path / "state", abstract_state)
  except Exception as e:  # orbax raises many kinds on damaged or mismatched files
    raise ModelFileError(f"cannot restore adapter checkpoint {str(path)!r}"
                         f" ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it may be"
                         " corrupt or incomplete") from None
  check_state(path, state)
  state = jax.tree.map(lambda x: x.astype(dtype), state)
  adapters = nnx.merge(graphdef, state).with_layout(default_layout())
  if mesh is not None and mesh.size > 1:  # the per-layer split places its slices anew
    from adafuse_jax.parallel import shard_adapter_params
    graphdef, state = nnx.split(adapters)
    adapters = nnx.merge(graphdef, shard_adapter_params(state, mesh))
  return adapters


def check_files(path: pathlib.Path) -> None:
  """Raises ModelFileError if a file under state/ differs from the digest its config recorded
  (pools saved before the config held file digests are checked after the restore only)."""
  recorded = json.loads((path / CONFIG_FILE).read_text()).get("files")
  if not recorded:
    return
  bad = damaged_files(path / "state", recorded)
  if bad:
    raise ModelFileError(f"adapter checkpoint {str(path)!r} is damaged: {len(bad)} file(s) under"
                         f" state/ differ from the digests in {CONFIG_FILE} ({', '.join(bad[:3])});"
                         " restore the folder from its source or train it again")


def check_state(path: pathlib.Path, state) -> None:
  """Raises ModelFileError if a restored pool holds non-finite values or differs from the
  digest its config recorded (a damaged or edited file)."""
  for key, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf)).sum())
    if bad:
      raise ModelFileError(f"adapter checkpoint {str(path)!r} is damaged: array"
                           f" {jax.tree_util.keystr(key)} holds {bad} NaN/Inf values; restore"
                           " the folder from its source or train it again")
  saved = json.loads((path / CONFIG_FILE).read_text()).get("digest")
  if saved is not None and state_digest(state) != saved:
    raise ModelFileError(f"adapter checkpoint {str(path)!r} is damaged: its arrays do not match"
                         f" the digest in {CONFIG_FILE} (a file under state/ was changed);"
                         " restore the folder from its source or train it again")


DEFAULT_POOL = pathlib.Path(__file__).parent.parent / "pools" / "smollm2-135m"


def pool_folder(spec: str) -> pathlib.Path:
  """The folder of a saved-pool spec: "default" (the shipped pool) or a path."""
  return DEFAULT_POOL if spec == "default" else pathlib.Path(spec)


def random_seed(spec: str, default: int) -> int | None:
  """The seed of a "random" or "random:SEED" pool spec (`default` for plain "random"); None for
  any other spec. A seed that is not an integer is a UserError."""
  if spec == "random":
    return default
  if not spec.startswith("random:"):
    return None
  try:
    return int(spec.split(":", 1)[1])
  except ValueError:
    raise UserError(f"--adapters {spec!r}: the seed after 'random:' must be an integer"
                    ) from None


def check_adapter_spec(spec: str | None, cfg: AdapterConfig) -> None:
  """The checks of `resolve_adapters` that need no model (run before loading one): raises
  UserError / ModelFileError naming what is wrong and the fix."""
  if cfg.mode == Mode.BACKBONE:
    if spec is not None:
      raise UserError("--adapters was given with --mode backbone; pick an adapter mode"
                      " (lora, layerwise, pregated) or drop --adapters")
    return
  if spec is None:
    raise UserError(f"--mode {cfg.mode} needs adapters: pass --adapters PATH (a trained"
                    " checkpoint), --adapters default, or --adapters random for a seeded random"
                    " pool (tests and benchmarks only)")
  if peft.is_peft_spec(spec):
    if peft.is_export(spec):
      peft.exported_config(spec)
      return
    for folder in peft.spec_folders(spec):
      peft.peek(folder)  # each is a readable PEFT LoRA folder
    return
  if random_seed(spec, 0) is not None:
    return
  path = pool_folder(spec)
  if spec == "default" and not (path / CONFIG_FILE).is_file():
    raise ModelFileError(f"no trained default pool is installed at {str(path)!r}; train one"
                         " (see README, training) or pass --adapters random")
  if not path.exists():
    raise ModelFileError(f"adapter checkpoint {spec!r} does not exist")
  saved_cfg, _ = read_adapter_config(path)
  if saved_cfg.mode != cfg.mode:
    raise UserError(f"adapter checkpoint {spec!r} was trained for mode {saved_cfg.mode!r}, not"
                    f" {cfg.mode!r}; pass --mode {saved_cfg.mode} or another checkpoint")


def resolve_adapters(spec: str | None, cfg: AdapterConfig, model_cfg: ModelConfig, *,
                     dtype: jnp.dtype = jnp.float32, seed: int = 0) -> MixtureOfLoRA | None:
  """Turns an `--adapters` spec into adapters for `cfg.mode` (None for "backbone").

  spec: a checkpoint folder; "default" (the trained SmolLM2 pool shipped with the package);
  a PEFT LoRA folder, or several joined by commas (`adafuse_jax.adapters.peft`); "random" or
  "random:SEED" (a seeded random pool with non-zero B, for tests and benchmarks: asked for
  explicitly, never a silent fallback); None with mode "backbone".
  """
  check_adapter_spec(spec, cfg)
  if cfg.mode == Mode.BACKBONE:
    return None
  if peft.is_peft_spec(spec):
    return peft.load_peft_pool(spec, model_cfg, cfg, dtype=dtype, seed=seed)
  if (pool_seed := random_seed(spec, seed)) is not None:
    return MixtureOfLoRA(model_cfg, cfg, seed=pool_seed, dtype=dtype, random_b=True)
  path = pool_folder(spec)
  return load_adapters(path, model_cfg, dtype=dtype)


def load_pool(spec: str, model_cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
              seed: int = 0) -> MixtureOfLoRA:
  """A pool by name: "default" (the trained SmolLM2 pool shipped with the package), a folder
  written by `save_adapters` or training, PEFT LoRA folders ("DIR" or "DIR1,DIR2,..."), or
  "random[:SEED]" (a seeded random pre-gated pool,
  for tests and benchmarks). Its mode is the saved one (pre-gated for "random")."""
  return resolve_adapters(spec, pool_config(spec), model_cfg, dtype=dtype, seed=seed)


def pool_config(spec: str) -> AdapterConfig:
  """The AdapterConfig a pool spec of `load_pool` loads as, read from its files alone (the
  library's default shape for "random[:SEED]"): raises ModelFileError when there is no pool."""
  if random_seed(spec, 0) is not None:
    return AdapterConfig()
  if peft.is_peft_spec(spec):
    return peft.spec_config(spec)
  path = pool_folder(spec)
  if not path.exists():
    raise ModelFileError(f"adapter pool {spec!r} does not exist; pass 'default', a folder"
                         " written by save_adapters or training, or 'random'")
  return read_adapter_config(path)[0]
