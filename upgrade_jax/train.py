"""The training engine shared by the upgrade network and the segmentation network.

The two tasks differ only in how a batch becomes an (input, target) pair (the
TASKS registry below). Everything else is one engine:

  create_train_state   UNet + Adam, a TrainState pytree
  make_train_step      the jitted, data-parallel step: sample crops from the
                       device-resident HQ set, flip, build the pair (perturb
                       the labels under the step's key), soft-Dice update
  make_val_set/evaluate  pooled Dice on a fixed (perturbed-once) validation set
  fit                  epochs, early stopping on validation Dice, Orbax
                       checkpoints (latest + best), resume after a crash
  predict              batched, jitted inference on full-size images

Randomness: the state carries a base key; step s uses fold_in(rng, s). A run
is therefore a pure function of (config, data), and a resumed run replays the
exact random stream of an uninterrupted one.

Data parallelism (parallel.py): one global-batch program under jax.jit, the
batch axis constrained to the `data` mesh axis. XLA partitions it, all-reduces
the gradients, and BatchNorm statistics are those of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from upgrade_jax import parallel
from upgrade_jax.data.types import Dataset
from upgrade_jax.losses import dice_loss_from_logits
from upgrade_jax.metrics import dice_counts, pooled_dice
from upgrade_jax.models.unet import MULTIPLE, UNet
from upgrade_jax.perturb import PerturbConfig, perturb

# Salt folded into the seed for the one-off perturbation of the validation set,
# so it never coincides with a training step key.
_VAL_KEY_SALT = 0x5EED_0F_0A


# --------------------------------------------------------------------------
# Configuration and state.

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run (frozen, hashable: static in jit).

  Attributes:
    task: "upgrade" (input = image + perturbed HQ label) or "segment"
      (input = image); see TASKS.
    widths: UNet widths, 4 encoder blocks + bottleneck.
    conv_impl: conv implementation name (models.conv.get_conv).
    crop: side of the square training crop; clipped to the dataset's padded
      size. Multiples of 16 avoid padding inside the UNet.
    batch_size: global batch, split over the devices (a multiple of them).
    lr: Adam learning rate.
    max_steps: hard limit on train steps.
    steps_per_epoch: steps between validations (the early-stopping unit).
    patience: epochs without validation improvement before stopping.
    perturb: the perturbation P (upgrade task).
    label_dropout: per-sample probability of zeroing the label input channel
      during training (upgrade task). An anti-shortcut option: the network
      cannot simply copy its label input and must read the image.
    strength_mix: if True, each training sample's omission / inclusion /
      salt-and-pepper rates are drawn uniformly in [0, configured rate], so
      the network sees every strength up to the configured one.
    flips: random horizontal and vertical flips of the crops.
    seed: the run's seed; all keys derive from it.
    log_every: steps between progress lines (the only host syncs).
    checkpoint_every: steps between "latest" checkpoints (also at each epoch
      end).
    eval_batch_size: validation batch (rounded up to a device multiple).
  """

  task: str = "upgrade"
  widths: tuple[int, ...] = (16, 32, 64, 128, 128)
  conv_impl: str = "xla"
  crop: int = 128
  batch_size: int = 8
  lr: float = 1e-3
  max_steps: int = 5000
  steps_per_epoch: int = 100
  patience: int = 10
  perturb: PerturbConfig = PerturbConfig()
  label_dropout: float = 0.0
  strength_mix: bool = False
  flips: bool = True
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 500
  eval_batch_size: int = 8

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"TrainConfig.task {self.task!r} unknown; choose one of "
                       f"{sorted(TASKS)}")
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if len(self.widths) != 5 or min(self.widths) < 1:
      raise ValueError(f"TrainConfig.widths must be 5 positive ints, got {self.widths}")
    for name in ("crop", "batch_size", "max_steps", "steps_per_epoch",
                 "patience", "log_every", "checkpoint_every", "eval_batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f"TrainConfig.label_dropout must lie in [0, 1], got {self.label_dropout}")
    if not self.lr > 0:
      raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
    if not isinstance(self.perturb, PerturbConfig):
      raise ValueError("TrainConfig.perturb must be a PerturbConfig")


class TrainState(flax.struct.PyTreeNode):
  """The whole mutable state of a run (a pytree; `model` and `tx` are static).

  step: () int32 number of completed steps; params, batch_stats: UNet
  variables; opt_state: Adam state; rng: (2,) uint32 base key (step s uses
  fold_in(rng, s)).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  model: UNet = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def arrays(self) -> dict:
    """The checkpointed part, as a plain dict of arrays."""
    return {"step": self.step, "params": self.params,
            "batch_stats": self.batch_stats, "opt_state": self.opt_state,
            "rng": self.rng}


def _raw_key(key) -> jax.Array:
  """Typed or raw PRNG key -> raw (2,) uint32 key (checkpoint friendly)."""
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(f"expected a threefry PRNG key, got {key.dtype}{key.shape}")
  return key


def _lecun_like_init(key, shapes):
  """Variables with Flax's default initialisers, from one random draw.

  Kernels (any 'kernel' leaf, fan_in = prod(shape[:-1])) get lecun_normal
  (truncated normal in [-2, 2], variance 1/fan_in, as flax.linen.Conv and
  ConvTranspose); BatchNorm 'scale' and 'var' are ones; every other leaf
  (biases, BatchNorm 'bias' and 'mean') is zeros. Why not `model.init`: it
  draws each kernel with its own truncated-normal graph, and XLA takes ~10 s
  on CPU to compile the UNet's ~20 of them; one flat draw compiles in ~1 s.
  The values differ from `model.init`'s, not their distribution.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [getattr(path[-1], "key", None) for path, _ in flat]
  sizes = [math.prod(s.shape) if n == "kernel" else 0
           for n, (_, s) in zip(names, flat)]
  z = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for name, size, (_, s) in zip(names, sizes, flat):
    if name == "kernel":
      fan_in = math.prod(s.shape[:-1])
      # 0.8796... is the std of a standard normal truncated to [-2, 2].
      std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
      out.append((z[offset:offset + size].reshape(s.shape) * std).astype(s.dtype))
      offset += size
    elif name in ("scale", "var"):
      out.append(jnp.ones(s.shape, s.dtype))
    else:
      out.append(jnp.zeros(s.shape, s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_variables(model: UNet, input_channels: int, key) -> dict:
  """{'params', 'batch_stats'} of `model` for inputs with `input_channels`."""
  dummy = jax.ShapeDtypeStruct((1, MULTIPLE, MULTIPLE, input_channels), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), key, dummy)
  return _init_jit(key, _Hashable(shapes))


class _Hashable:
  """Wraps a pytree of ShapeDtypeStructs so it can be a static jit argument."""

  def __init__(self, tree):
    self.tree = tree
    self._key = str(jax.tree_util.tree_structure(tree)) + str(
        [(s.shape, str(s.dtype)) for s in jax.tree.leaves(tree)])

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Hashable) and self._key == other._key


@functools.partial(jax.jit, static_argnums=1)
def _init_jit(key, shapes: _Hashable):
  return _lecun_like_init(key, shapes.tree)


@functools.lru_cache(maxsize=None)
def _optimizer() -> optax.GradientTransformation:
  # Adam with the learning rate as state (inject_hyperparams), not a
  # constant: `tx` is a static field of TrainState, so a single object for
  # every lr lets jit reuse one compiled step across fits and lrs.
  return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def create_train_state(config: TrainConfig, input_channels: int, key,
                       mesh=None) -> TrainState:
  """A fresh TrainState: UNet(config.widths) with `input_channels` inputs.

  Args:
    config: the run's TrainConfig.
    input_channels: image channels (+1 for the upgrade task; see
      `input_channels`).
    key: PRNG key; split into the init key and the run's base key.
    mesh: if given, the state is replicated over it.
  """
  if input_channels < 1:
    raise ValueError(f"input_channels must be >= 1, got {input_channels}")
  model = UNet(widths=config.widths, num_classes=2, conv_impl=config.conv_impl)
  k_init, k_run = jax.random.split(_raw_key(key))
  variables = init_variables(model, input_channels, k_init)
  tx = _optimizer()
  params = variables["params"]
  opt_state = tx.init(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(config.lr, jnp.float32)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"],
                     opt_state=opt_state, rng=k_run, model=model, tx=tx)
  if mesh is not None:
    state = parallel.replicate_tree(state, mesh)
  return state


# --------------------------------------------------------------------------
# Tasks: how a batch becomes (inputs, target). A registry, not if-chains.

class Task(NamedTuple):
  """pair_fn(key, images, targets, others, config, *, max_label, valid, train)
  -> (inputs (B,h,w,C') f32, target (B,h,w) bool); extra_channels = C' - C.
  whole_samples: the pair must be made on whole samples before cropping
  (True when it depends on the instances present, like P's omission)."""
  pair_fn: Callable
  extra_channels: int
  whole_samples: bool = False


TASKS: dict[str, Task] = {}


def register_task(name: str, extra_channels: int, whole_samples: bool = False):
  def wrap(fn):
    TASKS[name] = Task(fn, extra_channels, whole_samples)
    return fn
  return wrap


def input_channels(task: str, image_channels: int) -> int:
  """Input channels of the network for `task` on images with C channels."""
  return image_channels + TASKS[task].extra_channels


@register_task("upgrade", extra_channels=1, whole_samples=True)
def upgrade_pair(key, images, targets, others, config: TrainConfig, *,
                 max_label: int, valid, train: bool):
  """(image, P(HQ label)) -> HQ label.

  Args: images (B,h,w,C) f32; targets, others (B,h,w) int32; valid (B,h,w)
  bool. With train=True the anti-shortcut options (strength_mix,
  label_dropout) apply; validation uses the configured P as is.
  """
  b = targets.shape[0]
  k_perturb, k_mix, k_drop = jax.random.split(key, 3)
  keys = jax.random.split(k_perturb, b)
  cfg = config.perturb
  one = functools.partial(perturb, config=cfg, max_label=max_label)
  if train and config.strength_mix:
    top = jnp.array([cfg.omission_rate, cfg.inclusion_rate,
                     cfg.salt_pepper_prob], jnp.float32)
    rates = jax.random.uniform(k_mix, (b, 3)) * top
    lq = jax.vmap(lambda k, t, o, r: one(k, t, o, rates=r))(
        keys, targets, others, rates)
  else:
    lq = jax.vmap(one)(keys, targets, others)
  lq = lq & valid  # salt never lands on padding
  if train and config.label_dropout > 0:
    keep = ~jax.random.bernoulli(k_drop, config.label_dropout, (b,))
    lq = lq & keep[:, None, None]
  inputs = jnp.concatenate([images, lq[..., None].astype(images.dtype)], -1)
  return inputs, targets > 0


@register_task("segment", extra_channels=0)
def segment_pair(key, images, targets, others, config: TrainConfig, *,
                 max_label: int, valid, train: bool):
  """image -> HQ mask."""
  del key, others, config, max_label, valid, train
  return images, targets > 0


# --------------------------------------------------------------------------
# The train step.

class Batch(NamedTuple):
  images: Any   # (B, h, w, C) f32
  targets: Any  # (B, h, w) i32
  others: Any   # (B, h, w) i32
  valid: Any    # (B, h, w) bool


def _flip(x, flag, axis):
  """Per-sample flip of batch x along `axis` where flag (B,) is True."""
  f = flag.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(f, jnp.flip(x, axis), x)


def valid_from_extents(extents, h: int, w: int):
  """(B, h, w) bool: True inside each sample's valid (height, width)."""
  rows = jnp.arange(h)[None, :] < extents[:, 0, None]
  cols = jnp.arange(w)[None, :] < extents[:, 1, None]
  return rows[:, :, None] & cols[:, None, :]


def crop_and_flip(key, arrays, extents, crop: int, flips: bool = True):
  """The same random crop (inside each sample's extent) and flips of a tuple
  of per-sample arrays (B, H, W, ...).

  A sample smaller than the crop is taken whole from its origin. Returns the
  cropped arrays, each (B, min(crop, H), min(crop, W), ...).
  """
  b, h, w = arrays[0].shape[:3]
  ch, cw = min(crop, h), min(crop, w)
  k_y, k_x, k_fy, k_fx = jax.random.split(key, 4)
  y0 = jax.random.randint(k_y, (b,), 0, jnp.maximum(extents[:, 0] - ch, 0) + 1)
  x0 = jax.random.randint(k_x, (b,), 0, jnp.maximum(extents[:, 1] - cw, 0) + 1)

  def take(x, y, xo):
    start = (y, xo) + (jnp.zeros((), jnp.int32),) * (x.ndim - 2)
    return jax.lax.dynamic_slice(x, start, (ch, cw) + x.shape[2:])

  out = tuple(jax.vmap(take)(a, y0, x0) for a in arrays)
  if flips:
    fy = jax.random.bernoulli(k_fy, 0.5, (b,))
    fx = jax.random.bernoulli(k_fx, 0.5, (b,))
    out = tuple(_flip(_flip(a, fy, 1), fx, 2) for a in out)
  return out


def gather_samples(key, data: parallel.DeviceData, batch_size: int) -> Batch:
  """Random whole samples (B, H, W, ...) with their valid masks, and their
  (B, 2) extents."""
  n, h, w = data.targets.shape
  idx = jax.random.randint(key, (batch_size,), 0, n)
  ext = data.extents[idx]
  batch = Batch(data.images[idx], data.targets[idx], data.others[idx],
                valid_from_extents(ext, h, w))
  return batch, ext


def sample_crops(key, data: parallel.DeviceData, batch_size: int, crop: int,
                 flips: bool = True) -> Batch:
  """Random samples, crops inside each sample's valid extent, random flips.

  Args:
    key: PRNG key.
    data: device-resident dataset (N, H, W, ...).
    batch_size: B.
    crop: square crop side; clipped to (H, W).
    flips: random vertical and horizontal flips.

  Returns:
    Batch of (B, min(crop, H), min(crop, W)) crops. A sample smaller than
    the crop is taken whole from its origin; its padding is marked invalid.
  """
  k_idx, k_geo = jax.random.split(key)
  full, ext = gather_samples(k_idx, data, batch_size)
  return Batch(*crop_and_flip(k_geo, tuple(full), ext, crop, flips))


# Config fields the train step does not read: normalised away so fits that
# differ only in them share one compiled step.
# (The learning rate lives in the optimizer state, the seed in state.rng.)
_NOT_IN_STEP = dict(max_steps=1, steps_per_epoch=1, patience=1, log_every=1,
                    checkpoint_every=1, eval_batch_size=1, seed=0, lr=1.0)


def make_train_step(config: TrainConfig, mesh, max_label: int):
  """The jitted, data-parallel train step.

  Cached per (step-relevant config, mesh, max_label), so repeated fits of one
  config in a process compile once.

  Returns:
    train_step(state, data) -> (state, metrics): state is donated; data is
    the parallel.DeviceData of the training set; metrics = {"loss": () f32,
    "dice_counts": (3,) i32 train TP/FP/FN at threshold 0.5}.
  """
  return _build_train_step(dataclasses.replace(config, **_NOT_IN_STEP), mesh,
                           int(max_label))


@functools.lru_cache(maxsize=16)
def _build_train_step(config: TrainConfig, mesh, max_label: int):
  parallel.check_batch(config.batch_size, mesh)
  task = TASKS[config.task]
  rep = parallel.replicated(mesh)

  def train_step(state: TrainState, data: parallel.DeviceData):
    key = jax.random.fold_in(state.rng, state.step)
    k_idx, k_pair, k_geo = jax.random.split(key, 3)
    # The pair (e.g. the perturbation P) is made on whole samples and cropped
    # afterwards, as the paper perturbs whole slices: omitting floor(r·n) of
    # the n cells of a crop would omit nothing from a crop holding one cell.
    # A task that does not need whole samples (segmentation) crops first, so
    # the step never moves whole large images.
    full, ext = gather_samples(k_idx, data, config.batch_size)
    full = parallel.shard_batch(full, mesh)
    pair = functools.partial(task.pair_fn, config=config, max_label=max_label, train=True)
    if task.whole_samples:
      inputs, target = pair(k_pair, full.images, full.targets, full.others, valid=full.valid)
      inputs, target, valid = crop_and_flip(k_geo, (inputs, target, full.valid), ext,
                                            config.crop, config.flips)
    else:
      crops = Batch(*crop_and_flip(k_geo, tuple(full), ext, config.crop, config.flips))
      inputs, target = pair(k_pair, crops.images, crops.targets, crops.others,
                            valid=crops.valid)
      valid = crops.valid
    inputs, target, valid = parallel.shard_batch((inputs, target, valid), mesh)

    def loss_fn(params):
      logits, updates = state.model.apply(
          {"params": params, "batch_stats": state.batch_stats}, inputs,
          train=True, mutable=["batch_stats"])
      loss = dice_loss_from_logits(logits, target, valid)
      return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts = dice_counts(logits[..., 1] > logits[..., 0], target, valid)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "dice_counts": counts}

  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(rep, rep))


