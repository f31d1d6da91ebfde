"""The global-threshold baseline of the paper.

One intensity threshold for a whole data set: candidates are 0%, 1%, ...,
100% of the maximum intensity of the training Dataset; the one with the best
pooled Dice on the training Dataset is applied to the test Dataset. A pixel
is foreground when its intensity is >= the threshold (the paper's rule, for
fluorescence: bright cells) or, with polarity "dark", < the threshold (the
objects of electron microscopy, such as EPFL's mitochondria, are darker
than their surround); `fit_and_evaluate` picks the polarity on the training
Dataset too, bright on a tie. Multi-channel images are thresholded on their
channel mean. Padding pixels never count.

Usage:
  result = fit_and_evaluate(train, test)   # ThresholdResult
  masks = apply_threshold(test, result.threshold)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from upgrade_jax.data.types import Dataset
from upgrade_jax.metrics import pooled_dice, pooled_dice_np

__all__ = ["POLARITIES", "ThresholdResult", "threshold_candidates", "dice_per_threshold",
           "best_threshold", "apply_threshold", "fit_and_evaluate"]


@dataclasses.dataclass(frozen=True)
class ThresholdResult:
  threshold: float      # absolute intensity (in the Dataset's float32 units)
  fraction: float       # threshold / max intensity of the training Dataset
  train_dice: float     # pooled Dice on the training Dataset
  test_dice: float      # pooled Dice on the test Dataset
  polarity: str = "bright"   # "bright": foreground >= threshold; "dark": < threshold


# The paper's rule first: ties keep it.
POLARITIES = ("bright", "dark")


def _check_polarity(polarity: str) -> None:
  if polarity not in POLARITIES:
    raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")


def _intensity(dataset: Dataset) -> np.ndarray:
  """(N, H, W) float32: the channel mean of the images."""
  return dataset.normalised().mean(axis=-1, dtype=np.float32)


def threshold_candidates(max_intensity: float, steps: int = 100) -> np.ndarray:
  """(steps + 1,) float64: k / steps · max_intensity for k = 0..steps."""
  return np.arange(steps + 1, dtype=np.float64) / steps * float(max_intensity)


def dice_per_threshold(dataset: Dataset, thresholds: np.ndarray,
                       polarity: str = "bright") -> np.ndarray:
  """Pooled Dice of `intensity >= t` ("bright") or `intensity < t` ("dark")
  for each t in increasing `thresholds`.

  One pass over the pixels: each valid pixel is binned by the largest
  threshold it reaches, then TP/FP counts are suffix sums of the bins.

  Returns:
    (len(thresholds),) float64.
  """
  _check_polarity(polarity)
  thresholds = np.asarray(thresholds, np.float64)
  if np.any(np.diff(thresholds) < 0):
    raise ValueError("thresholds must be increasing")
  valid = dataset.valid_mask()
  values = _intensity(dataset)[valid].astype(np.float64)
  truth = dataset.targets[valid] > 0
  # bin k holds the pixels with thresholds[k] <= value < thresholds[k+1];
  # bin -1 (shifted to 0) those below every threshold.
  bins = np.searchsorted(thresholds, values, side="right")
  n = len(thresholds) + 1
  fg = np.bincount(bins[truth], minlength=n)
  bg = np.bincount(bins[~truth], minlength=n)
  tp = np.cumsum(fg[::-1])[::-1][1:]   # pixels reaching thresholds[k]
  fp = np.cumsum(bg[::-1])[::-1][1:]
  n_fg, n_bg = int(truth.sum()), int((~truth).sum())
  if polarity == "dark":   # the complement of `>= t`
    tp, fp = n_fg - tp, n_bg - fp
  fn = n_fg - tp
  return np.array([pooled_dice([a, b, c]) for a, b, c in zip(tp, fp, fn)])


def best_threshold(train: Dataset, steps: int = 100, polarities=POLARITIES
                   ) -> tuple[float, float, float, str]:
  """(threshold, fraction of max, train Dice, polarity) with the best pooled
  train Dice over the candidates and `polarities`.

  Ties go to the earlier polarity, then to the lowest threshold.
  """
  if len(train) == 0:
    raise ValueError("best_threshold: empty training Dataset")
  top = float(_intensity(train)[train.valid_mask()].max(initial=0.0))
  candidates = threshold_candidates(top, steps)
  best = None
  for polarity in polarities:
    dice = dice_per_threshold(train, candidates, polarity)
    k = int(np.argmax(dice))
    if best is None or dice[k] > best[2]:
      best = (float(candidates[k]), k / steps, float(dice[k]), polarity)
  if best is None:
    raise ValueError("best_threshold: no polarity given")
  return best


def apply_threshold(dataset: Dataset, threshold: float, polarity: str = "bright") -> np.ndarray:
  """(N, H, W) bool foreground masks, False on padding."""
  _check_polarity(polarity)
  above = _intensity(dataset).astype(np.float64) >= threshold
  return (above if polarity == "bright" else ~above) & dataset.valid_mask()


def fit_and_evaluate(train: Dataset, test: Dataset, steps: int = 100,
                     polarities=POLARITIES) -> ThresholdResult:
  """Chooses the threshold (and polarity) on `train` and scores it on
  `test` (pooled Dice). polarities=("bright",) is the paper's baseline
  exactly."""
  threshold, fraction, train_dice, polarity = best_threshold(train, steps, polarities)
  pred = apply_threshold(test, threshold, polarity)
  test_dice = pooled_dice_np(pred, test.targets, test.valid_mask())
  return ThresholdResult(threshold, fraction, train_dice, test_dice, polarity)
