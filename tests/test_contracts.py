"""The input contract of every entry point that takes a saved model, a
folder pair or a sweep, as one matrix: a broken model folder (missing,
empty, from another format version, truncated variables, an edited or
unreadable model.json, another channel count than the images), folders
that do not pair, an out_dir inside an input, `--collect` before every
point ran, a reproduction entry that does not exist.

Each case runs the entry point as a user would (tests/cli.py) and asserts:
exit 2, exactly one line on stderr naming the culprit, no traceback,
nothing new under the case's folder and every input byte-identical
(test_cli_inputs.assert_refused). None of them compiles: every refusal
comes before JAX runs anything. The same model breakages in the napari
widget: test_napari_plugin; experiments.upgrade's own matrix:
test_cli_inputs.
"""

import json
import shutil
from pathlib import Path

import cli
import numpy as np
import pytest
import tifffile

from conftest import toy_discs
from test_cli_inputs import _snapshot, assert_refused
from test_export_apply import tiny_upgrader
from upgrade_jax import export


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  """A saved (untrained) upgrader for grey images; cases copy it."""
  return export.save_upgrader(tmp_path_factory.mktemp("model") / "model", tiny_upgrader())


def _edit_json(field_path, value):
  def edit(model: Path):
    meta = json.loads((model / "model.json").read_text())
    d = meta
    for k in field_path[:-1]:
      d = d[k]
    d[field_path[-1]] = value
    (model / "model.json").write_text(json.dumps(meta))
  return edit


def _truncate(model: Path):
  p = model / "variables.npz"
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bytes(model: Path):   # the same size, other bytes: bit rot, not truncation
  p = model / "variables.npz"
  data = bytearray(p.read_bytes())
  data[len(data) // 2] ^= 0xFF
  p.write_bytes(bytes(data))


# (id, how the model folder breaks, culprit in the error line)
MODEL_BREAKAGES = [
    ("missing", lambda m: shutil.rmtree(m), "is not a folder"),
    ("empty", lambda m: [p.unlink() for p in m.iterdir()], "holds no model.json"),
    ("no_variables", lambda m: (m / "variables.npz").unlink(), "holds no variables.npz"),
    ("newer_format", _edit_json(["format_version"], 99), "reads format 1"),
    ("truncated_variables", _truncate, "does not match the checksum"),
    ("rotten_variables", _flip_bytes, "does not match the checksum"),
    ("edited_widths", _edit_json(["model", "widths"], [8, 8, 8, 8, 8]), "does not fit"),
    ("model_json_not_json", lambda m: (m / "model.json").write_text('{"format_version": 1'),
     "not readable JSON"),
]


def _folders(root: Path, names=("a", "b")) -> None:
  ds = toy_discs(len(names), (48, 48), seed=0)
  for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True)
  for i, n in enumerate(names):
    tifffile.imwrite(root / "images" / f"{n}.tif", (ds.images[i, ..., 0] * 200).astype(np.uint8))
    tifffile.imwrite(root / "labels" / f"{n}.tif", ds.targets[i].astype(np.uint16))


def _refused(module, args, root, culprit):
  before = _snapshot(root)
  proc = cli.run(module, ["--compilation_cache=", *args], timeout=300)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert_refused(proc, culprit, before, root)


@pytest.mark.parametrize("entry", ["apply", "export"])
@pytest.mark.parametrize("breakage", MODEL_BREAKAGES, ids=[b[0] for b in MODEL_BREAKAGES])
def test_a_broken_model_folder_is_refused_by_every_entry_point(saved_model, tmp_path, entry,
                                                               breakage):
  _, breaks, culprit = breakage
  root = tmp_path / "case"
  shutil.copytree(saved_model, root / "model")
  _folders(root / "data")
  breaks(root / "model")
  if entry == "apply":
    args = [f"--model={root / 'model'}", f"--images={root / 'data/images'}",
            f"--labels={root / 'data/labels'}", f"--out_dir={root / 'out'}"]
  else:
    args = [f"--model={root / 'model'}", f"--out={root / 'upgrader.zip'}"]
  _refused(f"experiments.{entry}", args, root, culprit)


