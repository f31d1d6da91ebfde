r"""Sweeps one flag of experiments.upgrade; one run directory per value.

    python -m experiments.sweep --flagfile=experiments/configs/fig_3_4_hq_size.cfg \
        --sweep=n_hq=5,10,20,40 --out_dir=runs/fig_3_4

Each value runs in out_dir/<flag>=<value>/ (resumable like any run), then
out_dir/sweep_<flag>.png (Dice against the swept value, like Figure 3.4) and
out_dir/sweep.json are written. Every flag of experiments.upgrade is accepted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from experiments import upgrade  # defines the run's flags
from upgrade_jax.data.io import write_text
from upgrade_jax.rundir import InputError

F = flags.FLAGS
flags.DEFINE_string("sweep", None, "FLAG=V1,V2,...: the flag to sweep and its values.")


def parse_sweep(spec: str) -> tuple[str, list[str]]:
  name, sep, values = spec.partition("=")
  name = name.strip().lstrip("-")
  if not sep or not values.strip():
    raise InputError(f"--sweep={spec!r}: expected FLAG=V1,V2,...")
  if name not in F or name in ("sweep", "out_dir", "flagfile"):
    raise InputError(f"--sweep: {name!r} is not a flag of experiments.upgrade")
  # A list flag (e.g. volume_shape) takes its values separated by ';'.
  sep = ";" if isinstance(F[name].parser, flags.ListParser) or ";" in values else ","
  return name, [v.strip() for v in values.split(sep) if v.strip()]


def _numeric(v: str):
  try:
    return float(v)
  except ValueError:
    return v


def plan_points(out_dir: Path):
  """Every point's checked plan, before any point runs (one bad value fails
  the sweep before anything is written)."""
  name, values = parse_sweep(F.sweep)
  plans = []
  for v in values:
    try:
      setattr(F, name, F[name].parser.parse(v))  # runs the flag's validators
    except (ValueError, flags.IllegalFlagValueError) as e:
      raise InputError(f"--sweep: bad value {v!r} for --{name}: {e}") from e
    plans.append((v, upgrade.plan_from_flags(out_dir / f"{name}={v}")))
  return name, plans


def main(argv):
  if len(argv) > 1:
    sys.stderr.write(f"error: unexpected arguments {argv[1:]}; every option is a --flag\n")
    return 2
  if not F.sweep:
    sys.stderr.write("error: --sweep=FLAG=V1,V2,... is required\n")
    return 2
  upgrade.setup_runtime()
  out_dir = Path(F.out_dir)
  name, plans = upgrade.one_line_errors(plan_points, out_dir, checking=True)
  points = []
  for v, plan in plans:
    upgrade._log(f"sweep {name}={v} -> {plan.out_dir}")
    d = upgrade.one_line_errors(upgrade.execute, plan)
    if d is not None:
      points.append((_numeric(v), d))
  if not points:
    return 0
  from upgrade_jax import report
  try:
    points.sort(key=lambda p: p[0])
  except TypeError:
    pass
  figure = out_dir / f"sweep_{name}.png"
  report.plot_sweep(points, figure, xlabel=name)
  summary = {"flag": name, "points": [
      {"value": x, "annotation_dice": d["annotation_dice"],
       "segmentation_dice": d["segmentation_dice"],
       "effective_rates": d.get("effective_rates")} for x, d in points]}
  write_text(out_dir / "sweep.json", json.dumps(summary, indent=2))
  upgrade._log(f"sweep done: {figure}, {out_dir / 'sweep.json'}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=upgrade.parse_flags_one_line)
