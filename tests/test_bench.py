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
  # On the CPU the ceiling is sampled before the rows and after each of the 3 rounds; the best
  # sample divides every floor.
  samples = report["ceiling_samples_tb_s"]
  assert len(samples) == 4 and report["ceiling_tb_s"] == max(samples)
  for r in report["results"]:
    assert r["floor_ms"] == pytest.approx(r["bytes_per_step"] / (max(samples) * 1e12) * 1e3)
  assert "the best of 4 samples" in out.stdout
  assert (tmp_path / "decode.png").stat().st_size > 1000
  assert "| backbone |" in out.stdout
  assert by_mode["backbone"]["ratio_to_backbone"] == 1.0  # the plain backbone is the reference
  # paired by round, the backbone against itself is exactly 1 with no spread
  assert by_mode["backbone"]["pipelined_ratio_interval"] == {"median": 1.0, "rounds": 3,
                                                             "low": 1.0, "high": 1.0}
  assert "interleaved rounds" in out.stdout and "[1.000, 1.000]" in out.stdout
  # --table re-renders the same table from results.json, measuring nothing
  from adafuse_jax.bench.cli import main
  written = (tmp_path / "table.md").read_text()
  assert main(["--table", str(tmp_path / "results.json")]) == 0
  assert (tmp_path / "table.md").read_text() == written


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
    (("--preset", "tiny", "--out", "pyproject.toml"), "is a file; name a folder"),
    (("--preset", "tiny", "--adapters", "default"), "was made for another model than preset"),
    (("--preset", "smollm2-135m", "--adapters", "default", "--modes", "backbone,layerwise"),
     "rows of mode layerwise need --adapters random"),
    (("--preset", "tiny", "--adapters", "no/such/pool"), "does not exist"),
    (("--preset", "tiny", "--adapters", "random:x"), "the seed after 'random:' must be an"),
    # A batch whose cache the device cannot hold: XLA's out-of-memory error as one line.
    (("--preset", "tiny", "--modes", "backbone", "--batch", "20000000", "--cache-len", "1024",
      "--steps", "1", "--rounds", "1", "--prefill", "", "--torch-peer", "off"),
     "the device ran out of memory"),
])
def test_bad_arguments_are_rejected(args, message):
  out = run_bench(*args)
  assert out.returncode == 2
  assert message in out.stderr and "Traceback" not in out.stderr


def test_a_saved_pool_is_benchmarked_as_saved(tmp_path):
  """`--adapters FOLDER` times the saved pool itself (its shape replaces --experts and --rank),
  and the table says which pool it was."""
  from adafuse_jax.adapters.io import save_adapters
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.bench.cli import TINY
  from adafuse_jax.config import AdapterConfig, ModelConfig

  pool = MixtureOfLoRA(ModelConfig(**TINY), AdapterConfig(num_experts=3, rank=2, top_k=1,
                                                          modules=("q", "v")), seed=5)
  save_adapters(tmp_path / "pool", pool)
  out = run_bench("--preset", "tiny", "--steps", "2", "--warmup", "1", "--prefill", "",
                  "--rounds", "1", "--modes", "backbone,pregated-packed", "--adapters",
                  str(tmp_path / "pool"), "--out", str(tmp_path / "run"))
  assert out.returncode == 0, out.stderr
  report = json.loads((tmp_path / "run" / "results.json").read_text())
  assert report["adapters"] == str(tmp_path / "pool")
  assert (report["adapter"]["num_experts"], report["adapter"]["rank"],
          report["adapter"]["top_k"], report["adapter"]["modules"]) == (3, 2, 1, ["q", "v"])
  assert f"pool `{tmp_path / 'pool'}`" in out.stdout
  assert [r["mode"] for r in report["results"]] == ["backbone", "pregated-packed"]


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


def test_ceiling_kernels_compute_what_they_time_and_every_method_reports_a_rate():
  """The ceiling's Pallas read and copy kernels (interpreted here) give the column sums and the
  copy of fresh random data; `measure` times every JAX method."""
  import jax
  import jax.numpy as jnp

  from adafuse_jax.bench import ceiling

  x = jax.random.normal(jax.random.key(3), (384, ceiling.COLS)).astype(jnp.bfloat16)
  sums = ceiling.pallas_read(x, block_rows=128, interpret=True)
  want = np.asarray(x, np.float32).reshape(3, 128, ceiling.COLS).sum(1)
  np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(ceiling.pallas_copy(x, interpret=True)), np.asarray(x))
  with pytest.raises(ValueError, match="multiple of block_rows"):
    ceiling.pallas_read(x[:100], block_rows=64, interpret=True)
  rates = ceiling.measure(1 << 20, rounds=1, reps=1)
  assert {"xla-sum", "xla-add-one", "pallas-copy 64x1024 w4"} <= set(rates)
  assert all(r.tb_s > 0 and r.nbytes > 0 for r in rates.values())
  assert ceiling.ceiling(rates).tb_s == max(r.tb_s for r in rates.values())


def test_ratio_interval_is_paired_by_round():
  from adafuse_jax.bench.measure import ratio_interval

  # the same 5% every round: no spread at all, whatever the rounds' own drift
  same = ratio_interval([1.05, 2.1, 1.575], [1.0, 2.0, 1.5])
  assert same["median"] == pytest.approx(1.05) and same["low"] == pytest.approx(1.05)
  assert same["high"] == pytest.approx(1.05)
  spread = ratio_interval([1.0, 1.2, 1.1, 1.3], [1.0, 1.0, 1.0, 1.0])
  logs = np.log([1.0, 1.2, 1.1, 1.3])
  half = 3.182 * logs.std(ddof=1) / 2  # t(0.975, df 3) with 4 rounds
  assert spread["low"] == pytest.approx(np.exp(logs.mean() - half))
  assert spread["high"] == pytest.approx(np.exp(logs.mean() + half))
  assert "low" not in ratio_interval([1.0], [1.0])  # one round: no interval


