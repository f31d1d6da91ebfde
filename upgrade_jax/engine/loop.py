"""The training loop: epochs, early stopping on validation Dice, resume.

  fit(config, train, val, workdir) -> FitResult

reads top to bottom: make or restore the state, place the data, then steps
until max_steps or early stopping, syncing with the host only to log, to
validate at each epoch end and to checkpoint. A killed run resumes from its
latest checkpoint and replays the same random stream (state.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax import parallel
from upgrade_jax.data.types import Dataset
from upgrade_jax.engine.checkpoints import Checkpoints, LoopRecord, check_resumable
from upgrade_jax.engine.config import TrainConfig
from upgrade_jax.engine.evaluation import evaluate, make_val_set
from upgrade_jax.engine.state import (TrainState, create_train_state, learning_rate,
                                      network_channels, scale_learning_rate,
                                      set_learning_rate)
from upgrade_jax.engine.step import draw_indices, make_train_step

__all__ = ["FitResult", "fit"]


@dataclasses.dataclass
class FitResult:
  """state_best: TrainState with the best-validation variables; state_last:
  the final state; history: one dict per epoch (step, epoch, loss,
  train_dice, val_dice, img_per_s); resumed_from: the step a previous run
  had reached, or None for a fresh run; steps: the steps trained;
  stop_reason: why it stopped ("early stop (patience P)", "early stop
  (patience P, after N lr drops)", "annealed (...)" or "max_steps");
  lr_drops: how many plateaus lowered the learning rate; anneal_epochs: the
  final anneal's length (0: none).
  """
  state_best: TrainState
  state_last: TrainState
  history: list
  best_val_dice: float
  best_step: int
  resumed_from: int | None
  steps: int = 0
  stop_reason: str = ""
  lr_drops: int = 0
  anneal_epochs: int = 0

  @property
  def hit_cap(self) -> bool:
    """Whether max_steps, not the validation rule, ended the run."""
    return self.stop_reason == "max_steps"

  def summary(self, max_steps: int) -> dict:
    """What results.json records of a network's training (JSON-able)."""
    return {"steps": self.steps, "best_step": self.best_step,
            "best_val_dice": self.best_val_dice, "stop_reason": self.stop_reason,
            "hit_cap": self.hit_cap, "max_steps": int(max_steps),
            "evaluations": len(self.history), "lr_drops": self.lr_drops,
            "anneal_epochs": self.anneal_epochs}


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


class _HostBatches:
  """The streaming placement's batches: step s gets the B whole samples the
  replicated step would draw (step.draw_indices with the state's rng), sent
  from the host. Indices come `chunk` steps at a time, one host sync each;
  the host gathers a batch while the devices run the previous step (JAX
  dispatches asynchronously)."""

  def __init__(self, train: Dataset, rng, batch_size: int, chunk: int, mesh):
    self.train, self.mesh, self.chunk = train, mesh, chunk
    self.labels_as = parallel.label_dtype(train.targets, train.others)
    n = len(train)
    rng = np.asarray(parallel.fetch(rng))   # a host copy: the step donates the state's
    self._draw = jax.jit(jax.vmap(lambda s: draw_indices(rng, s, n, batch_size)))
    self._first, self._idx = None, None

  def get(self, step: int) -> parallel.DeviceData:
    if self._first is None or not self._first <= step < self._first + self.chunk:
      self._first = step
      self._idx = np.asarray(jax.device_get(self._draw(np.arange(step, step + self.chunk))))
    return parallel.put_batch(self.train, self._idx[step - self._first], self.mesh,
                              self.labels_as)


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
      (the pipeline passes its run key: data, LQ perturbation, seeds). Stored
      with the checkpoint; a resume with another context is refused
      (ConfigMismatch), as is one on other training data.

  Returns:
    FitResult.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if len(train) == 0:
    raise ValueError("fit: the training Dataset is empty")
  if train.channels != val.channels:
    raise ValueError(f"fit: train has {train.channels} channels, val {val.channels}")
  max_label = max(train.max_label, val.max_label)
  state = create_train_state(config, network_channels(config, train.channels),
                             jax.random.PRNGKey(config.seed), mesh)
  ckpt = Checkpoints(workdir)
  resumed_from = None
  if ckpt.latest_step() is not None:
    state, best, record = ckpt.restore(state, log=log)
    check_resumable(record, config, train, val, workdir, context)
    resumed_from = record.step
    log(f"resuming from step {resumed_from} in {ckpt.directory}")
  else:
    best, record = _copy(state.variables), LoopRecord.fresh(config, train, val, context)

  if record.finished:
    log(f"run already finished ({record.stop_reason}); best val Dice "
        f"{record.best_val_dice:.4f} at step {record.best_step}")
  else:
    state, best = _train(config, state, best, record, ckpt, train, val, max_label, mesh, log)
    log(f"finished at step {record.step}: {record.stop_reason}; best val Dice "
        f"{record.best_val_dice:.4f} at step {record.best_step}")
  ckpt.close()
  return FitResult(state_best=state.with_variables(best), state_last=state,
                   history=record.history, best_val_dice=float(record.best_val_dice),
                   best_step=int(record.best_step), resumed_from=resumed_from,
                   steps=int(record.step), stop_reason=str(record.stop_reason),
                   lr_drops=int(record.lr_drops), anneal_epochs=int(record.anneal_epochs))


def _train(config: TrainConfig, state: TrainState, best: dict, record: LoopRecord,
           ckpt: Checkpoints, train: Dataset, val: Dataset, max_label: int, mesh,
           log) -> tuple[TrainState, dict]:
  """Steps from record.step until the record is finished; returns (state, best).

  Metrics stay on the device until a sync point (log line, epoch end,
  checkpoint): no host round trip per step.
  """
  placement = parallel.choose_placement(config.data_placement, train, mesh)
  streamed = placement == "stream"
  if placement == "shard":
    log(f"training set of {parallel.dataset_bytes(train) / 2**30:.2f} GiB sharded over the "
        f"{mesh.shape[parallel.DATA_AXIS]} devices")
  if streamed:
    log(f"training set of {parallel.dataset_bytes(train) / 2**30:.2f} GiB streamed from the "
        "host, one batch a step")
    batches = _HostBatches(train, state.rng, config.batch_size, config.log_every, mesh)
  else:
    data = parallel.place_dataset(train, mesh, shard=placement == "shard")
  valset = make_val_set(config, val, max_label, mesh)
  train_step = make_train_step(config, mesh, max_label, streamed=streamed)
  pending = []
  clock = _Throughput(config.batch_size)

  def sync():
    for m in jax.device_get(pending):
      record.add_step_metrics(m)
    pending.clear()
    clock.lap(record.step)

  while not record.finished:
    if record.step >= config.max_steps:
      record.finish("max_steps")
      ckpt.save(state, best, record)
      break
    state, metrics = train_step(state, batches.get(record.step) if streamed else data)
    record.step += 1
    step = record.step
    pending.append(metrics)
    if not clock.started:  # first step of this process: exclude compilation
      jax.block_until_ready(metrics)
      clock.restart(step)
    if step % config.log_every == 0:
      sync()
      eta = (config.max_steps - step) * config.batch_size / clock.rate
      log(f"step {step}/{config.max_steps} | loss {record.mean_loss:.4f} | "
          f"best val Dice {max(record.best_val_dice, 0.0):.4f} | "
          f"{clock.rate:.1f} img/s | ETA {_eta(eta)}")
    if step % config.steps_per_epoch == 0 or step >= config.max_steps:
      sync()
      entry, improved = record.close_epoch(evaluate(state, valset), clock.epoch_rate(),
                                           config.patience, config.max_steps,
                                           config.lr_drops, config.patience_growth,
                                           config.anneal)
      if improved:
        best = _copy(state.variables)
      if entry.get("lr_drop"):
        state = scale_learning_rate(state, config.lr_drop_factor)
        log(f"plateau at step {step}: learning rate lowered to {learning_rate(state):.3g} "
            f"(drop {record.lr_drops} of {config.lr_drops})")
      if "anneal_lr" in entry:
        # The rate at the plateau: every drop made so far applied to lr.
        base = config.lr * config.lr_drop_factor ** record.lr_drops
        state = set_learning_rate(state, base * entry["anneal_lr"])
        if record.anneal_start == entry["epoch"]:
          log(f"plateau at step {step}: annealing the learning rate from {base:.3g} to 0 "
              f"over {record.anneal_epochs} epochs")
      # A checkpoint every checkpoint_every steps and when the run ends, not
      # at each new best: a killed run resumes from the last one and replays
      # the same steps (state.py), so it finds the same best again, and a
      # synchronous save costs about as much as a validation.
      if record.finished or step % config.checkpoint_every == 0:
        ckpt.save(state, best, record)
      log(f"epoch {entry['epoch']} step {step} | loss {entry['loss']:.4f} | "
          f"train Dice {entry['train_dice']:.4f} | val Dice {entry['val_dice']:.4f} | "
          f"best {record.best_val_dice:.4f} @ {record.best_step}")
      clock.restart(step)
    elif step % config.checkpoint_every == 0:
      sync()
      ckpt.save(state, best, record)
      clock.restart(step)
  return state, best
