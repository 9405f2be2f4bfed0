"""What `pip install .` (not editable) ships: every package folder of the sources."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
  """setuptools installs exactly the packages pyproject names (a sub-package is not implied by
  its parent): a folder left out imports from a checkout but is missing from a wheel."""
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(config["packages"])
  dirs = {v: k for k, v in config.get("package-dir", {}).items()}
  found = set()
  for top in ("adafuse_jax", "pallas_kernels", "train"):
    for init in (ROOT / top).rglob("__init__.py"):
      rel = init.parent.relative_to(ROOT).as_posix()
      found.add(dirs.get(rel, rel.replace("/", ".")))
  assert found - listed == set(), f"package folders missing from pyproject.toml: {found - listed}"
  assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {listed - found}"
