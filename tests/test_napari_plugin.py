"""The napari plugin (upgrade_jax/napari): manifest, sample data, both widgets.

Headless: Qt's offscreen platform, and an Xvfb for napari's OpenGL canvas
when no X display is set (upgrade_jax/napari/_headless.py); skipped where
napari, npe2 or pytest-qt is not installed (pip install -e '.[napari]') or
neither a display nor Xvfb exists.
"""

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"   # before Qt loads a platform

import pytest  # noqa: E402

from conftest import require_extra, skip_unless_required  # noqa: E402

for _module in ("napari", "npe2", "pytestqt"):
  require_extra(_module, "pip install -e '.[napari]'")

# napari's pytest plugin is off for the whole suite (pyproject's addopts: its
# autouse fixtures would run around every test); its viewer fixture, and the
# autouse ones it relies on, apply to this module only.
from napari.utils._testsupport import (  # noqa: E402,F401
    _clean_themes, _disable_qt_warnings, make_napari_viewer, mock_app_model)

import csv  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

import cli  # noqa: E402
from conftest import XLA_CACHE  # noqa: E402
from upgrade_jax import export, review  # noqa: E402
from upgrade_jax.engine import TrainConfig, create_train_state  # noqa: E402
from upgrade_jax.napari import _headless, sample, training  # noqa: E402
from upgrade_jax.pipeline.config import PipelineConfig  # noqa: E402
from upgrade_jax.pipeline.user import stack_labels  # noqa: E402

WAIT_MS = 120_000
NAME = sample.IMAGE_NAME   # the apply files are named as the widget names its rows
# The P and width of every training here: one compiled train step for all (the
# step's cache key is its StepConfig, which holds the task with its P).
P_TEST, WIDTH = {"omission_rate": 0.5, "inclusion_rate": 0.0, "bias_max": 1}, 4


