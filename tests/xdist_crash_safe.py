"""A `--dist loadgroup` scheduler that finishes the run when a worker dies.

When the kernel's out-of-memory killer (or anything else) ends a pytest-xdist worker, xdist
3.8's group scheduler can stop handing out work and the run sits idle forever:
- `remove_node` puts the dead worker's *whole* workload back on the queue, the groups it had
  already finished included; each comes back as an empty unit that a worker is sent and never
  reports on, so the survivors park waiting for a next test (pytest-xdist issues 1323, 1378);
- the test the worker died on goes back too, and the replacement runs it again (issue 1371);
- a replacement worker is given one unit, and a worker runs its last test only once it knows
  the next one (or is told to shut down), so it waits forever (issue 1327);
- on a busy machine the controller can read a worker's last report after the worker died but
  before xdist's reader thread marked it down; sending it more work then raises OSError
  (broken pipe) out of the scheduler, an INTERNALERROR that ends the whole run.

`CrashSafeLoadGroup` requeues only unfinished groups, drops the test that crashed (xdist has
already reported it failed), and gives a new worker two units or the shutdown that follows its
last, and leaves a unit it could not send to a dead worker assigned to it: the worker's
`errordown` event follows, and `remove_node` requeues it. `conftest.py` installs it for `--dist
loadgroup`; `tests/test_suite_safety.py` kills a worker mid-run and checks that the run ends
with every other test run.
"""

from __future__ import annotations

import contextlib
from typing import Any

from xdist.scheduler import LoadGroupScheduling


class CrashSafeLoadGroup(LoadGroupScheduling):
  """LoadGroupScheduling whose recovery from a dead worker cannot leave the run idle."""

  def remove_node(self, node: Any) -> str | None:
    workload = self.assigned_work.pop(node)
    crashed = next((nodeid for unit in workload.values()
                    for nodeid, done in unit.items() if not done), None)
    if crashed is None:  # a clean shutdown: nothing was pending
      return None
    for unit in workload.values():
      if crashed in unit:
        unit[crashed] = True  # reported failed by xdist already: never run it again
    self.workqueue.update({scope: unit for scope, unit in workload.items()
                           if not all(unit.values())})
    for other in self.assigned_work:
      self._reschedule(other)
    return crashed

  def _assign_work_unit(self, node: Any) -> None:
    # A broken pipe: the worker died after its last report (xdist's own `shutdown` ignores the
    # error the same way). The unit stays in its workload, which `remove_node` requeues.
    with contextlib.suppress(OSError):
      super()._assign_work_unit(node)

  def schedule(self) -> None:
    if self.collection is None:
      super().schedule()
      return
    # A replacement joined after the first distribution: a worker runs a test once it knows
    # the next one, so give it a second unit, or the shutdown that lets it run its only one.
    for node in self.nodes:
      for _ in range(2):  # a no-op for a node with work enough or already shutting down
        self._reschedule(node)


def make_scheduler(config: Any, log: Any) -> CrashSafeLoadGroup | None:
  """The scheduler for `--dist loadgroup`; None (xdist's own choice) for other modes."""
  if config.getvalue("dist") != "loadgroup":
    return None
  return CrashSafeLoadGroup(config, log)
