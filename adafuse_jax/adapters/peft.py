"""PEFT LoRA folders in: one becomes a plain LoRA, several become one pool of experts.

A PEFT LoRA folder holds `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`,
`target_modules`, ...) and `adapter_model.safetensors` with, per adapted module and layer,
`...layers.{l}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. PEFT's
delta is `x @ A.T @ B.T * scale` with scale = alpha / r (alpha / sqrt(r) with rsLoRA), which
is this project's LoRA with A = A.T and B = B.T * scale at our scale 1 (alpha = rank).

Several folders become experts 0..E-1 of one pool: ranks may differ (each is zero-padded to the
largest: a zero row of A and of B adds nothing), a module that one adapter lacks contributes
zero for it, and the router is fresh (seeded) until trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from adafuse_jax.config import LINEAR_NAMES, AdapterConfig, ModelConfig
from adafuse_jax.errors import ModelFileError, UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's module names of a Llama-family model -> ours.
PEFT_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}
OURS_TO_PEFT = {v: k for k, v in PEFT_MODULES.items()}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def module_path(module: str, layer: int) -> str:
  """PEFT's (transformers') name of one of our modules at one layer: layers.3.mlp.up_proj."""
  part = "self_attn" if module in ("q", "k", "v", "o") else "mlp"
  return f"layers.{layer}.{part}.{OURS_TO_PEFT[module]}"


def check_new_folder(out: str | pathlib.Path) -> None:
  """Raises UserError unless `out` is a folder still to be made (or an empty one)."""
  out = pathlib.Path(out)
  if out.is_file() or (out.exists() and any(out.iterdir())):
    raise UserError(f"--out {str(out)!r} exists and is not empty; name a new folder")


def is_peft_folder(path: str | pathlib.Path) -> bool:
  """Whether `path` is a folder whose adapter_config.json was written by PEFT."""
  cfg = pathlib.Path(path) / CONFIG_FILE
  if not cfg.is_file():
    return False
  try:
    return "peft_type" in json.loads(cfg.read_text())
  except (OSError, json.JSONDecodeError):
    return False


def is_peft_spec(spec: str | None) -> bool:
  """Whether an --adapters spec names PEFT folders (one, or several joined by commas)."""
  if not spec or spec == "default" or spec.startswith("random"):
    return False
  return "," in spec or is_peft_folder(spec) or is_export(spec)


def spec_folders(spec: str) -> list[pathlib.Path]:
  return [pathlib.Path(p.strip()) for p in spec.split(",") if p.strip()]


@dataclasses.dataclass
class PeftLora:
  """One PEFT LoRA in our layout: per module m, A[m] [L, in, r] and B[m] [L, r, out] (the
  scale folded into B, zeros for layers the adapter leaves alone)."""

  path: pathlib.Path
  rank: int
  A: dict[str, np.ndarray]
  B: dict[str, np.ndarray]


def read_config(path: pathlib.Path) -> dict:
  """The adapter_config.json of a PEFT LoRA folder, checked for what this loader computes."""
  if not path.is_dir():
    raise ModelFileError(f"PEFT adapter {str(path)!r} does not exist (pass a folder holding"
                         f" {CONFIG_FILE} and {WEIGHTS_FILE})")
  try:
    c = json.loads((path / CONFIG_FILE).read_text())
  except FileNotFoundError:
    raise ModelFileError(f"{str(path)!r} has no {CONFIG_FILE}; a PEFT adapter folder is what"
                         " `model.save_pretrained(...)` writes") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ModelFileError(f"cannot read {str(path / CONFIG_FILE)!r}: {e}") from None
  kind = c.get("peft_type")
  if kind != "LORA":
    raise ModelFileError(f"{str(path)!r} is a PEFT {kind} adapter, not LoRA; only LoRA"
                         " adapters (peft_type LORA) load as experts")
  refused = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights (GPT-2 Conv1D)",
             "modules_to_save": "modules_to_save (fully trained extra modules)",
             "layer_replication": "layer replication", "lora_bias": "LoRA bias terms"}
  found = [what for key, what in refused.items() if c.get(key)]
  if c.get("bias", "none") != "none":
    found.append(f"bias {c['bias']!r}")
  if found:
    raise ModelFileError(f"PEFT adapter {str(path)!r} uses {', '.join(found)}, which this"
                         " loader does not compute; save a plain LoRA (bias 'none')")
  return c


def _targets(c: dict, path: pathlib.Path) -> list[str]:
  targets = c.get("target_modules") or []
  if isinstance(targets, str):  # a regex over module names
    targets = [n for n in PEFT_MODULES if re.search(targets, n)]
  short = [t.rsplit(".", 1)[-1] for t in targets]
  unknown = sorted(t for t in short if t not in PEFT_MODULES)
  if unknown:
    raise ModelFileError(f"PEFT adapter {str(path)!r} adapts {', '.join(unknown)}; only the"
                         f" attention and MLP projections ({', '.join(PEFT_MODULES)}) of a"
                         " Llama-family model carry experts")
  return sorted({PEFT_MODULES[t] for t in short}, key=LINEAR_NAMES.index)


def peek(path: str | pathlib.Path) -> tuple[list[str], int]:
  """(modules in our names, largest rank) of a PEFT LoRA folder, from its config alone."""
  path = pathlib.Path(path)
  c = read_config(path)
  ranks = [int(c.get("r", 8)), *(int(v) for v in (c.get("rank_pattern") or {}).values())]
  return _targets(c, path), max(ranks)


def read_lora(path: str | pathlib.Path, model_cfg: ModelConfig) -> PeftLora:
  """Loads one PEFT LoRA folder for a model of config `model_cfg`.

  Raises ModelFileError for a folder that is not a readable LoRA and UserError when it was made
  for another base model (a module or layer the model lacks, or other dimensions).
  """
  path = pathlib.Path(path)
  c = read_config(path)
  modules = _targets(c, path)
  weights = path / WEIGHTS_FILE
  if not weights.is_file():
    other = " (it holds adapter_model.bin: re-save it with safe_serialization=True)" if (
        path / "adapter_model.bin").exists() else ""
    raise ModelFileError(f"PEFT adapter {str(path)!r} lacks {WEIGHTS_FILE}{other}")
  tensors: dict[tuple[str, int, str], np.ndarray] = {}
  try:
    with safe_open(str(weights), framework="numpy") as f:
      for key in f.keys():
        m = _KEY.search(key)
        if m is None:
          if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
            raise ModelFileError(f"PEFT adapter {str(path)!r} adapts the embeddings or the head"
                                 f" ({key}); only the projections carry experts")
          continue
        layer, name, which = int(m.group(1)), m.group(2), m.group(3)
        if name not in PEFT_MODULES:
          raise ModelFileError(f"PEFT adapter {str(path)!r} holds {key}; only"
                               f" {', '.join(PEFT_MODULES)} carry experts")
        tensors[(PEFT_MODULES[name], layer, which)] = np.asarray(f.get_tensor(key), np.float32)
  except ModelFileError:
    raise
  except Exception as e:  # safetensors raises several kinds on damaged files
    raise ModelFileError(f"cannot read {str(weights)!r} ({type(e).__name__}: {e}); the file may"
                         " be truncated: copy it again") from None
  if not tensors:
    raise ModelFileError(f"{str(weights)!r} holds no lora_A/lora_B weights of a Llama-family"
                         " model")
  layers = sorted({l for _, l, _ in tensors})
  if layers[-1] >= model_cfg.layers:
    raise UserError(f"PEFT adapter {str(path)!r} adapts layer {layers[-1]}, but the model has"
                    f" {model_cfg.layers} layers: it was made for another base model"
                    f" ({c.get('base_model_name_or_path')!r}); load it with that one")
  modules = sorted({m for m, _, _ in tensors} | set(modules), key=LINEAR_NAMES.index)
  shapes = model_cfg.linear_shapes()
  alpha_pattern = c.get("alpha_pattern") or {}
  rank = max(t.shape[0] for (_, _, w), t in tensors.items() if w == "A")
  A: dict[str, np.ndarray] = {}
  B: dict[str, np.ndarray] = {}
  for m in modules:
    d_in, d_out = shapes[m]
    a = np.zeros((model_cfg.layers, d_in, rank), np.float32)
    b = np.zeros((model_cfg.layers, rank, d_out), np.float32)
    for l in range(model_cfg.layers):
      if (m, l, "A") not in tensors:
        continue
      la, lb = tensors[(m, l, "A")], tensors.get((m, l, "B"))
      if lb is None or la.ndim != 2 or lb.ndim != 2 or lb.shape[1] != la.shape[0]:
        raise ModelFileError(f"PEFT adapter {str(path)!r}: layer {l} {OURS_TO_PEFT[m]} has"
                             " lora_A without a matching lora_B; the file is damaged")
      r = la.shape[0]
      if la.shape[1] != d_in or lb.shape[0] != d_out:
        raise UserError(f"PEFT adapter {str(path)!r} was made for another base model: layer {l}"
                        f" {OURS_TO_PEFT[m]} maps {la.shape[1]} -> {lb.shape[0]}, the model's"
                        f" {d_in} -> {d_out} (base {c.get('base_model_name_or_path')!r}); load"
                        " it with its own base model")
      alpha = float(_pattern(alpha_pattern, m, l, c.get("lora_alpha", 8)))
      scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
      a[l, :, :r] = la.T
      b[l, :r, :] = lb.T * scale
    bad = int(a.size - np.isfinite(a).sum() + b.size - np.isfinite(b).sum())
    if bad:
      raise ModelFileError(f"PEFT adapter {str(path)!r} holds {bad} NaN/Inf values in"
                           f" {OURS_TO_PEFT[m]}; the file is damaged: copy or train it again")
    A[m], B[m] = a, b
  return PeftLora(path=path, rank=rank, A=A, B=B)


def _pattern(pattern: dict, module: str, layer: int, default):
  """PEFT's per-module override (`alpha_pattern`): the first key that matches the module's
  full name or ends it."""
  full = module_path(module, layer)
  for key, value in pattern.items():
    if re.fullmatch(rf"(.*\.)?{key}", full) or full.endswith(key):
      return value
  return default


def spec_config(spec: str, mode: str | None = None, top_k: int = 2) -> AdapterConfig:
  """The AdapterConfig that PEFT folders `spec` load as, from their configs alone: one folder
  is a plain LoRA ("lora"), several a pre-gated pool (or `mode`) of one expert each."""
  if is_export(spec):
    return exported_config(spec)
  folders = spec_folders(spec)
  peeks = [peek(f) for f in folders]
  modules = sorted({m for mods, _ in peeks for m in mods}, key=LINEAR_NAMES.index)
  rank = max(r for _, r in peeks)
  if mode is None:
    mode = "lora" if len(folders) == 1 else "pregated"
  if mode == "lora" and len(folders) > 1:
    raise UserError(f"--mode lora takes one PEFT adapter, not {len(folders)}; drop --mode to"
                    " make them one pre-gated pool, or merge them first")
  if mode not in ("lora", "pregated", "layerwise"):
    raise UserError(f"PEFT adapters load as mode lora, pregated or layerwise, not {mode!r}")
  return AdapterConfig(mode=mode, modules=tuple(modules), num_experts=len(folders), rank=rank,
                       alpha=float(rank), top_k=min(top_k, len(folders)))


def load_peft_pool(spec: str, model_cfg: ModelConfig, cfg: AdapterConfig | None = None, *,
                   dtype: jnp.dtype = jnp.float32, seed: int = 0):
  """PEFT LoRA folders (a spec "DIR" or "DIR1,DIR2,...") as a MixtureOfLoRA of config `cfg`
  (default `spec_config(spec)`); the router, if the mode has one, is seeded and untrained."""
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.model.llama import default_layout

  if is_export(spec):
    return load_exported(spec, model_cfg, dtype=dtype)
  cfg = cfg or spec_config(spec)
  loras = [read_lora(f, model_cfg) for f in spec_folders(spec)]
  if cfg.num_experts != len(loras):
    raise UserError(f"{len(loras)} PEFT adapters cannot fill a pool of {cfg.num_experts}"
                    " experts")
  mix = MixtureOfLoRA(model_cfg, cfg, seed=seed, dtype=dtype, layout="stacked")
  _set_experts(mix, loras, b_scale=1.0)  # alpha = rank: the pool's own scale is 1
  return mix.with_layout(default_layout())


def _set_experts(mix, loras: list[PeftLora], b_scale: float) -> None:
  """Packs LoRAs as experts 0..E-1 of a stacked pool: each zero-padded to the pool's rank, zero
  where it lacks a module, B divided by `b_scale` (the pool's alpha / rank)."""
  shapes, layers, r = mix.model_cfg.linear_shapes(), mix.model_cfg.layers, mix.cfg.rank
  for m in mix.cfg.modules:
    d_in, d_out = shapes[m]
    a = np.zeros((layers, d_in, len(loras), r), np.float32)
    b = np.zeros((layers, len(loras), r, d_out), np.float32)
    for e, lora in enumerate(loras):
      if m in lora.A:
        a[:, :, e, :lora.rank] = lora.A[m]
        b[:, e, :lora.rank, :] = lora.B[m] / b_scale
    dtype = getattr(mix.pool, f"A_{m}").get_value().dtype
    getattr(mix.pool, f"A_{m}").set_value(jnp.asarray(a, dtype))
    getattr(mix.pool, f"B_{m}").set_value(jnp.asarray(b, dtype))


# -- out ---------------------------------------------------------------------------------------

POOL_FILE = "pool_config.json"
STATE_FILE = "pool_state.safetensors"


def _write_lora(folder: pathlib.Path, a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                base_model: str) -> None:
  """One PEFT LoRA folder at scale 1 (lora_alpha = r): a[m] [L, in, r], b[m] [L, r, out] with
  the scale already in b."""
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  rank = next(iter(a.values())).shape[-1]
  tensors = {}
  for m in a:
    for l in range(a[m].shape[0]):
      key = f"base_model.model.model.{module_path(m, l)}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[m][l].T, np.float32)
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[m][l].T, np.float32)
  save_file(tensors, str(folder / WEIGHTS_FILE))
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
            "target_modules": [OURS_TO_PEFT[m] for m in a], "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True}
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def export_peft(mix, out: str | pathlib.Path, base_model: str = "") -> list[pathlib.Path]:
  """Writes a MixtureOfLoRA as PEFT LoRA folders under `out` and returns them.

  A plain LoRA (mode "lora") is one folder, `out` itself. A pool writes `expert-NN/` per
  expert (each the LoRA that expert is on its own), `shared/` when the pool has a shared part
  (its shared expert, or for a tied pool every expert side by side: the dense LoRA every
  token uses), and `pool_config.json` + `pool_state.safetensors` (the router and the tied
  pool's betas) so that `load_exported` restores the whole pool. `base_model` is recorded as
  PEFT's `base_model_name_or_path`.
  """
  from flax import nnx

  cfg = mix.cfg
  out = pathlib.Path(out)
  check_new_folder(out)
  stacked = {m: [np.asarray(x, np.float32) for x in mix.pool.stacked(m)] for m in cfg.modules}
  live = (np.arange(mix.model_cfg.layers) >= cfg.first_layer).astype(np.float32)

  def factors(e: int | None, prefix: str = ""):
    a, b = {}, {}
    for m in cfg.modules:
      if prefix:
        sa, sb = (np.asarray(x, np.float32) for x in mix.pool.stacked(m, prefix))
        a[m], b[m] = sa, sb
      elif e is None:  # every expert side by side
        fa, fb = stacked[m]
        a[m] = fa.reshape(*fa.shape[:2], -1)
        b[m] = fb.reshape(fb.shape[0], -1, fb.shape[-1])
      else:
        a[m], b[m] = stacked[m][0][:, :, e], stacked[m][1][:, e]
      b[m] = b[m] * cfg.scale * live[:, None, None]
    return a, b

  if cfg.mode == "lora":
    _write_lora(out, *factors(0), base_model)
    return [out]
  folders = []
  for e in range(cfg.num_experts):
    folders.append(out / f"expert-{e:02d}")
    _write_lora(folders[-1], *factors(e), base_model)
  if cfg.tied_shared or cfg.shared_rank:
    _write_lora(out / "shared", *factors(None, "S" if cfg.shared_rank else ""), base_model)
  from safetensors.numpy import save_file

  rest = {}
  for path, value in nnx.to_flat_state(nnx.state(mix.with_layout("stacked"))):
    key = ".".join(str(p) for p in path)
    if not re.match(r"pool\.S?[AB]_", key):
      rest[key] = np.asarray(value.get_value(), np.float32)
  if rest:
    save_file(rest, str(out / STATE_FILE))
  (out / POOL_FILE).write_text(json.dumps(
      {"adapter": cfg.to_dict(), "experts": [f.name for f in folders],
       "shared": "shared" if (cfg.tied_shared or cfg.shared_rank) else None,
       "base_model": base_model}, indent=2))
  return folders


