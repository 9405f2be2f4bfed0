"""The README's test command finishes when a worker is killed mid-run (the out-of-memory killer
on a busy machine): a small suite run by pytest-xdist with `--dist loadgroup`, as the README's
command runs ours, whose worker is SIGKILLed in one test. With xdist's own group scheduler
such a run sits idle forever (tests/xdist_crash_safe.py says why)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFTEST = """
from tests.xdist_crash_safe import make_scheduler

def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log)
"""

# A busy machine, made certain: the controller reads test_k1's report only after its worker has
# died in test_k2, and before xdist's reader thread has marked that worker down, so the
# scheduler's answer to the report (more work: the queue still holds test_after's units) meets
# a broken pipe.
CONFTEST_LATE_READER = """
import time
from tests.xdist_crash_safe import CrashSafeLoadGroup

class LateReader(CrashSafeLoadGroup):
    def mark_test_complete(self, node, item_index, duration=0):
        if not self.registered_collections[node][item_index].startswith("test_suite.py::test_k1"):
            return super().mark_test_complete(node, item_index, duration)
        time.sleep(1.0)  # test_k2 kills the worker meanwhile; the reader thread marks it down
        down, node._down = node._down, False  # as if the reader thread had not got there yet
        try:
            super().mark_test_complete(node, item_index, duration)
        finally:
            node._down = down

def pytest_xdist_make_scheduler(config, log):
    return LateReader(config, log)
"""

# Finished groups before the kill (requeued empty by xdist), a group after it, a crash that is
# not the last test, one that is the last test in its group (the replacement's lone unit), and
# a worker that died before the controller read its last report.
SUITES = {
    "kill-between-groups": """
        import os, signal, time
        import pytest

        @pytest.mark.xdist_group("a")
        def test_a1(): time.sleep(0.3)
        @pytest.mark.xdist_group("a")
        def test_a2(): time.sleep(0.3)
        @pytest.mark.parametrize("i", range(6))
        def test_before(i): time.sleep(0.2)
        def test_killed(): os.kill(os.getpid(), signal.SIGKILL)
        @pytest.mark.parametrize("i", range(6))
        def test_after(i): time.sleep(0.2)
        @pytest.mark.xdist_group("b")
        def test_b1(): time.sleep(0.3)
        @pytest.mark.xdist_group("b")
        def test_b2(): pass
    """,
    "kill-inside-group": """
        import os, signal, time
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_before(i): time.sleep(0.2)
        @pytest.mark.xdist_group("g")
        def test_g1(): time.sleep(0.2)
        @pytest.mark.xdist_group("g")
        def test_g2_killed(): os.kill(os.getpid(), signal.SIGKILL)
        @pytest.mark.xdist_group("g")
        def test_g3(): pass
        @pytest.mark.xdist_group("h")
        def test_h_last_killed(): time.sleep(1.0); os.kill(os.getpid(), signal.SIGKILL)
    """,
    "kill-before-report-read": """
        import os, signal, time
        import pytest

        @pytest.mark.xdist_group("k")
        def test_k1(): pass
        @pytest.mark.xdist_group("k")
        def test_k2_killed(): os.kill(os.getpid(), signal.SIGKILL)
        @pytest.mark.parametrize("i", range(8))
        def test_after(i): time.sleep(0.3)
    """,
}
CONFTESTS = {"kill-before-report-read": CONFTEST_LATE_READER}
EXPECTED = {"kill-between-groups": (1, 16), "kill-inside-group": (2, 6),
            "kill-before-report-read": (1, 9)}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_killed_worker_does_not_hang_the_run(tmp_path, suite):
  (tmp_path / "conftest.py").write_text(CONFTESTS.get(suite, CONFTEST))
  (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITES[suite]))
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  try:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--dist", "loadgroup", "test_suite.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"the run hung after a worker was killed:\n{e.stdout}")
  out = run.stdout
  assert run.returncode == 1, out
  assert "crashed while running" in out, out
  failed, passed = EXPECTED[suite]
  # Every test ran once: the killed ones failed, none of them twice, every other one passed.
  assert re.search(rf"\b{failed} failed, {passed} passed\b", out), out
