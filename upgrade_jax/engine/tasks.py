"""Training tasks: what a network learns, as one object each.

A task says how a batch of (images, HQ labels, other objects) becomes the
network's (inputs, target), what loss trains it, and how prediction builds
the input from images and (for the upgrade task) the labels to upgrade. Its
options live on it: a task is a frozen dataclass, hashable, so it is part of
the jit cache key of the step that runs it.

  Upgrade   u_θ(image, P(HQ label)) -> HQ label   (the paper's Algorithm 1)
  Segment   image -> HQ label                     (the comparison scenarios)

New tasks (the competing methods, with their own targets and losses)
subclass `Task` and register with `@register`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax.engine.augment import haze as add_haze
from upgrade_jax.losses import dice_loss_from_logits, foreground_probs, soft_dice_loss
from upgrade_jax.perturb import PerturbConfig, perturb

__all__ = ["Task", "Upgrade", "Segment", "TASKS", "register", "make_task", "task_from_json",
           "cell_codes"]

TASKS: dict[str, type] = {}


def register(cls):
  """Class decorator: makes a Task findable by its `name`."""
  TASKS[cls.name] = cls
  return cls


@dataclasses.dataclass(frozen=True)
class Task:
  """Base of every task. Subclasses set the class attributes and `pair`.

  Class attributes:
    name: the registry name (also stored in configs and checkpoints).
    extra_channels: input channels beyond the image's C.
    whole_samples: the pair must be made on whole samples before cropping
      (True when it depends on the instances present, as P's omission does:
      omitting floor(r·n) of the n cells of a crop omits nothing from a crop
      that holds one cell).
    uses_features: the loss reads the UNet's last decoder features too; the
      step then calls `feature_loss` instead of `loss`.
    uses_max_label: `pair` reads its static `max_label` (P's per-id tables).
      Other tasks get 0, so their train and validation programs do not
      depend on the largest id of the set (one compile serves them all).
  """

  name: ClassVar[str] = ""
  # Output classes of the network: 2 (background, foreground); a task with
  # more (Upgrade with boundaries) puts background first.
  num_classes: ClassVar[int] = 2
  extra_channels: ClassVar[int] = 0
  whole_samples: ClassVar[bool] = False
  uses_features: ClassVar[bool] = False
  uses_max_label: ClassVar[bool] = False

  def pair(self, key, images, targets, others, *, max_label: int, valid, train: bool):
    """(inputs (B,h,w,C+extra) f32, target (B,h,w)) of a batch.

    The target is bool, or what the task's own loss reads (a soft f32
    target, or int codes); the train and validation Dice read it as > 0.5.

    Args: key, a PRNG key; images (B,h,w,C) f32; targets, others (B,h,w)
    int32 instance ids; valid (B,h,w) bool; max_label, a static bound on the
    ids; train: True in the train step, False for the fixed validation set.
    """
    raise NotImplementedError

  def loss(self, logits, target, valid):
    """() f32 soft Dice of (B,h,w,2) logits against the (B,h,w) target:
    bool, or soft f32 in [0, 1] (Confident Learning's corrected pixels)."""
    return dice_loss_from_logits(logits, target, valid)

  def feature_loss(self, logits, features, target, valid, *, step, key):
    """() f32 loss of a task with `uses_features`: also the (B,h,w,F)
    decoder features, the () int32 step (for ramps) and a PRNG key."""
    raise NotImplementedError

  def prediction_inputs(self, images: np.ndarray, labels, valid) -> np.ndarray:
    """(N,H,W,C+extra) float32 network input for prediction (host side).

    Args: images (N,H,W,C) float32; labels (N,H,W) or None; valid (N,H,W)
    bool or None (padding outside it).
    """
    if labels is not None:
      raise ValueError(f"task {self.name!r} takes no label input")
    return images

  def to_json(self) -> dict:
    return {"name": self.name, **dataclasses.asdict(self)}


@register
@dataclasses.dataclass(frozen=True)
class Upgrade(Task):
  """(image, P(HQ label)) -> HQ label.

  Attributes:
    perturb: the perturbation P, drawn fresh for every sample and step.
    label_dropout: per-sample probability of zeroing the label input in
      training: an anti-shortcut option (the network cannot copy its label
      input and must read the image).
    strength_mix: draw each training sample's omission / inclusion /
      salt-and-pepper rates uniformly in [0, configured rate], so the network
      sees every strength up to the configured one.
    boundaries: also learn where touching cells meet: beside the foreground
      the network predicts each cell's interior (its pixels without the
      boundary: those with a 4-neighbour of another id or the background),
      trained by Dice on the foreground plus Dice on the interior
      (losses.foreground_probs); instances are then split on the predicted
      interiors (instances.instances_from_interiors).
    haze: the largest height of a random smooth background (a ramp or a
      glow, engine.augment.haze) laid over training images, in units of
      their normalised range; 0: none. Against floods on hazy images.
  """

  name: ClassVar[str] = "upgrade"
  extra_channels: ClassVar[int] = 1
  whole_samples: ClassVar[bool] = True
  uses_max_label: ClassVar[bool] = True

  perturb: PerturbConfig = PerturbConfig()
  label_dropout: float = 0.0
  strength_mix: bool = False
  boundaries: bool = False
  haze: float = 0.0

  @property
  def num_classes(self) -> int:   # an instance property over the ClassVar
    return 3 if self.boundaries else 2

  def __post_init__(self):
    if not isinstance(self.perturb, PerturbConfig):
      raise ValueError("Upgrade.perturb must be a PerturbConfig")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"Upgrade.label_dropout must lie in [0, 1], got {self.label_dropout}")
    if not 0.0 <= self.haze <= 10.0:
      raise ValueError(f"Upgrade.haze must lie in [0, 10], got {self.haze}")

  def pair(self, key, images, targets, others, *, max_label: int, valid, train: bool):
    # Validation uses the configured P as is (no mix, no dropout).
    b = targets.shape[0]
    k_perturb, k_mix, k_drop = jax.random.split(key, 3)
    keys = jax.random.split(k_perturb, b)
    cfg = self.perturb
    one = functools.partial(perturb, config=cfg, max_label=max_label)
    if train and self.strength_mix:
      top = jnp.array([cfg.omission_rate, cfg.inclusion_rate, cfg.salt_pepper_prob],
                      jnp.float32)
      rates = jax.random.uniform(k_mix, (b, 3)) * top
      lq = jax.vmap(lambda k, t, o, r: one(k, t, o, rates=r))(keys, targets, others, rates)
    else:
      lq = jax.vmap(one)(keys, targets, others)
    lq = lq & valid  # salt never lands on padding
    if train and self.label_dropout > 0:
      keep = ~jax.random.bernoulli(k_drop, self.label_dropout, (b,))
      lq = lq & keep[:, None, None]
    if train and self.haze > 0:   # a key of its own: the other streams stay as they were
      images = add_haze(jax.random.fold_in(key, 3), images, valid, self.haze)
    inputs = jnp.concatenate([images, lq[..., None].astype(images.dtype)], -1)
    if self.boundaries:   # int32 codes 0 background, 1 interior, 2 boundary (> 0.5: foreground)
      return inputs, cell_codes(targets)
    return inputs, targets > 0

  def loss(self, logits, target, valid):
    if not self.boundaries:
      return super().loss(logits, target, valid)
    maps = foreground_probs(logits)
    # The interior term does not move the foreground: its gradient reaches
    # the interior logit only.
    interior = jax.lax.stop_gradient(maps[..., 0]) * jax.nn.sigmoid(
        logits[..., 2].astype(jnp.float32))
    return (soft_dice_loss(maps[..., 0], target > 0, valid)
            + soft_dice_loss(interior, target == 1, valid))

  def prediction_inputs(self, images, labels, valid):
    if labels is None:
      raise ValueError("the upgrade task needs the labels to upgrade")
    lq = np.asarray(labels) > 0
    if lq.shape != images.shape[:3]:
      raise ValueError(f"predict: labels shape {lq.shape} != {images.shape[:3]}")
    if valid is not None:
      lq = lq & valid
    return np.concatenate([images, lq[..., None].astype(np.float32)], -1)


