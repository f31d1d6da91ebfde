"""A napari layer pair through a saved upgrader, exactly as experiments.apply
upgrades a file pair (no Qt here: the widget runs `upgrade_layers` in a worker).

A 2-D pair is one sample. A (Z, H, W) label stack with its (Z, H, W[, C])
image is upgraded slice by slice, each slice a sample, and stacked with ids
unique over the stack (pipeline.user.stack_labels), as user mode writes a
stack: slice z of the result is what apply writes for that slice's files,
its ids offset past those of the slices before it.
"""

from __future__ import annotations

import dataclasses
from typing import Generator

import numpy as np

from upgrade_jax import export, instances, review
from upgrade_jax.data import io
from upgrade_jax.pipeline.user import stack_labels
from upgrade_jax.rundir import InputError

__all__ = ["Upgraded", "layer_slices", "upgrade_steps", "upgrade_layers", "as_label_file"]


@dataclasses.dataclass(frozen=True)
class Upgraded:
  """labels: (H, W) or (Z, H, W) uint16 (uint32 above 65535 ids), as a file
  holds them; rows: review.rank_rows of one row per slice, most doubtful
  first, each row's "z" its slice index (0 for a 2-D pair)."""
  labels: np.ndarray
  rows: list


def layer_slices(image: np.ndarray, labels: np.ndarray, name: str) -> list:
  """[(image (H, W[, C]), labels (H, W), sample name)] of a layer pair.

  A 2-D pair is one sample named `name`; slice z of a stack is named
  "<name>_z<zzz>" (as data.stacking.volumes_to_dataset names slices).

  Raises:
    ValueError naming the shapes when labels are neither (H, W) nor
    (Z, H, W), or a stack's image has another number of slices.
  """
  image, labels = np.asarray(image), np.asarray(labels)
  if labels.ndim == 2:
    return [(image, labels, name)]
  if labels.ndim != 3:
    raise ValueError(f"labels of shape {labels.shape}: give (H, W) labels or a (Z, H, W) stack")
  if image.ndim not in (3, 4) or image.shape[0] != labels.shape[0]:
    raise ValueError(f"image shape {image.shape} does not match the label stack "
                     f"{labels.shape}: give a (Z, H, W[, C]) image of as many slices")
  return [(image[z], labels[z], f"{name}_z{z:03d}") for z in range(labels.shape[0])]


def as_label_file(labels: np.ndarray) -> np.ndarray:
  """labels as io.write_labels stores them in a TIFF (io.label_file_array), so
  a layer equals apply's file bit for bit (and saves as one)."""
  return io.label_file_array(labels, "upgraded labels")


def upgrade_steps(upgrader: export.Upgrader, image: np.ndarray, labels: np.ndarray, *,
                  name: str, output: str = "instances", image_name: str = "image",
                  label_name: str = "labels") -> Generator[tuple[int, int], None, Upgraded]:
  """Upgrades a layer pair: each slice through export.prepare_arrays and
  export.upgrade_reviewed, the functions apply runs on each file pair.

  A generator (for napari's thread_worker): yields (slices done, slices)
  after each slice, returns the Upgraded.

  Args:
    image: (H, W[, C]) or (Z, H, W[, C]) as the layer holds it (any numeric dtype).
    labels: (H, W) or (Z, H, W) LQ labels (instances or a 0/1 mask).
    name: the sample name of the review rows (see layer_slices).
    output: "instances" or "mask" (apply's --output).
    image_name, label_name: what error messages call the two layers.

  Raises:
    InputError of one line for what the inputs get wrong (shapes, ids,
    channels, output), before that slice's upgrade; anything raised while
    upgrading a checked slice is a bug and keeps its type and traceback.
  """
  try:
    parts = layer_slices(image, labels, name)
    if output not in instances.OUTPUTS:
      raise ValueError(f"output must be one of {list(instances.OUTPUTS)}, got {output!r}")
  except ValueError as e:
    raise InputError(str(e)) from None
  out, rows = [], []
  for z, (img, lab, sample) in enumerate(parts):
    where = f" (slice {z})" if len(parts) > 1 else ""
    try:
      img, lq = export.prepare_arrays(img, lab, upgrader, image_name=f"{image_name}{where}",
                                      label_name=f"{label_name}{where}")
    except ValueError as e:   # InputError (channels) too
      raise InputError(str(e)) from None
    _, upgraded, row = export.upgrade_reviewed(upgrader, img, lq, sample, output)
    out.append(upgraded)
    rows.append({**row, "z": z})
    yield z + 1, len(parts)
  stacked = out[0] if np.asarray(labels).ndim == 2 else stack_labels(out)
  return Upgraded(as_label_file(stacked), review.rank_rows(rows))


def upgrade_layers(upgrader: export.Upgrader, image: np.ndarray, labels: np.ndarray,
                   **kwargs) -> Upgraded:
  """upgrade_steps run to the end (same arguments): the Upgraded."""
  steps = upgrade_steps(upgrader, image, labels, **kwargs)
  while True:
    try:
      next(steps)
    except StopIteration as done:
      return done.value
