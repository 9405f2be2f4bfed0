"""The project's one vocabulary for adapter modes, decode paths and kernel backends.

Every surface (the Python API, `python -m adafuse_jax.decode`, the bench, training, the
registry) spells these through the enums and parse functions here; the bench's and training's
names are built from them, never re-typed.

- `Mode`: how tokens are routed to experts (what a pool *is*).
- `PathName`: how the chosen experts are applied in a forward pass (how a pool *runs*); the
  paths themselves, their checks and `auto` live in `adafuse_jax.paths.registry`.
- `BACKENDS`: which kernel implementation a path's Pallas op runs (`pallas_kernels`).
- `Variant`: a bench row, a mode on a path (plus SERE or a kernel backend), e.g.
  `pregated-gathered`, `pregated-merged@xla`, `pregated-packed+sere`.
"""

from __future__ import annotations

import dataclasses
import enum

from adafuse_jax.errors import UserError
from pallas_kernels.common import BACKENDS


class Mode(enum.StrEnum):
  """How tokens are routed: no adapters, one plain LoRA, a router at every adapted module
  (MoLA / MixLoRA), or one router that decides once for every layer (AdaFuse / LoRA-Switch)."""

  BACKBONE = "backbone"
  LORA = "lora"
  LAYERWISE = "layerwise"
  PREGATED = "pregated"


class PathName(enum.StrEnum):
  """How the experts are applied (see `adafuse_jax.paths`)."""

  XLA = "xla"            # plain XLA matmuls beside the backbone's
  PACKED = "packed"      # every expert's A appended to the backbone's matrices
  GATHERED = "gathered"  # Pallas BGMV (decode) / SGMV (prompts): only the step's experts
  MERGED = "merged"      # experts switched into the weights (SGMM), then a backbone pass
  AUTO = "auto"          # measure the candidates, run the fastest


MODES: tuple[str, ...] = tuple(Mode)
PATHS: tuple[str, ...] = tuple(PathName)
# How a decode step's attention may run (`adafuse_jax.model.layers.ATTENTION`, which says what
# each is); "auto" takes the library's choice for the devices.
ATTENTIONS: tuple[str, ...] = ("xla", "windowed", "pallas", "pallas-append")

# Spellings of earlier versions: the old name -> (path, kernel backend).
_LEGACY_PATHS = {"pallas": (PathName.GATHERED, "auto"), "fused": (PathName.GATHERED, "auto")}


def parse_mode(text: str, *, flag: str = "mode") -> Mode:
  """A `Mode` from its name; `UserError` listing the choices otherwise."""
  try:
    return Mode(text)
  except ValueError:
    raise UserError(f"unknown {flag} {text!r}; choose one of {', '.join(MODES)}") from None


def parse_path(text: str, *, flag: str = "path") -> PathName:
  """A `PathName` from its name; an earlier spelling is refused with its new one."""
  try:
    return PathName(text)
  except ValueError:
    pass
  if text in _LEGACY_PATHS:
    raise UserError(f"{flag} {text!r} is now spelled {_LEGACY_PATHS[text][0].value!r}")
  raise UserError(f"unknown {flag} {text!r}; choose one of {', '.join(PATHS)}")


def parse_backend(text: str, *, flag: str = "backend") -> str:
  if text not in BACKENDS:
    raise UserError(f"unknown {flag} {text!r}; choose one of {', '.join(BACKENDS)}")
  return text


def legacy_path(implementation: str | None, merge: bool) -> tuple[PathName | None, str]:
  """(path, backend) for the decode CLI's earlier `--implementation X [--merge]` spelling.

  implementation None keeps the path unset (the caller's default applies)."""
  if merge and implementation not in (None, "xla", "pallas"):
    raise UserError(f"--merge (now --path merged) folds experts into the weights; --implementation"
                    f" {implementation} applies them unmerged: drop one")
  if merge:
    return PathName.MERGED, "xla" if implementation == "xla" else "auto"
  if implementation is None:
    return None, "auto"
  if implementation in _LEGACY_PATHS:
    return _LEGACY_PATHS[implementation]
  return parse_path(implementation, flag="--implementation"), "auto"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One configuration of the bench: a mode on a path, optionally with SERE re-routing, a
  named kernel backend or a forced attention
  (`MODE[-PATH][@BACKEND][+sere][+NAME-attention]`, NAME one of `ATTENTIONS`; without a
  suffix the library's default, "auto"). `name` and `parse_variant` are inverse."""

  mode: Mode
  path: PathName = PathName.XLA
  sere: bool = False
  backend: str = "auto"
  attention: str = "auto"  # or forced: one of ATTENTIONS (`+NAME-attention`)

  @property
  def name(self) -> str:
    text = self.mode.value if self.mode == Mode.BACKBONE and self.path == PathName.XLA else (
        f"{self.mode.value}-{self.path.value}")
    if self.backend != "auto":
      text += f"@{self.backend}"
    text += "+sere" if self.sere else ""
    return text + (f"+{self.attention}-attention" if self.attention != "auto" else "")


# Bench names of earlier versions, accepted with a note of the new name.
_LEGACY_VARIANTS = {
    "pregated-merged-xla": "pregated-merged@xla",
    "pregated-fused-sere": "pregated-gathered+sere", "pregated-packed-sere": "pregated-packed+sere",
}


def parse_variant(text: str) -> tuple[Variant, str | None]:
  """(the Variant a bench name means, a note when it was an earlier spelling, else None).

  `pregated` alone means `pregated-xla`; `-fused` is the earlier `-gathered`."""
  original = text
  if text.endswith("-fused-dense"):
    raise UserError(f"bench mode {text!r} ran the dense fused kernel, which was removed (the"
                    " gathered kernels read fewer bytes); use"
                    f" {text.replace('-fused-dense', '-gathered')!r}")
  if text in _LEGACY_VARIANTS:
    text = _LEGACY_VARIANTS[text]
  text, *flags = text.split("+")
  known = ("sere", *(f"{name}-attention" for name in ATTENTIONS))
  for flag in flags:
    if flag not in known:
      raise UserError(f"bench mode {original!r}: unknown suffix '+{flag}'; choose from"
                      f" {', '.join('+' + k for k in known)}")
  sere = "sere" in flags
  forced = [f.removesuffix("-attention") for f in flags if f.endswith("-attention")]
  if len(forced) > 1:
    raise UserError(f"bench mode {original!r} names two attentions; keep one suffix")
  attention = forced[0] if forced else "auto"
  text, _, backend = text.partition("@")
  mode_text, _, path_text = text.partition("-")
  mode = parse_mode(mode_text, flag="bench mode")
  legacy = original in _LEGACY_VARIANTS or path_text in _LEGACY_PATHS
  if path_text in _LEGACY_PATHS:
    path = _LEGACY_PATHS[path_text][0]
  else:
    path = parse_path(path_text, flag=f"path of bench mode {original!r}") if path_text else (
        PathName.XLA)
  variant = Variant(mode, path, sere, parse_backend(backend) if backend else "auto", attention)
  return variant, (f"bench mode {original!r} is now spelled {variant.name!r}" if legacy else None)
