"""When do more HQ labels stop paying? A learning curve of u_θ on the user's
own HQ set, and the a + b·ln(n) trend the paper's Figure 3.4 shows.

  nested_sizes    training-set sizes of the curve (nested subsets)
  learning_curve  trains u_θ on each nested subset, scores each network
  fit_log_trend   least squares of Dice = a + b·ln(n)
  advice          what one more HQ label adds, where the gain falls below a threshold

n counts HQ *training* pairs: the validation pairs stay the same at every
point, so the curve measures what more training labels buy, not a moving
yardstick.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["nested_sizes", "learning_curve", "fit_log_trend", "advice", "Trend"]


def nested_sizes(n_train: int, fractions=(0.25, 0.5, 1.0), minimum: int = 2) -> list[int]:
  """Distinct subset sizes round(f·n_train), at least `minimum`, ascending.

  Raises ValueError when fewer than 2 distinct sizes result (no curve)."""
  sizes = sorted({min(n_train, max(minimum, round(f * n_train))) for f in fractions})
  if len(sizes) < 2:
    raise ValueError(f"{n_train} HQ training pair(s) give the sizes {sizes}: a learning curve "
                     "needs at least 2 distinct sizes; add HQ pairs or other --fractions")
  return sizes


def learning_curve(train_config, hq_train, hq_val, sizes, workdir, *,
                   seed: int = 0, score: Callable | None = None,
                   log: Callable[[str], None] = print, context=None) -> list[dict]:
  """u_θ trained on the first n samples of one seeded permutation of
  hq_train (nested subsets), for each n in sizes.

  Args:
    train_config: engine.TrainConfig of u_θ (task engine.Upgrade).
    hq_train, hq_val: Datasets of HQ pairs; hq_val is the same at every n.
    sizes: ascending subset sizes (nested_sizes).
    workdir: checkpoints go to workdir/n=<n>/ (a rerun resumes).
    score: optional fn(FitResult) -> dict of further numbers (e.g. a test
      Dice when ground truth exists).

  Returns:
    [{"n": n, "val_dice": best validation Dice, **score(fit)}, ...].
  """
  from upgrade_jax import engine

  order = np.random.default_rng(seed).permutation(len(hq_train))
  points = []
  for n in sizes:
    log(f"advise: u_θ on {n} of {len(hq_train)} HQ training pairs")
    fit = engine.fit(dataclasses.replace(train_config, seed=seed),
                     hq_train.subset(np.sort(order[:n])), hq_val,
                     Path(workdir) / f"n={n}", log=log, context=context)
    points.append({"n": int(n), "val_dice": float(fit.best_val_dice),
                   **(score(fit) if score else {})})
  return points


@dataclasses.dataclass(frozen=True)
class Trend:
  """Dice(n) = a + b·ln(n), fitted to (n, Dice) points."""
  a: float
  b: float

  def __call__(self, n):
    return self.a + self.b * np.log(np.asarray(n, dtype=np.float64))


def fit_log_trend(ns, dices) -> Trend:
  """Least-squares a + b·ln(n) through the points (at least 2 distinct n)."""
  ns = np.asarray(ns, dtype=np.float64)
  if len(np.unique(ns)) < 2 or np.any(ns <= 0):
    raise ValueError(f"fit_log_trend: need >= 2 distinct positive n, got {ns.tolist()}")
  b, a = np.polyfit(np.log(ns), np.asarray(dices, dtype=np.float64), 1)
  return Trend(float(a), float(b))


def advice(trend: Trend, n_now: int, threshold: float = 0.002) -> dict:
  """What the trend says at n_now training pairs.

  gain_next: Dice(n_now + 1) - Dice(n_now). The gain of one more label,
  b·ln((n+1)/n), falls below `threshold` from n_stop, the smallest n with
  b·ln((n+1)/n) < threshold. A flat or falling curve (b <= 0) has no n_stop
  (None): more labels are not expected to help.

  Returns:
    {"a", "b", "n_now", "dice_now", "gain_next", "threshold", "n_stop",
     "sentence"}.
  """
  dice_now = float(trend(n_now))
  gain = float(trend(n_now + 1) - dice_now)
  if trend.b <= 0:
    n_stop = None
    sentence = (f"At {n_now} HQ training pairs the fitted trend is flat or falling "
                f"(b = {trend.b:+.4f}): more HQ labels are not expected to improve u_θ.")
  else:
    # b·ln(1 + 1/n) < t  <=>  n > 1 / (exp(t/b) - 1)
    n_stop = int(math.floor(1.0 / math.expm1(threshold / trend.b))) + 1
    when = ("already passed" if n_stop <= n_now else f"at about {n_stop} pairs")
    sentence = (f"At {n_now} HQ training pairs one more HQ label is expected to add "
                f"{gain:+.4f} Dice to u_θ; the gain per label falls below {threshold:g} "
                f"{when} (trend {trend.a:.3f} + {trend.b:.4f}·ln n).")
  return {"a": trend.a, "b": trend.b, "n_now": int(n_now), "dice_now": dice_now,
          "gain_next": gain, "threshold": threshold, "n_stop": n_stop, "sentence": sentence}
