"""The review queue: which upgraded labels an expert should check first.

Every upgrade run writes `review.csv` (one row per upgraded image, most
doubtful first) and `review/` (an overlay PNG for each of the first N):

  image_review    one image's numbers: pixels changed, objects added and
                  removed, entropy of u_θ's probabilities, the doubt score
  rank_rows       rows sorted most doubtful first, with their rank
  review_csv      the rows as CSV text
  write_review    review.csv and the overlays of the top N, atomically

The score is the mean binary entropy (bits) of u_θ's foreground probability
over the pixels that are foreground in the LQ label or the upgraded mask
("foreground entropy"). Chosen by measurement (benchmarks/review_rank.py,
NOTES_issue14.md): Spearman correlation with the upgraded slice's Dice
against the truth -0.84 on the seed it was chosen on and -0.82 on another
(first quarter of the queue Dice 0.47, last quarter 0.90), where the mean
entropy over the changed pixels only gave -0.34 / -0.12 and the changed
fraction +0.26 / -0.05. The changed-only mean ignores an image whose
upgrade changed little but whose cells are all uncertain, and an image
with a few confidently added cells is not doubtful however much changed.

A flood (the background of an image turned foreground, as a hazy
background can make it) is flagged, not hidden: `flooded` is 1 where the
upgraded foreground covers more than FLOOD_FRACTION of the image and more
than FLOOD_RATIO times the larger of the LQ label's foreground and the
largest of the HQ training images' (`foreground_ratio`, a column to sort
by). Such a file is unusable as it is; the row says so. Where the truth
is known (simulated data, `apply --truth`), `truth_floods` is the check
that needs no reference: the upgraded foreground above FLOOD_FRACTION where
the truth's is below TRUTH_FLOOD_BELOW (column flooded_vs_truth).

All functions are pure except `write_review`, which writes files.
"""

from __future__ import annotations

import csv
import io as _io
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage as ndi

from upgrade_jax import rundir
from upgrade_jax import files
from upgrade_jax.data.types import Dataset

__all__ = ["SCORE", "COLUMNS", "binary_entropy", "image_review", "rank_rows", "review_csv",
           "write_review", "dataset_rows", "write_dataset_review", "TOP_N", "FLOOD_FRACTION",
           "FLOOD_RATIO", "TRUTH_FLOOD_BELOW", "truth_floods", "max_foreground_fraction",
           "flood_warning"]

# The column the queue is sorted by (see the module docstring for why).
SCORE = "mean_entropy_foreground"
COLUMNS = ("rank", "name", "score", "changed_fraction", "pixels_added", "pixels_removed",
           "objects_added", "objects_removed", "mean_entropy_changed",
           "mean_entropy_foreground", "expected_dice", "foreground_fraction",
           "lq_foreground_fraction", "foreground_ratio", "flooded")
TOP_N = 20
FLOOD_FRACTION, FLOOD_RATIO = 0.5, 2.0
TRUTH_FLOOD_BELOW = 0.3
TRUTH_COLUMNS = ("dice_vs_truth", "truth_foreground_fraction", "flooded_vs_truth")
_EPS = 1e-7
_PNG = re.compile(r"^\d{3,}_.*\.png$")   # the overlays this module writes


def binary_entropy(p) -> np.ndarray:
  """Entropy in bits of Bernoulli(p), elementwise: 0 at p = 0 or 1, 1 at 0.5.

  Args: p: float array in [0, 1]. Returns: float64 array of its shape.
  """
  p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
  return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _unmatched(a: np.ndarray, b: np.ndarray) -> int:
  """Connected components (4-connectivity) of mask `a` that touch no pixel of `b`."""
  lab, n = ndi.label(a)
  if n == 0:
    return 0
  hit = np.bincount(lab[b & a].ravel(), minlength=n + 1)[1:]
  return int(np.count_nonzero(hit == 0))


def first_names(names: Sequence[str], n: int) -> str:
  """The first `n` names, comma-separated, with ", ..." when there are more:
  a log line stays one line on a folder of hundreds of files."""
  return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def flood_warning(ranked: Sequence[dict]) -> str | None:
  """The log line naming the flooded rows of a review queue, or None."""
  flooded = [r["name"] for r in ranked if r["flooded"]]
  if not flooded:
    return None
  return (f"WARNING: {len(flooded)} upgraded labels flooded (foreground far above the LQ "
          f"label's and every HQ image's; column flooded of review.csv): "
          f"{first_names(flooded, 5)}")


