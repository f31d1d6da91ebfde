"""The plugin's two dock widgets (magicgui Containers; npe2 injects the viewer).

  UpgradeWidget  "Upgrade labels": an Image layer, its sloppy LQ Labels layer
                 and a saved model folder -> a Labels layer "<labels> upgraded"
                 holding what experiments.apply writes for the same image and
                 model, and the review queue (review.py's columns, most
                 doubtful first; a click on a row shows that slice)
  TrainWidget    "Train upgrader": (Image, Labels) pairs of HQ annotations and
                 the perturbation P the user describes -> a model folder that
                 apply and UpgradeWidget read (user mode's training path)

Both work in napari's thread_worker, so the viewer stays live, with a
progress bar. A problem with the inputs is one line (a napari notification
and the widget's status line, no traceback) and adds or writes nothing; any
other exception is a bug and reaches napari with its traceback.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSlider, Label, ProgressBar,
                              PushButton, Select, SpinBox, Table)
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QAbstractScrollArea

from upgrade_jax import export, instances, review
from upgrade_jax.napari import training, upgrading
from upgrade_jax.pipeline.config import PipelineConfig
from upgrade_jax.rundir import InputError

__all__ = ["UpgradeWidget", "TrainWidget", "one_line"]


def one_line(err) -> str:
  """An error's message as one line, the model folder named as in the GUI."""
  msg = " ".join(str(err).split()) or type(err).__name__
  return msg.replace("--model=", "model folder ", 1)


class _Failed:
  """A worker's result when the inputs were refused: the one-line message."""

  def __init__(self, message: str):
    self.message = message


def _layer_choices(viewer, kind):
  return lambda _widget: [(layer.name, layer) for layer in viewer.layers
                          if isinstance(layer, kind)]


def _refresh_on_layer_changes(viewer, container: Container) -> None:
  # Docked, napari resets the choices itself; undocked (a script, a test) it
  # does not, so the widget listens too: by a weak reference, and not once
  # its Qt widget is gone (a closed dock), since the viewer outlives it.
  ref = weakref.ref(container)

  def refresh(_event=None) -> None:
    widget = ref()
    if widget is not None:
      try:
        widget.reset_choices()
      except RuntimeError:   # "wrapped C/C++ object ... has been deleted"
        pass

  for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                viewer.layers.events.moved):
    event.connect(refresh)


class UpgradeWidget(Container):
  """Upgrade labels: see the module docstring.

  Attributes read by tests and scripts: busy (a run is under way), worker
  (the running or last thread_worker), result (the last
  upgrading.Upgraded), status (Label), queue (Table).
  """

  def __init__(self, napari_viewer: napari.viewer.Viewer):
    super().__init__()
    self.viewer = napari_viewer
    self.image = ComboBox(label="image", choices=_layer_choices(napari_viewer, Image))
    self.lq_labels = ComboBox(label="LQ labels", choices=_layer_choices(napari_viewer, Labels))
    self.model = FileEdit(label="model folder", mode="d")
    self.output = ComboBox(label="output", choices=list(instances.OUTPUTS),
                           value=PipelineConfig().output)
    self.run = PushButton(text="Upgrade")
    self.progress = ProgressBar(label="slices", min=0, max=1, value=0)
    self.status = Label(value="")
    self.queue = Table(columns=list(review.COLUMNS))
    self.queue.read_only = True
    # Scroll rather than widen the dock to the table's 15 columns.
    self.queue.native.setSizeAdjustPolicy(QAbstractScrollArea.AdjustIgnored)
    self.queue.native.setMinimumWidth(200)
    self.extend([self.image, self.lq_labels, self.model, self.output, self.run, self.progress,
                 self.status, Label(value="review queue, most doubtful first:"), self.queue])
    self.busy, self.worker = False, None
    self.result: upgrading.Upgraded | None = None
    self.run.changed.connect(self.start)
    self.queue.native.cellClicked.connect(self._show_row)
    _refresh_on_layer_changes(napari_viewer, self)

  def _fail(self, message: str) -> None:
    self.status.value = f"error: {message}"
    show_error(message)

  def start(self, *_):
    """Starts the upgrade in a worker (returns it), or shows why it cannot."""
    image, labels = self.image.value, self.lq_labels.value
    folder = self.model.value
    if image is None or labels is None:
      return self._fail("choose an Image layer and a Labels layer (the LQ labels)")
    if folder is None or str(folder) in ("", "."):
      return self._fail("choose the model folder of a training run (OUT/model)")
    # Copies: the worker must not see a layer the user paints on meanwhile.
    job = _upgrade_job(Path(folder), np.array(image.data), np.array(labels.data),
                       name=image.name, output=self.output.value, image_name=image.name,
                       label_name=labels.name)
    target = (f"{labels.name} upgraded", labels.scale, labels.translate)
    job.yielded.connect(self._on_progress)
    job.returned.connect(lambda result: self._on_done(result, *target))
    job.finished.connect(self._on_finished)
    self.busy, self.run.enabled = True, False
    self.progress.value = 0
    self.status.value = f"upgrading {labels.name} ..."
    self.worker = job
    job.start()
    return job

  def _on_finished(self) -> None:
    self.busy, self.run.enabled = False, True

  def _on_progress(self, done_total) -> None:
    done, total = done_total
    self.progress.max = total
    self.progress.value = done

  def _on_done(self, result, name: str, scale, translate) -> None:
    if isinstance(result, _Failed):
      return self._fail(result.message)
    self.result = result
    if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels):
      self.viewer.layers[name].data = result.labels   # a rerun replaces its own layer
    else:
      self.viewer.add_labels(result.labels, name=name, scale=scale, translate=translate)
    self._show_queue(result.rows)
    flooded = [r["name"] for r in result.rows if r["flooded"]]
    self.status.value = (f"{name}: {int(result.labels.max())} objects in {len(result.rows)} "
                         f"slice(s)" + (f"; FLOODED: {', '.join(flooded[:3])}" if flooded else ""))
    show_info(self.status.value)

  def _show_queue(self, rows) -> None:
    def cell(v):
      return round(v, 4) if isinstance(v, float) else v
    self.queue.value = {"data": [[cell(r[c]) for c in review.COLUMNS] for r in rows],
                        "index": list(range(len(rows))), "columns": list(review.COLUMNS)}
    self.queue.native.resizeColumnsToContents()

  def _show_row(self, row: int, _column: int) -> None:
    if self.result is None or self.result.labels.ndim != 3 or self.viewer.dims.ndim < 3:
      return
    z = self.result.rows[row]["z"]
    self.viewer.dims.set_current_step(self.viewer.dims.ndim - 3, z)


