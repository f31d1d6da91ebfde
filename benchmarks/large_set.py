"""A training set larger than a device: 2000 synthetic slices of 1024² train
within this machine's memory. Prints one JSON line.

    python -m benchmarks.large_set                      # 2000 x 1024², 30 steps
    python -m benchmarks.large_set --slices=200 --steps=10   # a quick look

The set is what a lab's HQ ∪ upgraded segmentation set looks like on the
host: uint16 images (compact, Dataset.image_scale: normalised on the device)
and 0/1 masks in int8 (4 bytes a pixel, against 12 for float32 images and
int32 targets and others). Its slices are 8 slices of one simulated 1024²
volume (the virtual microscope, hl60 preset), each repeated with its own
roll and flip: simulating 2000 distinct slices would take ~1 h and change
nothing about memory. The segmentation network trains with
data_placement="auto", which streams the set from the host on this machine
(a copy does not fit in half of a device's share of RAM); the peak resident
memory of the whole process (getrusage) is the figure the issue asks for.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from upgrade_jax import engine, parallel
from upgrade_jax.data import io
from upgrade_jax.data import stacking
from upgrade_jax.data.types import Dataset

flags.DEFINE_integer("slices", 2000, "Training slices.")
flags.DEFINE_integer("size", 1024, "Slice side (pixels).")
flags.DEFINE_integer("steps", 30, "Train steps.")
flags.DEFINE_string("placement", "auto", "TrainConfig.data_placement.")
F = flags.FLAGS

UNIQUE = 8   # simulated slices the set is made of


def _peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def build_set(n: int, size: int, seed: int = 0) -> tuple[Dataset, Dataset]:
  """(train, val): n compact slices (uint16 images, int8 0/1 masks) made of
  UNIQUE simulated ones, and 4 of the simulated slices as validation."""
  vol = io.synthetic("hl60", seed=seed, n_volumes=1, shape=(UNIQUE, size, size))[0]
  if vol.image.dtype != np.uint16:
    raise SystemExit(f"the simulator gave {vol.image.dtype} images; this benchmark "
                     "expects uint16")
  images = np.empty((n, size, size, 1), np.uint16)
  masks = np.empty((n, size, size), np.int8)
  scale = np.empty(n, np.float32)
  rng = np.random.default_rng(seed)
  for i in range(n):
    z = i % UNIQUE
    dy, dx = rng.integers(0, size, 2)
    img = np.roll(vol.image[z], (dy, dx), (0, 1))
    msk = np.roll(vol.target[z] > 0, (dy, dx), (0, 1))
    if i // UNIQUE % 2:
      img, msk = img[::-1], msk[::-1]
    images[i, ..., 0] = img
    masks[i] = msk
    scale[i] = max(float(img.max()), 1.0)
  ext = np.full((n, 2), size, np.int32)
  train = Dataset(images, masks, np.zeros_like(masks), ext,
                  tuple(f"s{i}" for i in range(n)), scale)
  val = stacking.volumes_to_dataset([vol], [(0, z) for z in range(4)], compact=True)
  val = val.replace(targets=(val.targets > 0).astype(np.int32))
  return train, val


def main(argv):
  del argv
  t0 = time.perf_counter()
  train, val = build_set(F.slices, F.size)
  built_s = time.perf_counter() - t0
  peak_built = _peak_gib()
  px = int(np.prod(train.targets.shape))
  config = engine.TrainConfig(task=engine.Segment(), widths=(16, 32, 64, 128, 128),
                              crop=256, batch_size=8, max_steps=F.steps,
                              steps_per_epoch=F.steps, log_every=10, checkpoint_every=10_000,
                              data_placement=F.placement)
  mesh = parallel.make_mesh()
  placement = parallel.choose_placement(F.placement, train, mesh)
  lines = []
  with tempfile.TemporaryDirectory(prefix="large_set_") as work:
    t1 = time.perf_counter()
    fit = engine.fit(config, train, val, work, log=lines.append, mesh=mesh)
    fit_s = time.perf_counter() - t1
  out = {
      "slices": F.slices, "size": F.size, "steps": F.steps,
      "placement": placement,
      "device_memory_GiB": round(parallel.device_memory(mesh.devices.flat[0]) / 2 ** 30, 2),
      "bytes_per_pixel": {"before_float32_int32_int32": 12,
                          "after_compact": parallel.bytes_per_pixel(train)},
      "set_GiB": {"before": round(px * 12 / 2 ** 30, 2),
                  "after": round(parallel.dataset_bytes(train) / 2 ** 30, 2)},
      "device_resident_GiB": (0.0 if placement == "stream" else
                              round(parallel.dataset_bytes(train) / 2 ** 30, 2)),
      "peak_rss_GiB": {"after_building_the_set": round(peak_built, 2),
                       "after_training": round(_peak_gib(), 2)},
      "host_RAM_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                            / 2 ** 30, 1),
      "build_s": round(built_s, 1), "fit_s": round(fit_s, 1),
      "img_per_s": fit.history[-1].get("img_per_s") if fit.history else None,
      "val_dice": round(float(fit.best_val_dice), 4),
      "loadavg_1m": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
