"""Figures a bench report derives from its measurements, when it is measured and again when
`--table` renders a stored results.json: each row's ratio to the baseline row and each path's
own floor. Nothing here times anything."""

from __future__ import annotations

from adafuse_jax.bench import measure as B
from adafuse_jax.vocab import Mode, Variant


def _attention(mode: str) -> str:
  """A row's attention suffix ("" for the default)."""
  return next((f for f in mode.split("+")[1:] if f.endswith("-attention")), "")


def _is_backbone(mode: str) -> bool:
  """"backbone", "backbone[layout]", "backbone-packed+pallas-attention", ..."""
  name = Variant(Mode.BACKBONE).name
  return mode == name or (mode.startswith(name) and mode[len(name)] in "[-+")


def baseline_row(rows: list[dict], attention: str | None = None) -> dict | None:
  """The backbone row ratios are to: the plain backbone's when it ran, else the first row of
  the backbone mode (a run of `backbone-packed,...` compares against the fused-weight
  backbone); with `attention` (a suffix such as "pallas-attention", "" for none), only among
  backbone rows with that suffix."""
  name = Variant(Mode.BACKBONE).name
  backbones = [r for r in rows if _is_backbone(r["mode"])
               and (attention is None or _attention(r["mode"]) == attention)]
  plain = [r for r in backbones if r["mode"].split("+")[0] == name
           or r["mode"].startswith(name + "[")]
  return (plain or backbones or [None])[0]


def add_ratios(rows: list[dict]) -> dict[str, str]:
  """Each row's ratio to its backbone row, synced and pipelined, with the paired-round interval
  where the rows were timed in interleaved rounds. A row with adapters is compared with the
  backbone row of the same attention suffix (`+pallas-attention`, `+xla-attention` or none)
  where the run has one: the adapters' cost over the backbone they ride on. Backbone rows, and
  rows without such a backbone, are compared with `baseline_row(rows)`. Returns {row: the row
  its ratios are to}."""
  fallback = baseline_row(rows)
  bases = {}
  for r in rows:
    # A backbone row compares with the reference backbone (what its attention changes); other
    # rows with the backbone of their own attention (what the adapters add on it).
    base = fallback if _is_backbone(r["mode"]) else (
        baseline_row(rows, _attention(r["mode"])) or fallback)
    if base is not None:
      bases[r["mode"]] = base["mode"]
    r["ratio_to_backbone"] = (r["decode"]["median_ms"] / base["decode"]["median_ms"]
                              ) if base else None
    both = base is not None and r.get("decode_pipelined") and base.get("decode_pipelined")
    r["pipelined_ratio_to_backbone"] = (
        r["decode_pipelined"]["median_ms"] / base["decode_pipelined"]["median_ms"]
    ) if both else None
    if base is not None and "rounds_pipelined_ms" in r and "rounds_pipelined_ms" in base:
      r["pipelined_ratio_interval"] = B.ratio_interval(r["rounds_pipelined_ms"],
                                                       base["rounds_pipelined_ms"])
      r["synced_ratio_interval"] = B.ratio_interval(r["rounds_synced_ms"],
                                                    base["rounds_synced_ms"])
  return bases


def add_path_floors(report: dict) -> None:
  """`path_floor_ms` on each row: the bytes *this path* reads per step over the ceiling. A row's
  `floor_ms` counts the experts a step can use at most (k per token, at most E: the op's
  floor); a path that computes the whole pool (packed) reads all E, one that gathers reads the
  step's measured distinct experts (`DecodePath.experts_read`). Rows whose path decides
  otherwise (merged switches, auto without a choice, the PyTorch peer) keep `floor_ms`.
  Needs the report's preset to be a named one (else nothing is added)."""
  from adafuse_jax import costs
  from adafuse_jax.config import PRESETS, AdapterConfig
  from adafuse_jax.paths import registry
  from adafuse_jax.vocab import parse_variant

  cfg = PRESETS.get(report["preset"])
  if cfg is None:
    return
  adapter = AdapterConfig.from_dict(report["adapter"])
  ceiling = report.get("ceiling_tb_s", report["copy_bandwidth_tb_s"]) * 1e12
  for r in report["results"]:
    if "path_floor_ms" in r or "floor_ms" not in r:
      continue
    r["path_floor_ms"] = r["floor_ms"]
    if r["mode"] == "pytorch-peer":
      continue
    variant, _ = parse_variant(r["mode"].split("[")[0])
    path = r["auto"]["decode_path"] if r.get("auto") else variant.path
    if variant.mode == Mode.BACKBONE or registry.is_auto(path):
      continue
    decode_path = registry.get(path)
    read = decode_path.experts_read(adapter.num_experts, r.get("distinct_experts"))
    if read is None or decode_path.merges:
      continue
    nbytes = costs.decode_bytes(cfg, report["dtype"], report["cache_len"] // 2, report["batch"],
                                adapter.replace(mode=variant.mode), experts=read)
    r["path_floor_ms"] = nbytes // report.get("devices", 1) / ceiling * 1e3
