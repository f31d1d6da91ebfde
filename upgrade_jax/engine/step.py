"""The jitted, data-parallel train step, and the batches it draws.

Each step samples whole samples from the device-resident training set, builds
the task's (inputs, target) pair under the step's key, crops and flips, and
takes one Adam step on the task's loss. One global-batch program under
jax.jit (parallel.py): the batch axis is constrained to the `data` mesh axis,
XLA partitions it and all-reduces the gradients, and BatchNorm statistics are
those of the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from upgrade_jax import parallel
from upgrade_jax.engine import xla_options
from upgrade_jax.engine.config import StepConfig, TrainConfig
from upgrade_jax.engine.state import TrainState, ema_update
from upgrade_jax.losses import foreground_of_logits
from upgrade_jax.metrics import FOREGROUND_THRESHOLD, dice_counts, extent_mask

__all__ = ["Batch", "crop_and_flip", "draw_indices", "gather_samples", "take_samples",
           "sample_crops", "make_train_step", "TrainStep"]


class Batch(NamedTuple):
  images: Any   # (B, h, w, C) f32
  targets: Any  # (B, h, w) i32
  others: Any   # (B, h, w) i32
  valid: Any    # (B, h, w) bool


def _flip(x, flag, axis):
  """Per-sample flip of batch x along `axis` where flag (B,) is True."""
  f = flag.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(f, jnp.flip(x, axis), x)


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


def draw_indices(rng, step, n, batch_size: int):
  """(B,) int32: the samples the train step at `step` draws from a set of n
  (an int or a traced () int32).

  The step's key is fold_in(rng, step), split in three: this uses the
  first. The streaming placement calls it on the host side (vmapped over
  steps) to send the very samples the replicated placement would gather.
  """
  k_idx = jax.random.split(jax.random.fold_in(rng, step), 3)[0]
  return jax.random.randint(k_idx, (batch_size,), 0, n)


def take_samples(data: parallel.DeviceData, idx=None) -> tuple[Batch, Any]:
  """Whole samples `idx` (B,) of `data` (all of it when None: a streamed
  batch), images normalised (compact ones divided by their scale) and labels
  widened to int32, with their valid masks; and their (B, 2) extents."""
  pick = (lambda x: x) if idx is None else (lambda x: x[idx])  # noqa: E731
  _, h, w = data.targets.shape
  ext = pick(data.extents)
  images = pick(data.images)
  valid = extent_mask(ext, h, w, xp=jnp)
  if data.scale is not None:   # compact: the same float32 arithmetic as stacking.stack_samples
    # XLA rewrites x / broadcast(s) as x * broadcast(1 / s), which rounds
    # differently; the barrier keeps a true division, so a compact set trains
    # bit for bit as its host-normalised float32 form.
    divisor = jax.lax.optimization_barrier(
        jnp.broadcast_to(pick(data.scale)[:, None, None, None], images.shape))
    images = images.astype(jnp.float32)
    if data.offset is not None:   # percentile: (x - low) / (high - low), padding stays 0
      images = jnp.where(valid[..., None],
                         (images - pick(data.offset)[:, None, None, None]) / divisor, 0.0)
    else:
      images = images / divisor
  # Labels are stored compactly (parallel.label_dtype); the tasks see int32.
  batch = Batch(images, pick(data.targets).astype(jnp.int32),
                pick(data.others).astype(jnp.int32), valid)
  return batch, ext


def gather_samples(key, data: parallel.DeviceData, batch_size: int) -> Batch:
  """Random whole samples (B, H, W, ...) with their valid masks, and their
  (B, 2) extents."""
  n = data.targets.shape[0] if data.count is None else data.count
  idx = jax.random.randint(key, (batch_size,), 0, n)
  return take_samples(data, idx)


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


class TrainStep:
  """The train step of a device-resident set: a gather of the step's batch,
  then the step proper on that batch (the streamed step).

  Why two programs: the gather's depends on the set's size N, the step's
  only on the batch. Every network of a run (and of a test session: the
  persistent XLA cache) with the same StepConfig, sample shape and mesh then
  shares one compiled step, whatever its N; only the small gather is
  compiled per set. The step's arithmetic is that of one fused program: the
  batch is the same rows, normalised inside the step (the replicated, sharded
  and streamed placements train bit for bit alike, tests/test_parallel.py).

  Call: step(state, data) -> (state, metrics), state donated. `lower(state,
  data).compile()` gives the same call compiled ahead of time (benchmarks).
  """

  def __init__(self, gather, core):
    self.gather, self.core = gather, core

  def __call__(self, state: TrainState, data: parallel.DeviceData):
    return self.core(state, self.gather(state.rng, state.step, data))

  def lower(self, state: TrainState, data: parallel.DeviceData):
    batch = self.gather.eval_shape(state.rng, state.step, data)
    return _Lowered(self.gather.lower(state.rng, state.step, data),
                    self.core.lower(state, batch))


class _Lowered(NamedTuple):
  gather: Any
  core: Any

  def compile(self):
    return _Compiled(self.gather.compile(), self.core.compile())


class _Compiled(TrainStep):
  """TrainStep's call on the two compiled programs, and their analyses."""

  # The step proper's (its convolutions, all-reduces and FLOPs); the
  # gather is a few row copies.
  def as_text(self):
    return self.core.as_text()

  def cost_analysis(self):
    return self.core.cost_analysis()

  def memory_analysis(self):
    """The two programs as one: the set (the gather's argument) and the
    state are live together, the batch once (the gather's output is the
    step's argument); temporaries are the larger program's."""
    g, c = self.gather.memory_analysis(), self.core.memory_analysis()
    return _Memory(c.argument_size_in_bytes + g.argument_size_in_bytes - g.output_size_in_bytes,
                   c.output_size_in_bytes, max(c.temp_size_in_bytes, g.temp_size_in_bytes),
                   c.alias_size_in_bytes)