def truth_floods(upgraded, truth) -> bool:
  """Whether an upgraded label flooded by its truth: foreground (> 0) over
  more than FLOOD_FRACTION of the image where the truth's covers less than
  TRUTH_FLOOD_BELOW (a background turned foreground).

  Args: upgraded, truth: (H, W) labels or masks of one shape (> 0 is foreground).
  """
  up, t = np.asarray(upgraded) > 0, np.asarray(truth) > 0
  if up.shape != t.shape:
    raise ValueError(f"shapes differ: upgraded {up.shape}, truth {t.shape}")
  if not up.size:
    return False
  return bool(up.mean() > FLOOD_FRACTION and t.mean() < TRUTH_FLOOD_BELOW)


def max_foreground_fraction(ds: Dataset) -> float:
  """The largest foreground fraction (target > 0 over its valid extent) of
  a Dataset's samples: the HQ set's reference for `flooded`."""
  fractions = [float((t[:h, :w] > 0).mean()) for t, (h, w) in zip(ds.targets, ds.extents)
               if h * w]
  return max(fractions, default=0.0)


def image_review(lq, upgraded, probs, name: str, truth=None,
                 hq_foreground_fraction: float | None = None) -> dict:
  """The review numbers of one upgraded image, on its valid extent only.

  Args:
    lq: (H, W) LQ label (int ids or 0/1; > 0 is foreground).
    upgraded: (H, W) bool upgraded mask (probs > 0.5).
    probs: (H, W) float32 foreground probabilities of u_θ.
    name: the image's name.
    truth: optional (H, W) ground truth (simulated data): adds TRUTH_COLUMNS
      (`dice_vs_truth`, `truth_foreground_fraction`, `flooded_vs_truth` 0/1
      by `truth_floods`).
    hq_foreground_fraction: the largest foreground fraction of the HQ
      training images (Upgrader.hq_foreground_fraction), or None (unknown:
      the LQ label alone is the reference).

  Returns:
    {name, changed_fraction, pixels_added, pixels_removed, objects_added (upgraded
    components touching no LQ pixel), objects_removed (LQ components touching no
    upgraded pixel), mean_entropy_changed, mean_entropy_foreground,
    expected_dice (the soft Dice of the probabilities against their own
    threshold: what Dice u_θ expects of itself), foreground_fraction,
    lq_foreground_fraction, foreground_ratio (the first over the larger of
    the second and hq_foreground_fraction), flooded (0/1, see the module
    docstring), score (= the SCORE column)}.
  """
  lq = np.asarray(lq) > 0
  up = np.asarray(upgraded, bool)
  probs = np.asarray(probs, np.float64)
  if not lq.shape == up.shape == probs.shape:
    raise ValueError(f"{name}: shapes differ: LQ {lq.shape}, upgraded {up.shape}, "
                     f"probabilities {probs.shape}")
  ent = binary_entropy(probs)
  added, removed = up & ~lq, lq & ~up
  changed = added | removed
  fg = lq | up
  soft = 2 * float(np.sum(probs * up)) / max(float(np.sum(probs) + np.sum(up)), _EPS)
  row = {"name": str(name),
         "changed_fraction": float(changed.mean()) if changed.size else 0.0,
         "pixels_added": int(added.sum()), "pixels_removed": int(removed.sum()),
         "objects_added": _unmatched(up, lq), "objects_removed": _unmatched(lq, up),
         "mean_entropy_changed": float(ent[changed].mean()) if changed.any() else 0.0,
         "mean_entropy_foreground": float(ent[fg].mean()) if fg.any() else 0.0,
         "expected_dice": soft if up.any() or probs.sum() > _EPS else 1.0}
  fg_up = float(up.mean()) if up.size else 0.0
  fg_lq = float(lq.mean()) if lq.size else 0.0
  reference = max(fg_lq, hq_foreground_fraction or 0.0)
  ratio = fg_up / reference if reference > 0 else (float("inf") if fg_up > 0 else 1.0)
  row.update(foreground_fraction=fg_up, lq_foreground_fraction=fg_lq,
             foreground_ratio=min(ratio, 1e6),
             flooded=int(fg_up > FLOOD_FRACTION and ratio > FLOOD_RATIO))
  row["score"] = row[SCORE]
  if truth is not None:
    t = np.asarray(truth) > 0
    denom = int(t.sum() + up.sum())
    row["dice_vs_truth"] = 2 * int((t & up).sum()) / denom if denom else 1.0
    row["truth_foreground_fraction"] = float(t.mean()) if t.size else 0.0
    row["flooded_vs_truth"] = int(truth_floods(up, t))
  return row


def rank_rows(rows: Sequence[dict]) -> list[dict]:
  """Rows sorted by score, highest (most doubtful) first, ties by name;
  each gets its 1-based `rank`."""
  ordered = sorted(rows, key=lambda r: (-r["score"], r["name"]))
  return [{"rank": i + 1, **r} for i, r in enumerate(ordered)]


def review_csv(ranked: Sequence[dict]) -> str:
  """CSV text of ranked rows: COLUMNS (plus TRUTH_COLUMNS when known)."""
  cols = list(COLUMNS) + [c for c in TRUTH_COLUMNS if ranked and c in ranked[0]]
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(cols)
  for r in ranked:
    w.writerow([f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in cols])
  return buf.getvalue()


