"""Every notebook runs top to bottom on the CPU (executed with nbclient, failing on any error),
and each .ipynb matches its jupytext pair (notebooks/*.py, the diff-friendly source)."""

from __future__ import annotations

import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
  assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_fused_switching", "03_benchmarks",
                                         "04_training"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_text_pair(path):
  jupytext = pytest.importorskip("jupytext")
  pair = jupytext.read(path.with_suffix(".py"))
  nb = jupytext.read(path)
  assert [c.source for c in nb.cells] == [c.source for c in pair.cells], (
      f"{path.name} and its .py pair differ: run `jupytext --sync {path.with_suffix('.py')}`")
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{path.name} has outputs committed; strip them")


# 04 prepares the shared data cache: under pytest-xdist it runs in the worker that holds the
# other tests touching that cache (`--dist loadgroup`), never beside them.
@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xdist_group("data-cache")) if p.stem == "04_training" else p
    for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError naming the failing cell
