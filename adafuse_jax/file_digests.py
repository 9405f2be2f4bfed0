"""SHA-256 digests of the files of a folder the project wrote (an adapter pool's `state/`, a
training checkpoint's step folder), recorded when it is saved and checked before a load reads
any of them: a damaged file is named before the checkpoint library touches it (a library that
fails half-way through a damaged restore leaves background work that complains after the
error), and no arithmetic runs on it."""

from __future__ import annotations

import hashlib
import pathlib


def folder_digests(folder: str | pathlib.Path) -> dict[str, str]:
  """{path relative to `folder`: "sha256:<hex>"} for every file below it."""
  folder = pathlib.Path(folder)
  return {f.relative_to(folder).as_posix(): file_digest(f)
          for f in sorted(p for p in folder.rglob("*") if p.is_file())}


def damaged_files(folder: str | pathlib.Path, recorded: dict[str, str]) -> list[str]:
  """The recorded files that are missing, changed or unreadable below `folder` (empty: all
  intact). Files written after the record (none, for the folders above) are not checked."""
  folder = pathlib.Path(folder)
  bad = []
  for rel, digest in sorted(recorded.items()):
    try:
      now = file_digest(folder / rel)
    except OSError:
      now = None
    if now != digest:
      bad.append(rel)
  return bad


def file_digest(path: pathlib.Path) -> str:
  """"sha256:<hex>" of one file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return "sha256:" + h.hexdigest()