# --------------------------------------------------------------------------
# Validation.

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
  pair = jax.jit(functools.partial(TASKS[config.task].pair_fn, config=config,
                                   max_label=max_label, train=False))
  inputs, target = pair(key, jnp.asarray(val.images, jnp.float32),
                        jnp.asarray(val.targets, jnp.int32),
                        jnp.asarray(val.others, jnp.int32), valid=jnp.asarray(valid))
  n = len(val)
  nb = -(-n // b)

  def batched(x):
    x = np.asarray(x)
    x = np.concatenate([x, np.zeros((nb * b - n,) + x.shape[1:], x.dtype)])
    return x.reshape((nb, b) + x.shape[1:])

  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  return ValSet(*(parallel.put(batched(x), sharding)
                  for x in (inputs, np.asarray(target), valid)))


@functools.partial(jax.jit, static_argnums=0)
def _eval_counts(model, variables, valset: ValSet):
  def body(counts, xs):
    x, t, v = xs
    logits = model.apply(variables, x, train=False)
    return counts + dice_counts(logits[..., 1] > logits[..., 0], t, v), None
  counts, _ = jax.lax.scan(body, jnp.zeros((3,), jnp.int32), tuple(valset))
  return counts


def evaluate(state: TrainState, valset: ValSet) -> float:
  """Pooled Dice (2ΣTP / (2ΣTP + ΣFP + ΣFN)) of the model on `valset`."""
  return pooled_dice(jax.device_get(
      _eval_counts(state.model, state.variables, valset)))


# --------------------------------------------------------------------------
# Prediction.

def bucket_size(n: int) -> int:
  """Padded size for a spatial size n: a multiple of 16 up to 64, then a
  multiple of 64, so a folder of mixed sizes compiles only a few shapes."""
  if n <= 64:
    return -(-n // MULTIPLE) * MULTIPLE
  return -(-n // 64) * 64


@functools.partial(jax.jit, static_argnums=0)
def _forward_probs(model, variables, x):
  logits = model.apply(variables, x, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


def _data_mesh_of(variables):
  """The mesh of variables replicated over a multi-device `data` mesh, else None."""
  sharding = getattr(jax.tree.leaves(variables)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if (isinstance(sharding, jax.sharding.NamedSharding)
      and mesh.shape.get(parallel.DATA_AXIS, 1) > 1):
    return mesh
  return None


def predict_proba(state, images, lq_masks=None, *, batch_size: int = 8,
                  extents=None) -> np.ndarray:
  """Foreground probabilities of full-size images.

  Args:
    state: a TrainState, or a (UNet, variables) pair.
    images: (N, H, W, C) float32.
    lq_masks: (N, H, W) bool label input for the upgrade network; None for
      the segmentation network.
    batch_size: images per jitted call (N is padded to a multiple). When the
      variables are replicated over a multi-device mesh (as fit leaves
      them), each batch is split over its `data` axis (batch_size is
      rounded up to a multiple of the device count).
    extents: optional (N, 2) valid (height, width) per image; outside it the
      label input is zeroed and the output is 0.

  Returns:
    (N, H, W) float32 in [0, 1].
  """
  model, variables = ((state.model, state.variables)
                      if isinstance(state, TrainState) else state)
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"predict: images must be (N, H, W, C), got {images.shape}")
  n, h, w, _ = images.shape
  valid = None
  if extents is not None:
    extents = np.asarray(extents)
    if extents.shape != (n, 2):
      raise ValueError(f"predict: extents shape {extents.shape} != {(n, 2)}")
    valid = ((np.arange(h)[None, :, None] < extents[:, 0, None, None]) &
             (np.arange(w)[None, None, :] < extents[:, 1, None, None]))
  x = images
  if lq_masks is not None:
    lq = np.asarray(lq_masks) > 0
    if lq.shape != (n, h, w):
      raise ValueError(f"predict: lq_masks shape {lq.shape} != {(n, h, w)}")
    if valid is not None:
      lq = lq & valid
    x = np.concatenate([images, lq[..., None].astype(np.float32)], -1)
  if batch_size < 1:
    raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
  mesh = _data_mesh_of(variables)
  put = lambda a: a
  if mesh is not None:  # variables on several devices: split each batch
    ndev = mesh.shape[parallel.DATA_AXIS]
    batch_size = -(-batch_size // ndev) * ndev
    put = lambda a: parallel.put(a, parallel.batch_sharding(mesh))
  hb, wb = bucket_size(h), bucket_size(w)
  nb = -(-n // batch_size)
  x = np.pad(x, ((0, nb * batch_size - n), (0, hb - h), (0, wb - w), (0, 0)))
  outs = [_forward_probs(model, variables, put(x[i * batch_size:(i + 1) * batch_size]))
          for i in range(nb)]  # dispatched asynchronously, fetched once
  probs = np.concatenate(jax.device_get(outs))[:n, :h, :w]
  if valid is not None:
    probs = np.where(valid, probs, 0.0).astype(np.float32)
  return probs


def predict(state, images, lq_masks=None, *, batch_size: int = 8,
            extents=None) -> np.ndarray:
  """(N, H, W) bool prediction (foreground probability > 0.5); see
  predict_proba for the arguments."""
  return predict_proba(state, images, lq_masks, batch_size=batch_size,
                       extents=extents) > 0.5


# --------------------------------------------------------------------------
# Checkpoints.

# Config fields that change the random stream or the model: a workdir holding
# a run with other values is not resumed.
_RESUME_FIELDS = ("task", "widths", "crop", "batch_size", "lr", "perturb",
                  "label_dropout", "strength_mix", "flips", "seed",
                  "steps_per_epoch")


class ConfigMismatch(ValueError):
  """A directory holds results of another configuration; resuming would mix
  them with this one. The message is one line naming the differing fields."""


def config_diff(stored, wanted, prefix: str = "") -> list[str]:
  """Dotted names of the fields where two JSON-like configs differ.

  Example: config_diff({"a": {"b": 1}}, {"a": {"b": 2}}) == ["a.b"].
  """
  if isinstance(stored, dict) and isinstance(wanted, dict):
    out = []
    for k in sorted(set(stored) | set(wanted)):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in stored or k not in wanted:
        out.append(name)
      else:
        out += config_diff(stored[k], wanted[k], name)
    return out
  return [] if stored == wanted else [prefix or "<config>"]


def data_digest(ds: Dataset) -> str:
  """sha256 of a Dataset's images, targets, others and extents (what a run
  trained on), so a resume on other data is refused."""
  h = hashlib.sha256()
  for a in (ds.images, ds.targets, ds.others, ds.extents):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.data)
  return h.hexdigest()[:16]


def _config_json(config: TrainConfig) -> dict:
  return json_safe(dataclasses.asdict(config))


def json_safe(x):
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return x


class Checkpoints:
  """The run's Orbax checkpoints: workdir/checkpoints/<step>/{state,best,record}.

  One atomic Orbax step holds the latest TrainState, the best variables so
  far and the host-side record (early-stopping counters, history, config), so
  a SIGKILL at any moment leaves a consistent checkpoint: either the previous
  step or the new one, never a latest without its matching best.
  """

  def __init__(self, workdir):
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, cleanup_tmp_directories=True,
            # Synchronous: the next step donates (reuses) the state buffers,
            # and on CPU a "host copy" may alias them. Saves are rare.
            enable_async_checkpointing=False))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state: TrainState, best: dict, record: dict) -> None:
    step = int(record["step"])
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.arrays()),
        best=ocp.args.StandardSave(best),
        record=ocp.args.JsonSave(json_safe(record))), force=True)

  def restore(self, template: TrainState):
    """Latest (state, best variables, record), shaped and sharded like
    `template`."""
    abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    step = self.latest_step()
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(template.arrays())),
        best=ocp.args.StandardRestore(abstract(template.variables)),
        record=ocp.args.JsonRestore()))
    state = template.replace(**out["state"])
    return state, out["best"], out["record"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# --------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class FitResult:
  """state_best: TrainState with the best-validation variables; state_last:
  the final state; history: one dict per epoch (step, epoch, loss,
  train_dice, val_dice, img_per_s); resumed_from: the step a previous run
  had reached, or None for a fresh run."""
  state_best: TrainState
  state_last: TrainState
  history: list
  best_val_dice: float
  best_step: int
  resumed_from: int | None


def _data_record(train: Dataset, val: Dataset) -> dict:
  return {"train": list(train.images.shape), "val": list(val.images.shape),
          "train_digest": data_digest(train), "val_digest": data_digest(val)}


def _fresh_record(config: TrainConfig, train: Dataset, val: Dataset,
                  context: dict | None) -> dict:
  return {"step": 0, "best_val_dice": -1.0, "best_step": 0, "bad_epochs": 0,
          "finished": False, "stop_reason": "", "history": [],
          "epoch_loss_sum": 0.0, "epoch_steps": 0, "epoch_counts": [0, 0, 0],
          "config": _config_json(config), "context": json_safe(context or {}),
          "data": _data_record(train, val)}


def _check_resumable(record: dict, config: TrainConfig, train, val, workdir,
                     context: dict | None = None):
  """Raises ConfigMismatch unless `workdir`'s run has this config, context
  (e.g. the pipeline's data and LQ perturbation) and training data."""
  want = _config_json(config)
  diff = [k for k in _RESUME_FIELDS if record["config"].get(k) != want[k]]
  diff += [f"context.{k}" for k in config_diff(record.get("context", {}),
                                                json.loads(json.dumps(json_safe(context or {}))))]
  if diff:
    raise ConfigMismatch(
        f"workdir {workdir} holds a run with a different config ({', '.join(diff)}"
        f"); use another workdir, the same config, or start fresh")
  data = _data_record(train, val)
  if record["data"] != data:
    fields = config_diff(record["data"], data)
    raise ConfigMismatch(f"workdir {workdir} holds a run on other data ({', '.join(fields)}); "
                         "use another workdir or start fresh")


def _copy(tree):
  # Own buffers: the train step donates (invalidates) the state it is given.
  return jax.tree.map(jnp.copy, tree)


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Throughput:
  """Images/s of the train steps alone (not compilation, validation or
  checkpointing): laps are taken right after a host sync."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.start = None
    self.rate = float("nan")
    self._time, self._steps = 0.0, 0

  @property
  def started(self) -> bool:
    return self.start is not None

  def restart(self, step: int) -> None:
    self.start = (time.perf_counter(), step)

  def lap(self, step: int) -> None:
    if self.start is None:
      return
    now = time.perf_counter()
    dt, n = now - self.start[0], step - self.start[1]
    if n > 0 and dt > 0:
      self.rate = n * self.batch_size / dt
      self._time += dt
      self._steps += n
    self.start = (now, step)

  def epoch_rate(self) -> float | None:
    """Mean img/s since the last call (None if nothing was timed: JSON-safe)."""
    rate = self._steps * self.batch_size / self._time if self._time else None
    self._time, self._steps = 0.0, 0
    return rate


def fit(config: TrainConfig, train: Dataset, val: Dataset, workdir, *,
        log: Callable[[str], None] = print, mesh=None,
        context: dict | None = None) -> FitResult:
  """Trains with early stopping on validation Dice; resumes from `workdir`.

  Args:
    config: the TrainConfig.
    train: the training Dataset (HQ, 80 %); placed once on every device.
    val: the validation Dataset (HQ, 20 %), turned once into a fixed
      (perturbed) validation set.
    workdir: directory for the Orbax checkpoints. If it already holds a run of
      this config, training resumes from its latest checkpoint; if that run
      had finished, its result is returned without training.
    log: called with one progress line at a time.
    mesh: device mesh (default: all devices on the `data` axis).
    context: JSON-able settings outside `config` that the run depends on
      (the pipeline passes its whole run config: data, LQ perturbation,
      seeds). Stored with the checkpoint; a resume with another context is
      refused (ConfigMismatch), as is one on other training data.

  Returns:
    FitResult.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if len(train) == 0:
    raise ValueError("fit: the training Dataset is empty")
  if train.channels != val.channels:
    raise ValueError(f"fit: train has {train.channels} channels, val {val.channels}")
  max_label = max(train.max_label, val.max_label)
  channels = input_channels(config.task, train.channels)
  state = create_train_state(config, channels, jax.random.PRNGKey(config.seed), mesh)
  ckpt = Checkpoints(workdir)
  resumed_from = None
  if ckpt.latest_step() is not None:
    state, best, record = ckpt.restore(state)
    _check_resumable(record, config, train, val, workdir, context)
    resumed_from = int(record["step"])
    log(f"resuming from step {resumed_from} in {ckpt.directory}")
  else:
    best, record = _copy(state.variables), _fresh_record(config, train, val, context)

  def result():
    ckpt.close()
    return FitResult(state_best=state.replace(**best), state_last=state,
                     history=record["history"],
                     best_val_dice=float(record["best_val_dice"]),
                     best_step=int(record["best_step"]), resumed_from=resumed_from)

  if record["finished"]:
    log(f"run already finished ({record['stop_reason']}); best val Dice "
        f"{record['best_val_dice']:.4f} at step {record['best_step']}")
    return result()

  data = parallel.place_dataset(train, mesh)
  valset = make_val_set(config, val, max_label, mesh)
  train_step = make_train_step(config, mesh, max_label)
  step = int(record["step"])
  pending = []  # device metrics not yet fetched: no host sync per step
  clock = _Throughput(config.batch_size)

  def sync():
    """Fetches pending metrics into the record (the host sync point)."""
    nonlocal pending
    for m in jax.device_get(pending):
      record["epoch_loss_sum"] += float(m["loss"])
      record["epoch_steps"] += 1
      record["epoch_counts"] = [a + int(b) for a, b in
                                zip(record["epoch_counts"], m["dice_counts"])]
    pending = []
    clock.lap(step)

  while not record["finished"]:
    if step >= config.max_steps:
      record.update(finished=True, stop_reason="max_steps")
      ckpt.save(state, best, record)
      break
    state, metrics = train_step(state, data)
    step += 1
    record["step"] = step
    pending.append(metrics)
    if not clock.started:  # first step of this process: exclude compilation
      jax.block_until_ready(metrics)
      clock.restart(step)
    epoch_end = step % config.steps_per_epoch == 0 or step >= config.max_steps
    if step % config.log_every == 0:
      sync()
      eta = (config.max_steps - step) * config.batch_size / clock.rate
      log(f"step {step}/{config.max_steps} | loss "
          f"{record['epoch_loss_sum'] / max(record['epoch_steps'], 1):.4f} | "
          f"best val Dice {max(record['best_val_dice'], 0.0):.4f} | "
          f"{clock.rate:.1f} img/s | ETA {_eta(eta)}")
    if epoch_end:
      sync()
      val_dice = evaluate(state, valset)
      entry = {"step": step, "epoch": len(record["history"]) + 1,
               "loss": record["epoch_loss_sum"] / max(record["epoch_steps"], 1),
               "train_dice": pooled_dice(record["epoch_counts"]),
               "val_dice": val_dice, "img_per_s": clock.epoch_rate()}
      record["history"].append(entry)
      record.update(epoch_loss_sum=0.0, epoch_steps=0, epoch_counts=[0, 0, 0])
      if val_dice > record["best_val_dice"]:
        record.update(best_val_dice=val_dice, best_step=step, bad_epochs=0)
        best = _copy(state.variables)
      else:
        record["bad_epochs"] += 1
      if record["bad_epochs"] >= config.patience:
        record.update(finished=True,
                      stop_reason=f"early stop (patience {config.patience})")
      elif step >= config.max_steps:
        record.update(finished=True, stop_reason="max_steps")
      ckpt.save(state, best, record)
      log(f"epoch {entry['epoch']} step {step} | loss {entry['loss']:.4f} | "
          f"train Dice {entry['train_dice']:.4f} | val Dice {val_dice:.4f} | "
          f"best {record['best_val_dice']:.4f} @ {record['best_step']}")
      clock.restart(step)
    elif step % config.checkpoint_every == 0:
      sync()
      ckpt.save(state, best, record)
      clock.restart(step)
  log(f"finished at step {step}: {record['stop_reason']}; best val Dice "
      f"{record['best_val_dice']:.4f} at step {record['best_step']}")
  return result()