@register
@dataclasses.dataclass(frozen=True)
class Segment(Task):
  """image -> HQ mask."""

  name: ClassVar[str] = "segment"

  def pair(self, key, images, targets, others, *, max_label: int, valid, train: bool):
    del key, others, max_label, valid, train
    return images, targets > 0


def cell_codes(ids):
  """(B, h, w) int32 codes of instance ids: 0 background, 1 interior, 2
  boundary (a cell pixel with a 4-neighbour of another id, background
  included; the image border counts as nothing). Jittable."""
  ids = jnp.asarray(ids, jnp.int32)
  pad = jnp.pad(ids, ((0, 0), (1, 1), (1, 1)), mode="edge")
  centre = pad[:, 1:-1, 1:-1]
  edge = ((pad[:, :-2, 1:-1] != centre) | (pad[:, 2:, 1:-1] != centre)
          | (pad[:, 1:-1, :-2] != centre) | (pad[:, 1:-1, 2:] != centre))
  return jnp.where(ids > 0, jnp.where(edge, 2, 1), 0).astype(jnp.int32)


def make_task(name: str, **options) -> Task:
  """The registered task `name` with `options`."""
  try:
    cls = TASKS[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None
  return cls(**options)


def task_from_json(d: dict) -> Task:
  """Inverse of Task.to_json."""
  d = dict(d)
  name = d.pop("name")
  if "perturb" in d and isinstance(d["perturb"], dict):
    d["perturb"] = PerturbConfig(**d["perturb"])
  return make_task(name, **d)
