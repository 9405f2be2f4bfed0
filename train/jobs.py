"""Several `python -m adafuse_jax.train` processes side by side on one machine (`all --jobs N`).

One small model's training leaves most of a large GPU and of the host idle: XLA compiles on
one core, a step of SmolLM2-135M at 16 x 256 tokens is short, and evaluation decodes item by
item. N processes overlap their compilations on the host's cores and their kernels on the GPU.
Each job gets 1/N of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless already set) and
writes its log to its own file; the caller reads their results from the files they leave.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from adafuse_jax.errors import UserError

# What the processes together may take of the GPU's memory; the rest is the driver's and
# XLA's own headroom (the default for one process is 0.75).
GPU_MEMORY_SHARE = 0.9


def job_env(max_jobs: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of each job: `base` (default os.environ) with the GPU memory split."""
  env = dict(os.environ if base is None else base)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY_SHARE / max_jobs:.3f}")
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def _tail(path: pathlib.Path, lines: int = 15) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return "(no log)"


def run_jobs(jobs: Sequence[tuple[str, Sequence[str]]], max_jobs: int, log_dir: pathlib.Path,
             progress: bool = True, poll_s: float = 0.2) -> dict[str, float]:
  """Runs each (name, argv) as a subprocess, at most `max_jobs` at once, in the given order.

  Each job's stdout and stderr go to log_dir/NAME.log. Returns {name: wall seconds}. If a job
  fails, no new one starts, the running ones finish, and a UserError names every failed job with
  its log's last lines. On an interruption (Ctrl-C, SIGTERM as from `timeout`) the running jobs
  are terminated before this returns, so that none outlives its caller.
  """
  if max_jobs < 1:
    raise UserError(f"--jobs={max_jobs} must be at least 1")
  log_dir.mkdir(parents=True, exist_ok=True)
  env = job_env(max_jobs)
  pending = list(jobs)
  running: dict[str, tuple[subprocess.Popen, float]] = {}
  seconds: dict[str, float] = {}
  failed: list[str] = []

  def on_term(signum, frame):  # `timeout` sends SIGTERM; unwind through the finally below
    # Once: `timeout` signals its whole process group too, so a second SIGTERM can arrive while
    # the finally below is stopping the jobs, and must not cut that short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")

  # Python delivers signals to the main thread only; elsewhere the caller's own handling stands.
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, on_term) if in_main_thread else None
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(pending), desc=f"jobs (<= {max_jobs} at once)", unit="job")
  try:
    while pending or running:
      while pending and len(running) < max_jobs and not failed:
        name, argv = pending.pop(0)
        with open(log_dir / f"{name}.log", "w") as log:
          proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env)
        running[name] = (proc, time.perf_counter())
        print(f"# {name}: started (log: {log_dir / f'{name}.log'})", file=sys.stderr)
      if failed and not running:
        break
      time.sleep(poll_s)
      for name, (proc, t0) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        seconds[name] = time.perf_counter() - t0
        if proc.returncode != 0:
          failed.append(name)
        print(f"# {name}: {'failed' if proc.returncode else 'finished'} after"
              f" {seconds[name]:.0f} s", file=sys.stderr)
        if bar is not None:
          bar.update(1)
          bar.set_postfix_str(",".join(running) or "-")
  finally:
    for proc, _ in running.values():
      proc.terminate()
    for proc, _ in running.values():
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)
    if bar is not None:
      bar.close()
  if failed:
    raise UserError("; ".join(
        f"job {name} failed (log {log_dir / f'{name}.log'}; its end:\n{_tail(log_dir / f'{name}.log')}\n)"
        for name in failed) + (f"; not started: {', '.join(n for n, _ in pending)}" if pending else ""))
  return seconds
