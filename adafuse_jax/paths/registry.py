"""The one registry of decode paths: what exists, what can run a configuration, the size
thresholds the paths share, and which candidates `auto` measures and how it weighs them.

No other module compares path names: the Generator, the CLIs, the bench and training ask here.
Adding a path = a module in `adafuse_jax/paths/` with a `DecodePath` subclass + one line in
`PATHS` below.
"""

from __future__ import annotations

import dataclasses

import jax

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.sere import SereSettings
from adafuse_jax.config import AdapterConfig
from adafuse_jax.errors import UserError
from adafuse_jax.paths.base import AdapterRuntime, DecodePath, Thresholds
from adafuse_jax.paths.gathered import GatheredPath
from adafuse_jax.paths.merged import MergedPath, merge_blocker
from adafuse_jax.paths.packed import PackedPath
from adafuse_jax.paths.xla import XlaPath
from adafuse_jax.vocab import Mode, PathName, Variant, parse_path

# Measured side by side on the GPU (H100/H200, 7B shape):
# - decode_max_tokens: the BGMV kernels are matrix-vector designs; for prompts XLA's GEMMs win
#   (prefill of 512 tokens: 64.1 ms in the fused kernel vs 32.3 ms in XLA, H100).
# - gather_max_share: at batch 1 (E=8, k=2, all modules) gathering the chosen experts took
#   14.2 ms/token, all E densely 17.2, one dynamic slice per expert 37.0 (H100).
# - segmented_min_share: SGMV reads only the chosen experts but writes and re-reads one row per
#   (token, choice); the dense GEMMs win while E·r is a small share of the module's input.
# fused_base_max_width: on the H200 at 64 rank-64 experts (E·r = 4096), batch 32, the gathered
# kernels with the base folded in ran at 36% of their floor where XLA's GEMMs on path packed ran
# at 74% (docs/benchmarks.md, "Large pools"): wide pools take XLA's base GEMM.
# fused_base_max_rows: a narrow pool (8 experts, E·r = 128 and 512) at batch 1 runs its whole
# step (SERE on) faster with the base folded in (1.286x and 1.356x the backbone, against 1.368x and
# 1.483x with XLA's base); from 2 rows on slower (E·r = 128 at batch 2, 4, 8, 16: 1.427x, 1.499x,
# 1.504x, 1.539x fused against 1.373x, 1.408x, 1.449x, 1.398x; E·r = 512 at batch 32: 1.723x
# against 1.629x; docs/benchmarks/h200/gathered-probe/e8r*-top2-b*.md): one row.
THRESHOLDS = Thresholds(decode_max_tokens=64, gather_max_share=0.25, segmented_min_share=0.25,
                        fused_base_max_width=512, fused_base_max_rows=1)

PATHS: dict[PathName, DecodePath] = {p.name: p for p in (
    XlaPath(THRESHOLDS),
    PackedPath(THRESHOLDS),
    GatheredPath(THRESHOLDS),
    MergedPath(THRESHOLDS),
)}

# Fastest measured at batch-1 decode on the CPU and on the GPU (docs/benchmarks.md), for any mode.
DEFAULT_PATH = PathName.PACKED


def get(path: str | PathName) -> DecodePath:
  """The DecodePath of a name ("auto" is not a path: see `adafuse_jax.auto`)."""
  name = parse_path(str(path))
  if name == PathName.AUTO:
    raise UserError("path 'auto' measures the candidates: use adafuse_jax.choose_path (or"
                    " --path auto on the command line), then build the Generator it returns")
  return PATHS[name]


def is_auto(path: str | PathName) -> bool:
  return parse_path(str(path)) == PathName.AUTO


def check(path: str | PathName, adapter_cfg: AdapterConfig | None, *,
          layout: str = "stacked", shared_folded: bool = False) -> DecodePath:
  """The DecodePath, after checking it can run these adapters (None: the backbone) in this
  weight layout; `UserError` naming the fix otherwise. `shared_folded`: check the adapters as a
  Generator runs them, their shared expert folded into the backbone first."""
  decode_path = get(path)
  if shared_folded and adapter_cfg is not None:
    adapter_cfg = as_generator_runs(adapter_cfg)
  reason = decode_path.blocker(adapter_cfg, layout)
  if reason is not None:
    raise UserError(f"path {decode_path.name.value!r}: {reason}")
  return decode_path


def as_generator_runs(adapter_cfg: AdapterConfig) -> AdapterConfig:
  """The adapters' configuration as a Generator's decode path sees it: a shared expert (tied or
  not) is folded into the backbone first, so only the routed experts remain."""
  if adapter_cfg.has_shared:
    return adapter_cfg.replace(shared_rank=0, tied_shared=False)
  return adapter_cfg


def runtime(adapters: MixtureOfLoRA, path: str | PathName = PathName.XLA, *,
            derived=None, sere: SereSettings | None = None, backend: str = "auto"
            ) -> AdapterRuntime:
  """The `LinearFn` of one forward pass of these adapters on a path (plain XLA by default: what
  training, evaluation and calibration run)."""
  return check(path, adapters.cfg).runtime(adapters, derived, sere=sere, backend=backend)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One path `auto` measures: the variant's name, its path and kernel backend."""

  name: str
  path: PathName
  backend: str = "auto"

  @property
  def merges(self) -> bool:
    return PATHS[self.path].merges


def candidates(adapter_cfg: AdapterConfig, *, layout: str, batch: int,
               agree_rate: float | None = None) -> list[Candidate]:
  """The paths that can run this configuration on this backend. A batch of several sequences
  gets the merged candidate only when its rows are expected to agree on their experts at some
  steps (`agree_rate` > 0): otherwise every merged step would run unmerged, as the other
  candidates do, plus a copy of the weights."""
  # The candidates run in Generators, which fold a shared expert into the backbone first.
  adapter_cfg = as_generator_runs(adapter_cfg)
  mode = Mode(adapter_cfg.mode)
  names = [PathName.XLA, PathName.PACKED]
  if jax.default_backend() != "cpu" and layout == "stacked":
    names.append(PathName.GATHERED)
  if (batch == 1 or (agree_rate or 0.0) > 0) and merge_blocker(adapter_cfg) is None:
    names.append(PathName.MERGED)
  return [Candidate(Variant(mode, p).name, p) for p in names
          if PATHS[p].blocker(adapter_cfg, layout) is None]


def expected_ms(measured: dict[str, float], *, switch_rate: float, batch: int,
                agree_rate: float | None) -> float:
  """A candidate's expected decode ms/token from its timings: an unmerged path's `step`; a
  merged one's `switched` and `unchanged` steps weighted by the switch rate, and at batch > 1
  by the share of steps whose rows agree (the others run `disagreed`, unmerged)."""
  if "step" in measured:
    return measured["step"]
  cost = switch_rate * measured["switched"] + (1 - switch_rate) * measured["unchanged"]
  if batch > 1:
    cost = agree_rate * cost + (1 - agree_rate) * measured["disagreed"]
  return cost


def describe() -> str:
  """One line per path: its name and what it does (for --help and the docs)."""
  return "\n".join(f"{p.name.value}: {p.summary}" for p in PATHS.values())