class _Memory(NamedTuple):
  argument_size_in_bytes: int
  output_size_in_bytes: int
  temp_size_in_bytes: int
  alias_size_in_bytes: int


def make_train_step(config: TrainConfig | StepConfig, mesh, max_label: int, *,
                    streamed: bool = False):
  """The jitted, data-parallel train step.

  Built from the StepConfig (`config.step`) only and cached per (StepConfig,
  mesh, max_label, streamed), so fits that differ only in loop settings,
  seed or learning rate compile once. `max_label` counts only for a task
  that reads it (Task.uses_max_label).

  Args:
    streamed: `data` is not the training set but the B samples this step
      draws (parallel.put_batch of the host's draw_indices), used in order.

  Returns:
    train_step(state, data) -> (state, metrics): state is donated; data is
    the parallel.DeviceData of the training set (or of the step's batch when
    streamed); metrics = {"loss": () f32, "dice_counts": (3,) i32 train
    TP/FP/FN at threshold 0.5}. Not streamed: a TrainStep (its batch
    gathered on the device by a program of its own).
  """
  step = config.step if isinstance(config, TrainConfig) else config
  max_label = int(max_label) if step.task.uses_max_label else 0
  core = _build_train_step(step, mesh, max_label)
  if streamed:
    return core
  return TrainStep(_build_gather(step.batch_size, mesh), core)


@functools.lru_cache(maxsize=16)
def _build_gather(batch_size: int, mesh):
  """jit(rng, step, data) -> the DeviceData of the B whole samples the step
  at `step` draws (draw_indices), its rows sharded over `data` as put_batch
  lays out a streamed batch; count None (the step reads every row)."""
  def gather(rng, step, data: parallel.DeviceData) -> parallel.DeviceData:
    idx = draw_indices(rng, step, data.count, batch_size)
    return jax.tree.map(lambda x: x[idx], data._replace(count=None))

  # Stated, not inferred: on any mesh the batch is laid out as put_batch lays
  # it (XLA would choose replicated on one device), so the gathered and the
  # streamed batch run one step program.
  return jax.jit(gather, out_shardings=parallel.batch_sharding(mesh))


@functools.lru_cache(maxsize=16)
def _build_train_step(config: StepConfig, mesh, max_label: int):
  parallel.check_batch(config.batch_size, mesh)
  task = config.task
  rep = parallel.replicated(mesh)

  def train_step(state: TrainState, data: parallel.DeviceData):
    key = jax.random.fold_in(state.rng, state.step)
    _, k_pair, k_geo = jax.random.split(key, 3)
    # The pair (e.g. the perturbation P) is made on whole samples and cropped
    # afterwards when the task needs it (Task.whole_samples: the paper
    # perturbs whole slices). Other tasks crop first, so the step never moves
    # whole large images. `data` is the step's batch, in order (TrainStep's
    # gather, or the streamed batch).
    full, ext = take_samples(data)
    full = parallel.shard_batch(full, mesh)
    pair = functools.partial(task.pair, max_label=max_label, train=True)
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
      variables = {"params": params, "batch_stats": state.batch_stats}
      if task.uses_features:  # e.g. Partial Labelling's centroids
        (logits, features), updates = state.model.apply(
            variables, inputs, train=True, return_features=True, mutable=["batch_stats"])
        # A key of its own, folded from the pair's, so the other tasks'
        # random streams stay as they were.
        loss = task.feature_loss(logits, features, target, valid, step=state.step,
                                 key=jax.random.fold_in(k_pair, 1))
      else:
        logits, updates = state.model.apply(
            variables, inputs, train=True, mutable=["batch_stats"])
        loss = task.loss(logits, target, valid)
      return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    hard = target if target.dtype == jnp.bool_ else target > FOREGROUND_THRESHOLD  # soft or coded targets
    counts = dice_counts(foreground_of_logits(logits), hard, valid)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params,
                                                    state.step + 1, config.ema_decay))
    return new_state, {"loss": loss, "dice_counts": counts}

  # XLA's default compile: without YNNPACK, XLA:CPU's gradients are wrong
  # here (xla_options).
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(rep, rep),
                 compiler_options=xla_options.compiler_options("train"))
