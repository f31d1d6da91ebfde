r"""Seconds and peak memory of upgrading one large image (tiled prediction).

    python -m benchmarks.tile_bench --size=4096 [--tile=1024 --margin=64 --batch=1] \
        [--model=RUN/model] [--width=16]

Upgrades a synthetic size x size image of bright discs (an LQ label with half
of them omitted) with a saved upgrader (--model) or a fresh UNet of --width
(the cost does not depend on the weights): the first call (compile included),
a second call (steady state), then instance labels. Run one size per process:
peak RSS (ru_maxrss) is the process's maximum. Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

from absl import app, flags

from upgrade_jax.runtime import tune_malloc

tune_malloc()

flags.DEFINE_integer("size", 2048, "Image side.")
flags.DEFINE_integer("tile", 1024, "Tile side.")
flags.DEFINE_integer("margin", 64, "Tile margin.")
flags.DEFINE_integer("batch", 1, "Tiles per call.")
flags.DEFINE_integer("width", 16, "UNet base width (without --model).")
flags.DEFINE_string("model", "", "A saved model/ folder (optional).")
F = flags.FLAGS


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
  del argv
  import jax
  import numpy as np

  from upgrade_jax import export, instances
  from upgrade_jax.engine import TrainConfig, create_train_state
  from upgrade_jax.engine.tiling import TileConfig

  tiling = TileConfig(tile=F.tile, margin=F.margin, batch=F.batch)
  if F.model:
    up = export.load_upgrader(F.model)
    up = dataclasses.replace(up, tiling=tiling)
  else:
    w = F.width
    state = create_train_state(TrainConfig(widths=(w, 2 * w, 4 * w, 8 * w, 8 * w)), 2,
                               jax.random.PRNGKey(0))
    up = export.upgrader_from_state(state, image_channels=1, tiling=tiling)
  rng = np.random.default_rng(0)
  n = F.size
  # Discs of radius 8-14 on a grid with jitter: ~n²/900 cells.
  yy, xx = np.mgrid[:n, :n]
  step = 30
  cy = (yy // step) * step + step // 2
  cx = (xx // step) * step + step // 2
  r = 8 + (cy * 7 + cx * 13) % 7
  inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  gt = np.where(inside, (yy // step) * (n // step + 1) + xx // step + 1, 0).astype(np.int32)
  image = (0.15 + 0.7 * inside + 0.1 * rng.standard_normal((n, n))).astype(np.float32)[..., None]
  lq = np.where(gt % 2 == 0, gt, 0)
  del yy, xx, cy, cx, r, inside
  base = rss_mb()
  t0 = time.perf_counter()
  mask, _ = export.upgrade_sample(up, image, lq, "mask")
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  mask, _ = export.upgrade_sample(up, image, lq, "mask")
  steady = time.perf_counter() - t0
  peak_predict = rss_mb()
  t0 = time.perf_counter()
  labels = instances.instances_from_upgrade(mask, lq)
  inst = time.perf_counter() - t0
  print(json.dumps({
      "size": n, "tile": F.tile, "margin": F.margin, "batch": F.batch,
      "widths": list(up.model.widths), "model": F.model or "random init",
      "first_call_s": round(first, 2), "predict_s": round(steady, 2),
      "mpix_per_s": round(n * n / 1e6 / steady, 3), "instances_s": round(inst, 2),
      "objects": int(labels.max()), "rss_before_mb": round(base),
      "peak_rss_predict_mb": round(peak_predict), "peak_rss_mb": round(rss_mb()),
      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
  app.run(main)
