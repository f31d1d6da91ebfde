"""The competing methods of the paper's Table 3.3 as engine tasks.

  ConfidentLearning   image -> corrected label: Dice on soft targets where
                      Confident Learning corrected the given label
  PartialLabelling    image -> label, from labelled foreground, sampled
                      background, pseudo-labels and a separation term

Both read codes that the pipeline writes into a Dataset's int32 targets
(instance ids are >= 0, codes are negative): baselines.confident's
TO_BACKGROUND / TO_FOREGROUND, and UNLABELLED (-1) for Partial Labelling.
A target without codes (the HQ validation slices) is an ordinary label, so
validation and early stopping are those of every other network.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from upgrade_jax.baselines import confident, partial
from upgrade_jax.engine.tasks import Task, register

__all__ = ["ConfidentLearning", "PartialLabelling"]


@register
@dataclasses.dataclass(frozen=True)
class ConfidentLearning(Task):
  """image -> soft target (B, h, w) f32: 1 on labelled foreground, 0 on
  background, `confidence` on background corrected to foreground and
  1 - confidence on foreground corrected to background (the authors' 0.8 /
  0.2). The loss is the engine's soft Dice, which takes soft targets.

  Attributes:
    confidence: the soft target of a corrected pixel, towards its new class.
    folds: K of the cross-fitting that makes the out-of-sample probabilities
      (pipeline/methods.py trains K teachers, each predicting the fold it
      did not see). Not read by the step.
  """

  name: ClassVar[str] = "confident_learning"

  confidence: float = 0.8
  folds: int = 2

  def __post_init__(self):
    if not 0.5 <= self.confidence <= 1.0:
      raise ValueError(f"ConfidentLearning.confidence must lie in [0.5, 1], got {self.confidence}")
    if self.folds < 2:
      raise ValueError(f"ConfidentLearning.folds must be >= 2, got {self.folds}")

  def pair(self, key, images, targets, others, *, max_label: int, valid, train: bool):
    del key, others, max_label, valid, train
    c = jnp.float32(self.confidence)
    soft = jnp.where(targets > 0, 1.0, 0.0).astype(jnp.float32)
    soft = jnp.where(targets == confident.TO_FOREGROUND, c, soft)
    soft = jnp.where(targets == confident.TO_BACKGROUND, 1.0 - c, soft)
    return images, soft


@register
@dataclasses.dataclass(frozen=True)
class PartialLabelling(Task):
  """image -> label from partial labels; target codes (B, h, w) int32 in
  {1 labelled foreground, 0 labelled background, -1 unlabelled}.

  loss = supervised + w_p(step)·pseudo + w_f(step)·separation, the weights
  ramped linearly from 0 at `ramp_start` to their maximum at `ramp_end`
  (train steps), so the pseudo-labels start from features the supervised
  term has already shaped (the authors: after 50 images, full at 100).

  Attributes:
    gamma: cosine-similarity threshold of a pseudo-label.
    pseudo_weight: maximum weight of the pseudo-label term.
    separation_weight: maximum weight of the Fisher-style term.
    ramp_start, ramp_end: the ramp, in train steps.
  """

  name: ClassVar[str] = "partial_labelling"
  uses_features: ClassVar[bool] = True

  gamma: float = 0.9
  pseudo_weight: float = 0.1
  separation_weight: float = 0.15
  ramp_start: int = 50
  ramp_end: int = 100

  def __post_init__(self):
    if not 0.0 < self.gamma < 1.0:
      raise ValueError(f"PartialLabelling.gamma must lie in (0, 1), got {self.gamma}")
    if min(self.pseudo_weight, self.separation_weight) < 0:
      raise ValueError("PartialLabelling weights must be >= 0")
    if not 0 <= self.ramp_start <= self.ramp_end:
      raise ValueError(f"PartialLabelling ramp needs 0 <= ramp_start <= ramp_end, got "
                       f"{self.ramp_start}, {self.ramp_end}")

  def pair(self, key, images, targets, others, *, max_label: int, valid, train: bool):
    del key, others, max_label, valid, train
    codes = jnp.where(targets > 0, partial.LABELLED_FG,
                      jnp.where(targets < 0, partial.UNLABELLED, partial.LABELLED_BG))
    return images, codes.astype(jnp.int32)

  def loss(self, logits, target, valid):
    raise TypeError("PartialLabelling's loss needs the decoder features: see feature_loss")

  def feature_loss(self, logits, features, target, valid, *, step, key):
    terms = partial.partial_losses(key, logits, features, target, valid, gamma=self.gamma)
    w = partial.ramp(step, self.ramp_start, self.ramp_end)
    return (terms["supervised"] + w * self.pseudo_weight * terms["pseudo"]
            + w * self.separation_weight * terms["separation"])
