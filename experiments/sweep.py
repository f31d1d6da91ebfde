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

F = flags.FLAGS
flags.DEFINE_string("sweep", None, "FLAG=V1,V2,...: the flag to sweep and its values.")


def parse_sweep(spec: str) -> tuple[str, list[str]]:
  name, sep, values = spec.partition("=")
  name = name.strip().lstrip("-")
  if not sep or not values.strip():
    raise app.UsageError(f"--sweep={spec!r}: expected FLAG=V1,V2,...")
  if name not in F or name in ("sweep", "out_dir", "flagfile"):
    raise app.UsageError(f"--sweep: {name!r} is not a flag of experiments.upgrade")
  # A list flag (e.g. volume_shape) takes its values separated by ';'.
  sep = ";" if isinstance(F[name].parser, flags.ListParser) or ";" in values else ","
  return name, [v.strip() for v in values.split(sep) if v.strip()]


def _numeric(v: str):
  try:
    return float(v)
  except ValueError:
    return v


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not F.sweep:
    raise app.UsageError("--sweep=FLAG=V1,V2,... is required")
  upgrade.setup_runtime()
  name, values = parse_sweep(F.sweep)
  out_dir = Path(F.out_dir)
  points = []
  for v in values:
    try:
      setattr(F, name, F[name].parser.parse(v))  # runs the flag's validators
    except (ValueError, flags.IllegalFlagValueError) as e:
      raise app.UsageError(f"--sweep: bad value {v!r} for --{name}: {e}") from e
    point_dir = out_dir / f"{name}={v}"
    upgrade._log(f"sweep {name}={v} -> {point_dir}")
    try:
      d = upgrade.run_from_flags(point_dir)
    except ValueError as e:   # pipeline.ConfigMismatch: one line, no traceback
      if type(e).__name__ != "ConfigMismatch":
        raise
      print(f"error: {e}", file=sys.stderr)
      return 2
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
  app.run(main)
