"""The training engine shared by every network of the method.

One engine, many tasks: a task (tasks.py) says how a batch becomes the
network's (inputs, target), its loss, and how prediction builds its input;
the rest is shared.

  config.py       TrainConfig (the run) and StepConfig (what the step reads)
  tasks.py        Task, Upgrade, Segment: the registry of tasks
  noisy_tasks.py  ConfidentLearning, PartialLabelling (Table 3.3's methods)
  state.py        TrainState, create_train_state
  step.py         the jitted, data-parallel train step and its batches
  evaluation.py   the fixed validation set, evaluate, predict / predict_proba
  tiling.py       one image of any size: shape buckets, overlapping tiles
  checkpoints.py  Orbax checkpoints and the loop's LoopRecord
  loop.py         fit: epochs, early stopping, resume
  xla_options.py  per-backend compiler options of the jitted programs

The names below are the engine's public API.
"""

from upgrade_jax.engine.checkpoints import (Checkpoints, ConfigMismatch, LoopRecord,
                                            check_resumable, config_diff, data_digest)
from upgrade_jax.engine.config import StepConfig, TrainConfig
from upgrade_jax.engine.evaluation import (ValSet, bucket_size, evaluate, make_val_set,
                                         predict, predict_proba)
from upgrade_jax.engine.loop import FitResult, fit
from upgrade_jax.engine.state import (TrainState, create_train_state, ema_update,
                                      init_variables, learning_rate, network_channels,
                                      scale_learning_rate, set_learning_rate)
from upgrade_jax.engine.step import (Batch, crop_and_flip, draw_indices, gather_samples,
                                     TrainStep, make_train_step, sample_crops, take_samples)
from upgrade_jax.engine.tasks import TASKS, Segment, Task, Upgrade, make_task, task_from_json
from upgrade_jax.engine.noisy_tasks import ConfidentLearning, PartialLabelling

__all__ = ["Checkpoints", "ConfigMismatch", "LoopRecord", "check_resumable", "config_diff",
           "data_digest", "StepConfig", "TrainConfig",
           "ValSet", "bucket_size", "evaluate", "make_val_set", "predict", "predict_proba",
           "FitResult", "fit", "TrainState", "create_train_state", "ema_update", "init_variables",
           "learning_rate", "network_channels", "scale_learning_rate", "set_learning_rate",
           "Batch", "crop_and_flip",
           "draw_indices", "gather_samples",
           "TrainStep", "make_train_step", "sample_crops", "take_samples", "TASKS", "Segment", "Task", "Upgrade", "make_task",
           "task_from_json", "ConfidentLearning", "PartialLabelling"]