@thread_worker
def _upgrade_job(folder: Path, image: np.ndarray, labels: np.ndarray, **kwargs):
  """Worker: load the model, then upgrading.upgrade_steps (yields progress)."""
  try:
    upgrader = export.load_upgrader(folder)
  except (ValueError, OSError) as e:   # checking: any of these is the user's input
    return _Failed(one_line(e))
  try:
    return (yield from upgrading.upgrade_steps(upgrader, image, labels, **kwargs))
  except InputError as e:
    return _Failed(one_line(e))


class _Relay(QObject):
  """Carries engine.fit's log lines from the worker thread to the widget
  (a queued signal: the slot runs in the main thread)."""
  line = Signal(str)


class TrainWidget(Container):
  """Train upgrader: see the module docstring.

  Attributes read by tests and scripts: busy, worker, result (the last
  training.train_upgrader dict), pairs (the [(image, labels, others or
  None)] layer names), status, progress; cancel() stops a run.
  """

  def __init__(self, napari_viewer: napari.viewer.Viewer):
    super().__init__()
    self.viewer = napari_viewer
    d = training.DEFAULTS
    self.pair_image = ComboBox(label="HQ image", choices=_layer_choices(napari_viewer, Image))
    self.pair_labels = ComboBox(label="HQ labels",
                                choices=_layer_choices(napari_viewer, Labels))
    self.pair_others = ComboBox(label="others (optional)", nullable=True,
                                choices=_layer_choices(napari_viewer, Labels))
    self.add_pair = PushButton(text="Add pair")
    self.pairs: list[tuple[str, str, str | None]] = []
    self.pair_list = Select(label="pairs", choices=lambda _w: [self._pair_text(p)
                                                                for p in self.pairs])
    self.remove_pair = PushButton(text="Remove selected pairs")
    self.omission = FloatSlider(label="omission rate", min=0.0, max=1.0, step=0.05,
                                value=d["omission_rate"])
    self.inclusion = FloatSlider(label="inclusion rate", min=0.0, max=1.0, step=0.05,
                                 value=d["inclusion_rate"])
    self.bias = SpinBox(label="bias max (px)", min=0, max=32, value=d["bias_max"])
    self.others = ComboBox(label="inclusion draws from", choices=list(training.OTHERS_MODES),
                           value=d["others"])
    self.max_steps = SpinBox(label="max steps", min=1, max=1_000_000, value=d["max_steps"])
    self.net_width = SpinBox(label="width", min=1, max=256, value=d["width"])
    self.folder = FileEdit(label="save model to", mode="w")
    self.train = PushButton(text="Train")
    self.stop = PushButton(text="Cancel", enabled=False)
    self.progress = ProgressBar(label="steps", min=0, max=d["max_steps"], value=0)
    self.status = Label(value="")
    self.extend([self.pair_image, self.pair_labels, self.pair_others, self.add_pair,
                 self.pair_list, self.remove_pair, self.omission, self.inclusion, self.bias,
                 self.others, self.max_steps, self.net_width, self.folder, self.train, self.stop,
                 self.progress, self.status])
    self.busy, self.worker = False, None
    self.result: dict | None = None
    self._cancel = threading.Event()
    self._relay = _Relay()
    self._relay.line.connect(self._on_line)
    self.add_pair.changed.connect(self.add_current_pair)
    self.remove_pair.changed.connect(self._remove_selected)
    self.train.changed.connect(self.start)
    self.stop.changed.connect(self.cancel)
    _refresh_on_layer_changes(napari_viewer, self)

  @staticmethod
  def _pair_text(pair) -> str:
    image, labels, others = pair
    return f"{image} | {labels}" + (f" | others {others}" if others else "")

  def add_current_pair(self, *_):
    image, labels = self.pair_image.value, self.pair_labels.value
    if image is None or labels is None:
      return self._fail("choose an Image layer and its HQ Labels layer, then Add pair")
    others = self.pair_others.value
    pair = (image.name, labels.name, others.name if others is not None else None)
    if pair not in self.pairs:
      self.pairs.append(pair)
      self.pair_list.reset_choices()

  def _remove_selected(self, *_):
    chosen = set(self.pair_list.value)
    self.pairs = [p for p in self.pairs if self._pair_text(p) not in chosen]
    self.pair_list.reset_choices()

  def _fail(self, message: str) -> None:
    self.status.value = f"error: {message}"
    show_error(message)

  def _layer_arrays(self):
    """[(image, labels, others or None)] copies of the pairs' layer data."""
    out = []
    for names in self.pairs:
      missing = [n for n in names if n is not None and n not in self.viewer.layers]
      if missing:
        raise InputError(f"layer {missing[0]!r} of pair {self._pair_text(names)!r} is gone; "
                         "remove the pair or restore the layer")
      out.append(tuple(None if n is None else np.array(self.viewer.layers[n].data)
                       for n in names))
    return out

  def start(self, *_):
    """Starts training in a worker (returns it), or shows why it cannot."""
    try:
      pairs = self._layer_arrays()
      folder = training.check_destination(self.folder.value)
      cfg = training.user_config(omission_rate=self.omission.value,
                                 inclusion_rate=self.inclusion.value,
                                 bias_max=self.bias.value, max_steps=self.max_steps.value,
                                 width=self.net_width.value, others=self.others.value)
    except ValueError as e:
      return self._fail(one_line(e))
    self._cancel.clear()
    job = _train_job(pairs, [p[0] for p in self.pairs], cfg, folder, self._relay.line.emit,
                     self._cancel.is_set)
    job.returned.connect(self._on_done)
    job.finished.connect(self._on_finished)
    self.progress.max, self.progress.value = cfg.upgrade.max_steps, 0
    self.busy, self.train.enabled, self.stop.enabled = True, False, True
    self.status.value = f"training on {len(pairs)} pair(s) ..."
    self.worker = job
    job.start()
    return job

  def cancel(self, *_):
    """Stops a running training at its next step; nothing is saved."""
    self._cancel.set()
    self.status.value = "cancelling ..."

  def _on_line(self, line: str) -> None:
    m = training.STEP_LINE.match(line)
    if m:
      self.progress.value = min(int(m.group(1)), self.progress.max)
    else:   # epoch and summary lines: the status shows the latest
      self.status.value = line

  def _on_done(self, result) -> None:
    if isinstance(result, _Failed):
      return self._fail(result.message)
    if result is None:
      self.status.value = "cancelled; nothing was saved"
      return show_info(self.status.value)
    self.result = result
    self.status.value = (f"saved {result['folder']}: best validation Dice "
                         f"{result['best_val_dice']:.3f} at step {result['best_step']} "
                         f"(optimistic: it chose the step)")
    show_info(self.status.value)

  def _on_finished(self) -> None:
    self.busy, self.train.enabled, self.stop.enabled = False, True, False


@thread_worker
def _train_job(pairs, names, cfg, folder, log, should_stop):
  """Worker: training.train_upgrader; None when cancelled."""
  try:
    return training.train_upgrader(pairs, names, cfg, folder, log=log,
                                   should_stop=should_stop)
  except training.Cancelled:
    return None
  except InputError as e:   # train_upgrader checks first and says so by InputError
    return _Failed(one_line(e))
