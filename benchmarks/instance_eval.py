r"""Instance scores of label folders against a ground-truth folder.

    python -m benchmarks.instance_eval --gt=DIR --labels=lq=DIR,upgraded=DIR[,...] \
        [--same=DIR_A,DIR_B]

For each named folder: StarDist-style matching summed over the images
(precision, recall, F1 and accuracy TP/(TP+FP+FN) at IoU 0.5 and 0.75) and
pooled Dice, on the files present in --gt, and the flooded files
(review.truth_floods: foreground above half the image where the truth's is
below 0.3, a background turned foreground). --same checks that two
folders hold byte-identical files. Prints one JSON line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from absl import app, flags

flags.DEFINE_string("gt", None, "Ground-truth instance labels.")
flags.DEFINE_list("labels", [], "name=folder pairs to score.")
flags.DEFINE_list("same", [], "Two folders whose files must be byte-identical.")
flags.mark_flag_as_required("gt")
F = flags.FLAGS


def main(argv):
  del argv
  from upgrade_jax import instances, metrics, review

  gt_files = sorted(Path(F.gt).glob("*.tif"))
  gts = [tifffile.imread(p) for p in gt_files]
  out = {"images": len(gts), "gt_objects": int(sum(len(np.unique(g)) - 1 for g in gts))}
  for item in F.labels:
    name, _, folder = item.partition("=")
    preds = [tifffile.imread(Path(folder) / p.name) for p in gt_files]
    scores = instances.summary_scores(gts, preds)
    scores["objects"] = int(sum(len(np.unique(p)) - 1 for p in preds))
    scores["flooded"] = [p.name for p, pr, g in zip(gt_files, preds, gts)
                         if review.truth_floods(pr, g)]
    scores["dice"] = metrics.pooled_dice(np.sum([metrics.dice_counts_np(p > 0, g > 0)
                                                 for p, g in zip(preds, gts)], axis=0))
    out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
  if F.same:
    a, b = (Path(x) for x in F.same)
    names = sorted(p.name for p in a.iterdir())
    out["identical_files"] = sum((a / n).read_bytes() == (b / n).read_bytes()
                                 for n in names if (b / n).is_file())
    out["compared_files"] = len(names)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
