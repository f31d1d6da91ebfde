"""Validation and prediction.

  make_val_set / evaluate   pooled Dice on a fixed validation set, built once
                            (the upgrade task's label input perturbed once
                            with a key derived from the seed)
  predict_proba / predict   batched, jitted inference on full-size images;
                            the network input is built by the state's task
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax import parallel
from upgrade_jax.data.types import Dataset, float_images
from upgrade_jax.engine import xla_options
from upgrade_jax.engine.config import TrainConfig
from upgrade_jax.engine.state import TrainState
from upgrade_jax.engine.tasks import Task
from upgrade_jax.losses import foreground_of_logits, foreground_probs
from upgrade_jax.metrics import FOREGROUND_THRESHOLD, dice_counts, extent_mask, pooled_dice
from upgrade_jax.models.unet import MULTIPLE

__all__ = ["ValSet", "make_val_set", "evaluate", "bucket_size", "predict_proba", "predict"]

# Salt folded into the seed for the one-off perturbation of the validation set,
# so it never coincides with a training step key.
_VAL_KEY_SALT = 0x5EED_0F_0A


class ValSet(NamedTuple):
  """A fixed validation set on the devices, in eval batches.

  inputs: (nb, b, H, W, C') f32; target, valid: (nb, b, H, W) bool. Samples
  added to fill the last batch are all-invalid.
  """
  inputs: Any
  target: Any
  valid: Any


def make_val_set(config: TrainConfig, val: Dataset, max_label: int,
                 mesh=None) -> ValSet:
  """Builds the validation pairs once; the upgrade task's label input is
  perturbed with a fixed key derived from config.seed (and no dropout/mix).
  """
  if len(val) == 0:
    raise ValueError("make_val_set: the validation Dataset is empty")
  mesh = parallel.make_mesh() if mesh is None else mesh
  ndev = mesh.shape[parallel.DATA_AXIS]
  b = -(-config.eval_batch_size // ndev) * ndev
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _VAL_KEY_SALT)
  valid = val.valid_mask()
  pair = jax.jit(functools.partial(config.task.pair, max_label=max_label, train=False))
  inputs, target = pair(key, jnp.asarray(val.normalised()),
                        jnp.asarray(val.targets, jnp.int32),
                        jnp.asarray(val.others, jnp.int32), valid=jnp.asarray(valid))
  target = np.asarray(target)
  if target.dtype != bool:   # a soft or coded target: foreground is > FOREGROUND_THRESHOLD
    target = target > FOREGROUND_THRESHOLD
  n = len(val)
  nb = -(-n // b)

  def batched(x):
    x = np.asarray(x)
    x = np.concatenate([x, np.zeros((nb * b - n,) + x.shape[1:], x.dtype)])
    return x.reshape((nb, b) + x.shape[1:])

  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  return ValSet(*(parallel.put(batched(x), sharding)
                  for x in (inputs, target, valid)))


def _eval_counts(model, variables, valset: ValSet):
  def body(counts, xs):
    x, t, v = xs
    logits = model.apply(variables, x, train=False)
    return counts + dice_counts(foreground_of_logits(logits), t, v), None
  counts, _ = jax.lax.scan(body, jnp.zeros((3,), jnp.int32), tuple(valset))
  return counts


def evaluate(state: TrainState, valset: ValSet) -> float:
  """Pooled Dice (2ΣTP / (2ΣTP + ΣFP + ΣFN)) of the model on `valset`."""
  counts = xla_options.jit(_eval_counts, static_argnums=0)(
      state.model, state.variables, valset)
  return pooled_dice(jax.device_get(counts))


def bucket_size(n: int) -> int:
  """Padded size for a spatial size n: a multiple of 16 up to 64, then a
  multiple of 64, so a folder of mixed sizes compiles only a few shapes."""
  if n <= 64:
    return -(-n // MULTIPLE) * MULTIPLE
  return -(-n // 64) * 64


def _probs(model, variables, x):
  return foreground_probs(model.apply(variables, x, train=False))


def forward_probs_fn():
  """The jitted (model, variables, x (B, H, W, C) f32) -> (B, H, W) f32
  foreground probability (losses.foreground_probs: (B, H, W, 2) foreground
  and interior for a model with boundaries) used by predict_proba and
  tiling, compiled with this backend's
  xla_options (on XLA:CPU without YNNPACK fusions)."""
  return xla_options.jit(_probs, static_argnums=0)


def _data_mesh_of(variables):
  """The mesh of variables replicated over a multi-device `data` mesh, else None."""
  sharding = getattr(jax.tree.leaves(variables)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if (isinstance(sharding, jax.sharding.NamedSharding)
      and mesh.shape.get(parallel.DATA_AXIS, 1) > 1):
    return mesh
  return None


def predict_proba(state, images, labels=None, *, batch_size: int = 8,
                  extents=None, task: Task | None = None) -> np.ndarray:
  """Foreground probabilities of full-size images.

  Args:
    state: a TrainState, or a (UNet, variables) pair (then pass `task`).
    images: (N, H, W, C) float32, normalised (integer arrays are refused:
      a compact Dataset's images need Dataset.normalised()); or a Dataset,
      compact or not, normalised one batch at a time (its extents are used
      unless `extents` is given), so a large set never exists whole as
      float32 network inputs.
    labels: (N, H, W) label input of a task that takes one (the LQ masks to
      upgrade); None for the segmentation network.
    batch_size: images per jitted call (N is padded to a multiple). When the
      variables are replicated over a multi-device mesh (as fit leaves
      them), each batch is split over its `data` axis (batch_size is
      rounded up to a multiple of the device count).
    extents: optional (N, 2) valid (height, width) per image; outside it the
      label input is zeroed and the output is 0.
    task: the task whose input layout to build (default: the state's).

  Returns:
    (N, H, W) float32 in [0, 1].
  """
  model, variables = ((state.model, state.variables)
                      if isinstance(state, TrainState) else state)
  task = task if task is not None else getattr(state, "task", None)
  if task is None:
    raise ValueError("predict: pass task= with a (model, variables) pair")
  if isinstance(images, Dataset):
    ds = images
    extents = ds.extents if extents is None else extents
    shape = ds.images.shape
    batch_images = lambda i, j: ds.normalised(np.arange(i, j))  # noqa: E731
  else:
    arr = float_images(images, "predict")
    shape = arr.shape
    batch_images = lambda i, j: arr[i:j]  # noqa: E731
  if len(shape) != 4:
    raise ValueError(f"predict: images must be (N, H, W, C), got {shape}")
  n, h, w, _ = shape
  valid = None
  if extents is not None:
    extents = np.asarray(extents)
    if extents.shape != (n, 2):
      raise ValueError(f"predict: extents shape {extents.shape} != {(n, 2)}")
    valid = extent_mask(extents, h, w)
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (n, h, w):
      raise ValueError(f"predict: labels shape {labels.shape} != {(n, h, w)}")
  if batch_size < 1:
    raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
  mesh = _data_mesh_of(variables)
  put = lambda a: a
  if mesh is not None:  # variables on several devices: split each batch
    ndev = mesh.shape[parallel.DATA_AXIS]
    batch_size = -(-batch_size // ndev) * ndev
    put = lambda a: parallel.put(a, parallel.batch_sharding(mesh))
  hb, wb = bucket_size(h), bucket_size(w)
  take = lambda a, i, j: None if a is None else a[i:j]  # noqa: E731
  forward = forward_probs_fn()
  outs = []
  for i in range(0, n, batch_size):   # dispatched asynchronously, fetched once
    j = min(i + batch_size, n)
    x = task.prediction_inputs(batch_images(i, j), take(labels, i, j), take(valid, i, j))
    x = np.pad(x, ((0, batch_size - (j - i)), (0, hb - h), (0, wb - w), (0, 0)))
    outs.append(forward(model, variables, put(x)))
  # fetch: with several processes a batch spans devices of the others.
  probs = np.concatenate(parallel.fetch(outs))[:n, :h, :w]
  if valid is not None:
    probs = np.where(valid, probs, 0.0).astype(np.float32)
  return probs


def predict(state, images, labels=None, *, batch_size: int = 8,
            extents=None, task: Task | None = None) -> np.ndarray:
  """(N, H, W) bool prediction (foreground probability > FOREGROUND_THRESHOLD); see
  predict_proba for the arguments."""
  return predict_proba(state, images, labels, batch_size=batch_size,
                       extents=extents, task=task) > FOREGROUND_THRESHOLD
