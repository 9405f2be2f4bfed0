"""The load benchmark end to end on a tiny checkpoint made by transformers: the real server on
loopback, a client process, the static-batch baseline, and mixed steps compared on one engine."""

from __future__ import annotations

import json

import pytest

from adafuse_jax.bench import load

FIXTURE = "tests/fixtures/hf-llama3"


def test_the_load_bench_compares_mixed_steps_on_one_engine(tmp_path):
  argv = ["--model", FIXTURE, "--adapters", "random:0", "--concurrency", "2", "--static-batch", "2",
          "--sequential", "0", "--requests", "3", "--max-tokens", "4", "--prompt-tokens", "4,12",
          "--rounds", "2", "--chunk", "16", "--mixed-prefill", "16", "--compare-mixed",
          "--out", str(tmp_path)]
  assert load.main(argv) == 0
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["rounds"] == 2
  assert [(lv["label"], lv["mixed"]) for lv in res["levels"]] == [("2", False), ("2 mixed", True)]
  for lv in res["levels"]:  # every request's every token arrived, and the engine counted them
    assert lv["output_tokens"] == 3 * 4 and lv["generated"] == 3 * 4
    assert lv["decode_steps"] >= 3 and lv["tokens_per_s"] > 0
    assert lv["prefill_computed_tokens"] >= lv["prompt_tokens"] >= 3 * 4
    assert lv["device_wait_s"] > 0 and lv["host_s"] > 0 and lv["idle_s"] >= 0
  # The second round ran the pair in the other order.
  assert [v["mixed"] for v in res["raw_rounds"][1]["levels"].values()] == [True, False]
  for key in ("served_over_static", "mixed_over_static", "mixed_over_unmixed"):
    assert res[key]["rounds"] == 2 and res[key]["low"] <= res[key]["median"] <= res[key]["high"]
  assert res["sequential_tokens_per_s"] != res["sequential_tokens_per_s"]  # NaN: not run
  table = (tmp_path / "results.md").read_text()
  assert "| 2 mixed |" in table and "sequential decoding (`generate`, batch 1): not run" in table
  assert (tmp_path / "load.png").stat().st_size > 0


def test_the_load_bench_drives_the_engine_in_process_beside_the_server(tmp_path):
  argv = ["--model", FIXTURE, "--adapters", "random:0", "--concurrency", "2", "--static-batch", "2",
          "--sequential", "0", "--requests", "3", "--max-tokens", "4", "--prompt-tokens", "4,12",
          "--rounds", "2", "--chunk", "16", "--in-process", "--out", str(tmp_path)]
  assert load.main(argv) == 0
  res = json.loads((tmp_path / "results.json").read_text())
  assert [(lv["label"], lv["in_process"]) for lv in res["levels"]] == [
      ("2", False), ("2 in-process", True)]
  for lv in res["levels"]:
    assert lv["output_tokens"] == 3 * 4 and lv["generated"] == 3 * 4 and lv["requests"] == 3
    assert lv["ttft_p50_ms"] > 0 and lv["itl_p50_ms"] > 0
  assert [v["in_process"] for v in res["raw_rounds"][1]["levels"].values()] == [True, False]
  for key in ("in_process_over_static", "served_over_in_process"):
    assert res[key]["rounds"] == 2 and res[key]["low"] <= res[key]["median"] <= res[key]["high"]
  assert "| 2 in-process |" in (tmp_path / "results.md").read_text()


def test_the_load_bench_compares_waiting_prefill_passes_with_passes_that_do_not(tmp_path):
  argv = ["--model", FIXTURE, "--adapters", "random:0", "--concurrency", "3", "--static-batch", "3",
          "--sequential", "0", "--requests", "6", "--max-tokens", "5", "--prompt-tokens", "4,12",
          "--rounds", "2", "--chunk", "16", "--prefill-wait", "3", "--compare-prefill-wait",
          "--out", str(tmp_path)]
  assert load.main(argv) == 0
  res = json.loads((tmp_path / "results.json").read_text())
  assert [(lv["label"], lv["prefill_wait"]) for lv in res["levels"]] == [("3", 3),
                                                                         ("3 no-wait", 0)]
  for lv in res["levels"]:
    assert lv["output_tokens"] == 6 * 5 and lv["generated"] == 6 * 5
  assert res["levels"][1]["prefill_waits"] == 0  # passes that do not wait never wait
  assert [v["prefill_wait"] for v in res["raw_rounds"][1]["levels"].values()] == [0, 3]
  r = res["wait_over_no_wait"]
  assert r["rounds"] == 2 and r["low"] <= r["median"] <= r["high"]
  assert "| 3 no-wait |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["--compare-mixed"], "--compare-mixed needs --mixed-prefill"),
    (["--compare-prefill-wait", "--prefill-wait", "0"], "at least 1 with --compare-prefill-wait"),
    (["--prefill-wait", "-2"], "--prefill-wait must be 0 or more"),
    (["--sequential", "-1"], "--sequential must be 0"),
    (["--concurrency", "a"], "--concurrency takes integers"),
])
def test_bad_options_are_one_error_line(argv, words, capsys):
  assert load.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and words in err and "Traceback" not in err
