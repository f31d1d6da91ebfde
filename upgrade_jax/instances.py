"""Instance labels from an upgraded mask, and instance matching metrics.

What a lab feeds to StarDist, Cellpose or napari are instance labels, in
which touching cells are separate objects. The upgrade network predicts a
foreground probability; this module turns it into instances and scores
instances against a ground truth.

  instances_from_upgrade   (probability, LQ labels) -> (H, W) instance map:
                           the LQ label's own instances seed a watershed on
                           the distance map of the upgraded foreground; cells
                           the LQ label omitted are split off at distance
                           peaks no LQ instance covers; a 0/1 LQ mask gives
                           the components; specks are dropped
  instances_from_interiors (mask, interior probability) -> instances: the
                           cell interiors an upgrader with boundaries
                           predicts seed a watershed of its foreground
  components               today's connected components of a mask
  matching / matching_dataset
                           one-to-one matching at IoU thresholds, with the
                           semantics of StarDist's stardist.matching (tp, fp,
                           fn, precision, recall, accuracy = TP/(TP+FP+FN),
                           f1, summed over a dataset)

All functions run on the host (numpy, scipy, scikit-image).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from scipy.optimize import linear_sum_assignment

__all__ = ["OUTPUTS", "MIN_INSTANCE_PX", "components", "drop_small", "instances_from_upgrade",
           "instances_from_interiors",
           "has_instances",
           "relabel", "iou_matrix", "matching", "matching_dataset", "THRESHOLDS",
           "DSB_THRESHOLDS",
           "summary_scores", "InstanceTally", "labels_from_mask"]

# What the upgraded files hold: "instances" (touching cells separated) or
# "mask" (connected components of the upgraded mask: the plain mask a user
# asks for with --output=mask).
OUTPUTS = ("instances", "mask")
THRESHOLDS = (0.5, 0.75)
# The Data Science Bowl 2018 score: TP/(TP+FP+FN) averaged over IoU 0.5:0.05:0.95.
DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
# Instances below this many px are dropped from every upgraded label: the
# upgraded foreground holds single-pixel specks (median 1 px) that would each
# count as a false instance. Measured 2026-12-07 (BUILD_NOTES, "Instances"):
# dropping those below 10 px raised the upgraded labels' F1@0.5 from 0.864
# to 0.891 on 40 DSB2018 images and from 0.731 to 0.767 (components) on the
# quickstart's test slices; 20 px was better on DSB2018 (0.899), worse there
# (0.745), where 5% of the true cells (slice ends) are under 9 px.
MIN_INSTANCE_PX = 10


def relabel(labels) -> np.ndarray:
  """(H, W) int ids -> int32 ids 1..n in sorted order of the ids (0 stays 0)."""
  labels = np.asarray(labels)
  ids = np.unique(labels)
  ids = ids[ids > 0]
  lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
  lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
  return lut[labels]


def components(mask) -> np.ndarray:
  """(H, W) int32 4-connected components of a bool mask (ids 1..n)."""
  lab, _ = ndi.label(np.asarray(mask, bool))
  return lab.astype(np.int32)


def labels_from_mask(mask, lq_labels=None, output: str = "instances",
                     interior=None) -> np.ndarray:
  """(H, W) int32 labels to write for an upgraded (H, W) bool mask.

  output "instances": touching cells separate: split on the (H, W)
  `interior` probability of an upgrader with boundaries
  (instances_from_interiors), else seeded by the (H, W) LQ labels where they
  hold instances (instances_from_upgrade); "mask": the connected components
  of the mask.
  """
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if output == "mask":
    return components(mask)
  if interior is not None:
    return instances_from_interiors(mask, interior)
  return instances_from_upgrade(mask, lq_labels)


def instances_from_interiors(mask, interior, *, threshold: float = 0.5,
                             min_seed: int = 4,
                             min_unseeded: int = MIN_INSTANCE_PX) -> np.ndarray:
  """Instances of an upgraded mask split on predicted cell interiors.

  An upgrader with boundaries (engine.Upgrade(boundaries=True)) predicts
  where each cell's interior lies; touching cells have separate interiors,
  divided by their shared boundary. Seeds are the 4-connected components of
  interior > threshold inside the mask (at least `min_seed` px: a speck is
  no cell); a watershed of -interior grows them over the mask, and mask no
  seed reaches becomes its own instances (components) when it holds at
  least `min_unseeded` px; smaller pieces are dropped. Why: the foreground
  the interiors do not reach is mostly single-pixel specks (69 pieces of
  median 1 px on the quickstart's test slices; dropping those below 10 px
  raised the upgraded labels' F1@0.5 from 0.59 to 0.72), while a cell whose
  interior the network missed is larger.

  Args:
    mask: (H, W) bool upgraded foreground.
    interior: (H, W) float interior probability.

  Returns:
    (H, W) int32 instance ids 1..n (0 = background), deterministic.
  """
  from skimage.segmentation import watershed

  mask = np.asarray(mask, bool)
  interior = np.asarray(interior, np.float32)
  if interior.shape != mask.shape:
    raise ValueError(f"instances_from_interiors: interior {interior.shape} != mask {mask.shape}")
  if not mask.any():
    return np.zeros(mask.shape, np.int32)
  seeds = drop_small(components((interior > threshold) & mask), min_seed)
  labels = watershed(-interior, seeds, mask=mask).astype(np.int32)
  rest = mask & (labels == 0)
  if rest.any():
    pieces = drop_small(components(rest), min_unseeded)
    labels[pieces > 0] = pieces[pieces > 0] + labels.max()
  return relabel(labels)


def has_instances(labels) -> bool:
  """True when `labels` carries instance ids (some id > 1), False for a
  binary mask (0/1), whose only "instance" is the union of every cell."""
  return int(np.asarray(labels).max(initial=0)) > 1


def _instance_cores(lq: np.ndarray, mask: np.ndarray, erode: int) -> np.ndarray:
  """Each LQ instance's pixels farther than `erode` from its own border,
  inside `mask` (an LQ instance drawn too large, the bias, must not claim
  its neighbour); an instance whose core is empty keeps its part in `mask`."""
  # Borders between touching instances count as borders: distance to the
  # nearest pixel of another id (background included).
  edge = np.zeros_like(mask)
  edge[:-1] |= lq[:-1] != lq[1:]
  edge[1:] |= lq[:-1] != lq[1:]
  edge[:, :-1] |= lq[:, :-1] != lq[:, 1:]
  edge[:, 1:] |= lq[:, :-1] != lq[:, 1:]
  inner = (lq > 0) & ~edge
  depth = ndi.distance_transform_edt(inner)
  cores = np.where((depth >= erode) & mask, lq, 0)
  present = np.zeros(int(lq.max(initial=0)) + 1, bool)
  present[cores.ravel()] = True
  lost = ~present[lq] & (lq > 0) & mask
  cores[lost] = lq[lost]
  return cores


def drop_small(labels, min_size: int) -> np.ndarray:
  """(H, W) int32 `labels` without the instances below `min_size` px,
  relabelled 1..n."""
  labels = np.asarray(labels, np.int32)
  if min_size > 1 and labels.any():
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    labels = np.where(small[labels], 0, labels)
  return relabel(labels)


def instances_from_upgrade(prob, lq_labels=None, *, threshold: float = 0.5,
                           seed_erosion: int = 2, peak_fraction: float = 0.7,
                           min_size: int = MIN_INSTANCE_PX) -> np.ndarray:
  """Instance labels from an upgraded foreground and the LQ label.

  With LQ instances (an annotator's cells, not a 0/1 mask):
    1. foreground = prob > threshold; d = its Euclidean distance map.
    2. Seeds from the LQ label's own instances: each instance's core
       (eroded by `seed_erosion` px, so a dilated LQ cell does not reach
       into its neighbour), inside the foreground. An annotator's instances
       are the best evidence of where one cell ends and the next begins.
    3. Seeds for cells the LQ label omitted: local maxima of d (cell
       centres) at least peak_fraction·r apart and at least
       peak_fraction·r deep, r = median radius of the LQ instances, that no
       LQ instance covers.
    4. Watershed of -d from all seeds inside the foreground: touching
       cells split where the foreground narrows between them.
    5. Foreground no seed reached becomes its own instances (components).
  Without LQ instances (a 0/1 mask, or None): the connected components of
  the foreground. Splitting them at distance peaks, with r taken from the
  foreground's own components, over-split the cells: F1@0.5 0.503 against
  0.731 for the components on the quickstart's test slices (2026-12-07).
  Either way, instances below `min_size` px are dropped (MIN_INSTANCE_PX).

  Args:
    prob: (H, W) float foreground probability (or a bool mask).
    lq_labels: (H, W) int LQ instance labels, or a 0/1 mask, or None.
    threshold: foreground threshold on prob.
    seed_erosion: px removed from each LQ instance's border for its seed.
    peak_fraction: min peak distance and depth, as a fraction of r.
    min_size: instances below this many px are dropped (0 keeps all).

  Returns:
    (H, W) int32 instance ids 1..n (0 = background), deterministic.
  """
  from skimage.feature import peak_local_max
  from skimage.segmentation import watershed

  prob = np.asarray(prob)
  mask = prob > threshold if prob.dtype != bool else prob
  if not mask.any():
    return np.zeros(mask.shape, np.int32)
  if lq_labels is not None and np.asarray(lq_labels).shape != mask.shape:
    raise ValueError(f"instances_from_upgrade: LQ labels {np.asarray(lq_labels).shape} != "
                     f"prob {mask.shape}")
  if lq_labels is None or not has_instances(lq_labels):
    return drop_small(components(mask), min_size)
  lq = relabel(lq_labels)
  dist = ndi.distance_transform_edt(mask)
  markers = _instance_cores(lq, mask, seed_erosion)
  sizes = np.bincount(lq.ravel())[1:]
  sizes = sizes[sizes > 0]
  radius = float(np.sqrt(np.median(sizes) / np.pi)) if sizes.size else 1.0
  peaks = peak_local_max(dist, min_distance=max(1, int(round(peak_fraction * radius))),
                         threshold_abs=max(1.0, peak_fraction * radius),
                         labels=components(mask), exclude_border=False)
  n = int(markers.max(initial=0))
  if len(peaks):
    peaks = peaks[lq[peaks[:, 0], peaks[:, 1]] == 0]
    markers[peaks[:, 0], peaks[:, 1]] = n + 1 + np.arange(len(peaks), dtype=np.int32)
  labels = watershed(-dist, markers, mask=mask).astype(np.int32)
  rest = mask & (labels == 0)
  if rest.any():
    extra = components(rest)
    labels[rest] = extra[rest] + labels.max()
  return drop_small(labels, min_size)


# --------------------------------------------------------------------------
# Matching (StarDist semantics).

def iou_matrix(y_true, y_pred) -> np.ndarray:
  """(n_true, n_pred) IoU of every pair of instances (ids relabelled 1..n,
  row/column i-1 is id i).

  Args: y_true, y_pred: (H, W) int instance maps of one shape.
  """
  t, p = relabel(y_true), relabel(y_pred)
  if t.shape != p.shape:
    raise ValueError(f"matching: shapes differ {t.shape} vs {p.shape}")
  nt, np_ = int(t.max(initial=0)), int(p.max(initial=0))
  overlap = np.bincount(t.ravel().astype(np.int64) * (np_ + 1) + p.ravel(),
                        minlength=(nt + 1) * (np_ + 1)).reshape(nt + 1, np_ + 1)
  area_t = overlap.sum(1, keepdims=True)
  area_p = overlap.sum(0, keepdims=True)
  union = area_t + area_p - overlap
  iou = np.divide(overlap, union, out=np.zeros(overlap.shape), where=union > 0)
  return iou[1:, 1:]


def _safe_divide(a, b) -> float:
  return float(a) / float(b) if b else 0.0


def _counts_at(iou: np.ndarray, thr: float) -> tuple[int, float]:
  """(tp, sum of matched IoU) of the optimal one-to-one matching at thr.

  The cost -(iou >= thr) - iou / (2·n_matched) first maximises the number
  of pairs above thr and, among those, their summed IoU (the second term is
  below 1/2 in total, so it never trades a match away)."""
  n_true, n_pred = iou.shape
  n_matched = min(n_true, n_pred)
  if n_matched == 0:
    return 0, 0.0
  costs = -(iou >= thr).astype(float) - iou / (2 * n_matched)
  rows, cols = linear_sum_assignment(costs)
  scores = iou[rows, cols]
  ok = scores >= thr
  return int(np.count_nonzero(ok)), float(scores[ok].sum())


def _stats(tp, fp, fn, n_true, n_pred, sum_matched, thr) -> dict:
  return {"thresh": thr, "tp": tp, "fp": fp, "fn": fn, "n_true": n_true, "n_pred": n_pred,
          "precision": _safe_divide(tp, tp + fp), "recall": _safe_divide(tp, tp + fn),
          "accuracy": _safe_divide(tp, tp + fp + fn), "f1": _safe_divide(2 * tp, 2 * tp + fp + fn),
          "mean_true_score": _safe_divide(sum_matched, n_true),
          "mean_matched_score": _safe_divide(sum_matched, tp),
          "panoptic_quality": _safe_divide(sum_matched, tp + fp / 2 + fn / 2)}


def matching(y_true, y_pred, thresholds=THRESHOLDS) -> list[dict]:
  """Per-threshold matching of one image (stardist.matching.matching).

  Returns one dict per threshold: thresh, tp, fp, fn, n_true, n_pred,
  precision, recall, accuracy, f1, mean_true_score, mean_matched_score,
  panoptic_quality.
  """
  return matching_dataset([y_true], [y_pred], thresholds)


def matching_dataset(ys_true, ys_pred, thresholds=THRESHOLDS) -> list[dict]:
  """Matching summed over a dataset (stardist.matching.matching_dataset with
  by_image=False): tp, fp, fn and the matched IoU are summed over every
  image, then the ratios are taken (0 when a denominator is 0).

  Args:
    ys_true, ys_pred: sequences of (H_i, W_i) int instance maps, pairwise of
      one shape.
    thresholds: IoU thresholds.
  """
  ys_true, ys_pred = list(ys_true), list(ys_pred)
  if len(ys_true) != len(ys_pred):
    raise ValueError(f"matching_dataset: {len(ys_true)} true vs {len(ys_pred)} predicted maps")
  thresholds = tuple(float(t) for t in np.atleast_1d(thresholds))
  acc = np.zeros((len(thresholds), 3))   # tp, sum matched, (unused)
  n_true = n_pred = 0
  for t, p in zip(ys_true, ys_pred):
    iou = iou_matrix(t, p)
    n_true += iou.shape[0]
    n_pred += iou.shape[1]
    for k, thr in enumerate(thresholds):
      tp, s = _counts_at(iou, thr)
      acc[k, 0] += tp
      acc[k, 1] += s
  out = []
  for k, thr in enumerate(thresholds):
    tp = int(acc[k, 0])
    out.append(_stats(tp, n_pred - tp, n_true - tp, n_true, n_pred, acc[k, 1], thr))
  return out


def summary_scores(ys_true, ys_pred, thresholds=THRESHOLDS) -> dict:
  """The instance scores of results.json and the tables, flat:
  "precision@t", "recall@t", "f1@t", "accuracy@t" (TP/(TP+FP+FN)) and
  "panoptic_quality@t" at every t of `thresholds`, and "dsb_score", the
  mean accuracy over DSB_THRESHOLDS (the DSB2018 metric), all pooled over
  the images as stardist.matching.matching_dataset (by_image=False)."""
  tally = InstanceTally(thresholds)
  for t, p in zip(ys_true, ys_pred, strict=True):
    tally.add(t, p)
  return tally.summary()


class InstanceTally:
  """`summary_scores` one image at a time: add(truth, prediction) for each,
  then summary(). Holds counts only, so a folder of any size is scored with
  one image in memory."""

  def __init__(self, thresholds=THRESHOLDS):
    self.thresholds = tuple(float(t) for t in thresholds)
    self._every = tuple(sorted(set(self.thresholds) | set(DSB_THRESHOLDS)))
    self._acc = np.zeros((len(self._every), 2))   # tp, summed matched IoU
    self._n_true = self._n_pred = 0
    self.images = 0

  def add(self, y_true, y_pred) -> None:
    iou = iou_matrix(y_true, y_pred)
    self._n_true += iou.shape[0]
    self._n_pred += iou.shape[1]
    self.images += 1
    for k, thr in enumerate(self._every):
      tp, s = _counts_at(iou, thr)
      self._acc[k, 0] += tp
      self._acc[k, 1] += s

  def summary(self) -> dict:
    stats = {}
    for k, thr in enumerate(self._every):
      tp = int(self._acc[k, 0])
      stats[round(thr, 2)] = _stats(tp, self._n_pred - tp, self._n_true - tp, self._n_true,
                                    self._n_pred, self._acc[k, 1], thr)
    out = {}
    for t in self.thresholds:
      s = stats[round(t, 2)]
      for key in ("precision", "recall", "f1", "accuracy", "panoptic_quality"):
        out[f"{key}@{t:g}"] = s[key]
    out["dsb_score"] = float(np.mean([stats[t]["accuracy"] for t in DSB_THRESHOLDS]))
    return out
