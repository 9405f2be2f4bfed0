"""Tensor parallelism on simulated CPU devices: every adapter mode on the paths that shard gives
the same logits and greedy tokens on 2 and 4 devices as on one, with the weights really split;
bad device counts are named errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from adafuse_jax.errors import UserError
from adafuse_jax.parallel import check_divisible, make_mesh
from tests.conftest import llvm_o0, tiny_config

WORKER = pathlib.Path(__file__).parent / "parallel_worker.py"


def _cpu_devices(devices: int) -> dict:
  """The environment of a subprocess on `devices` simulated CPU devices, compiling at LLVM -O0
  (its programs are small and run a few times: compiling is its time, a third less at -O0 for
  the worker below; 1 and N devices compile alike)."""
  flags = llvm_o0(os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")


def _worker(part: str) -> dict:
  r = subprocess.run([sys.executable, str(WORKER), part], capture_output=True, text=True,
                     env=_cpu_devices(4), timeout=900, cwd=WORKER.parent.parent)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  return out


# Each worker process runs once: the tests that read it share one xdist worker.
@pytest.fixture(scope="module")
def runs() -> dict:
  return _worker("xla")


@pytest.fixture(scope="module")
def kernel_runs() -> dict:
  return _worker("kernels")


@pytest.fixture(scope="module")
def train_runs() -> dict:
  return _worker("train")


def _equal_across_devices(runs: dict, key: str, rtol: float = 1e-4) -> None:
  one = runs["runs"][f"{key}/1"]
  assert one["q_shards"] == 1
  for devices in (2, 4):
    many = runs["runs"][f"{key}/{devices}"]
    assert many["q_shards"] == devices and "tp" in many["q_spec"]  # q really split
    assert many["tokens"] == one["tokens"]
    np.testing.assert_allclose(many["logits"], one["logits"], rtol=rtol, atol=rtol)


@pytest.mark.xdist_group("tp-xla")
@pytest.mark.parametrize("layout", ["stacked", "list"])
@pytest.mark.parametrize("mode", ["backbone", "lora", "pregated", "layerwise"])
@pytest.mark.parametrize("path", ["xla", "packed"])
def test_sharded_decode_equals_one_device(runs, layout, mode, path):
  _equal_across_devices(runs, f"{layout}/{mode}/{path}")


@pytest.mark.xdist_group("tp-kernels")
@pytest.mark.parametrize("path,mode", [("gathered", "lora"), ("gathered", "pregated"),
                                       ("gathered", "layerwise"), ("merged", "lora"),
                                       ("merged", "pregated")])
def test_kernel_paths_run_per_shard_and_equal_one_device(kernel_runs, path, mode):
  """The Pallas kernels (BGMV, the SGMM switch; interpreted) inside shard_map give one device's
  tokens and logits on 2 and 4."""
  _equal_across_devices(kernel_runs, f"stacked/{mode}/{path}")
  if not (path, mode) == ("merged", "lora"):  # a LoRA merges once and decodes as the backbone
    assert kernel_runs["runs"][f"stacked/{mode}/{path}/4"]["shard_calls"] > 0
  assert kernel_runs["runs"][f"stacked/{mode}/{path}/1"]["shard_calls"] == 0


@pytest.mark.xdist_group("tp-kernels")
def test_switch_on_a_sharded_model_equals_the_unsharded_switch(kernel_runs):
  sw = kernel_runs["switch"]
  assert sw["switches"][0] == sw["switches"][1] >= 1 and sw["experts_equal"]
  assert sw["max_weight_diff"] <= 1e-5
  assert set(sw["weights_split"].values()) == {4}  # every merged weight really split


@pytest.mark.xdist_group("tp-train")
def test_data_by_tensor_parallel_training_equals_one_device(train_runs):
  """Trainer(mesh=make_mesh(4, cfg, data=2)): batches split over "dp", weights and experts over
  "tp"; four steps give one device's losses and pool, and the split checkpoint restores on one
  device."""
  tr = train_runs["training"]
  np.testing.assert_allclose(tr["losses_mesh"], tr["losses_one"], rtol=1e-5)
  assert tr["pool_diff"] < 1e-4
  assert "tp" in tr["b_q_spec"] and "dp" in tr["batch_spec"]
  assert tr["restored_step"] == 4 and tr["restored_diff"] == 0.0


@pytest.mark.xdist_group("tp-train")
def test_serving_engine_on_a_mesh_writes_one_devices_tokens(train_runs):
  """Continuous batching with the slot cache split by KV heads: six requests of different
  lengths in flight together give the same greedy ids on 2 and 4 devices as on one."""
  sv = train_runs["serving"]
  assert sv["2"] == sv["1"] and sv["4"] == sv["1"]
  assert "tp" in sv["cache_spec_2"] and "tp" in sv["cache_spec_4"]


def test_data_parallel_bad_counts_are_named_errors():
  with pytest.raises(UserError, match="must divide --devices"):
    make_mesh(1, data=2)


@pytest.mark.xdist_group("tp-xla")
def test_checkpoint_restores_onto_another_device_count(runs):
  ck = runs["checkpoints"]
  assert ck["restored_on"] == 4  # a pool saved on one device restored split over four
  assert ck["equal_4"] and ck["equal_2"] and ck["equal_1"]  # saved from four, restored on 2, 1


def test_bad_device_counts_are_named_errors():
  with pytest.raises(UserError, match="more devices than exist"):
    make_mesh(64)
  with pytest.raises(UserError, match="attention heads 6"):
    check_divisible(tiny_config(), 4)  # 6 heads, 2 KV heads


def test_cli_default_model_and_pool_on_three_devices_writes_the_same_text():
  """SmolLM2-135M has 9 heads and 3 KV heads: 3 devices is the split that divides them."""
  def decode(devices: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "adafuse_jax.decode", "--devices", str(devices),
                        "--adapters", "default", "--max-new-tokens", "12", "--json",
                        "--prompt", "The capital of France is", "--prompt", "def add(a, b):"],
                       capture_output=True, text=True, env=_cpu_devices(devices), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)
  one, three = decode(1), decode(3)
  assert three["completions"] == one["completions"]
  assert three["generated_tokens"] == one["generated_tokens"]


def test_bench_runs_rows_on_a_mesh(tmp_path):
  """`python -m adafuse_jax.bench --devices 2`: every row runs split, the floor is per device
  (simulated CPU devices: a check that it runs and records, not a speed figure)."""
  r = subprocess.run([sys.executable, "-m", "adafuse_jax.bench", "--preset", "tiny",
                      "--devices", "2", "--modes", "backbone,pregated-packed,pregated-gathered", "--steps", "20",
                      "--rounds", "2", "--prefill", "", "--out", str(tmp_path)],
                     capture_output=True, text=True, env=_cpu_devices(2), timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["devices"] == 2
  assert "2 tensor-parallel devices" in (tmp_path / "table.md").read_text()
