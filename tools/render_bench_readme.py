"""Builds docs/benchmarks/README.md from the recorded results (no number typed by hand).

    python tools/render_bench_readme.py
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
sys.path.insert(0, str(ROOT.parents[1]))

from adafuse_jax.bench import markdown  # noqa: E402

INTRO = """# Benchmarks

Every table below was written by the command shown with it (`python -m adafuse_jax.bench` or a
script under `tools/`) and rendered into this page by `python tools/render_bench_readme.py`.
Method: compile time apart, warm-up steps discarded, median and p10-p90. Decode steps are timed
two ways since 2026-11-23: *synced* (a device sync after every step: latency) and *pipelined*
(steps dispatched back to back with one sync at the end, as `generate` runs them: the host
enqueues step t+1 while the device runs step t). Earlier runs were synced only. The floor is the bytes a decode step must read (linear weights, head, KV cache prefix,
the experts used) divided by the copy bandwidth measured in the same run. Kernels/step counts the
launches in the compiled step (fusions, custom calls, library calls).
"""


def section(folder: pathlib.Path, title: str) -> list[str]:
  report = json.loads((folder / "results.json").read_text())
  env = report["environment"]
  cmd = env["command"].split("adafuse_jax/bench.py", 1)[-1].strip()
  lines = [f"## {title}", "", f"- command: `python -m adafuse_jax.bench {cmd}`",
           f"- device: {env['device']}; JAX {env['jax']} (jaxlib {env['jaxlib']}), Python"
           f" {env['python']}; date {env['date']}",
           f"- files: `{folder.relative_to(ROOT)}/`", "",
           markdown(report), ""]
  if (folder / "decode.png").exists():
    lines += [f"![decode latency by mode]({folder.relative_to(ROOT)}/decode.png)", ""]
  return lines + kernel_profiles(folder, "Kernel time per decode step")


def kernel_profiles(folder: pathlib.Path, caption: str) -> list[str]:
  """The `tools/kernel_breakdown.py` tables recorded in a folder, each with its command."""
  lines = []
  for prof in sorted(folder.glob("kernels_*.md")):
    lines += [f"{caption} (`python tools/kernel_breakdown.py --mode"
              f" {prof.stem[len('kernels_'):]}`):", "", prof.read_text().strip(), ""]
  return lines


def sweep_section(path: pathlib.Path) -> list[str]:
  data = json.loads(path.read_text())
  lines = ["## Fused expert matmul alone: tile sweep", "",
           f"`python tools/tile_sweep.py` on {data['device']}, JAX {data['jax']}: all 32 layers of"
           " one Llama-2-7B module shape in one jitted function, x of one token, E·r = 128.",
           " Effective bandwidth counts the bytes of W and B read.", "",
           "| module shape | XLA dot + dot + add ms (TB/s) | best Pallas tiles | Pallas ms (TB/s) |",
           "|---|---|---|---|"]
  shapes = dict.fromkeys(r["shape"] for r in data["rows"])
  for shape in shapes:
    rows = [r for r in data["rows"] if r["shape"] == shape and "ms" in r]
    ref = next(r for r in rows if r["impl"] == "xla")
    best = min((r for r in rows if r["impl"] != "xla"), key=lambda r: r["ms"])
    lines.append(f"| {shape} | {ref['ms']:.3f} ({ref['tb_s']:.2f}) | {best['impl']} |"
                 f" {best['ms']:.3f} ({best['tb_s']:.2f}) |")
  return lines + [""]


def sgmv_sweep_section(path: pathlib.Path) -> list[str]:
  data = json.loads(path.read_text())
  lines = ["## Gathered expand kernel alone: tile sweep", "",
           f"`python tools/sgmv_tile_sweep.py` on {data['device']}, JAX {data['jax']}: all 32 layers"
           " of one Llama-2-7B module shape in one jitted function; batch 1 reads 2 active experts,"
           " batch 32 all 8 (rank 16). Bandwidth counts W and the active B. The best tiles per"
           " case are the defaults (`SgmvTiles.for_shape`).", "",
           "| module shape | decode | XLA x@W ms (TB/s) | best tiles | kernel ms (TB/s) |",
           "|---|---|---|---|---|"]
  cases = dict.fromkeys((r["shape"], r["situation"]) for r in data["rows"])
  for shape, situation in cases:
    rows = [r for r in data["rows"] if (r["shape"], r["situation"]) == (shape, situation)
            and "ms" in r]
    ref = next(r for r in rows if r["impl"].startswith("xla"))
    best = min((r for r in rows if not r["impl"].startswith("xla")), key=lambda r: r["ms"])
    lines.append(f"| {shape} | {situation} | {ref['ms']:.3f} ({ref['tb_s']:.2f}) | {best['impl']} |"
                 f" {best['ms']:.3f} ({best['tb_s']:.2f}) |")
  return lines + [""]


def throughput_section(paths: list[pathlib.Path]) -> list[str]:
  """Tokens/s by batch size and mode, and the share of the backbone's throughput kept."""
  reports = [json.loads(p.read_text()) for p in paths]
  modes = [r["mode"] for r in reports[-1]["results"]]
  lines = ["## H100: throughput by batch size (Llama-2-7B bf16, 8 experts r=16 top-2, all 7"
           " modules)", "",
           "Decode tokens/s = batch x 1000 / (ms per step); in brackets the share of the backbone's"
           " throughput in the same run. Batch 1 comes from the latest full run (`h100/`), the"
           " others from `h100-batch/` (`python -m adafuse_jax.bench --batch B --modes " +
           ",".join(modes) + " --prefill \"\" --steps 20`).", "",
           "| batch | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
  for r in reports:
    by_mode = {x["mode"]: x for x in r["results"]}
    base = by_mode["backbone"]["decode"]["median_ms"]
    cells = []
    for m in modes:
      if m not in by_mode:
        cells.append("-")
        continue
      ms = by_mode[m]["decode"]["median_ms"]
      cells.append(f"{1000 * r['batch'] / ms:.0f} ({100 * base / ms:.0f}%)")
    lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
  return lines + [""]


def pipelined_throughput_section(image_prefix: str = "") -> list[str]:
  """Tokens/s (pipelined) by batch size, per expert configuration, from the runs that have it."""
  groups = [("8 experts, rank 16", [ROOT / "h100-full", ROOT / "h100-pipelined" / "batch32",
                                    ROOT / "h100-pipelined" / "batch64"]),
            ("64 experts, rank 64", sorted((ROOT / "h100-e64r64").glob("batch*"),
                                           key=lambda p: int(p.name[len("batch"):]))),
            ("64 experts, rank 64: packed projections beside the gathered kernels (later runs)",
             sorted((ROOT / "h100-e64r64-packed").glob("batch*"),
                    key=lambda p: int(p.name[len("batch"):]))),
            ("H200: 8 experts, rank 16", sorted((ROOT / "h200-batch").glob("batch*"),
                                                key=lambda p: int(p.name[len("batch"):]))),
            ("H200: 64 experts, rank 64", [ROOT / "h200-auto" / "e64r64-batch32"])]
  lines = ["## Decode throughput by batch size, pipelined (Llama-2-7B bf16, top-2, all 7"
           " modules; H100 unless the title says H200)", "",
           "Tokens/s = batch x 1000 / (pipelined ms per step); in brackets the share of the"
           " backbone's throughput in the same run; `distinct` is the mean number of distinct"
           " experts a step touched (what SERE cuts: `-sere` = SERE with S = 1, rho = 0, the"
           " similarity calibrated by linear CKA in the run). Each row is one run of"
           " `python -m adafuse_jax.bench --batch B ...` (its section below has the command).", ""]
  lines += ["What the bytes allow (`docs/benchmarks/ceiling.md`, `python"
            " tools/throughput_ceiling.py`: the backbone's bytes over the backbone's plus those of"
            " the distinct experts a step touches under uniform routing; a bound where both stream"
            " at the same bandwidth: where the backbone runs far below its floor, e.g. the H100 at"
            " batch 64, 54% of it, a measured share can pass it):", "",
            *(ROOT / "ceiling.md").read_text().strip().splitlines()[2:], "",
            *([f"![ceiling against measured shares]({image_prefix}ceiling.png)", ""]
              if (ROOT / "ceiling.png").exists() else [])] if (
                ROOT / "ceiling.md").exists() else []
  for title, folders in groups:
    reports = [json.loads((f / "results.json").read_text()) for f in folders
               if (f / "results.json").exists()]
    if not reports:
      continue
    modes = list(dict.fromkeys(x["mode"] for r in reports for x in r["results"]
                               if "decode_pipelined" in x and not x["mode"].startswith("lora")))
    lines += [f"### {title}", "", "| batch | " + " | ".join(modes) + " |",
              "|---|" + "---|" * len(modes)]
    for r in reports:
      by_mode = {x["mode"]: x for x in r["results"]}
      base = by_mode["backbone"]["decode_pipelined"]["median_ms"]
      cells = []
      for m in modes:
        x = by_mode.get(m)
        if x is None:
          cells.append("-")
          continue
        ms = x["decode_pipelined"]["median_ms"]
        cell = f"{1000 * r['batch'] / ms:.0f} ({100 * base / ms:.0f}%)"
        if "distinct_experts" in x:
          cell += f", distinct {x['distinct_experts']:.1f}"
        cells.append(cell)
      lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


PACKED_RUNS = (("b1-pregated", "pre-gated paths and auto, batch 1"),
               ("b1-layerwise", "layer-wise paths, batch 1, and prefill of 512 tokens"),
               ("b1-prefill", "prefill of 512 tokens, again"),
               ("b32", "batch 32"),
               ("qv", "experts on q and v only, batch 1 (auto at the trained router's switch"
                      " rate)"))


def packed_sections() -> list[str]:
  """The latest side-by-side run of the current paths, then the runs of the packed projections
  (adafuse_jax/packed.py), latest first."""
  lines = []
  if (ROOT / "h100-headline" / "results.json").exists():
    lines += section(ROOT / "h100-headline", "H100: the current decode paths side by side, batch"
                     " 1 (latest; merged switching on the Mosaic GPU kernel)")
  notes = ROOT / "h100-packed" / "README.md"
  lines += [notes.read_text().strip().replace("# ", "## ", 1), ""] if notes.exists() else []
  for sub, title in PACKED_RUNS:
    if (ROOT / "h100-packed" / sub / "results.json").exists():
      lines += section(ROOT / "h100-packed" / sub, f"H100, packed projections: {title} (latest)")
  equality = ROOT / "h100-equality" / "path_equality.md"
  if equality.exists():
    lines += ["## Do the paths generate the same text? (`python tools/path_equality.py`)", "",
              "`merged` switches with the kernel `adafuse_jax.switching.switch_kernel` picks: the"
              " Mosaic GPU kernel (`pallas_kernels/sgmm_mosaic.py`) for these shapes since that"
              " kernel landed.", "", equality.read_text().strip(), ""]
  qv_merged = ROOT / "h100-sgmm-mosaic" / "qv-merged"
  if (qv_merged / "results.json").exists():
    lines += section(qv_merged, "H100: experts on q and v only, merged switching on the Mosaic"
                     " GPU kernel beside the packed path (latest)")
  merged_batch = ROOT / "h200-merged-batch8"
  if (merged_batch / "results.json").exists():
    lines += section(merged_batch, "H200: merged decoding of a batch of 8 beside the gathered"
                     " kernel (rows that disagree run unmerged; rows that agree switch)")
  return lines


# The H200 runs of session 8 (2026-11-30): the latest, on the GPU this workplace lends now.
H200_RUNS = (("h200-xla-rows/model", "plain-XLA pre-gated and layer-wise paths reading the row"
              " layout (`adafuse_jax/row_layout.py`) beside the packed paths, batch 1"),
             ("h200-auto/batch1", "pre-gated paths and auto, batch 1"),
             ("h200-auto/batch1-auto-first", "auto measured before the fixed packed path, batch"
              " 1 (synced steps vary by +-20% between runs on this machine; pipelined is what"
              " generate runs)"),
             ("h200-prefill", "prefill of 512 tokens with per-token routing"),
             ("h200-auto/e64r64-batch32", "64 rank-64 experts, batch 32, auto beside the fixed"
              " paths"),
             ("h200-after-refactor/batch1", "batch 1 again after the adapter-runtime and kernel-"
              "wrapper refactors (session 13): the packed and fused paths beside the backbone,"
              " to check that neither moved"))


def xla_rows_section() -> list[str]:
  """The linear-layers probe that chose the row layout for the plain-XLA decode path."""
  md = ROOT / "h200-xla-rows" / "probe.md"
  if not md.exists():
    return []
  return ["## Plain-XLA expert formulations, linear layers only (`python"
          " tools/routing_matvec_probe.py`, latest)", "",
          "FACTS.md's setting (the 7B's 32 layers of q, k, v, o, gate, up, down at batch 1, no"
          " attention): the stored layouts (router [in, E], A [in, E, r]) beside copies with the"
          " contracted dimension minor (`-t`: einsum; `-tsum`: f32 multiply and row sum, what"
          " `adafuse_jax/row_layout.py` ships) and the dense formulation. `step diff`: the whole"
          " step against the stored layout's; `module error`: one module against the f32"
          " reference.", "", md.read_text().strip(), ""]


def segmented_section() -> list[str]:
  """The segmented prompt kernels beside their Triton peer, ragged_dot and XLA."""
  md = ROOT / "h200-segmented" / "segmented.md"
  if not md.exists():
    return []
  segmented_markdown(md)
  lines = ["## Prompt-time experts: segmented kernels (Pallas and Triton), ragged_dot, XLA"
           " (`python tools/segmented_bench.py`, latest)", "",
           "`pallas_kernels/segmented.py` (token-expert pairs grouped by expert, Punica's SGMV) and"
           " `pallas_kernels/triton_peer.py` (the same two kernels in Triton's language, called"
           " through jax-triton) on the same shapes, tables and tiles, beside `jax.lax.ragged_dot`"
           " and the dense XLA formulations.", "", md.read_text().strip(), ""]
  if (ROOT / "h200-segmented" / "segmented.png").exists():
    lines += ["![cost over the base GEMM](h200-segmented/segmented.png)", ""]
  tiles = [ROOT / "h200-segmented" / f"block-m{m}" / "segmented.md" for m in (16, 64)]
  if all(t.exists() for t in tiles):
    lines += ["### Rows per segment tile, 64 experts (one GPU call, 16-row tiles then 64-row)", ""]
    for t in tiles:
      segmented_markdown(t)
      lines += [t.read_text().strip(), ""]
  splits = [ROOT / "h200-segmented" / f"shrink-splits-{k}" / "segmented.md" for k in (1, 4)]
  if all(t.exists() for t in splits):
    lines += ["### The shrink's input split over S programs per tile, 64 experts (one GPU call,"
              " S = 1 then S = 4)", ""]
    for t in splits:
      segmented_markdown(t)
      lines += [t.read_text().strip(), ""]
  return lines


def segmented_markdown(md: pathlib.Path) -> None:
  """Re-renders a segmented_bench table from its JSON (the table's layout may have grown)."""
  sys.path.insert(0, str(ROOT.parents[1] / "tools"))
  import segmented_bench

  md.write_text(segmented_bench.markdown(json.loads(md.with_suffix(".json").read_text())))


def h200_sections() -> list[str]:
  lines = []
  for sub, title in H200_RUNS:
    if (ROOT / sub / "results.json").exists():
      lines += section(ROOT / sub, f"H200: {title} (latest)")
  return lines + xla_rows_section() + segmented_section()


def h200_readme_block() -> str:
  """The latest H200 runs for the project README's bench block."""
  runs = [(sub, title) for sub, title in H200_RUNS if (ROOT / sub / "results.json").exists()]
  if not runs:
    return ""
  parts = [f"`docs/benchmarks/{sub}/` ({title}):\n\n"
           + markdown(json.loads((ROOT / sub / "results.json").read_text()))
           for sub, title in runs]
  seg = ROOT / "h200-segmented" / "segmented.md"
  if seg.exists():
    parts.append("`docs/benchmarks/h200-segmented/` (prompt-time experts, one module over 32"
                 " layers):\n\n" + seg.read_text().split("\n\n", 3)[-1].strip())
  return ("Latest runs, NVIDIA H200 (the GPU lent since session 7; every ratio against the"
          " backbone of the same run):\n\n" + "\n\n".join(parts) + "\n\nH100 runs.\n\n")


def main() -> None:
  lines = [INTRO]
  lines += h200_sections()
  lines += packed_sections()
  if (ROOT / "cpu-packed" / "results.json").exists():
    lines += section(ROOT / "cpu-packed", "CPU (2 cores): the real default model, packed"
                     " projections beside the plain paths (latest)")
  if (ROOT / "h100-full" / "results.json").exists():
    for sub in ("batch1", "batch32"):
      if (ROOT / "h100-tuned" / sub / "results.json").exists():
        lines += section(ROOT / "h100-tuned" / sub, f"H100: after tuning the gathered kernels'"
                         f" tiles ({sub.replace('batch', 'batch ')}, latest)")
    lines += section(ROOT / "h100-full", "H100: every decode path, full run (batch 1)")
    lines += section(ROOT / "h100-full" / "prefill", "H100: prefill of 128 and 512 tokens")
    if (ROOT / "h100-full" / "prefill2048" / "results.json").exists():
      lines += section(ROOT / "h100-full" / "prefill2048", "H100: prefill of 2048 tokens")
    if (ROOT / "h100-full" / "qv" / "results.json").exists():
      lines += section(ROOT / "h100-full" / "qv", "H100: experts on q and v only, batch 1 (auto"
                       " costs the merged path at the trained router's measured switch rate)")
    lines += pipelined_throughput_section()
    notes = ROOT / "h100-e64r64-packed" / "README.md"
    if notes.exists():
      lines += [notes.read_text().strip().replace("# ", "## ", 1), ""]
    for folder in (*sorted((ROOT / "h100-pipelined").glob("batch*")),
                   *sorted((ROOT / "h100-e64r64-packed").glob("batch*")),
                   *sorted(p.parent for p in
                           (ROOT / "h100-e64r64-packed").glob("auto-*/results.json")),
                   *sorted((ROOT / "h100-e64r64").glob("batch*"))):
      lines += section(folder, f"H100: {folder.parent.name}, {folder.name}")
    for folder in sorted((ROOT / "h200-batch").glob("batch*"),
                         key=lambda p: int(p.name[len("batch"):])):
      lines += section(folder, f"H200: {folder.parent.name}, {folder.name}")
    notes = ROOT / "h100-pipelined" / "README.md"
    if notes.exists():
      lines += ["## Why pipelined steps matter", "",
                notes.read_text().split("\n\n", 2)[-1].strip(), ""]
      lines += kernel_profiles(ROOT / "h100-pipelined", "Kernel time per synced decode step")
    if (ROOT / "h100-sgmv" / "sgmv_tile_sweep.json").exists():
      lines += sgmv_sweep_section(ROOT / "h100-sgmv" / "sgmv_tile_sweep.json")
    lines += ["# Earlier runs (synced timing only)", ""]
  for name, title in (("h100", "H100: every decode path, run of 2026-11-22"),
                      ("cpu", "CPU (2 cores): the real default model"),
                      ("h100-initial", "H100: first run (gather formulation, both weight layouts)")):
    if (ROOT / name / "results.json").exists():
      lines += section(ROOT / name, title)
  for name, title in (("h100-merged/bench_all7", "H100: pregated-merged, experts on all 7 modules"),
                      ("h100-merged/bench_qv", "H100: pregated-merged, experts on q and v")):
    if (ROOT / name / "results.json").exists():
      lines += section(ROOT / name, title)
  batch_runs = sorted((ROOT / "h100-batch").glob("batch*/results.json"),
                      key=lambda p: int(p.parent.name[len("batch"):]))
  if batch_runs and (ROOT / "h100" / "results.json").exists():
    lines += throughput_section([ROOT / "h100" / "results.json", *batch_runs])
    for path in batch_runs:
      lines += section(path.parent, f"H100: batch {path.parent.name[len('batch'):]}")
  expected = ROOT / "h100-merged" / "expected_cost.md"
  if expected.exists():
    lines += ["#" + expected.read_text().strip(), ""]
  one_jit = ROOT / "h100-merged" / "one_jit_kernels.md"
  if one_jit.exists():
    lines += ["### Why the merged step is two compiled calls", "", one_jit.read_text().strip(), ""]
  mosaic = ROOT / "h100-sgmm-mosaic" / "sgmm.md"
  if mosaic.exists():
    lines += ["## SGMM switch kernel alone: Triton and Mosaic GPU side by side"
              " (`python tools/sgmm_bench.py --quick --mosaic`, latest)", "",
              "`pallas_kernels/sgmm_mosaic.py` (TMA copies, one `wgmma` per tile, rebuild from the"
              " pristine base) beside the Triton-lowered kernel of `pallas_kernels/sgmm.py` and"
              " XLA, same weights, same switches. % of copy is against an XLA copy of 2 GiB"
              " measured in the same run; the switch kernels stream further than that copy.", "",
              mosaic.read_text().strip(), ""]
  sgmm = ROOT / "h100-sgmm" / "sgmm.md"
  if sgmm.exists():
    lines += ["## SGMM switch kernel alone (`python tools/sgmm_bench.py`, earlier run)", "",
              sgmm.read_text().strip(), ""]
  probe = ROOT / "h100-expert-paths" / "probe.log"
  if probe.exists():
    lines += ["## H100: XLA formulations of the unmerged experts", "",
              "`bash tools/expert_path_probe.sh OUT` (one process per `ADAFUSE_EXPERT_PATH`; the"
              " backbone and the fused kernel in the first). Its log:", "", "```",
              probe.read_text().strip(), "```", ""]
  sweep = ROOT / "h100-fused" / "tile_sweep.json"
  if sweep.exists():
    lines += sweep_section(sweep)
  (ROOT / "README.md").write_text("\n".join(lines))
  print(f"wrote {ROOT / 'README.md'}")
  # The project README shows the latest H100 decode table between its bench markers.
  readme = ROOT.parents[1] / "README.md"
  text = readme.read_text()
  head, rest = text.split("<!-- bench:start -->", 1)
  _, tail = rest.split("<!-- bench:end -->", 1)
  latest = ROOT / ("h100-full" if (ROOT / "h100-full").exists() else "h100")
  table = markdown(json.loads((latest / "results.json").read_text()))
  for sub in ("prefill", "prefill2048"):
    if (latest / sub / "results.json").exists():
      prefill = markdown(json.loads((latest / sub / "results.json").read_text()))
      table += "\n\nPrefill (same preset, another run):\n\n" + prefill.split("\n\n")[-1]
  tuned = ROOT / "h100-tuned" / "batch1" / "results.json"
  if tuned.exists():
    table = ("After tuning the gathered kernels' tiles"
             " (`docs/benchmarks/h100-tuned/`):\n\n" + markdown(json.loads(tuned.read_text()))
             + "\n\nThe full suite (every path, one run before the tuning):\n\n" + table)
  packed = [(sub, ROOT / "h100-packed" / sub / "results.json") for sub, _ in PACKED_RUNS]
  packed = [(sub, p) for sub, p in packed if p.exists()]
  if packed:
    runs = "\n\n".join(f"`docs/benchmarks/h100-packed/{sub}/` ({title}):\n\n"
                         + markdown(json.loads(p.read_text()))
                         for (sub, p), (_, title) in zip(packed, PACKED_RUNS))
    table = ("Latest runs, packed projections (`adafuse_jax/packed.py`), each mode measured"
             " beside the backbone in the same run:\n\n" + runs + "\n\nEarlier runs.\n\n" + table)
  throughput = "\n".join(pipelined_throughput_section("docs/benchmarks/")[2:])
  table = h200_readme_block() + table + "\n\n" + throughput
  text = f"{head}<!-- bench:start -->\n{table}\n<!-- bench:end -->{tail}"
  # ... and the training results tables, as `python -m train all` wrote them.
  for marker, sub in (("training-gpu-all", "gpu-1000-all/results.md"),
                      ("training", "results.md"), ("training-pilot", "cpu-pilot/results.md"),
                      ("training-shared", "shared-fraction.md"),
                      ("training-shared-300", "shared-fraction-300.md"),
                      ("training-gpu-1000", "gpu-1000.md"),
                      ("training-pilot-seeds", "cpu-pilot-seeds.md"),
                      ("training-gpu-seeds", "gpu-1000-seeds.md")):
    training = ROOT.parents[1] / "docs" / "training" / sub
    if training.exists() and f"<!-- {marker}:start -->" in text:
      head, rest = text.split(f"<!-- {marker}:start -->", 1)
      _, tail = rest.split(f"<!-- {marker}:end -->", 1)
      text = (f"{head}<!-- {marker}:start -->\n{training.read_text().strip()}\n"
              f"<!-- {marker}:end -->{tail}")
  readme.write_text(text)
  print(f"updated {readme}")


if __name__ == "__main__":
  main()
