"""Dice counts, pooled Dice and the statistics reported in the paper.

The paper reports Dice pooled over the whole test set,
    Dice = 2·ΣTP / (2·ΣTP + ΣFP + ΣFN),
with the sums over every pixel of every test image, not a mean of per-image
Dice. `dice_counts` is pure jnp (usable inside jit); the rest runs on the host.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.stats

# A probability above this is foreground: every mask made from a network's
# probability map (training Dice, prediction, upgraded labels, apply) uses it.
FOREGROUND_THRESHOLD = 0.5


def extent_mask(extents, h: int, w: int, xp=np):
  """(N, h, w) bool: True inside each sample's valid (height, width).

  Args:
    extents: (N, 2) int (height, width) of each sample's real pixels; the
      rest of the padded (h, w) frame is padding.
    xp: numpy or jax.numpy (the same code on the host and under jit).
  """
  rows = xp.arange(h)[None, :, None] < extents[:, 0, None, None]
  cols = xp.arange(w)[None, None, :] < extents[:, 1, None, None]
  return rows & cols


def dice_counts(pred, target, valid=None):
  """Pixel counts (TP, FP, FN) of a binary prediction against a binary target.

  Args:
    pred: (..., H, W) bool or {0,1} predicted foreground.
    target: (..., H, W) bool or {0,1} (or instance ids; >0 is foreground).
    valid: optional (..., H, W) bool; pixels where it is False are ignored.

  Returns:
    (3,) int32 array [TP, FP, FN] summed over all axes.
  """
  p = jnp.asarray(pred) > 0
  t = jnp.asarray(target) > 0
  if valid is not None:
    v = jnp.asarray(valid)
    p, t = p & v, t & v
  tp = jnp.sum(p & t, dtype=jnp.int32)
  fp = jnp.sum(p & ~t, dtype=jnp.int32)
  fn = jnp.sum(~p & t, dtype=jnp.int32)
  return jnp.stack([tp, fp, fn])


def pooled_dice(counts) -> float:
  """Pooled Dice 2·TP / (2·TP + FP + FN) from summed counts.

  Args:
    counts: (3,) or (N, 3) [TP, FP, FN]; rows are summed first.

  Returns:
    The pooled Dice as a Python float; 1.0 when there is no foreground at all
    (nothing to find and nothing found).
  """
  c = np.asarray(counts, dtype=np.int64).reshape(-1, 3).sum(axis=0)
  tp, fp, fn = (int(x) for x in c)
  denom = 2 * tp + fp + fn
  return 1.0 if denom == 0 else 2.0 * tp / denom


def pooled_dice_np(pred, target, valid=None) -> float:
  """Host convenience: pooled Dice of numpy stacks (N, H, W) or (H, W)."""
  p = np.asarray(pred) > 0
  t = np.asarray(target) > 0
  if valid is not None:
    p, t = p & valid, t & valid
  return pooled_dice(dice_counts_np(p, t))


def dice_counts_np(pred, target) -> list[int]:
  """Host twin of `dice_counts` for bool numpy arrays: [TP, FP, FN]."""
  return [int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred & ~target)),
          int(np.count_nonzero(~pred & target))]


def summarize(values) -> dict:
  """{"mean", "std", "per_rep"} of per-repetition values.

  std is the sample standard deviation (ddof=1): repetitions are a sample of
  seeds, and ddof=0 understates the spread at 3-5 reps by 13-18%. None for
  fewer than 2 values (no spread is measured; not 0).
  """
  v = [float(x) for x in values]
  arr = np.asarray(v, dtype=np.float64)
  return {"mean": float(arr.mean()) if v else float("nan"),
          "std": float(arr.std(ddof=1)) if len(v) >= 2 else None,
          "per_rep": v}


def min_wilcoxon_p(n: int) -> float:
  """Smallest two-sided exact Wilcoxon signed-rank p with n pairs: 2 / 2**n
  (all differences of one sign). 0.25 at n = 3, 0.0625 at n = 5: below
  n = 6 no result can reach p < 0.05."""
  return min(1.0, 2.0 / 2.0 ** n) if n >= 1 else 1.0


def paired_difference(a, b, confidence: float = 0.95) -> dict:
  """Paired comparison of a vs b over repetitions, what a reader needs when
  a Wilcoxon test on 3-5 pairs cannot be small.

  Returns:
    {"n", "mean_diff" (mean of a - b), "ci_low", "ci_high" (Student t
    interval of the mean difference, None for n < 2), "confidence", "wins"
    (a > b), "losses", "ties", "min_possible_p" (min_wilcoxon_p(n))}.
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: samples differ in shape {a.shape} vs {b.shape}")
  d = a - b
  n = int(d.size)
  out = {"n": n, "mean_diff": float(d.mean()) if n else None, "ci_low": None,
         "ci_high": None, "confidence": confidence, "wins": int(np.sum(d > 0)),
         "losses": int(np.sum(d < 0)), "ties": int(np.sum(d == 0)),
         "min_possible_p": min_wilcoxon_p(n)}
  if n >= 2:
    half = (scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    out["ci_low"], out["ci_high"] = float(d.mean() - half), float(d.mean() + half)
  return out


# Below this (Dice), a difference between two networks is within what one
# network moves between runs on its own: the noise floor of a single pair
# (one repetition has no interval).
NOISE_FLOOR = 0.01
# The resolution a comparison must reach to carry a verdict of the size the
# paper reports (differences of 0.03-0.05 Dice).
RESOLUTION = 0.03


def oracle_check(oracle, hq, confidence: float = 0.95,
                 noise_floor: float = NOISE_FLOOR) -> dict:
  """The harness invariant: the oracle (every training slice with its true
  labels) must score at least as well as HQ only, within the noise.

  The noise is the half-width of the paired interval of oracle - HQ only
  over the repetitions, at least `noise_floor` (and `noise_floor` alone for
  one repetition). A row whose oracle is below HQ only by more than the
  noise is "unconverged": under-trained or mis-selected networks, not
  evidence, and no verdict may be drawn from it.

  Returns:
    paired_difference(oracle, hq) plus "noise" and "unconverged" (bool).
  """
  out = paired_difference(oracle, hq, confidence)
  if out["n"] == 0:
    return {**out, "noise": None, "unconverged": False}
  half = (out["ci_high"] - out["mean_diff"]) if out["ci_high"] is not None else 0.0
  noise = max(half, noise_floor)
  return {**out, "noise": noise, "unconverged": bool(out["mean_diff"] < -noise)}


def resolves(paired: dict, resolution: float = RESOLUTION) -> bool:
  """Whether a paired_difference's interval is narrow enough (half-width at
  most `resolution`) to tell differences of that size apart."""
  if paired.get("ci_high") is None:
    return False
  return (paired["ci_high"] - paired["ci_low"]) / 2 <= resolution


def gap_recovered(scenario, floor, ceiling, min_gap: float = 0.0) -> dict:
  """The fraction of the floor -> ceiling gap a scenario recovers, e.g. of
  hq -> oracle by hq_upgraded: (scenario - floor) / (ceiling - floor).

  1 = the scenario reaches the ceiling, 0 = no better than the floor,
  negative = worse than the floor. Per repetition and of the means; None
  where the ceiling exceeds the floor by no more than `min_gap` (no gap to
  recover, or one so small that the ratio would only amplify noise).

  Returns:
    {"of_means": float | None, "per_rep": [float | None, ...],
     "gap": mean ceiling - mean floor}.
  """
  s, lo, hi = (np.asarray(x, dtype=np.float64) for x in (scenario, floor, ceiling))
  if not s.shape == lo.shape == hi.shape:
    raise ValueError(f"gap_recovered: samples differ in shape {s.shape}, {lo.shape}, {hi.shape}")

  def frac(a, b, c):
    return float((a - b) / (c - b)) if c - b > min_gap else None

  return {"of_means": frac(s.mean(), lo.mean(), hi.mean()) if s.size else None,
          "per_rep": [frac(*v) for v in zip(s, lo, hi)],
          "gap": float(hi.mean() - lo.mean()) if s.size else None}


def wilcoxon(a, b) -> float | None:
  """Two-sided Wilcoxon signed-rank p-value of paired samples a vs b.

  Returns None when the test is undefined (fewer than 2 pairs, or every
  difference zero), instead of raising, so small runs still report.
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"wilcoxon: paired samples differ in shape {a.shape} vs {b.shape}")
  if a.size < 2 or np.all(a == b):
    return None
  return float(scipy.stats.wilcoxon(a, b).pvalue)
