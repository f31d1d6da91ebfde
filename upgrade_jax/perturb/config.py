"""PerturbConfig: which components P applies and how strongly; the count rules."""

from __future__ import annotations

import dataclasses

import numpy as np

# Floors and rounds of rate·n are taken in float32; a product within this
# distance of an integer counts as that integer (0.7·10 is 7, not 6).
COUNT_EPS = 1e-4

COUNT_ROUNDINGS = ("stochastic", "floor", "authors")
# The one default of the count rule (PerturbConfig and the functions use it).
DEFAULT_COUNT_ROUNDING = "stochastic"


@dataclasses.dataclass(frozen=True)
class PerturbConfig:
  """Which perturbations P applies, and how strongly.

  Attributes:
    omission_rate: fraction r of target instances dropped, in [0, 1].
    inclusion_rate: fraction r of `others` objects added, in [0, 1].
    bias_max: q_max for the dilate/erode bias; 0 switches bias off.
    per_instance_bias: bias each instance on its own (never merges cells).
    salt_pepper_prob: expected fraction of pixels flipped (salt and pepper).
    count_rounding: how omission and inclusion turn rate·n into a count of
      objects, one of COUNT_ROUNDINGS (see `components.count`); "stochastic" has
      expectation exactly rate·n.
  """

  omission_rate: float = 0.0
  inclusion_rate: float = 0.0
  bias_max: int = 0
  per_instance_bias: bool = False
  salt_pepper_prob: float = 0.0
  count_rounding: str = DEFAULT_COUNT_ROUNDING

  def __post_init__(self):
    if self.count_rounding not in COUNT_ROUNDINGS:
      raise ValueError(f"PerturbConfig.count_rounding {self.count_rounding!r} unknown; "
                       f"choose one of {list(COUNT_ROUNDINGS)}")
    for name in ("omission_rate", "inclusion_rate", "salt_pepper_prob"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"PerturbConfig.{name} must lie in [0, 1], got {v!r}")
    if (not isinstance(self.bias_max, (int, np.integer)) or isinstance(self.bias_max, bool)
        or self.bias_max < 0):
      raise ValueError(f"PerturbConfig.bias_max must be an int >= 0, got {self.bias_max!r}")

  @property
  def is_identity(self) -> bool:
    return (self.omission_rate == 0 and self.inclusion_rate == 0 and
            self.bias_max == 0 and self.salt_pepper_prob == 0)
