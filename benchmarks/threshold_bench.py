"""Best global threshold per synthetic preset: is the task hard enough?

For each preset: 30 volumes (seed 0, default size), 6 held out as the test set
(seeded), the threshold searched in steps of 1% of the maximum intensity and
chosen on every slice of the 24 training volumes by pooled Dice, then scored
on the test slices (pooled Dice). Two intensity scales are reported: "max"
(per-image max normalisation: the pipeline's baseline up to commit 979b759)
and "raw" (the 16-bit values as they are, a truly global threshold: the
pipeline's baseline, `pipeline.threshold_baseline`). The reference, side by
side, is the paper's best global threshold on its own synthetic sets (Table
"global thresholding": 0.89 on HL60, 0.21 on granulocytes in the combined
set) and the difficulty bounds the presets are built to (<= 0.92 and <= 0.5).

Prints one JSON line.

    python benchmarks/threshold_bench.py [--n_volumes 30] [--n_test 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

from upgrade_jax.baselines import threshold
from upgrade_jax.data import sampling, synthetic
from upgrade_jax.data import stacking

PAPER = {"hl60": 0.89, "combined_granulocytes": 0.21}
BOUND = {"hl60": 0.92, "combined_granulocytes": 0.5}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_volumes", type=int, default=30)
  parser.add_argument("--n_test", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()
  out = {"bench": "global_threshold", "n_volumes": args.n_volumes, "n_test": args.n_test,
         "seed": args.seed, "shape": list(synthetic.DEFAULT_SHAPE), "presets": {}}
  holds = True
  for preset in synthetic.PRESETS:
    vols = synthetic.generate(preset, seed=args.seed, n_volumes=args.n_volumes)
    train, test = sampling.hold_out(vols, args.n_test, seed=args.seed)
    row = {}
    for scale, norm in (("max", "max"), ("raw", "none")):
      r = threshold.fit_and_evaluate(stacking.volumes_to_dataset(train, normalisation=norm),
                                     stacking.volumes_to_dataset(test, normalisation=norm))
      row[scale] = {"fraction": r.fraction, "train_dice": round(r.train_dice, 4),
                    "test_dice": round(r.test_dice, 4)}
    if preset in BOUND:
      worst = max(row[s]["test_dice"] for s in ("max", "raw"))
      row.update(paper=PAPER[preset], bound=BOUND[preset], holds=worst <= BOUND[preset])
      holds &= row["holds"]
    out["presets"][preset] = row
  out["pipeline_scale"] = "raw"   # what pipeline.threshold_baseline uses
  out["all_bounds_hold"] = holds
  out["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
