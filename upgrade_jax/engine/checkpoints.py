"""Checkpoints of a run, and the loop's host-side record that they carry.

One atomic Orbax step holds the latest TrainState, the best variables so far
and the `LoopRecord` (early-stopping counters, history, config, data shapes),
so a SIGKILL at any moment leaves a consistent checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from upgrade_jax.files import json_safe
from upgrade_jax.data.types import Dataset
from upgrade_jax.engine.config import TrainConfig
from upgrade_jax.engine.state import TrainState
from upgrade_jax.metrics import pooled_dice
from upgrade_jax.rundir import InputError, check_space, disk_full

__all__ = ["LoopRecord", "Checkpoints", "check_resumable", "ConfigMismatch", "config_diff",
           "arrays_digest",
           "data_digest"]

# The layout of a checkpoint: 3 = the state holds `ema_params` (the weights'
# moving average). Older layouts (1, 2) have no average and are not resumed.
RECORD_LAYOUT = 3


class ConfigMismatch(InputError):
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
  trained on), so a resume on other data is refused. A compact set hashes as
  its float32 form (normalised a sample at a time): it trains identically,
  so a run may resume on either form. Labels hash as int32, whatever type
  holds them."""
  h = hashlib.sha256()
  h.update(f"float32{ds.images.shape}".encode())
  for i in range(len(ds)):
    h.update(np.ascontiguousarray(ds.normalised([i])).data)
  for a in (ds.targets, ds.others, ds.extents):
    a = np.ascontiguousarray(a, np.int32)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.data)
  return h.hexdigest()[:16]


def _at(tree, dotted: str):
  """The value at a dotted path of nested dicts (None where it is missing)."""
  for k in dotted.split("."):
    tree = tree.get(k) if isinstance(tree, dict) else None
  return tree


def _data_record(train: Dataset, val: Dataset) -> dict:
  return {"train": list(train.images.shape), "val": list(val.images.shape),
          "train_digest": data_digest(train), "val_digest": data_digest(val)}


