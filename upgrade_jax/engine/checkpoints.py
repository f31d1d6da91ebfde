"""Checkpoints of a run, and the loop's host-side record that they carry.

One atomic Orbax step holds the latest TrainState, the best variables so far
and the `LoopRecord` (early-stopping counters, history, config, data shapes),
so a SIGKILL at any moment leaves a consistent checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from upgrade_jax.data.io import json_safe
from upgrade_jax.data.types import Dataset
from upgrade_jax.engine.config import TrainConfig
from upgrade_jax.engine.state import TrainState
from upgrade_jax.metrics import pooled_dice
from upgrade_jax.rundir import InputError

__all__ = ["LoopRecord", "Checkpoints", "check_resumable"]

# The record's layout: 1 = TrainConfig with task options at the top level
# (before the engine package); 2 = options inside config["task"].
RECORD_LAYOUT = 2


@dataclasses.dataclass
class LoopRecord:
  """What the loop knows besides the arrays (saved as JSON with each checkpoint).

  config: TrainConfig.to_json() of the run; data: shapes of the training and
  validation images; step: completed steps; best_val_dice / best_step: the
  best validation so far (-1 before the first); bad_epochs: epochs since it;
  finished / stop_reason; history: one dict per epoch; epoch_*: running sums
  of the current epoch's train metrics.
  """

  config: dict
  data: dict
  step: int = 0
  best_val_dice: float = -1.0
  best_step: int = 0
  bad_epochs: int = 0
  finished: bool = False
  stop_reason: str = ""
  history: list = dataclasses.field(default_factory=list)
  epoch_loss_sum: float = 0.0
  epoch_steps: int = 0
  epoch_counts: list = dataclasses.field(default_factory=lambda: [0, 0, 0])
  layout: int = RECORD_LAYOUT

  @classmethod
  def fresh(cls, config: TrainConfig, train: Dataset, val: Dataset) -> "LoopRecord":
    return cls(config=json_safe(config.to_json()),
               data={"train": list(train.images.shape), "val": list(val.images.shape)})

  @classmethod
  def from_json(cls, d: dict, where) -> "LoopRecord":
    d = dict(d)
    layout = d.pop("layout", 1)
    if layout == 1:  # a checkpoint of the single-module train.py
      d["config"] = _config_from_layout_1(d["config"])
    elif layout != RECORD_LAYOUT:
      raise InputError(f"checkpoint in {where} has record layout {layout}, newer than this "
                       f"upgrade_jax reads ({RECORD_LAYOUT}); upgrade the package or use "
                       "another out_dir")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})

  def add_step_metrics(self, metrics: dict) -> None:
    """Adds one fetched train step's {"loss", "dice_counts"} to the epoch sums."""
    self.epoch_loss_sum += float(metrics["loss"])
    self.epoch_steps += 1
    self.epoch_counts = [a + int(b) for a, b in zip(self.epoch_counts,
                                                    metrics["dice_counts"])]

  def close_epoch(self, val_dice: float, img_per_s, patience: int,
                  max_steps: int) -> tuple[dict, bool]:
    """Ends an epoch: appends its history entry, updates early stopping.

    Returns:
      (entry, improved): the epoch's history dict, and whether `val_dice` is
      a new best (the caller keeps the variables).
    """
    entry = {"step": self.step, "epoch": len(self.history) + 1,
             "loss": self.epoch_loss_sum / max(self.epoch_steps, 1),
             "train_dice": pooled_dice(self.epoch_counts), "val_dice": val_dice,
             "img_per_s": img_per_s}
    self.history.append(entry)
    self.epoch_loss_sum, self.epoch_steps, self.epoch_counts = 0.0, 0, [0, 0, 0]
    improved = val_dice > self.best_val_dice
    if improved:
      self.best_val_dice, self.best_step, self.bad_epochs = val_dice, self.step, 0
    else:
      self.bad_epochs += 1
    if self.bad_epochs >= patience:
      self.finish(f"early stop (patience {patience})")
    elif self.step >= max_steps:
      self.finish("max_steps")
    return entry, improved

  def finish(self, reason: str) -> None:
    self.finished, self.stop_reason = True, reason

  @property
  def mean_loss(self) -> float:
    return self.epoch_loss_sum / max(self.epoch_steps, 1)


def _config_from_layout_1(c: dict) -> dict:
  """A layout-1 TrainConfig dict (task options at the top) in layout 2."""
  c = dict(c)
  task = {"name": c.pop("task")}
  options = {k: c.pop(k) for k in ("perturb", "label_dropout", "strength_mix") if k in c}
  if task["name"] == "upgrade":
    task.update(options)
  c["task"] = task
  return c


def _canonical(x):
  return json.loads(json.dumps(json_safe(x), sort_keys=True))


def check_resumable(record: LoopRecord, config: TrainConfig, train: Dataset, val: Dataset,
                    workdir) -> None:
  """Raises InputError naming what differs when `workdir`'s run is not a run
  of `config` on data of these shapes (TrainConfig.RESUMABLE_CHANGES may differ)."""
  want = _canonical(config.to_json())
  have = _canonical(record.config)
  diff = sorted(k for k in set(want) | set(have)
                if k not in TrainConfig.RESUMABLE_CHANGES and want.get(k) != have.get(k))
  if diff:
    detail = ", ".join(f"{k}: {have.get(k)} -> {want.get(k)}" for k in diff)
    raise InputError(f"{workdir} holds a training run with another config ({detail}); "
                     "use another out_dir, or the same settings to resume it")
  shapes = {"train": list(train.images.shape), "val": list(val.images.shape)}
  if record.data != shapes:
    raise InputError(f"{workdir} holds a training run on data of shapes {record.data}, not "
                     f"{shapes}; use another out_dir, or the same data to resume it")


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

  def save(self, state: TrainState, best: dict, record: LoopRecord) -> None:
    self.manager.save(record.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.arrays()),
        best=ocp.args.StandardSave(best),
        record=ocp.args.JsonSave(json_safe(dataclasses.asdict(record)))), force=True)

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
    return state, out["best"], LoopRecord.from_json(out["record"], self.directory)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
