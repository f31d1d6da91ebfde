"""Sample data: a small stack of the virtual microscope, made on the fly.

One volume of the default preset and shape (DataConfig: hl60, 32×256×256),
seeded; SAMPLE_SLICES evenly spaced slices away from its dim ends. The LQ
labels are P of the library's LQ maker (sampling.make_lq with
PipelineConfig().lq_perturb, the CLI's default LQ: 70% of the cells omitted),
as their connected components: instance labels as a sloppy annotator hands
them in. The HQ labels are the simulator's truth.
"""

from __future__ import annotations

import numpy as np

from upgrade_jax import instances
from upgrade_jax.data import sampling, stacking, synthetic
from upgrade_jax.pipeline.config import DataConfig, PipelineConfig

__all__ = ["SAMPLE_SLICES", "make_sample", "sample_data"]

SAMPLE_SLICES = 5   # small: seconds to make, and enough HQ slices to train on (4 + 1 val)
LQ_NAME, HQ_NAME, IMAGE_NAME = "LQ labels", "HQ labels (truth)", "synthetic image"


def make_sample(seed: int = 0, n_slices: int = SAMPLE_SLICES):
  """(image (Z, H, W) uint16, LQ labels (Z, H, W) int32, truth (Z, H, W) int32).

  Z = n_slices (fewer only if the volume has fewer non-empty slices); ids of
  the LQ labels are per slice, the truth's the volume's (one id, one cell).
  """
  data, pipe = DataConfig(), PipelineConfig()
  vol = synthetic.generate(data.preset, seed=seed, n_volumes=1, shape=data.volume_shape)[0]
  # n_slices + 2 evenly spaced, less both ends: the edge slices are dim and nearly empty.
  zs = np.unique(np.linspace(0, vol.num_slices - 1, n_slices + 2).round().astype(int)[1:-1])
  ds = stacking.volumes_to_dataset([vol], [(0, int(z)) for z in zs], **data.image_kwargs)
  lq = sampling.make_lq(ds, pipe.lq_perturb, seed=seed)
  lq_ids = np.stack([instances.components(m > 0) for m in lq.targets])
  return vol.image[zs], lq_ids, vol.target[zs].astype(np.int32)


def sample_data() -> list:
  """The npe2 sample-data command: [(data, kwargs, layer type)] of the image,
  the LQ labels and the HQ labels (truth)."""
  image, lq, truth = make_sample()
  return [(image, {"name": IMAGE_NAME}, "image"),
          (lq, {"name": LQ_NAME}, "labels"),
          (truth, {"name": HQ_NAME, "visible": False}, "labels")]