@dataclasses.dataclass
class LoopRecord:
  """What the loop knows besides the arrays (saved as JSON with each checkpoint).

  config: TrainConfig.to_json() of the run; data: shapes and digests of the
  training and validation sets; context: JSON-able settings outside the
  config that the run depends on (the pipeline's run key); step: completed steps; best_val_dice / best_step: the
  best validation so far (-1 before the first); best_epoch: its epoch (from
  1); bad_epochs: epochs since it, or since the last learning-rate drop;
  stage_start: the epoch of the last drop (0 before any); lr_drops: drops
  made; anneal_start / anneal_epochs: the epoch the final anneal began at and
  its length (0 before it); finished / stop_reason; history: one dict per epoch; epoch_*: running sums
  of the current epoch's train metrics.
  """

  config: dict
  data: dict
  context: dict = dataclasses.field(default_factory=dict)
  step: int = 0
  best_val_dice: float = -1.0
  best_step: int = 0
  best_epoch: int = 0
  bad_epochs: int = 0
  stage_start: int = 0
  lr_drops: int = 0
  anneal_start: int = 0
  anneal_epochs: int = 0
  finished: bool = False
  stop_reason: str = ""
  history: list = dataclasses.field(default_factory=list)
  epoch_loss_sum: float = 0.0
  epoch_steps: int = 0
  epoch_counts: list = dataclasses.field(default_factory=lambda: [0, 0, 0])
  layout: int = RECORD_LAYOUT

  @classmethod
  def fresh(cls, config: TrainConfig, train: Dataset, val: Dataset,
            context: dict | None = None) -> "LoopRecord":
    return cls(config=json_safe(config.to_json()), data=_data_record(train, val),
               context=_canonical(context or {}))

  @classmethod
  def from_json(cls, d: dict, where) -> "LoopRecord":
    d = dict(d)
    layout = d.pop("layout", 1)
    if layout < RECORD_LAYOUT:
      raise InputError(f"checkpoint in {where} was made by an older upgrade_jax (layout "
                       f"{layout}, before the weights' moving average) and cannot be "
                       "resumed; use another out_dir, or delete it to start fresh")
    if layout > RECORD_LAYOUT:
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

  def close_epoch(self, val_dice: float, img_per_s, patience: int, max_steps: int,
                  lr_drops: int = 0, patience_growth: float = 0.0,
                  anneal: float = 0.0) -> tuple[dict, bool]:
    """Ends an epoch: appends its history entry, updates early stopping.

    A stage (the epochs since the last learning-rate drop) waits
    W = max(patience, ceil(patience_growth * (best_epoch - stage_start)))
    epochs without a new best. Then, while fewer than `lr_drops` drops were
    made, the entry gets "lr_drop": True (the caller lowers the rate) and a
    new stage starts; else, with `anneal` a > 0, the final anneal starts:
    L = ceil(a * epoch) more epochs whose rates fall along a cosine to 0,
    entry["anneal_lr"] = the factor (of the rate at the plateau) for the next
    epoch, anneal_cosine(j, L) for its j-th epoch, and the run stops after
    the L-th, with no early stop meanwhile (the best is still kept); else
    the run stops.

    Returns:
      (entry, improved): the epoch's history dict, and whether `val_dice` is
      a new best (the caller keeps the variables).
    """
    epoch = len(self.history) + 1
    entry = {"step": self.step, "epoch": epoch,
             "loss": self.epoch_loss_sum / max(self.epoch_steps, 1),
             "train_dice": pooled_dice(self.epoch_counts), "val_dice": val_dice,
             "img_per_s": img_per_s}
    self.history.append(entry)
    self.epoch_loss_sum, self.epoch_steps, self.epoch_counts = 0.0, 0, [0, 0, 0]
    improved = val_dice > self.best_val_dice
    if improved:
      self.best_val_dice, self.best_step, self.best_epoch = val_dice, self.step, epoch
      self.bad_epochs = 0
    else:
      self.bad_epochs += 1
    wait = max(int(patience),
               math.ceil(patience_growth * max(self.best_epoch - self.stage_start, 0)))
    if self.anneal_epochs:
      j = epoch - self.anneal_start   # anneal epochs done
      if j >= self.anneal_epochs:
        self.finish(f"annealed ({self.anneal_epochs} epochs from a plateau at step "
                    f"{self.history[self.anneal_start - 1]['step']})")
      else:
        entry["anneal_lr"] = anneal_cosine(j + 1, self.anneal_epochs)
    elif self.bad_epochs >= wait:
      if self.lr_drops < lr_drops:
        self.lr_drops += 1
        self.bad_epochs, self.stage_start = 0, epoch
        entry["lr_drop"] = True
      elif anneal > 0:
        self.anneal_start, self.anneal_epochs = epoch, max(1, math.ceil(anneal * epoch))
        entry["anneal_lr"] = anneal_cosine(1, self.anneal_epochs)
      else:
        drops = (f", after {self.lr_drops} lr drop{'s' if self.lr_drops != 1 else ''}"
                 if self.lr_drops else "")
        self.finish(f"early stop (patience {wait}{drops})")
    if not self.finished and self.step >= max_steps:
      self.finish("max_steps")
    return entry, improved

  def finish(self, reason: str) -> None:
    self.finished, self.stop_reason = True, reason

  @property
  def mean_loss(self) -> float:
    return self.epoch_loss_sum / max(self.epoch_steps, 1)


def _canonical(x):
  return json.loads(json.dumps(json_safe(x), sort_keys=True))


def anneal_cosine(j: int, length: int) -> float:
  """The learning-rate factor of the j-th of `length` anneal epochs (1-based):
  0.5 (1 + cos(pi j / (length + 1))), from just below 1 down towards 0, so
  that no epoch trains at rate 0."""
  return 0.5 * (1.0 + math.cos(math.pi * j / (length + 1)))


