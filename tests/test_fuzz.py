"""The fuzz harness (`tests/fuzz_inputs.py`), a few seeded cases of every class of bad input:
every case succeeds with finite (and, for pools and checkpoints, unchanged) output or fails with
a named error; none raises an unnamed exception, none corrupts silently. `tools/fuzz_table.py`
runs more cases and writes docs/robustness.md."""

from __future__ import annotations

import pytest

from tests.fuzz_inputs import CLASSES


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_inputs_succeed_or_fail_by_name(name, tmp_path):
  counts = CLASSES[name](8, 20261203, tmp_path)
  assert sum(counts.values()) == 8
  assert counts["traceback"] == 0 and counts["corrupt"] == 0, dict(counts)
