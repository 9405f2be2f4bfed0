"""`python -m adafuse_jax.bench` on the CPU: a tiny run writes valid results; bad arguments fail."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest


def run_bench(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "adafuse_jax.bench", *args], capture_output=True,
                        text=True, timeout=600)


def test_tiny_run_writes_json_table_and_plot(tmp_path):
  out = run_bench("--preset", "tiny", "--steps", "2", "--warmup", "1", "--prefill", "16",
                  "--batch", "4", "--rounds", "3", "--modes",
                  "backbone,backbone-packed,pregated,pregated-gathered,pregated-gathered+sere,"
                  "pregated-auto,layerwise-packed",
                  "--out", str(tmp_path))
  assert out.returncode == 0, out.stderr
  report = json.loads((tmp_path / "results.json").read_text())
  modes = [r["mode"] for r in report["results"]]
  assert modes == ["backbone", "backbone-packed", "pregated-xla", "pregated-gathered",
                   "pregated-gathered+sere", "pregated-auto", "layerwise-packed"]
  for r in report["results"]:
    assert r["decode"]["median_ms"] > 0 and r["floor_ms"] > 0 and r["kernels_per_step"] > 0
    assert r["decode_pipelined"]["median_ms"] > 0 and r["decode_pipelined"]["n"] == 3
    assert len(r["rounds_pipelined_ms"]) == len(r["rounds_synced_ms"]) == 3
    iv = r["pipelined_ratio_interval"]
    assert iv["rounds"] == 3 and 0 < iv["low"] <= iv["high"]
  by_mode = {r["mode"]: r for r in report["results"]}
  # SERE with rho = 0 and S = 1: every secondary choice lands on a primary expert.
  assert 1 <= by_mode["pregated-gathered+sere"]["distinct_experts"] <= 4
  assert by_mode["pregated-gathered+sere"]["sere"] == {"rho": 0.0, "primary_k": 1}
  auto = by_mode["pregated-auto"]["auto"]
  assert auto["path"] in auto["expected_ms"] and "pregated-auto` chose" in out.stdout
  assert report["environment"]["jax"] and report["copy_bandwidth_tb_s"] > 0
  assert (tmp_path / "decode.png").stat().st_size > 1000
  assert "| backbone |" in out.stdout
  assert by_mode["backbone"]["ratio_to_backbone"] == 1.0  # the plain backbone is the reference
  # paired by round, the backbone against itself is exactly 1 with no spread
  assert by_mode["backbone"]["pipelined_ratio_interval"] == {"median": 1.0, "rounds": 3,
                                                             "low": 1.0, "high": 1.0}
  assert "interleaved rounds" in out.stdout and "[1.000, 1.000]" in out.stdout


def test_merged_batch_table_times_identical_rows(tmp_path):
  """At batch > 1 the merged table's steps run on identical rows (they agree: merged passes),
  one fed back (it switches), one fed a fixed token (it switches at most once)."""
  out = run_bench("--preset", "tiny", "--steps", "3", "--warmup", "1", "--prefill", "",
                  "--batch", "2", "--modes", "backbone,pregated-merged", "--out", str(tmp_path))
  assert out.returncode == 0, out.stderr
  merged = json.loads((tmp_path / "results.json").read_text())["results"][1]
  assert merged["decode_agreed_unchanged"]["median_ms"] > 0
  assert merged["agreed_unchanged_switches"] <= 1 and merged["agreed_unmerged_share"] == 0
  row = next(line for line in out.stdout.splitlines()
             if line.startswith("| pregated-merged |") and line.count("|") == 7)
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert float(cells[1]) == pytest.approx(merged["decode_agreed"]["median_ms"], abs=1e-3)
  assert float(cells[3]) == pytest.approx(merged["decode_agreed_unchanged"]["median_ms"], abs=1e-3)
  assert "Recorded before identical rows" not in out.stdout
  assert "decode_unchanged" not in merged  # disagreeing rows would time an unmerged step again


@pytest.mark.parametrize("args, message", [
    (("--preset", "gpt-5"), "unknown preset"),
    (("--preset", "tiny", "--experts", "1", "--top-k", "2"), "larger than num_experts"),
    (("--preset", "tiny", "--batch", "0"), "--batch=0"),
    (("--preset", "tiny", "--modes", "turbo"), "unknown bench mode 'turbo'"),
    (("--preset", "tiny", "--modes", "pregated-cuda"), "unknown path of bench mode"),
    (("--preset", "tiny", "--modes", "pregated-fused-dense"), "use 'pregated-gathered'"),
    (("--preset", "tiny", "--sere-rho", "1.5"), "--sere-rho"),
    (("--preset", "tiny", "--switch-rate", "-0.1"), "--switch-rate"),
])
def test_bad_arguments_are_rejected(args, message):
  out = run_bench(*args)
  assert out.returncode == 2
  assert message in out.stderr and "Traceback" not in out.stderr


def test_earlier_mode_names_run_under_their_new_names(tmp_path):
  """Bench names of earlier versions still run, with a note naming the new spelling."""
  out = run_bench("--preset", "tiny", "--steps", "1", "--warmup", "0", "--prefill", "",
                  "--modes", "pregated-fused,pregated-merged-xla", "--out", str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert "'pregated-fused' is now spelled 'pregated-gathered'" in out.stderr
  assert "'pregated-merged-xla' is now spelled 'pregated-merged@xla'" in out.stderr
  modes = [r["mode"] for r in json.loads((tmp_path / "results.json").read_text())["results"]]
  assert modes == ["pregated-gathered", "pregated-merged@xla"]


def _tool(name: str):
  import importlib
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
  return importlib.import_module(name)


def test_throughput_ceiling_counts_distinct_experts_and_bytes(tmp_path, capsys):
  ceiling = _tool("throughput_ceiling")
  assert ceiling.expected_distinct(8, 2, 1) == pytest.approx(2.0)
  assert ceiling.expected_distinct(64, 2, 32) == pytest.approx(40.8, abs=0.1)
  # Monte Carlo: 32 tokens, each 2 distinct of 64 experts.
  rng = np.random.default_rng(0)
  sim = np.mean([len({e for _ in range(32) for e in rng.choice(64, 2, replace=False)})
                 for _ in range(400)])
  assert abs(sim - ceiling.expected_distinct(64, 2, 32)) < 0.5
  text = ceiling.main(["--configs", "64x64", "--batches", "1,32", "--out",
                       str(tmp_path / "c.md")])
  rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 64x64")]
  share = [int(r[5].rstrip("%")) for r in rows]
  assert share[0] > share[1]  # more tokens, more distinct experts, a lower ceiling
  assert (tmp_path / "c.md").read_text() == text
  ceiling.main(["--configs", "8x16", "--plot", str(tmp_path / "c.png"), "--measured",
                str(pathlib.Path(__file__).parents[1] / "docs/benchmarks/h200/batch8")])
  assert (tmp_path / "c.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    ceiling.main(["--configs", "1x16"])  # fewer experts than top-k
  assert "E >= top-k" in capsys.readouterr().err
