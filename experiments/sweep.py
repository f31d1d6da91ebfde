r"""Sweeps one flag of experiments.upgrade; one run directory per value.

    python -m experiments.sweep --flagfile=experiments/configs/fig_3_4_hq_size.cfg \
        --sweep=n_hq=5,10,20,40 --out_dir=runs/fig_3_4

Each value runs in out_dir/<flag>=<value>/ (resumable like any run), then
out_dir/sweep_<flag>.png (Dice against the swept value, like Figure 3.4) and
out_dir/sweep.json are written. Every flag of experiments.upgrade is accepted.

On a cluster, run the points as separate jobs and collect them afterwards:

    python -m experiments.sweep --flagfile=F --list          # the points, 0-based
    python -m experiments.sweep --flagfile=F --index=2       # one point
    python -m experiments.sweep --flagfile=F --collect       # sweep.json + figure

Inside a SLURM job array (`sbatch --array=0-3`) the index defaults to
$SLURM_ARRAY_TASK_ID. The collected sweep.json equals the in-process one: both
are made from the points' results.json files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags

from experiments import cli, run_config, upgrade  # the run's flags come with run_config
from upgrade_jax.files import write_text
from upgrade_jax.rundir import InputError

F = flags.FLAGS
flags.DEFINE_string("sweep", None, "FLAG=V1,V2,...: the flag to sweep and its values.")
flags.DEFINE_integer("index", None, "Run only point INDEX (0-based, see --list); default "
                     "$SLURM_ARRAY_TASK_ID when set, else every point in this process.",
                     lower_bound=0)
flags.DEFINE_bool("list", False, "Print the sweep's points (index, value, folder, done) "
                  "and exit.")
flags.DEFINE_bool("collect", False, "Only write sweep.json and the figure from the points "
                  "that have finished (all must have).")

# Array-job index variables of the schedulers, in the order they are read.
ARRAY_INDEX_VARS = ("SLURM_ARRAY_TASK_ID",)


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


def point_dirs(out_dir: Path) -> tuple[str, list[tuple[str, Path]]]:
  """(flag, [(value, point folder), ...]) of the sweep, in the order given."""
  name, values = parse_sweep(F.sweep)
  return name, [(v, out_dir / f"{name}={v}") for v in values]


def plan_points(out_dir: Path, index: int | None = None):
  """Checked plans of every point (or of point `index`), before any point runs:
  one bad value fails the sweep before anything is written. Each point reads
  its own view of the flags; the global FLAGS are never changed."""
  name, points = point_dirs(out_dir)
  if index is not None and index >= len(points):
    raise InputError(f"--index={index}: the sweep has {len(points)} points (0.."
                     f"{len(points) - 1}); see --list")
  views = []
  for v, _ in points:
    try:
      views.append(run_config.FlagView().with_value(name, v))
    except (ValueError, flags.Error) as e:
      raise InputError(f"--sweep: bad value {v!r} for --{name}: {e}") from e
  from upgrade_jax import rundir
  rundir.check_owner(out_dir, "sweep")   # the sweep's own folder: its points and sweep.json
  chosen = range(len(points)) if index is None else [index]
  return name, [(points[k][0], upgrade.plan_from_flags(points[k][1], views[k]))
                for k in chosen]


# What a point's results.json holds: a simulated run's test-set numbers, or
# a user-mode run's (no test set: the validation Dice of its networks on the
# HQ validation pairs, and its counts).
SIMULATED_KEYS = ("annotation_dice", "segmentation_dice", "effective_rates")
USER_KEYS = ("upgrade_best_val_dice", "segmentation_best_val_dice", "n_hq", "n_lq")


def _point_kind(d: dict) -> str | None:
  if "annotation_dice" in d and "segmentation_dice" in d:
    return "simulated"
  if "upgrade_best_val_dice" in d:
    return "user"
  return None


def collect(out_dir: Path) -> Path:
  """Writes out_dir/sweep.json and sweep_<flag>.png from the points' results.json.

  Everything is read and checked before either file is written: a point
  that has not finished, a results.json that is not a run's, or points of
  both kinds (simulated and user mode) are refused with one line."""
  from upgrade_jax import report, rundir

  name, points = point_dirs(out_dir)
  rundir.check_owner(out_dir, "sweep")
  missing = [str(d) for _, d in points if not (d / "results.json").is_file()]
  if missing:
    raise InputError(f"--collect: {len(missing)} point(s) have not finished (no results.json): "
                     f"{', '.join(missing[:3])}; run them first (--index=K)")
  done = []
  for v, d in points:
    path = d / "results.json"
    try:
      done.append((_numeric(v), json.loads(path.read_text())))
    except ValueError:
      raise InputError(f"--collect: {path} is not readable JSON; rerun that point "
                       "(--index=K)") from None
  kinds = {_point_kind(d) for _, d in done}
  if None in kinds or len(kinds) != 1:
    bad = next((str(p / "results.json") for (_, p), (_, d) in zip(points, done)
                if _point_kind(d) is None), None)
    what = (f"{bad} is not the results.json of a run" if bad else
            "the points mix simulated and user-mode runs")
    raise InputError(f"--collect: {what}; collect a sweep of one kind")
  kind = kinds.pop()
  try:
    done.sort(key=lambda p: p[0])
  except TypeError:
    pass
  keys = SIMULATED_KEYS if kind == "simulated" else USER_KEYS
  summary = {"flag": name, "kind": kind, "points": [
      {"value": x, **{k: d.get(k) for k in keys}} for x, d in done]}
  figure = out_dir / f"sweep_{name}.png"
  if kind == "simulated":
    report.plot_sweep(done, figure, xlabel=name)
  else:
    report.plot_user_sweep(done, figure, xlabel=name)
  write_text(out_dir / "sweep.json", json.dumps(summary, indent=2))
  return figure


def array_index() -> int | None:
  """--index, else the scheduler's array index, else None (every point)."""
  if F.index is not None:
    return F.index
  for var in ARRAY_INDEX_VARS:
    value = os.environ.get(var, "").strip()
    if value:
      if not value.isdigit():
        raise InputError(f"${var}={value!r} is not a point index; give --index")
      return int(value)
  return None


def list_points(out_dir: Path) -> None:
  name, points = point_dirs(out_dir)
  for k, (v, d) in enumerate(points):
    state = "done" if (d / "results.json").is_file() else "todo"
    print(f"{k}\t{name}={v}\t{d}\t{state}")


def main(argv):
  cli.refuse_arguments(argv)
  if not F.sweep:
    sys.stderr.write("error: --sweep=FLAG=V1,V2,... is required\n")
    return 2
  out_dir = Path(F.out_dir)
  if F.list:
    cli.one_line_errors(list_points, out_dir, checking=True)
    return 0
  if F.collect:
    figure = cli.one_line_errors(collect, out_dir, checking=True)
    cli.log_line(f"sweep collected: {figure}, {out_dir / 'sweep.json'}")
    return 0
  cli.setup_runtime()
  index = cli.one_line_errors(array_index, checking=True)
  name, plans = cli.one_line_errors(plan_points, out_dir, index, checking=True)
  from upgrade_jax import rundir
  rundir.mark_owner(out_dir, "sweep")
  results = []
  for v, plan in plans:
    cli.log_line(f"sweep {name}={v} -> {plan.out_dir}")
    results.append(cli.one_line_errors(upgrade.execute, plan))
  if index is not None:
    cli.log_line(f"sweep point {index} done; --collect when every point has run")
    return 0
  figure = cli.one_line_errors(collect, out_dir)
  cli.log_line(f"sweep done: {figure}, {out_dir / 'sweep.json'}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