def is_export(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / POOL_FILE).is_file()


def exported_config(path: str | pathlib.Path) -> AdapterConfig:
  """The AdapterConfig recorded by `export_peft` in `path`."""
  path = pathlib.Path(path)
  try:
    meta = json.loads((path / POOL_FILE).read_text())
    return AdapterConfig.from_dict(meta["adapter"])
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ModelFileError(f"{str(path / POOL_FILE)!r} is damaged ({e}); export the pool again"
                         ) from None


def load_exported(path: str | pathlib.Path, model_cfg: ModelConfig, *,
                  dtype: jnp.dtype = jnp.float32):
  """The pool `export_peft` wrote to `path`, router and all (same logits as before export)."""
  from flax import nnx
  from safetensors.numpy import load_file

  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.model.llama import default_layout

  path = pathlib.Path(path)
  cfg = exported_config(path)
  meta = json.loads((path / POOL_FILE).read_text())
  mix = MixtureOfLoRA(model_cfg, cfg, dtype=jnp.float32, layout="stacked")
  _set_experts(mix, [read_lora(path / name, model_cfg) for name in meta["experts"]],
               b_scale=cfg.scale)
  if cfg.shared_rank:
    shared = read_lora(path / meta["shared"], model_cfg)
    for m in cfg.modules:
      getattr(mix.pool, f"SA_{m}").set_value(jnp.asarray(shared.A[m]))
      getattr(mix.pool, f"SB_{m}").set_value(jnp.asarray(shared.B[m] / cfg.scale))
  if (path / STATE_FILE).is_file():
    rest = load_file(str(path / STATE_FILE))
    flat = dict(nnx.to_flat_state(nnx.state(mix)))
    for key, value in rest.items():
      target = next((v for p, v in flat.items() if ".".join(map(str, p)) == key), None)
      if target is None or target.get_value().shape != value.shape:
        raise ModelFileError(f"{str(path / STATE_FILE)!r} holds {key} {value.shape}, which this"
                             " pool's config does not have; export the pool again")
      target.set_value(jnp.asarray(value, target.get_value().dtype))
  mix = jax_cast(mix, dtype)
  return mix.with_layout(default_layout())


def jax_cast(mix, dtype):
  """The pool's arrays in `dtype` (routers included), float32 kept where the dtype is it."""
  from flax import nnx
  import jax

  if jnp.dtype(dtype) == jnp.float32:
    return mix
  graphdef, state = nnx.split(mix)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))