def _overlay_png(image, lq, upgraded, title: str) -> bytes:
  """PNG bytes: the image with the LQ contour (red), the upgraded contour
  (cyan), added pixels (green) and removed pixels (magenta)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  img = np.asarray(image, np.float32)
  img = img.mean(-1) if img.ndim == 3 else img
  lq, up = np.asarray(lq) > 0, np.asarray(upgraded, bool)
  lo, hi = np.percentile(img, [1, 99.8])
  tint = np.zeros(img.shape + (4,), np.float32)
  tint[up & ~lq] = (0.1, 0.9, 0.1, 0.45)    # added by the upgrade
  tint[lq & ~up] = (0.95, 0.1, 0.9, 0.45)   # removed by the upgrade
  h, w = img.shape
  scale = 6.0 / max(h, w)
  fig, ax = plt.subplots(figsize=(max(2.5, w * scale), max(2.5, h * scale) + 0.4))
  ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
  ax.imshow(tint)
  for m, color in ((lq, "red"), (up, "cyan")):
    if m.any() and not m.all():
      ax.contour(m.astype(float), levels=[0.5], colors=color, linewidths=0.8)
  ax.set_title(title, fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel("red: LQ  cyan: upgraded  green: added  magenta: removed", fontsize=7)
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def write_review(directory, rows: Sequence[dict],
                 sample: Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                 top_n: int = TOP_N, guard: rundir.InputGuard | None = None) -> list[dict]:
  """Writes directory/review.csv (ranked rows) and directory/review/ (one
  overlay PNG per image of the top `top_n`, named <rank>_<name>.png).

  Args:
    rows: `image_review` dicts, any order.
    sample: name -> (image (H, W[, C]), LQ (H, W), upgraded (H, W)) on the
      valid extent, called for the top `top_n` only (so a caller may reload
      them from disk instead of holding every image).
    guard: the run's inputs; writing over one raises InputError.

  Returns:
    The ranked rows.
  """
  directory = Path(directory)
  ranked = rank_rows(rows)
  files.write_text(directory / "review.csv", review_csv(ranked), guard=guard)
  if not rundir.is_primary_process():  # several JAX processes: process 0 writes
    return ranked
  folder = directory / "review"
  if guard is not None:
    guard.check_output(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for p in folder.iterdir():   # an earlier run's overlays (its ranking may differ)
    if p.is_file() and _PNG.match(p.name):
      p.unlink()
  for r in ranked[:top_n]:
    image, lq, up = sample(r["name"])
    title = (f"#{r['rank']} {r['name']}: score {r['score']:.3f}, "
             f"{r['changed_fraction']:.1%} changed, +{r['objects_added']}/"
             f"-{r['objects_removed']} objects"
             + (f", FLOODED ({r['foreground_fraction']:.0%} foreground)" if r.get("flooded")
                else ""))
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", r["name"])
    files.write_bytes(folder / f"{r['rank']:03d}_{safe}.png", _overlay_png(image, lq, up, title),
                   guard=guard)
  return ranked


def dataset_rows(lq: Dataset, masks: np.ndarray, probs: np.ndarray,
                 truth: np.ndarray | None = None,
                 hq_foreground_fraction: float | None = None) -> list[dict]:
  """`image_review` of every sample of a Dataset, cropped to its extent.

  Args:
    lq: Dataset whose targets are the LQ labels (> 0 is foreground).
    masks: (N, H, W) bool upgraded masks; probs: (N, H, W) float32.
    truth: optional (N, H, W) ground truth ids (simulated data).
  """
  rows = []
  for i, (name, (h, w)) in enumerate(zip(lq.names, lq.extents)):
    t = None if truth is None else truth[i, :h, :w]
    rows.append(image_review(lq.targets[i, :h, :w], masks[i, :h, :w], probs[i, :h, :w],
                             name, truth=t, hq_foreground_fraction=hq_foreground_fraction))
  return rows


def write_dataset_review(directory, lq: Dataset, masks: np.ndarray, probs: np.ndarray, *,
                         truth: np.ndarray | None = None, top_n: int = TOP_N,
                         guard: rundir.InputGuard | None = None,
                         hq_foreground_fraction: float | None = None) -> list[dict]:
  """`write_review` of a Dataset held in memory (see `dataset_rows`)."""
  index = {n: i for i, n in enumerate(lq.names)}

  def sample(name):
    i = index[name]
    h, w = lq.extents[i]
    return lq.normalised([i])[0, :h, :w], lq.targets[i, :h, :w], masks[i, :h, :w]

  return write_review(directory, dataset_rows(lq, masks, probs, truth, hq_foreground_fraction),
                      sample, top_n=top_n, guard=guard)