@pytest.fixture(scope="session", autouse=True)
def display():
  """Before pytest-qt's QApplication (autouse: first of the session fixtures)."""
  if not _headless.has_display():
    skip_unless_required("napari's canvas needs OpenGL: an X display, or Xvfb "
                         "(apt-get install xvfb)")
  with _headless.virtual_display() as d:
    yield d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The sample and a tiny upgrader trained on its HQ labels (the Train
  widget's path without Qt: width 4, 4 steps)."""
  image, lq, truth = sample.make_sample()
  folder = tmp_path_factory.mktemp("model") / "tiny"
  cfg = training.user_config(**P_TEST, max_steps=4, width=WIDTH)
  training.train_upgrader([(image, truth, None)], ["sample"], cfg, folder, log=lambda _: None)
  return folder, image, lq, truth


def _rgb(image2d):
  return np.repeat((image2d / image2d.max() * 255).astype(np.uint8)[..., None], 3, -1)


@pytest.fixture(scope="module")
def applied(trained, tmp_path_factory):
  """experiments.apply on the sample's slices as 2-D files (and an RGB one)."""
  folder, image, lq, _ = trained
  root = tmp_path_factory.mktemp("apply")
  for sub in ("images", "labels"):
    (root / sub).mkdir()
  for z in range(len(image)):
    tifffile.imwrite(root / "images" / f"{NAME}_z{z:03d}.tif", image[z])
    tifffile.imwrite(root / "labels" / f"{NAME}_z{z:03d}.tif", lq[z].astype(np.uint16))
  tifffile.imwrite(root / "images/rgb.tif", _rgb(image[0]), photometric="rgb")
  tifffile.imwrite(root / "labels/rgb.tif", lq[0].astype(np.uint16))
  cli.run("experiments.apply", [f"--compilation_cache={XLA_CACHE}", f"--model={folder}",
                                f"--images={root}/images", f"--labels={root}/labels",
                                f"--out_dir={root}/out"], timeout=300, check=True)
  return root / "out"


def _csv_rows(path):
  return {r["name"]: r for r in csv.DictReader(io.StringIO(path.read_text()))}


def _upgrade(viewer, qtbot, image, labels, model, output="instances", widget=None):
  from upgrade_jax.napari.widgets import UpgradeWidget
  w = widget or UpgradeWidget(viewer)
  w.image.value, w.lq_labels.value = image, labels
  w.model.value, w.output.value = model, output
  w.run.native.click()
  qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
  return w


def _errors(records, since):
  from napari.utils.notifications import NotificationSeverity
  return [n.message for n in records[since:] if n.severity == NotificationSeverity.ERROR]


def test_manifest_validates():
  from importlib import metadata

  import npe2
  pm = npe2.PluginManifest.from_distribution("upgrade_jax")
  pm.validate_imports()   # every python_name imports
  assert {w.display_name for w in pm.contributions.widgets} == {"Upgrade labels",
                                                                "Train upgrader"}
  assert [s.key for s in pm.contributions.sample_data] == ["synthetic"]
  eps = metadata.distribution("upgrade_jax").entry_points.select(group="napari.manifest")
  assert [(e.name, e.value) for e in eps] == [("upgrade-jax", "upgrade_jax.napari:napari.yaml")]


def test_defaults_come_from_the_configs(make_napari_viewer):
  from experiments import run_flags
  from upgrade_jax.napari.widgets import TrainWidget, UpgradeWidget
  assert training.GUI_PRESET == run_flags.CLI_DEFAULTS
  viewer = make_napari_viewer()
  t, u = TrainWidget(viewer), UpgradeWidget(viewer)
  pipe = PipelineConfig()
  p = pipe.upgrade.task.perturb
  assert (t.omission.value, t.inclusion.value, t.bias.value) == (
      p.omission_rate, p.inclusion_rate, p.bias_max)
  assert t.net_width.value == pipe.upgrade.widths[0] and t.others.value == pipe.data.others
  assert u.output.value == pipe.output
  cfg = training.user_config(omission_rate=0.3, inclusion_rate=0.1, bias_max=2, max_steps=7,
                             width=8)
  assert cfg.upgrade.widths == (8, 16, 32, 64, 64)   # the CLI's --width=8
  assert cfg.upgrade.task.perturb == p.__class__(omission_rate=0.3, inclusion_rate=0.1,
                                                 bias_max=2)


def test_sample_data_contribution(make_napari_viewer, trained):
  viewer = make_napari_viewer()
  layers = viewer.open_sample("upgrade_jax", "synthetic")
  kinds = [type(layer).__name__ for layer in layers]
  assert kinds == ["Image", "Labels", "Labels"]
  image, lq, truth = (layer.data for layer in layers)
  _, s_image, s_lq, s_truth = trained
  for got, want in ((image, s_image), (lq, s_lq), (truth, s_truth)):   # seeded
    np.testing.assert_array_equal(got, want)
  assert image.shape == lq.shape == truth.shape == (sample.SAMPLE_SLICES, 256, 256)
  # LQ: P omitted most cells (70%).
  assert sum(int(z.max()) for z in lq) < sum(len(np.unique(z)) - 1 for z in truth)


def test_upgrade_2d_and_rgb_equal_apply(make_napari_viewer, qtbot, trained, applied):
  folder, image, lq, _ = trained
  viewer = make_napari_viewer()
  img = viewer.add_image(image[0], name=NAME)
  lab = viewer.add_labels(lq[0], name="lq")
  _, widget = viewer.window.add_plugin_dock_widget("upgrade_jax", "Upgrade labels")
  w = _upgrade(viewer, qtbot, img, lab, folder, widget=widget)
  out = viewer.layers["lq upgraded"]
  want = tifffile.imread(applied / "upgraded" / f"{NAME}_z000.tif")
  assert out.data.max() > 0 and out.data.dtype == want.dtype == np.uint16
  assert np.array_equal(out.data, want)
  # Its review row is apply's (the rank aside: apply ranked 6 files).
  row = _csv_rows(applied / "review.csv")[f"{NAME}_z000"]
  mine = dict(zip(review.COLUMNS, next(csv.reader(io.StringIO(
      review.review_csv(w.result.rows).splitlines()[1])))))
  assert {k: v for k, v in mine.items() if k != "rank"} == {
      k: v for k, v in row.items() if k not in ("rank", "name")} | {"name": NAME}
  assert w.queue.shape == (1, len(review.COLUMNS))
  assert list(w.queue.column_headers) == list(review.COLUMNS)
  # An RGB layer under the model's grey policy, as apply reads an RGB file.
  rgb = viewer.add_image(_rgb(image[0]), name="rgb", rgb=True)
  lab2 = viewer.add_labels(lq[0], name="lq rgb")
  _upgrade(viewer, qtbot, rgb, lab2, folder, widget=w)
  np.testing.assert_array_equal(viewer.layers["lq rgb upgraded"].data,
                                tifffile.imread(applied / "upgraded/rgb.tif"))
  # output=mask: the components of the same mask (instances drop specks).
  _upgrade(viewer, qtbot, img, lab, folder, output="mask", widget=w)
  comp = viewer.layers["lq upgraded"].data   # a rerun replaces its layer
  assert ((want > 0) <= (comp > 0)).all() and not np.array_equal(comp, want)


def test_upgrade_stack_equals_per_slice_apply(make_napari_viewer, qtbot, trained, applied):
  folder, image, lq, _ = trained
  viewer = make_napari_viewer()
  img = viewer.add_image(image, name=NAME)
  lab = viewer.add_labels(lq, name="lq")
  w = _upgrade(viewer, qtbot, img, lab, folder)
  out = viewer.layers["lq upgraded"].data
  per_slice = [tifffile.imread(applied / "upgraded" / f"{NAME}_z{z:03d}.tif")
               for z in range(len(image))]
  # The ids offset per slice, unique over the stack, as user mode writes a stack.
  assert out.dtype == np.uint16 and np.array_equal(out, stack_labels(per_slice))
  assert w.progress.value == w.progress.max == len(image)
  # The review queue: apply's rows of these slices, in apply's order.
  rows = [r for r in _csv_rows(applied / "review.csv").values() if r["name"] != "rgb"]
  assert [r["name"] for r in w.result.rows] == [r["name"] for r in rows]
  mine = list(csv.DictReader(io.StringIO(review.review_csv(w.result.rows))))
  assert [{k: v for k, v in r.items() if k != "rank"} for r in mine] == [
      {k: v for k, v in r.items() if k != "rank"} for r in rows]
  assert w.queue.shape == (len(image), len(review.COLUMNS))
  row = next(i for i, r in enumerate(w.result.rows) if r["z"] != viewer.dims.current_step[0])
  w.queue.native.cellClicked.emit(row, 0)   # a click on a row shows its slice
  assert viewer.dims.current_step[0] == w.result.rows[row]["z"]


def test_upgrade_refuses_bad_inputs_in_one_line(make_napari_viewer, qtbot, trained, tmp_path):
  from napari.utils.notifications import notification_manager
  folder, image, lq, _ = trained
  rgb_model = export.upgrader_from_state(   # takes 3 channels, its policy gives 1
      create_train_state(TrainConfig(widths=(4, 8, 8, 8, 8)), 4, jax.random.PRNGKey(1)),
      image_channels=3)
  export.save_upgrader(tmp_path / "three", rgb_model)
  (tmp_path / "empty").mkdir()
  viewer = make_napari_viewer()
  img = viewer.add_image(image[0], name="img")
  lab = viewer.add_labels(lq[0], name="lq")
  small = viewer.add_labels(lq[0][:100], name="small")
  cases = [(lab, tmp_path / "empty", "holds no model.json"),
           (lab, tmp_path / "three", "takes 3"),
           (small, folder, "does not match label shape")]
  from test_contracts import MODEL_BREAKAGES   # the entry points' matrix, in the widget
  for name, breaks, culprit in MODEL_BREAKAGES:
    shutil.copytree(folder, tmp_path / "broken" / name)
    breaks(tmp_path / "broken" / name)
    cases.append((lab, tmp_path / "broken" / name, culprit))
  w = None
  for labels, model, culprit in cases:
    since = len(notification_manager.records)
    w = _upgrade(viewer, qtbot, img, labels, model, widget=w)
    errors = _errors(notification_manager.records, since)
    assert len(errors) == 1 and culprit in errors[0] and "\n" not in errors[0], errors
    assert w.status.value == f"error: {errors[0]}"
  assert [layer.name for layer in viewer.layers] == ["img", "lq", "small"]   # none added


def _train_widget(viewer, trained, tmp_path, max_steps):
  from upgrade_jax.napari.widgets import TrainWidget
  _, image, _, truth = trained
  t = TrainWidget(viewer)
  t.pair_image.value = viewer.add_image(image, name="hq image")
  t.pair_labels.value = viewer.add_labels(truth, name="hq labels")
  t.add_pair.native.click()
  t.net_width.value, t.max_steps.value = WIDTH, max_steps
  t.omission.value, t.inclusion.value, t.bias.value = (
      P_TEST["omission_rate"], P_TEST["inclusion_rate"], P_TEST["bias_max"])
  t.folder.value = tmp_path / "saved"
  return t


def test_train_widget_saves_a_model_apply_reads(make_napari_viewer, qtbot, trained, tmp_path):
  viewer = make_napari_viewer()
  t = _train_widget(viewer, trained, tmp_path, max_steps=3)
  assert t.pairs == [("hq image", "hq labels", None)]
  t.train.native.click()
  qtbot.waitUntil(lambda: not t.busy, timeout=WAIT_MS)
  assert t.result is not None, t.status.value
  up = export.load_upgrader(tmp_path / "saved")
  assert up.model.widths == (4, 8, 16, 32, 32)
  p = up.task.perturb
  assert (p.omission_rate, p.inclusion_rate, p.bias_max) == tuple(P_TEST.values())
  assert t.progress.value == 3 and t.result["steps"] == 3
  assert not list(tmp_path.glob(".*"))   # no staging folder left


def test_train_cancel_saves_nothing(make_napari_viewer, qtbot, trained, tmp_path):
  viewer = make_napari_viewer()
  t = _train_widget(viewer, trained, tmp_path, max_steps=100_000)
  t.train.native.click()
  qtbot.waitUntil(lambda: t.progress.value >= 2, timeout=WAIT_MS)
  t.stop.native.click()
  qtbot.waitUntil(lambda: not t.busy, timeout=30_000)   # stops at its next step
  assert t.progress.value < 100 and t.result is None
  assert t.status.value == "cancelled; nothing was saved"
  assert list(tmp_path.iterdir()) == []   # neither the folder nor a staging one
