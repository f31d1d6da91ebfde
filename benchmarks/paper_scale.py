r"""Paper scale on whatever device is there: the numbers a GPU owner asks for.

    python -m benchmarks.paper_scale [--budget_s=300] [--no_torch] [--smoke]

The paper's scale (§3.2.3): batch 4 of whole 565×807 slices, a 4+4-block
UNet of widths 64…512. The UNet takes sides that are multiples of 16, so a
slice is padded to 576×816 (as the library pads: the padding is marked
invalid in the loss); experiments/configs/paper_scale.cfg trains so.

One JSON line per measure, then a summary line:
  train_step   u_θ (task upgrade: the perturbation P drawn on the device in
               the step) and a segmentation network (task segment): compile
               s, step s, steps/s, img/s, GFLOP per step (XLA's cost
               analysis) and achieved GFLOP/s, the compiled program's memory
               and the device's peak memory (where the device reports it),
               and the same step of the same network in PyTorch on the same
               device (benchmarks/torch_unet.py): a `torch_step` line each
               with `ratio_vs_torch` = t_torch / t_jax (no such lines without
               PyTorch for that device; null when it did not fit);
  perturbation P alone (the same 4 slices, jitted) and its share of the
               u_θ step; `share_by_identity_step` = 1 − t(step on the same
               input with the label made beforehand) / t(u_θ step), when the
               budget allows that third step;
  predict      apply's path (export.upgrade_sample: tiles of 1024, instances)
               on a 2048² and a 4096² image: s per image and Mpx/s;
  projection   the wall time of Table 3.1 at this scale: 8 rows × 5
               repetitions × (u_θ + 5 segmentation networks: HQ, LQ, HQ + LQ,
               HQ + upgraded, oracle) at the steps the stopping rule takes,
               from the measured step times (validation, data and compile
               excluded), and at the step caps of the flagfile (the bound).

`--budget_s`: the command ends within about that time. Each measure is
costed before it runs (its compiled FLOPs over the GFLOP/s achieved so far,
or a matmul's before any step ran); one that does not fit is not run, and
its line says `"measured": false` with the time projected from its FLOPs.
`--smoke`: the same on a tiny problem (64×96 slices, width 4) that the
test suite runs on CPU to check every field.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from benchmarks.bench_common import prepare_cpu_benchmark  # no jax import: safe before jax

# The paper's scale (§3.2.3) and the Table 3.1 protocol of this project.
PAPER = dict(slice_hw=(565, 807), width=64, batch=4, predict_sides=(2048, 4096),
             tiling=dict(tile=1024, margin=64))   # apply's default TileConfig
# The smoke's sides tile as the paper's do (several tiles), into one tile shape.
SMOKE = dict(slice_hw=(57, 90), width=4, batch=2, predict_sides=(128, 192),
             tiling=dict(tile=64, margin=8))
TABLE_3_1 = dict(rows=8, reps=5, segmentation_networks=5)
# Steps a network trains under the stopping rule, until a record at this
# scale says otherwise: the CPU-scale rule stops segmentation networks at
# 600-1450 steps (BUILD_NOTES "Convergence of the rule", 2026-12-06; median
# ~950) and u_θ runs its budget; the caps are paper_scale.cfg's.
RULE_STEPS = dict(upgrade=800, segment=950)
CAP_STEPS = dict(upgrade=20000, segment=20000)
# P of the Table 3.1 combined row (table_3_1_combined_hl60.cfg).
PERTURB = dict(omission_rate=0.3, inclusion_rate=0.3, bias_max=4)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--budget_s", type=float, default=300.0, help="end within about this time")
  p.add_argument("--smoke", action="store_true", help="a tiny problem (the test suite's)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--max_timed_steps", type=int, default=5, help="timed steps per network")
  return p.parse_args(argv)


class Budget:
  """Seconds left of --budget_s, and whether a cost still fits."""

  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def fits(self, cost_s: float) -> bool:
    return cost_s <= self.left()


def emit(line: dict, budget: "Budget | None" = None) -> dict:
  if budget is not None:
    line = {**line, "at_s": budget.elapsed()}   # when the measure ended
  print(json.dumps({k: (float(f"{v:.5g}") if isinstance(v, float) else v)   # 5 digits
                    for k, v in line.items()}), flush=True)
  return line


def main(argv=None) -> int:
  args = parse_args(argv)
  scale = SMOKE if args.smoke else PAPER
  budget = Budget(args.budget_s)
  prepare_cpu_benchmark()
  import jax

  from benchmarks import paper_scale_jax as pj
  from upgrade_jax.engine.tiling import TileConfig

  load_before = os.getloadavg()[0]
  device = jax.devices()[0]
  torch = None if args.no_torch else pj.torch_for(device)
  lines, rate = [], pj.matmul_gflops()   # the first estimate of achievable GFLOP/s
  steps = {}
  problem = pj.Problem(scale["slice_hw"], scale["width"], scale["batch"], PERTURB)
  for network in ("segment", "upgrade"):
    # Room for the next network (1 step) and the PyTorch steps (2.5 each).
    room = (network == "segment") + (5.0 if torch is not None else 0.0)
    m = pj.train_step(problem, network, budget, rate, args.max_timed_steps, room_after=room)
    if m["measured"]:
      rate = m["gflops"]
    steps[network] = m
    lines.append(emit({"measure": "train_step", **m}, budget))
  lines.append(emit({"measure": "perturbation",
                     **pj.perturbation(problem, steps["upgrade"], budget, rate)}, budget))
  tiling = TileConfig(**scale["tiling"])
  for side in scale["predict_sides"]:
    lines.append(emit({"measure": "predict", **pj.predict(problem, side, budget, rate, tiling)},
                      budget))
  # PyTorch last: on a CPU its freed memory stays in the process (a 13 GB
  # JAX step after a PyTorch one ran out of 24 GB; BUILD_NOTES).
  for network in ("segment", "upgrade") if torch is not None else ():
    nxt = 2.5 * steps["upgrade"]["step_s"] if network == "segment" else 0.0
    lines.append(emit({"measure": "torch_step", "network": network,
                       **pj.torch_step(torch, problem, network, budget, steps[network],
                                       reserve_s=nxt)}, budget))
  lines.append(emit({"measure": "projection", **projection(steps)}))
  emit({"summary": True, "device": device.device_kind, "platform": device.platform,
        "devices": jax.device_count(), "smoke": args.smoke, "budget_s": args.budget_s,
        "elapsed_s": budget.elapsed(), "within_budget": budget.elapsed() <= args.budget_s * 1.1,
        "slice": list(problem.padded_hw), "width": problem.width, "batch": problem.batch,
        "measured": [f"{l['measure']}:{l.get('network', l.get('side', ''))}" for l in lines
                     if l.get("measured")],
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "jax": jax.__version__, "torch": getattr(torch, "__version__", None),
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine()})
  return 0


def projection(steps: dict) -> dict:
  """Table 3.1's wall time from the step times (measured or projected)."""
  per_rep = {"upgrade": 1, "segment": TABLE_3_1["segmentation_networks"]}
  reps = TABLE_3_1["rows"] * TABLE_3_1["reps"]

  def hours(step_counts):
    return sum(reps * per_rep[n] * step_counts[n] * steps[n]["step_s"] for n in per_rep) / 3600

  return {"table": "3.1", "rows": TABLE_3_1["rows"], "reps": TABLE_3_1["reps"],
          "networks_per_rep": per_rep, "rule_steps": RULE_STEPS, "cap_steps": CAP_STEPS,
          "hours_at_rule_steps": hours(RULE_STEPS), "hours_at_cap_steps": hours(CAP_STEPS),
          "from_measured_steps": all(steps[n]["measured"] for n in per_rep),
          "excluded": "validation, data generation, compilation"}


if __name__ == "__main__":
  sys.exit(main())
