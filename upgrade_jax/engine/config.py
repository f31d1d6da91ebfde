"""The configuration of one training run, and the part the train step reads.

`TrainConfig` holds everything a run needs, in three groups: the task (with
its own options), what the step and the model read, and the loop's settings.
`StepConfig` is the step's part, derived from a TrainConfig: the train step
is built from a StepConfig only, so it cannot read a loop setting, and two
fits that differ only in loop settings (max_steps, patience, the seed, the
learning rate, which lives in the optimizer state) share one compiled step.
"""

from __future__ import annotations

import dataclasses

from upgrade_jax.engine.tasks import Task, Upgrade, make_task
from upgrade_jax.parallel import PLACEMENTS

__all__ = ["TrainConfig", "StepConfig"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the train step reads (frozen, hashable: the step's cache key).

  Attributes: see TrainConfig.
  """

  task: Task
  widths: tuple[int, ...]
  conv_impl: str
  crop: int
  batch_size: int
  flips: bool
  ema_decay: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run (frozen, hashable).

  The task:
    task: a Task (engine.tasks), e.g. Upgrade(perturb=...) or Segment(); a
      registered name ("upgrade", "segment") stands for the task with its
      default options.
  The step and the model (StepConfig):
    widths: UNet widths, 4 encoder blocks + bottleneck.
    conv_impl: conv implementation name (models.conv.get_conv).
    crop: side of the square training crop; clipped to the dataset's padded
      size. Multiples of 16 avoid padding inside the UNet.
    batch_size: global batch, split over the devices (a multiple of them).
    flips: random horizontal and vertical flips of the crops.
    ema_decay: decay of the moving average of the weights that validation,
      checkpoint selection and prediction use (0: the raw weights). Why: at
      a constant Adam learning rate the raw weights' validation Dice jumps
      by 0.05-0.1 between validations, so early stopping on it stopped on
      a lucky early peak (BUILD_NOTES.md).
  The state:
    lr: Adam learning rate (held in the optimizer state).
    seed: the run's seed; all keys derive from it.
  The loop:
    max_steps: hard limit on train steps.
    steps_per_epoch: steps between validations (the early-stopping unit).
    patience: epochs without validation improvement before stopping (or
      before lowering the learning rate, while lr_drops remain).
    lr_drops: how many times a plateau lowers the learning rate instead of
      ending the run (0: the first plateau ends it). Why: at a constant Adam
      rate the validation Dice plateaus while a lower rate still gains
      0.005-0.03 (BUILD_NOTES.md); the counter starts
      afresh after each drop.
    lr_drop_factor: what a drop multiplies the learning rate by, in (0, 1).
    patience_growth: g >= 0; the patience of a stage becomes
      max(patience, ceil(g * epochs the stage took to reach its best)), so a
      network that still improves slowly waits longer (0: fixed patience).
    anneal: a >= 0; at the plateau that would end the run (no drops left),
      anneal instead: ceil(a * epochs so far) more epochs at rates falling
      along a cosine to 0 (checkpoints.anneal_cosine), then stop (0: stop at
      the plateau). Why: a plateau at a constant rate is that rate's noise
      floor, not the network's (BUILD_NOTES.md, "Convergence of the rule").
    log_every: steps between progress lines (the only host syncs).
    checkpoint_every: steps between checkpoints (also one at the end); each
      holds the best variables so far, and a resumed run replays the steps
      since the last one exactly.
    eval_batch_size: validation batch (rounded up to a device multiple).
    data_placement: where the training set lives (parallel.PLACEMENTS):
      "replicate" on every device, "shard" its samples over the devices,
      "stream" from the host one batch a step, or "auto": the first that
      fits in half a device's memory (parallel.choose_placement). Same
      results in every placement.
  """

  task: Task = Upgrade()
  widths: tuple[int, ...] = (16, 32, 64, 128, 128)
  conv_impl: str = "xla"
  crop: int = 128
  batch_size: int = 8
  flips: bool = True
  ema_decay: float = 0.99
  lr: float = 1e-3
  seed: int = 0
  max_steps: int = 5000
  steps_per_epoch: int = 100
  patience: int = 10
  lr_drops: int = 0
  lr_drop_factor: float = 0.1
  patience_growth: float = 0.0
  anneal: float = 0.0
  log_every: int = 50
  checkpoint_every: int = 500
  eval_batch_size: int = 8
  data_placement: str = "auto"

  # Settings a resumed run may change (train longer, log more often, another
  # implementation of the same convolution). Every other field changes the
  # model or the random stream, and a checkpoint made with another value is
  # not resumed.
  RESUMABLE_CHANGES = ("max_steps", "patience", "patience_growth", "log_every",
                       "checkpoint_every", "eval_batch_size", "conv_impl", "data_placement")

  def __post_init__(self):
    if isinstance(self.task, str):
      object.__setattr__(self, "task", make_task(self.task))
    if not isinstance(self.task, Task):
      raise ValueError(f"TrainConfig.task must be a Task or a task name, got {self.task!r}")
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if len(self.widths) != 5 or min(self.widths) < 1:
      raise ValueError(f"TrainConfig.widths must be 5 positive ints, got {self.widths}")
    for name in ("crop", "batch_size", "max_steps", "steps_per_epoch",
                 "patience", "log_every", "checkpoint_every", "eval_batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.data_placement not in PLACEMENTS:
      raise ValueError(f"TrainConfig.data_placement must be one of {PLACEMENTS}, "
                       f"got {self.data_placement!r}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
    if int(self.lr_drops) < 0:
      raise ValueError(f"TrainConfig.lr_drops must be >= 0, got {self.lr_drops!r}")
    if not 0.0 < self.lr_drop_factor < 1.0:
      raise ValueError(f"TrainConfig.lr_drop_factor must be in (0, 1), got {self.lr_drop_factor}")
    if not self.patience_growth >= 0.0:
      raise ValueError(f"TrainConfig.patience_growth must be >= 0, got {self.patience_growth}")
    if not self.anneal >= 0.0:
      raise ValueError(f"TrainConfig.anneal must be >= 0, got {self.anneal}")
    if not self.lr > 0:
      raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")

  @property
  def step(self) -> StepConfig:
    """The fields the train step reads."""
    return StepConfig(**{f.name: getattr(self, f.name)
                         for f in dataclasses.fields(StepConfig)})

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["task"] = self.task.to_json()
    d["widths"] = list(self.widths)
    return d

  @classmethod
  def from_json(cls, d: dict) -> "TrainConfig":
    from upgrade_jax.engine.tasks import task_from_json
    return cls(**{**d, "task": task_from_json(d["task"])})