def check_resumable(record: LoopRecord, config: TrainConfig, train: Dataset, val: Dataset,
                    workdir, context: dict | None = None) -> None:
  """Raises ConfigMismatch naming what differs unless `workdir`'s run is a run
  of `config` (TrainConfig.RESUMABLE_CHANGES may differ), with this `context`
  (e.g. the pipeline's data and LQ perturbation), on the same training data."""
  # A field the stored config lacks was added to TrainConfig after the run
  # was made, and the run trained with its default.
  defaults = {k: v for k, v in TrainConfig().to_json().items() if k != "task"}
  want, have = _canonical(config.to_json()), _canonical({**defaults, **record.config})
  diff = [f"{k}: {_at(have, k)} -> {_at(want, k)}" for k in config_diff(have, want)
          if k.split(".")[0] not in TrainConfig.RESUMABLE_CHANGES]
  diff += [f"context.{k}" for k in config_diff(_canonical(record.context),
                                                _canonical(context or {}))]
  if diff:
    raise ConfigMismatch(f"{workdir} holds a training run with another config "
                         f"({', '.join(diff)}); use another out_dir, the same settings to "
                         "resume it, or start fresh")
  data = _data_record(train, val)
  if record.data != data:
    raise ConfigMismatch(f"{workdir} holds a training run on other data "
                         f"({', '.join(config_diff(record.data, data))}); use another "
                         "out_dir, the same data to resume it, or start fresh")


