"""Is the tied pool's training graph numerically the LoRA's? One batch, both graphs, f32 and bf16.

    python tools/tied_numerics_probe.py --workdir /tmp/cpu-s5 --step 50 [--rows 8] [--out FILE]

Loads a `pregated-tied` checkpoint (`python -m train fit --mode pregated-tied --workdir ...`),
sets every beta to 0 (the tied pool is then exactly a LoRA of rank E*r) and builds that LoRA
from the same A and B. Then, on the checkpoint's next training batch and with the backbone in
f32 and in bf16, it computes each graph's loss and its gradients for A and B. Where the two
graphs are the same function, their differences are rounding: if the tied graph's bf16
gradients leave the LoRA's far more than in f32, the tied path does something else in bf16.
Also printed: the loss change that the checkpoint's own betas make (the routed term's size).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from adafuse_jax.adapters import tied_as_lora  # noqa: E402
from adafuse_jax.experts import AdapterParam  # noqa: E402
from train.loop import TrainConfig, Trainer, batch_at, forward_loss  # noqa: E402


def loss_and_factor_grads(model, adapters, windows):
  """(loss, {module: (dA, dB)} as [L, in, E*r], [L, E*r, out] f32 numpy)."""
  def loss_fn(ad):
    return forward_loss(model, ad, windows)[1]["ce"]

  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(adapters)
  out = {}
  for m in adapters.cfg.modules:
    da, db = (np.asarray(getattr(grads.pool, f"{p}_{m}").get_value(), np.float32) for p in "AB")
    out[m] = da.reshape(da.shape[0], da.shape[1], -1), db.reshape(db.shape[0], -1, db.shape[-1])
  return float(loss), out


def rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> str:
  from adafuse_jax.weights import load_model
  from train import data

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a pregated-tied run's --workdir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--rows", type=int, default=8, help="rows of the batch to use (<= its batch)")
  p.add_argument("--mode", default="pregated-tied")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--seed", type=int, default=5)
  p.add_argument("--out")
  args = p.parse_args(argv)

  cache = data.default_cache()
  train_streams, heldout = data.load_streams(cache, "train"), data.load_streams(cache, "heldout")
  lines = [f"Made by `python tools/tied_numerics_probe.py {shlex.join(sys.argv[1:] if argv is None else argv)}`"
           f" on {jax.devices()[0].device_kind} (JAX {jax.__version__}).", ""]
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = load_model(dtype=dtype, progress=False).model
    cfg = TrainConfig(mode=args.mode, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                      seed=args.seed)
    trainer = Trainer(model, cfg, train_streams, heldout, args.workdir)
    step = trainer.restore(args.step)
    windows = jnp.asarray(batch_at(train_streams, step, cfg.batch, cfg.seq_len, cfg.seed)[:args.rows])
    tied = trainer.adapters
    with_betas = float(forward_loss(model, tied, windows)[1]["ce"])
    betas = {m: np.asarray(getattr(tied.pool, f"beta_{m}").get_value()) for m in tied.cfg.modules}
    for m in tied.cfg.modules:
      var = getattr(tied.pool, f"beta_{m}")
      var.set_value(jnp.zeros_like(var.get_value()))
    results[jnp.dtype(dtype).name] = (with_betas, loss_and_factor_grads(model, tied, windows),
                                      loss_and_factor_grads(model, tied_as_lora(tied), windows))
  lines += [f"Checkpoint step {step} of {args.workdir}; the batch of step {step} (seed {args.seed}),"
            f" {args.rows} rows of {args.seq_len} tokens. Betas at that step: largest |beta|"
            f" {max(float(np.abs(b).max()) for b in betas.values()):.4f}.", "",
            "| backbone dtype | loss, tied (betas 0) | loss, LoRA | loss change from the"
            " betas | dA tied vs LoRA (rel. L2, worst module) | dB tied vs LoRA |",
            "|---|---|---|---|---|---|"]
  for name, (with_betas, (lt, gt), (ll, gl)) in results.items():
    da = max(rel(gt[m][0], gl[m][0]) for m in gt)
    db = max(rel(gt[m][1], gl[m][1]) for m in gt)
    lines.append(f"| {name} | {lt:.6f} | {ll:.6f} | {with_betas - lt:+.6f} | {da:.2e} | {db:.2e} |")
  (_, (_, g32), _), (_, (_, g16), (_, l16)) = results["float32"], results["bfloat16"]
  lines += ["", "bf16 rounding itself, for scale: the tied graph's bf16 gradients against its f32"
            f" ones: dA {max(rel(g16[m][0], g32[m][0]) for m in g32):.2e}, dB"
            f" {max(rel(g16[m][1], g32[m][1]) for m in g32):.2e}; the LoRA's:"
            f" dA {max(rel(l16[m][0], g32[m][0]) for m in g32):.2e}, dB"
            f" {max(rel(l16[m][1], g32[m][1]) for m in g32):.2e}."]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  return text


if __name__ == "__main__":
  main()
