"""Prediction on images of any size, in bounded memory, with few compiles.

  TileConfig          tile side, context margin, tiles per call
  shape_bucket        padded size of one image axis (a short ladder of sizes)
  tile_starts         where the tiles of one axis start, and where to cut
  predict_image       (H, W, C) image [+ (H, W) label input] -> (H, W) probability

An image no larger than the tile runs whole, padded to its shape bucket, so a
folder of mixed sizes compiles once per bucket, not once per image. A larger
image runs as overlapping tiles of one fixed shape; neighbouring tiles
overlap by at least 2·margin and each output pixel comes from the tile in
which it lies deepest (centre-crop stitching), so every pixel sees at least
`margin` px of context on every side that has image: no visible seams
(BUILD_NOTES.md).

Each image is predicted on its own (tiles of one image batched together,
never images with each other), so an image's result depends on the image,
its labels, the network and the TileConfig only, not on the folder it came
in: a saved upgrader applied to any folder reproduces a training run's files
bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from upgrade_jax.data.types import float_images
from upgrade_jax.engine.evaluation import forward_probs_fn
from upgrade_jax.engine.tasks import Task
from upgrade_jax.models.unet import MULTIPLE

__all__ = ["TileConfig", "shape_bucket", "tile_starts", "predict_image"]

# Bucket ladder above 64: 64·2^k·{1, 1.25, 1.5, 1.75}; an axis pads by at
# most 25 %, and DSB2018's 8 sizes fall into 7 buckets.
_STEPS = (1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """How prediction cuts an image.

  Attributes:
    tile: side of the square tiles (a multiple of 16); images no larger run
      whole. Memory of a call grows with batch·tile².
    margin: context px kept on each inner side of a tile (neighbouring tiles
      overlap by >= 2·margin); must leave tile - 2·margin >= 16.
    batch: tiles of one image per jitted call.
  """

  tile: int = 1024
  margin: int = 64
  batch: int = 1

  def __post_init__(self):
    if self.tile < MULTIPLE or self.tile % MULTIPLE:
      raise ValueError(f"tile must be a multiple of {MULTIPLE} >= {MULTIPLE}, got {self.tile}")
    if self.margin < 0 or self.tile - 2 * self.margin < MULTIPLE:
      raise ValueError(f"margin {self.margin} leaves no tile interior for tile {self.tile}; "
                       f"need 0 <= margin <= {(self.tile - MULTIPLE) // 2}")
    if self.batch < 1:
      raise ValueError(f"batch must be >= 1, got {self.batch}")


def shape_bucket(n: int, tile: int) -> int:
  """Padded length of an axis of n px: multiples of 16 up to 64, then the
  ladder 64·2^k·{1, 1.25, 1.5, 1.75}, capped at `tile` (longer axes tile)."""
  if n <= 4 * MULTIPLE:
    return min(tile, -(-n // MULTIPLE) * MULTIPLE)
  base = 4 * MULTIPLE
  while True:
    for s in _STEPS:
      size = int(base * s)
      if size >= n:
        return min(tile, size)
    base *= 2


def tile_starts(n: int, size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
  """Tiles of `size` covering an axis of n px (n >= size), and their cuts.

  Returns:
    (starts, cuts): tile k covers [starts[k], starts[k] + size) and owns the
    output [cuts[k], cuts[k+1]); cuts[0] = 0, cuts[-1] = n, and each cut lies
    in the middle of the two tiles' overlap (>= 2·margin wide).
  """
  if n <= size:
    return np.array([0]), np.array([0, n])
  k = 1 + -(-(n - size) // (size - 2 * margin))
  starts = np.round(np.linspace(0, n - size, k)).astype(int)
  cuts = np.concatenate([[0], (starts[1:] + starts[:-1] + size) // 2, [n]])
  return starts, cuts


def _tile_side(n: int, config: TileConfig) -> int:
  """Tile side along an axis of n px: the bucket of n when it fits one tile;
  else the smallest bucket that covers n with as many tiles as `config.tile`
  would need (2048 px at tile 1024 needs 3 tiles: 3 x 768, not 3 x 1024,
  which would compute 2.25x the pixels)."""
  if n <= config.tile:
    return shape_bucket(n, config.tile)
  inner = config.tile - 2 * config.margin
  k = 1 + -(-(n - config.tile) // inner)
  return shape_bucket(-(-(n + (k - 1) * 2 * config.margin) // k), config.tile)


def predict_image(model, variables, task: Task, image: np.ndarray, labels=None, *,
                  config: TileConfig = TileConfig()) -> np.ndarray:
  """Foreground probability of one image of any size.

  Args:
    model, variables: the UNet and its {'params', 'batch_stats'}.
    task: builds the network input (engine.Upgrade adds the label channel).
    image: (H, W, C) float32, normalised.
    labels: (H, W) label input of the upgrade task (>0 is foreground), or
      None for a segmentation network.
    config: the TileConfig.

  Returns:
    (H, W) float32 in [0, 1]; (H, W, 2) [foreground, interior] for a model
    with boundaries (losses.foreground_probs).
  """
  image = float_images(image, "predict_image")
  if image.ndim != 3:
    raise ValueError(f"predict_image: image must be (H, W, C), got {image.shape}")
  h, w, _ = image.shape
  x = task.prediction_inputs(image[None], None if labels is None else np.asarray(labels)[None],
                             None)[0]
  th, tw = _tile_side(h, config), _tile_side(w, config)
  # Zero padding up to one tile (the label channel is 0 there, as for the
  # padding of a Dataset).
  x = np.pad(x, ((0, max(0, th - h)), (0, max(0, tw - w)), (0, 0)))
  rows, row_cuts = tile_starts(x.shape[0], th, config.margin)
  cols, col_cuts = tile_starts(x.shape[1], tw, config.margin)
  boxes = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
  maps = 2 if model.num_classes == 3 else 1
  out = np.zeros(x.shape[:2] + ((maps,) if maps > 1 else ()), np.float32)
  calls = []   # (boxes of a call, its probabilities on the device)

  def paste(calls):
    for chunk, probs in zip([c for c, _ in calls], jax.device_get([p for _, p in calls])):
      for (i, j), tile_probs in zip(chunk, probs):
        r0, c0 = rows[i], cols[j]
        a0, a1, b0, b1 = row_cuts[i], row_cuts[i + 1], col_cuts[j], col_cuts[j + 1]
        out[a0:a1, b0:b1] = tile_probs[a0 - r0:a1 - r0, b0 - c0:b1 - c0]

  forward = forward_probs_fn()
  for start in range(0, len(boxes), config.batch):
    chunk = boxes[start:start + config.batch]
    tiles = np.stack([x[rows[i]:rows[i] + th, cols[j]:cols[j] + tw] for i, j in chunk])
    if len(chunk) < config.batch:  # one compiled shape per bucket
      tiles = np.concatenate([tiles, np.zeros((config.batch - len(chunk),) + tiles.shape[1:],
                                              tiles.dtype)])
    calls.append((chunk, forward(model, variables, tiles)))
    if len(calls) >= 4:  # dispatched asynchronously; fetch before memory grows
      paste(calls)
      calls = []
  paste(calls)
  return out[:h, :w]