def test_debug_shows_the_traceback_of_a_refusal(saved_model, tmp_path):
  root = tmp_path / "case"
  shutil.copytree(saved_model, root / "model")
  _truncate(root / "model")
  proc = cli.run("experiments.export", ["--compilation_cache=", f"--model={root / 'model'}",
                                        f"--out={root / 'u.zip'}", "--debug"], timeout=300)
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  assert "does not match the checksum" in proc.stderr and not (root / "u.zip").exists()


def _apply_case(setup):
  def args(root: Path):
    base = {"model": root / "model", "images": root / "data/images",
            "labels": root / "data/labels", "out_dir": root / "out"}
    base.update(setup(root) or {})
    return [f"--{k}={v}" for k, v in base.items()]
  return args


def _three_channel_model(root):
  shutil.rmtree(root / "model")
  export.save_upgrader(root / "model", tiny_upgrader(image_channels=3))


def _unpaired_names(root):
  for p in sorted((root / "data/labels").iterdir()):
    p.rename(p.with_name("x" + p.name))


def _label_without_image(root):
  shutil.copy(root / "data/labels/a.tif", root / "data/labels/c.tif")


def _different_shape(root):
  tifffile.imwrite(root / "data/labels/b.tif", np.zeros((40, 48), np.uint16))


APPLY_CASES = [
    ("model_for_three_channels", _apply_case(_three_channel_model), "takes 3"),
    ("folders_do_not_pair", _apply_case(_unpaired_names), "no label file"),
    ("label_without_image", _apply_case(_label_without_image), "c.tif"),
    ("pair_shapes_differ", _apply_case(_different_shape), "b.tif"),
    ("out_dir_inside_labels", _apply_case(lambda r: {"out_dir": r / "data/labels/out"}),
     "--out_dir"),
    ("out_dir_inside_model", _apply_case(lambda r: {"out_dir": r / "model/out"}), "--out_dir"),
    ("truth_does_not_pair", _apply_case(lambda r: {"truth": r / "model"}), "--truth"),
    ("stray_word", lambda r: _apply_case(lambda _: None)(r) + ["upgrade"], "upgrade"),
]


@pytest.mark.parametrize("case", APPLY_CASES, ids=[c[0] for c in APPLY_CASES])
def test_apply_refuses_what_it_cannot_upgrade(saved_model, tmp_path, case):
  _, args, culprit = case
  root = tmp_path / "case"
  shutil.copytree(saved_model, root / "model")
  _folders(root / "data")
  _refused("experiments.apply", args(root), root, culprit)


ADVISE_CASES = [
    ("labels_do_not_pair", lambda r: (r / "data/labels/a.tif").unlink(), {}, "a.tif"),
    ("out_dir_inside_images", None, {"out_dir": "data/images/advice"}, "--out_dir"),
    ("missing_folder", None, {"hq_labels": "nowhere"}, "--hq_labels"),
    ("bad_fraction", None, {"fractions": "0.5,1.5"}, "--fractions"),
]


@pytest.mark.parametrize("case", ADVISE_CASES, ids=[c[0] for c in ADVISE_CASES])
def test_advise_refuses_bad_inputs(tmp_path, case):
  _, breaks, over, culprit = case
  root = tmp_path / "case"
  _folders(root / "data", names=("a", "b", "c", "d"))
  if breaks:
    breaks(root)
  flags = {"hq_images": "data/images", "hq_labels": "data/labels", "out_dir": "advice", **over}
  args = [f"--{k}={root / v if k != 'fractions' else v}" for k, v in flags.items()]
  _refused("experiments.advise", args + ["--width=4", "--crop=32"], root, culprit)


def test_collect_before_every_point_ran_is_refused(tmp_path):
  # Point 0 of a two-point sweep finished (its results.json), point 1 did not.
  root = tmp_path / "case"
  point = root / "sweep/omission_rate=0.3"
  point.mkdir(parents=True)
  (point / "results.json").write_text(json.dumps({"upgrade_best_val_dice": 0.5}))
  (root / "sweep/omission_rate=0.6").mkdir()
  _refused("experiments.sweep", ["--sweep=omission_rate=0.3,0.6",
                                 f"--out_dir={root / 'sweep'}", "--collect"],
           root, "omission_rate=0.6")