def arrays_digest(tree) -> str | None:
  """sha256 (16 hex digits) of a pytree's arrays: each leaf's path, dtype,
  shape and bytes, in tree order, from a host copy. None when an array is
  split over processes (no process holds it whole: nothing to compare)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = leaf
    if isinstance(x, jax.Array):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
      if not x.is_fully_addressable:
        shard = x.addressable_shards[0]
        if shard.data.shape != x.shape:
          return None
        x = shard.data
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# What one step takes beyond its arrays' bytes: Orbax's metadata, index and
# JSON files (tens of KB for these trees), with room to spare.
STEP_OVERHEAD_BYTES = 1 << 20


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class _HeldReports:
  """Holds what Orbax's writer threads report while a step is saved (absl
  log lines, tracebacks of callbacks on a closed event loop, unraisable
  exceptions: ~1000 lines for one failed write) and prints them afterwards, unless `drop` is set:
  a save that fails on a full disk is then one DiskFull line, not the same
  error from every thread."""

  def __init__(self):
    self.drop, self._records, self._text = False, [], io.StringIO()

  def filter(self, record):   # a logging filter: every absl record is held
    self._records.append(record)
    return False

  def settle(self, quiet_s: float = 0.5, max_s: float = 10.0) -> None:
    """Waits until nothing has been reported for quiet_s (at most max_s)."""
    t0, seen, since = time.monotonic(), -1, time.monotonic()
    while time.monotonic() - t0 < max_s:
      n = len(self._records) + len(self._text.getvalue())
      if n != seen:
        seen, since = n, time.monotonic()
      elif time.monotonic() - since >= quiet_s:
        return
      time.sleep(0.05)

  def __enter__(self):
    self._logger = logging.getLogger("absl")
    self._logger.addFilter(self)
    self._stderr, sys.stderr = sys.stderr, self._text
    self._hook, sys.unraisablehook = sys.unraisablehook, self._records.append
    return self

  def __exit__(self, *exc):
    sys.stderr, sys.unraisablehook = self._stderr, self._hook
    self._logger.removeFilter(self)
    if not self.drop:
      for record in self._records:
        if isinstance(record, logging.LogRecord):
          self._logger.handle(record)
        else:
          self._hook(record)
      self._stderr.write(self._text.getvalue())
    return False


class Checkpoints:
  """The run's Orbax checkpoints: workdir/checkpoints/<step>/{state,best,record}.

  One atomic Orbax step holds the latest TrainState, the best variables so
  far and the host-side record (early-stopping counters, history, config), so
  a SIGKILL at any moment leaves a consistent checkpoint: either the previous
  step or the new one, never a latest without its matching best.

  Each step also holds the digest of its arrays (`arrays_digest` of the
  state and of the best variables). A restore checks it: a step that does
  not read back or whose arrays differ from their digest is corrupted, and
  the previous step is used instead (one log line; the steps since are
  replayed exactly), or, with none left, the run is refused in one line.
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
    arrays = state.arrays()
    digest = {"state": arrays_digest(arrays), "best": arrays_digest(best)}
    where = self.directory / str(record.step)
    needed = _nbytes((arrays, best)) + STEP_OVERHEAD_BYTES
    check_space(where, needed)   # a disk already full: one line, nothing written
    with _HeldReports() as held:
      try:
        self.manager.save(record.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            best=ocp.args.StandardSave(best),
            record=ocp.args.JsonSave(json_safe(dataclasses.asdict(record))),
            digest=ocp.args.JsonSave(digest)), force=True)
      except Exception as e:   # noqa: BLE001 - only a full disk is translated
        full = disk_full(e, where, needed)
        if full is None:
          raise
        # The disk filled up during the write. Orbax writes a step under
        # <step>.orbax-checkpoint-tmp* and renames it only when complete, so
        # the half-written step never has its final name; it is removed now
        # (it holds space the user is about to free), once Orbax's threads
        # have stopped, and their reports of the same error are dropped.
        try:
          self.manager.wait_until_finished()
        except Exception:   # noqa: BLE001 - the same failure, reported by `full`
          pass
        held.settle()   # TensorStore's callbacks go on for a moment after the raise
        for partial in self.directory.glob(f"{record.step}.orbax-checkpoint-tmp*"):
          shutil.rmtree(partial, ignore_errors=True)
        held.drop = True
        raise full from None

  def restore(self, template: TrainState, log=print):
    """The latest good (state, best variables, record), shaped and sharded
    like `template`; a corrupted step is skipped for the one before it,
    said in one `log` line (see the class docstring)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self._restore_step(step, template)
      except (InputError, ConfigMismatch):
        raise   # an old layout or another run: not corruption
      except Exception as e:   # noqa: BLE001 - any failure to read back is corruption
        why = " ".join(str(e).split())[:160] or type(e).__name__
        where = self.directory / str(step)
        if i + 1 < len(steps):
          log(f"WARNING: checkpoint {where} is corrupted ({why}); resuming from step "
              f"{steps[i + 1]} instead")
          self.manager.delete(step)   # the replay saves this step afresh
        else:
          raise InputError(f"{self.directory}: every checkpoint is corrupted (step {step}: "
                           f"{why}); delete {self.directory} to train this network afresh"
                           ) from None

  def _restore_step(self, step: int, template: TrainState):
    abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)
    # The record first: an old layout is refused with its own message, not
    # with Orbax's error about a missing array.
    record = self.manager.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))["record"]
    record = LoopRecord.from_json(record, self.directory)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(template.arrays())),
        best=ocp.args.StandardRestore(abstract(template.variables))))
    stored = self._digest(step)
    if stored is not None:
      got = {"state": arrays_digest(out["state"]), "best": arrays_digest(out["best"])}
      for k in ("state", "best"):
        if stored.get(k) is not None and got[k] is not None and stored[k] != got[k]:
          raise ValueError(f"its {k} arrays do not match their checksum")
    state = template.replace(**out["state"])
    return state, out["best"], record

  def _digest(self, step: int) -> dict | None:
    """The step's stored digest, or None (a checkpoint made before them)."""
    if not (self.directory / str(step) / "digest").exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(
        digest=ocp.args.JsonRestore()))["digest"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
