r"""Is the review queue informative? Rank correlation of doubt and Dice.

    python -m benchmarks.review_rank --choose_seed=0 --report_seed=1 [--max_steps=200]
    python -m benchmarks.review_rank --run_dir=RUN     # a finished synthetic run

Simulated data know the truth, so every row of a synthetic run's review.csv
carries the upgraded slice's Dice against it (dice_vs_truth). For each
candidate doubt score (higher = more doubtful) this prints the Spearman rank
correlation with that Dice: an informative queue has a clearly negative one
(most doubtful first = lowest Dice first). Without --run_dir it trains two
small upgrade-only runs through the library (synthetic hl60, 70% omission,
data and training seeds both = the seed), chooses the candidate with the
most negative correlation on --choose_seed and reports it on --report_seed,
with the mean Dice of the first and last quarter of that seed's queue.
Prints one JSON object.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

from upgrade_jax.runtime import tune_malloc

tune_malloc()  # before jax is imported

import numpy as np  # noqa: E402

flags.DEFINE_string("run_dir", "", "A finished synthetic run (its review.csv) to score instead.")
flags.DEFINE_integer("choose_seed", 0, "Seed on which the score is chosen.")
flags.DEFINE_integer("report_seed", 1, "Seed on which the chosen score is reported.")
flags.DEFINE_integer("n_volumes", 6, "Synthetic volumes (1 held out for test).")
flags.DEFINE_list("volume_shape", ["16", "128", "128"], "Synthetic Z,H,W.")
flags.DEFINE_integer("n_hq", 8, "HQ slices.")
flags.DEFINE_integer("width", 8, "UNet base width.")
flags.DEFINE_integer("max_steps", 200, "Training steps of u_θ.")
flags.DEFINE_string("out_dir", "", "Where the runs go (default: a temporary folder).")
F = flags.FLAGS

# name -> doubt from a review.csv row (higher = more doubtful).
CANDIDATES = {
    "mean_entropy_foreground": lambda r: float(r["mean_entropy_foreground"]),
    "mean_entropy_changed": lambda r: float(r["mean_entropy_changed"]),
    "one_minus_expected_dice": lambda r: 1.0 - float(r["expected_dice"]),
    "changed_fraction": lambda r: float(r["changed_fraction"]),   # no probabilities
}


def read_rows(run_dir: Path) -> list[dict]:
  with open(run_dir / "review.csv") as f:
    rows = list(csv.DictReader(f))
  if not rows or "dice_vs_truth" not in rows[0]:
    raise SystemExit(f"{run_dir}/review.csv has no dice_vs_truth column (not a synthetic run)")
  return rows


def correlations(rows: list[dict]) -> dict:
  """{candidate: Spearman rho of doubt vs Dice}, and the quartile Dice of each."""
  from scipy.stats import spearmanr

  dice = np.array([float(r["dice_vs_truth"]) for r in rows])
  out = {}
  for name, doubt in CANDIDATES.items():
    d = np.array([doubt(r) for r in rows])
    order = np.argsort(-d, kind="stable")   # most doubtful first
    q = max(1, len(rows) // 4)
    out[name] = {"spearman": round(float(spearmanr(d, dice).statistic), 4),
                 "dice_first_quarter": round(float(dice[order[:q]].mean()), 4),
                 "dice_last_quarter": round(float(dice[order[-q:]].mean()), 4)}
  return {"images": len(rows), "mean_dice": round(float(dice.mean()), 4), "scores": out}


def run_seed(seed: int, out_dir: Path) -> dict:
  """An upgrade-only synthetic run (library, no CLI); its review rows scored."""
  from upgrade_jax import engine, pipeline
  from upgrade_jax.perturb import PerturbConfig

  train = engine.TrainConfig(
      task=engine.Upgrade(perturb=PerturbConfig(omission_rate=0.7)),
      widths=tuple(F.width * m for m in (1, 2, 4, 8, 8)), crop=64, batch_size=8,
      max_steps=F.max_steps, steps_per_epoch=50, patience=4, log_every=100)
  data = pipeline.DataConfig(n_volumes=F.n_volumes, n_test=1, n_hq=F.n_hq, max_test=16,
                             volume_shape=tuple(int(s) for s in F.volume_shape),
                             data_seed=seed)
  cfg = pipeline.PipelineConfig(data=data, upgrade=train, scenarios=(),
                                threshold_baseline=False, seed=seed, review_top=0)
  t0 = time.perf_counter()
  res = pipeline.run(cfg, out_dir, log=lambda s: None)
  out = correlations(read_rows(out_dir))
  out.update(seed=seed, seconds=round(time.perf_counter() - t0, 1),
             upgrade_best_val_dice=round(res.reps[0]["upgrade_best_val_dice"], 4),
             annotation_dice=res.reps[0]["annotation_dice"]["lq_train_set"])
  return out


def main(argv):
  del argv
  if F.run_dir:
    print(json.dumps({"run_dir": F.run_dir, **correlations(read_rows(Path(F.run_dir)))}))
    return
  base = Path(F.out_dir or tempfile.mkdtemp(prefix="review_rank_"))
  t0 = time.perf_counter()
  choose = run_seed(F.choose_seed, base / f"seed{F.choose_seed}")
  chosen = min(choose["scores"], key=lambda k: choose["scores"][k]["spearman"])
  report = run_seed(F.report_seed, base / f"seed{F.report_seed}")
  print(json.dumps({
      "chosen_on_seed": F.choose_seed, "chosen": chosen,
      "reported_on_seed": F.report_seed, "reported": report["scores"][chosen],
      "choose_run": choose, "report_run": report,
      "settings": {k: getattr(F, k) for k in ("n_volumes", "volume_shape", "n_hq", "width",
                                               "max_steps")},
      "seconds": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg(),
      "out_dir": str(base)}, indent=1))


if __name__ == "__main__":
  app.run(main)
