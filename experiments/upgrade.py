r"""Algorithm 1 end to end: flags → configs → pipeline → report.

    python -m experiments.upgrade --flagfile=experiments/configs/quickstart.cfg

Synthetic or real data with simulated LQ labels (--data=synthetic|epfl_mito|
folder|stack) gives the paper's Table 3.1: annotation Dice of the LQ and
upgraded test labels and segmentation Dice per scenario. User mode takes real
LQ annotations:

    python -m experiments.upgrade --hq_images=DIR --hq_labels=DIR \
        --lq_images=DIR --lq_labels=DIR --out_dir=DIR [--scenarios=hq_upgraded]

and writes out_dir/upgraded/<LQ file name>.tif. Rerunning with the same
--out_dir resumes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import cli  # first: tunes malloc before jax is imported
from experiments.run_config import FlagView, build_config, check_flag_combination
from experiments.run_flags import paper_figures
from upgrade_jax.pipeline import PipelineConfig

F = flags.FLAGS
log_line = cli.log_line


@dataclasses.dataclass
class Plan:
  """A run checked from the flags, before anything is written."""
  cfg: PipelineConfig
  out_dir: Path
  prepared: object
  flags: FlagView
  user: object = None


def plan_from_flags(out_dir: Path, v: FlagView | None = None) -> Plan:
  """Builds the configs from the flags (or view `v`) and loads and checks every
  input and the out_dir. Creates nothing; every problem raises InputError/
  ValueError/OSError with a message naming the culprit."""
  from upgrade_jax import pipeline

  v = v or FlagView()
  check_flag_combination(v)
  cfg = build_config(v)
  if v.hq_images:
    if not v.present("scenarios"):  # user mode: upgrade only unless asked
      cfg = dataclasses.replace(cfg, scenarios=())
    user = pipeline.UserData(v.hq_images, v.hq_labels, v.lq_images, v.lq_labels,
                             v.others_labels)
    return Plan(cfg, out_dir, pipeline.prepare_user(cfg, user, out_dir), v, user)
  prepared = pipeline.prepare_run(cfg, out_dir, log=log_line, fresh=v.fresh)
  return Plan(cfg, out_dir, prepared, v)


def execute(plan: Plan) -> dict | None:
  """Runs a checked plan; returns the results.json dict (None in user mode,
  whose results.json holds the upgraded file list)."""
  from upgrade_jax import pipeline, report, rundir

  t0 = time.perf_counter()
  out_dir = plan.out_dir
  if plan.user is not None:
    pipeline.run_user(plan.cfg, plan.user, out_dir, log=log_line, prepared=plan.prepared)
    log_line(f"done in {time.perf_counter() - t0:.0f}s; upgraded labels in "
             f"{out_dir / 'upgraded'}")
    return None
  results = pipeline.run(plan.cfg, out_dir, log=log_line, prepared=plan.prepared,
                         fresh=plan.flags.fresh)
  paper = paper_figures(plan.flags.paper)
  d = report.write_results(out_dir, results, extra={"paper": paper,
                                                    "command": " ".join(sys.argv)})
  if not rundir.is_primary_process():  # several processes: process 0 reports
    return d
  figures = report.write_figures(out_dir, d, paper or None)
  print()
  print(report.format_table(d, paper or None))
  print()
  log_line(f"done in {time.perf_counter() - t0:.0f}s; results in {out_dir / 'results.json'}, "
       f"figures {', '.join(p.name for p in figures)}")
  return d


def run_from_flags(out_dir: Path) -> dict | None:
  """Checks, then runs, with the current flags (see plan_from_flags, execute)."""
  return execute(plan_from_flags(out_dir))


def main(argv):
  cli.refuse_arguments(argv)
  cli.setup_runtime()
  out_dir = Path(F.out_dir)
  plan = cli.one_line_errors(plan_from_flags, out_dir, checking=True)
  cli.one_line_errors(execute, plan)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