def test_bench_row_names_parse_with_the_attention_suffix():
  from adafuse_jax.errors import UserError
  from adafuse_jax.vocab import Mode, PathName, Variant, parse_variant

  variant, note = parse_variant("pregated-packed+sere+pallas-attention")
  assert note is None
  assert variant == Variant(Mode.PREGATED, PathName.PACKED, True, "auto", "pallas")
  assert variant.name == "pregated-packed+sere+pallas-attention"
  assert parse_variant("backbone-packed+pallas-attention")[0].attention == "pallas"
  assert parse_variant("backbone+xla-attention")[0].attention == "xla"
  assert parse_variant("backbone+xla-attention")[0].name == "backbone+xla-attention"
  assert parse_variant("backbone")[0].attention == "auto"  # the library's default
  assert parse_variant("pregated-packed+windowed-attention")[0].attention == "windowed"
  forced = parse_variant("backbone-packed+pallas-append-attention")[0]
  assert forced.attention == "pallas-append"
  assert forced.name == "backbone-packed+pallas-append-attention"
  with pytest.raises(UserError, match=r"unknown suffix '\+flash'; choose from \+sere, "
                                      r"\+xla-attention, \+windowed-attention, "
                                      r"\+pallas-attention, \+pallas-append-attention"):
    parse_variant("backbone+flash")
  with pytest.raises(UserError, match="names two attentions"):
    parse_variant("backbone+xla-attention+pallas-attention")


def _timed_row(mode: str, ms: list[float]) -> dict:
  return {"mode": mode, "decode": {"median_ms": float(np.median(ms))},
          "decode_pipelined": {"median_ms": float(np.median(ms))},
          "rounds_pipelined_ms": ms, "rounds_synced_ms": ms}


def test_ratios_pair_each_row_with_the_backbone_of_its_attention():
  """Without a plain `backbone` row the ratios are to the first backbone row; a row with an
  attention suffix is paired with the backbone row of the same suffix."""
  from adafuse_jax.bench.derive import add_ratios

  rows = [_timed_row("backbone-packed", [4.6, 4.7, 4.6]),
          _timed_row("backbone-packed+pallas-attention", [4.1, 4.2, 4.1]),
          _timed_row("pregated-packed", [5.06, 5.17, 5.06]),
          _timed_row("pregated-packed+pallas-attention", [4.51, 4.62, 4.51]),
          _timed_row("pytorch-peer", [5.0, 5.0, 5.0])]
  bases = add_ratios(rows)
  assert bases["pregated-packed"] == bases["pytorch-peer"] == "backbone-packed"
  assert bases["pregated-packed+pallas-attention"] == "backbone-packed+pallas-attention"
  # A backbone row itself: against the reference backbone (what its attention saves).
  assert bases["backbone-packed+pallas-attention"] == "backbone-packed"
  by = {r["mode"]: r for r in rows}
  assert by["backbone-packed+pallas-attention"]["pipelined_ratio_interval"]["median"] == (
      pytest.approx(4.1 / 4.6))
  assert by["pregated-packed"]["pipelined_ratio_interval"]["median"] == pytest.approx(1.1)
  assert by["pregated-packed+pallas-attention"]["pipelined_ratio_interval"]["median"] == (
      pytest.approx(1.1))
  # With a plain backbone row, rows without a suffix compare against it.
  plain = [_timed_row("backbone-packed", [4.0] * 3), _timed_row("backbone", [5.0] * 3),
           _timed_row("pregated-packed", [6.0] * 3)]
  assert add_ratios(plain)["pregated-packed"] == "backbone"


def test_each_path_floor_counts_the_experts_that_path_reads():
  """Packed computes the whole pool (all E experts' bytes), gathered reads the step's distinct
  experts; the op's floor counts min(E, k x batch)."""
  from adafuse_jax import costs
  from adafuse_jax.bench.derive import add_path_floors
  from adafuse_jax.config import PRESETS, AdapterConfig

  acfg = AdapterConfig(mode="pregated", num_experts=64, rank=64, top_k=4)
  cfg = PRESETS["llama2-7b"]
  report = {"preset": "llama2-7b", "dtype": "bfloat16", "adapter": acfg.to_dict(), "batch": 2,
            "cache_len": 512, "ceiling_tb_s": 4.0, "copy_bandwidth_tb_s": 3.0, "results": [
                {"mode": "backbone-packed", "floor_ms": 3.0},
                {"mode": "pregated-packed", "floor_ms": 3.5, "distinct_experts": 7.5},
                {"mode": "pregated-gathered+sere", "floor_ms": 3.5, "distinct_experts": 5.25},
                {"mode": "pytorch-peer", "floor_ms": 3.0}]}
  add_path_floors(report)
  got = {r["mode"]: r["path_floor_ms"] for r in report["results"]}
  ms = lambda n: costs.decode_bytes(cfg, "bfloat16", 256, 2, acfg, experts=n) / 4e12 * 1e3  # noqa: E731
  assert got["pregated-packed"] == pytest.approx(ms(64))
  assert got["pregated-gathered+sere"] == pytest.approx(ms(5.25))
  assert got["backbone-packed"] == 3.0 and got["pytorch-peer"] == 3.0
  # The op's floor: k x batch = 8 experts of 64.
  assert costs.decode_bytes(cfg, "bfloat16", 256, 2, acfg) == costs.decode_bytes(
      cfg, "bfloat16", 256, 2, acfg, experts=8)
