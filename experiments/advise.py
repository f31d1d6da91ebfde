r"""How much would more HQ labels improve the upgrade network?

    python -m experiments.advise --hq_images=DIR --hq_labels=DIR --out_dir=DIR
    python -m experiments.advise --flagfile=experiments/configs/quickstart.cfg \
        --n_hq=20 --out_dir=runs/advise        # synthetic: also scores the test set

Trains u_θ on nested subsets of the HQ training pairs (--fractions, default
25/50/100%), with the same validation pairs at every size, fits
Dice = a + b·ln(n) to the best validation Dice (the paper's Figure 3.4 trend)
and says in one sentence what one more HQ label is expected to add and from
which n the gain per label falls below --gain_threshold. Writes advice.json
and advice.png into --out_dir; a rerun resumes the trained subsets.

The validation Dice is the early-stopping set's best (optimistic, and on
P(HQ) inputs, not on your real LQ labels). On synthetic data the test set's
upgraded-annotation Dice is measured and fitted too: the quantity Figure 3.4
plots, so the advice can be checked against a real sweep (BUILD_NOTES.md).
Every flag of experiments.upgrade that sets u_θ's training applies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import cli, run_config  # the run's flags come with run_config
from upgrade_jax.files import write_text
from upgrade_jax.rundir import InputError

F = flags.FLAGS
flags.DEFINE_list("fractions", ["0.25", "0.5", "1.0"], "Fractions of the HQ training pairs "
                  "of the learning curve's points (nested subsets).")
flags.DEFINE_float("gain_threshold", 0.002, "Dice per extra HQ label below which more labels "
                   "are said to stop paying.", lower_bound=0.0)
flags.DEFINE_list("predict_n", [], "Further numbers of HQ training pairs to predict the "
                  "Dice at (e.g. 32), reported in advice.json and drawn.")


def _fractions() -> tuple[float, ...]:
  try:
    fr = tuple(float(f) for f in F.fractions)
  except ValueError:
    raise InputError(f"--fractions={','.join(F.fractions)}: give numbers in (0, 1]") from None
  if not fr or any(not 0 < f <= 1 for f in fr):
    raise InputError(f"--fractions={','.join(F.fractions)}: every fraction must be in (0, 1]")
  return fr


def _predict_n() -> list[int]:
  try:
    ns = [int(n) for n in F.predict_n]
  except ValueError:
    raise InputError(f"--predict_n={','.join(F.predict_n)}: give whole numbers") from None
  if any(n < 1 for n in ns):
    raise InputError(f"--predict_n={','.join(F.predict_n)}: numbers must be >= 1")
  return ns


def plan(out_dir: Path):
  """Checks the flags and loads the HQ pairs; creates nothing.

  Returns (cfg, hq_train, hq_val, score_fn or None, guard)."""
  from upgrade_jax import metrics, pipeline, rundir
  from upgrade_jax.pipeline.user import load_hq_pairs

  v = run_config.FlagView()
  if v.lq_images or v.lq_labels:
    raise InputError("--lq_images/--lq_labels do not apply to experiments.advise: it learns "
                     "from the HQ pairs only; remove them")
  user_mode = bool(v.hq_images or v.hq_labels)
  run_config.check_flag_combination(v, user_flags=("hq_images", "hq_labels"))
  cfg = run_config.build_config(v)
  _fractions(), _predict_n()
  if user_mode:
    if not v.hq_labels:
      raise InputError("--hq_images needs --hq_labels (the HQ instance labels, same file names)")
    for flag in ("hq_images", "hq_labels"):
      if not Path(getattr(v, flag)).is_dir():
        raise InputError(f"--{flag}={getattr(v, flag)} is not a folder")
    guard = rundir.InputGuard([v.hq_images, v.hq_labels])
    rundir.check_out_dir(out_dir, guard, owner="advise")
    hq, train_idx, val_idx = load_hq_pairs(cfg, v.hq_images, v.hq_labels)
    return cfg, hq.subset(train_idx), hq.subset(val_idx), None, guard
  volumes, guard = pipeline.prepare_run(cfg, out_dir, log=cli.log_line, owner="advise")
  data = pipeline.prepare_rep(cfg, volumes, seed=cfg.seed)
  valid = data.test.valid_mask()

  def score(fit) -> dict:  # the test set's upgraded-annotation Dice (Figure 3.4's quantity)
    up = pipeline.upgrade_labels(pipeline.upgrader_of(cfg, fit, data.hq_train.channels),
                                 data.test_lq_masks)
    return {"test_dice": metrics.pooled_dice_np(up, data.test.targets, valid),
            "test_lq_dice": metrics.pooled_dice_np(data.test_lq_masks.targets,
                                                   data.test.targets, valid)}

  return cfg, data.hq_train, data.hq_val, score, guard


def run(out_dir: Path, planned) -> dict:
  from upgrade_jax import advise, rundir
  from upgrade_jax.files import json_safe
  from upgrade_jax.pipeline import run_key

  cfg, hq_train, hq_val, score, guard = planned
  sizes = advise.nested_sizes(len(hq_train), _fractions())
  with rundir.RunLock(out_dir, owner="advise"):
    rundir.remove_stale_temps(out_dir)
    points = advise.learning_curve(cfg.upgrade, hq_train, hq_val, sizes, out_dir / "curve",
                                   seed=cfg.seed, score=score, log=cli.log_line,
                                   context={"advise": run_key(cfg)})
    n_now = sizes[-1]
    out = {"n_train": len(hq_train), "n_val": len(hq_val), "points": points}
    for key in ("val_dice", "test_dice"):
      if key not in points[0]:
        continue
      trend = advise.fit_log_trend([p["n"] for p in points], [p[key] for p in points])
      a = advise.advice(trend, n_now, F.gain_threshold)
      a["predicted"] = {str(n): float(trend(n)) for n in _predict_n()}
      out[key] = a
    write_text(out_dir / "advice.json", json.dumps(out, indent=2, default=json_safe), guard=guard)
    _plot(out, out_dir / "advice.png")
  return out


def _plot(out: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from upgrade_jax import advise
  from upgrade_jax.report import save_figure

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ns = np.array([p["n"] for p in out["points"]], dtype=float)
  extra = [int(n) for k in ("val_dice", "test_dice") if k in out for n in out[k]["predicted"]]
  xs = np.geomspace(ns.min(), max([ns.max(), *extra]), 60)
  for key, label, color in (("val_dice", "validation (P(HQ) inputs)", "#4c72b0"),
                            ("test_dice", "test set (real LQ inputs)", "#55a868")):
    if key not in out:
      continue
    a = out[key]
    trend = advise.Trend(a["a"], a["b"])
    ax.scatter(ns, [p[key] for p in out["points"]], color=color, label=label, zorder=3)
    ax.plot(xs, trend(xs), ":", color=color)
    for n, d in a["predicted"].items():
      ax.scatter([int(n)], [d], marker="x", color=color)
  ax.set_xscale("log")
  ax.set_xlabel("HQ training pairs")
  ax.set_ylabel("u_θ Dice")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def main(argv):
  cli.refuse_arguments(argv)
  cli.setup_runtime()
  out_dir = Path(F.out_dir)
  planned = cli.one_line_errors(plan, out_dir, checking=True)
  out = cli.one_line_errors(run, out_dir, planned)
  for key in ("val_dice", "test_dice"):
    if key in out:
      cli.log_line(f"{key}: {out[key]['sentence']}")
  cli.log_line(f"advice in {out_dir / 'advice.json'}, {out_dir / 'advice.png'}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
