r"""DSB2018 nuclei as a lab would have them: a few HQ labels, many sloppy ones.

    python -m benchmarks.dsb_lq --data_dir=../shared/datasets/dsb2018 --out=/tmp/dsb_lq \
        [--n_hq=10 --n_lq=40 --omission_rate=0.5 --bias_max=2 --seed=0]

writes (never into the repository; the data are not ours to ship)

    OUT/hq/{images,labels}/   n_hq image/label pairs as they are
    OUT/lq/{images,labels}/   n_lq other images with LQ *instance* labels:
                              floor(rate·n) of each image's n nuclei omitted,
                              then every kept nucleus dilated or eroded by q
                              px, q uniform in 1..bias_max, one draw per
                              image (the paper's omission + bias P, kept as
                              instances: an annotator draws cells one by one,
                              so touching cells stay separate objects)
    OUT/lq/gt/                the ground truth of the LQ images (for scoring)

Images are taken from the grey fluorescence images of 256x256 .. 520x696
(the most common kind), chosen with the seed; prints one JSON line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import tifffile
from absl import app, flags

F = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script, so that importing
  `lq_instances` (tests) does not clash with experiments.upgrade's flags."""
  flags.DEFINE_string("data_dir", "../shared/datasets/dsb2018", "The DSB2018 folder.")
  flags.DEFINE_string("out", None, "Output folder (outside the repository).")
  flags.DEFINE_integer("n_hq", 10, "HQ pairs.")
  flags.DEFINE_integer("n_lq", 40, "LQ images.")
  flags.DEFINE_float("omission_rate", 0.5, "Fraction of nuclei omitted per LQ image.")
  flags.DEFINE_integer("bias_max", 2, "Max px of the per-image dilation/erosion.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.mark_flag_as_required("out")


def lq_instances(labels: np.ndarray, rng: np.random.Generator, omission_rate: float,
                 bias_max: int) -> np.ndarray:
  """(H, W) LQ instance labels from GT instances: omission, then a per-image
  bias that keeps instances apart (growth into background only)."""
  from skimage.segmentation import expand_labels

  ids = np.unique(labels)
  ids = ids[ids > 0]
  drop = rng.choice(ids, int(np.floor(omission_rate * len(ids))), replace=False)
  kept = np.where(np.isin(labels, drop), 0, labels)
  if bias_max < 1:
    return kept
  q = int(rng.integers(1, bias_max + 1))
  if rng.random() < 0.5:
    return expand_labels(kept, q)
  # Erode each instance on its own (3x3 square, q times), as P's bias does.
  footprint = np.ones((2 * q + 1, 2 * q + 1), bool)
  same = ndi.minimum_filter(kept, footprint=footprint) == ndi.maximum_filter(
      kept, footprint=footprint)
  return np.where(same, kept, 0)


def main(argv):
  del argv
  root = Path(F.data_dir)
  names = []
  for p in sorted((root / "images").glob("*.tif")):
    img = tifffile.imread(p)
    if img.ndim == 2 and img.shape[0] * img.shape[1] <= 520 * 696:
      names.append(p.stem)
  rng = np.random.default_rng(F.seed)
  pick = rng.permutation(names)[:F.n_hq + F.n_lq]
  out = Path(F.out)
  for sub in ("hq/images", "hq/labels", "lq/images", "lq/labels", "lq/gt"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  n_gt = n_lq = 0
  for k, stem in enumerate(pick):
    split = "hq" if k < F.n_hq else "lq"
    shutil.copyfile(root / "images" / f"{stem}.tif", out / split / "images" / f"{stem}.tif")
    gt = tifffile.imread(root / "labels" / f"{stem}.tif")
    if split == "hq":
      shutil.copyfile(root / "labels" / f"{stem}.tif", out / "hq/labels" / f"{stem}.tif")
      continue
    lq = lq_instances(gt, rng, F.omission_rate, F.bias_max)
    tifffile.imwrite(out / "lq/labels" / f"{stem}.tif", lq.astype(np.uint16),
                     compression="zlib")
    shutil.copyfile(root / "labels" / f"{stem}.tif", out / "lq/gt" / f"{stem}.tif")
    n_gt += len(np.unique(gt)) - 1
    n_lq += len(np.unique(lq)) - 1
  print(json.dumps({"out": str(out), "n_hq": F.n_hq, "n_lq_images": len(pick) - F.n_hq,
                    "gt_nuclei": n_gt, "lq_nuclei": n_lq, "omission_rate": F.omission_rate,
                    "bias_max": F.bias_max, "seed": F.seed}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
