"""The sample behind a package's test tensors, and its preprocessing in numpy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from upgrade_jax import export, instances
from upgrade_jax.data import intensity, io, stacking
from upgrade_jax.perturb import perturb
from upgrade_jax.rundir import InputError

__all__ = ["Sample", "sample_from_arrays", "read_sample", "synthetic_sample", "package_inputs",
           "reference_maps"]

# bioimageio.core's scale_range divides by (high - low + eps), eps 1e-6 (its
# default, and what core uses whatever the kwargs say); package_inputs does too.
_SCALE_RANGE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Sample:
  """One (image, LQ label) pair.

  Attributes:
    raw: (H, W, C) float32 after the upgrader's channel policy, before
      normalisation: the package's "image" input.
    image: (H, W, C) float32 normalised as the JAX path sees it
      (export.load_sample).
    labels: (H, W) int32 LQ instance labels (or a 0/1 mask).
    source: where it came from, for the README.
  """

  raw: np.ndarray
  image: np.ndarray
  labels: np.ndarray
  source: str


def _channels_of(upgrader: export.Upgrader, image: np.ndarray, label_shape, source) -> np.ndarray:
  raw = intensity.to_channels(io._split_channels(np.asarray(image), label_shape, source),
                              upgrader.channels)
  if raw.shape[-1] != upgrader.image_channels:
    raise InputError(f"{source}: {raw.shape[-1]} channel(s) after the model's "
                     f"'{upgrader.channels}' policy, but the model takes "
                     f"{upgrader.image_channels}; use a model trained on such images")
  return raw


def sample_from_arrays(upgrader: export.Upgrader, image: np.ndarray, labels: np.ndarray,
                       source: str) -> Sample:
  """A Sample of an (H, W[, C]) image of any numeric dtype and its (H, W)
  LQ labels, normalised as a training run's Dataset holds it.

  Raises:
    ValueError naming `source`; InputError when the channel count differs.
  """
  labels = io.check_labels(labels, source)
  if labels.ndim != 2:
    raise ValueError(f"{source}: expected a 2-D label image, got shape {labels.shape}")
  raw = _channels_of(upgrader, image, labels.shape, source)
  ds = stacking.stack_samples([(image, labels, None, source)],
                              normalisation=upgrader.normalisation,
                              channels=upgrader.channels, percentiles=upgrader.percentiles)
  return Sample(raw, ds.images[0], ds.targets[0], source)


def read_sample(upgrader: export.Upgrader, image_path, label_path) -> Sample:
  """The Sample of an image file and its LQ label file, through
  export.load_sample (the path `apply` takes). Raises ValueError/InputError
  naming the file."""
  image, labels = export.load_sample(image_path, label_path, upgrader)
  raw = _channels_of(upgrader, io.read_image(image_path), labels.shape, image_path)
  return Sample(raw, image, labels, f"{Path(image_path).name} with LQ label "
                                    f"{Path(label_path).name}")


def synthetic_sample(upgrader: export.Upgrader, *, preset: str = "hl60", seed: int = 0,
                     shape=(8, 256, 256)) -> Sample:
  """A slice of the synthetic microscope (io.synthetic, the slice with the
  most target pixels) and, as its LQ label, the components of P(its truth)
  under the upgrader's own perturbation P (key `seed`): the kind of pair u_θ
  was trained on. Grey images: an "rgb" upgrader gets them repeated."""
  vol = io.synthetic(preset, seed=seed, n_volumes=1, shape=shape)[0]
  z = int(np.argmax((vol.target > 0).reshape(vol.num_slices, -1).sum(1)))
  target, others = vol.target[z], vol.others[z]
  lq = perturb(jax.random.PRNGKey(seed), target, others, upgrader.task.perturb,
               max_label=int(max(target.max(), others.max(), 1)))
  return sample_from_arrays(upgrader, vol.image[z], instances.components(np.asarray(lq)),
                            f"synthetic microscope ({preset}, seed {seed}, slice {z} of "
                            f"{shape[1]}x{shape[2]}) with LQ = P(truth)")


def package_inputs(upgrader: export.Upgrader, raw: np.ndarray,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """What the package's preprocessing hands the graph, computed as
  bioimageio.core computes it: "percentile" is scale_range over y, x (its
  float64 linear quantiles and its eps), the mask is labels > 0.5.

  Args: raw (H, W, C) float32 (Sample.raw); labels (H, W) LQ ids or mask.
  Returns: image (1, C, H, W) and lq_mask (1, 1, H, W), float32.
  """
  x = np.asarray(raw, np.float32)
  if upgrader.normalisation == "percentile":
    lo, hi = np.percentile(x.astype(np.float64), upgrader.percentiles, axis=(0, 1))
    x = ((x - lo) / (hi - lo + _SCALE_RANGE_EPS)).astype(np.float32)
  mask = (np.asarray(labels) > 0.5).astype(np.float32)
  return x.transpose(2, 0, 1)[None], mask[None, None]


def reference_maps(upgrader: export.Upgrader, sample: Sample) -> np.ndarray:
  """(K, H, W) float32: the JAX path's probabilities (export.sample_maps:
  foreground, and interior with boundaries), the package's test output."""
  fg, interior = export.sample_maps(upgrader, sample.image, sample.labels)
  return np.stack([fg] if interior is None else [fg, interior]).astype(np.float32)
