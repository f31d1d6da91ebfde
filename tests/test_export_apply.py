"""The saved upgrader (export.py) and `python -m experiments.apply`."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax
import cli
import numpy as np
import pytest
import tifffile

from conftest import toy_discs
from upgrade_jax import export, instances
from upgrade_jax.engine import TrainConfig, create_train_state
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.rundir import InputError

ROOT = Path(__file__).resolve().parents[1]
from conftest import XLA_CACHE as CACHE  # noqa: E402
TINY = ["--width=4", "--crop=32", "--batch_size=4", "--max_steps=6", "--steps_per_epoch=3",
        "--log_every=3", "--patience=2"]


def tiny_upgrader(image_channels=1):
  state = create_train_state(TrainConfig(widths=(4, 8, 8, 8, 8)), image_channels + 1,
                             jax.random.PRNGKey(1))
  return export.upgrader_from_state(state, image_channels=image_channels,
                                    tiling=TileConfig(tile=64, margin=16))


def test_save_load_round_trip(tmp_path):
  up = tiny_upgrader()
  export.save_upgrader(tmp_path / "model", up, train={"best_val_dice": 0.5})
  meta = json.loads((tmp_path / "model" / "model.json").read_text())
  assert meta["format_version"] == export.FORMAT_VERSION and meta["input"]["image_channels"] == 1
  assert meta["task"]["name"] == "upgrade" and meta["prediction"]["tile"] == 64
  back = export.load_upgrader(tmp_path / "model")
  assert back.tiling == up.tiling and back.model == up.model and back.task == up.task
  assert back.hq_foreground_fraction is None   # unknown unless the run gave it
  dense = dataclasses.replace(up, hq_foreground_fraction=0.375)
  export.save_upgrader(tmp_path / "dense", dense)
  assert export.load_upgrader(tmp_path / "dense").hq_foreground_fraction == 0.375
  jax.tree.map(np.testing.assert_array_equal, back.variables, up.variables)
  ds = toy_discs(1, (100, 90), seed=3)   # larger than the tile: 4 tiles
  a = export.upgrade_sample(up, ds.images[0], ds.targets[0])
  b = export.upgrade_sample(back, ds.images[0], ds.targets[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape == (100, 90) and a[1].dtype == np.int32


@pytest.mark.parametrize("breakage,culprit", [
    ("no_json", "holds no model.json"),
    ("no_npz", "holds no variables.npz"),
    ("newer", "reads format 1"),
    ("checksum", "does not match the checksum"),
    ("channels", "does not fit the network"),
    ("not_json", "not readable JSON"),
])
def test_load_errors_are_one_line(tmp_path, breakage, culprit):
  d = export.save_upgrader(tmp_path / "model", tiny_upgrader())
  meta = json.loads((d / "model.json").read_text())
  if breakage == "no_json":
    (d / "model.json").unlink()
  elif breakage == "no_npz":
    (d / "variables.npz").unlink()
  elif breakage == "newer":
    meta["format_version"] = 2
  elif breakage == "checksum":
    (d / "variables.npz").write_bytes((d / "variables.npz").read_bytes()[:-10])
  elif breakage == "channels":
    meta["input"]["image_channels"] = 3
  elif breakage == "not_json":
    (d / "model.json").write_text("{")
  if breakage in ("newer", "channels"):
    (d / "model.json").write_text(json.dumps(meta))
  with pytest.raises(InputError, match=culprit) as e:
    export.load_upgrader(d)
  assert "\n" not in str(e.value)


def test_wrong_channel_count(tmp_path):
  up = tiny_upgrader(image_channels=3)   # an RGB model whose policy says grey
  tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 20), np.uint8))
  tifffile.imwrite(tmp_path / "l.tif", np.zeros((20, 20), np.uint16))
  with pytest.raises(InputError, match="1 channel.*takes 3"):
    export.load_sample(tmp_path / "a.tif", tmp_path / "l.tif", up)


# --------------------------------------------------------------------------
# The CLI.

def run(module, args, check=True):
  return cli.run(module, [f"--compilation_cache={CACHE}", *args], timeout=600, check=check)


def make_folders(root: Path) -> None:
  ds = toy_discs(8, (48, 48), seed=1, discs=(5, 8), radius=(4, 6))
  for name, idx in (("hq", range(4)), ("lq", range(4, 8))):
    for sub in ("images", "labels"):
      (root / name / sub).mkdir(parents=True)
    for i in idx:
      img = (ds.images[i, ..., 0] * 1000).clip(0).astype(np.uint16)
      tifffile.imwrite(root / name / "images" / f"{name}{i}.tif", img)
      lab = ds.targets[i].copy()
      if name == "lq":
        (root / "lq/truth").mkdir(exist_ok=True)
        tifffile.imwrite(root / "lq/truth" / f"lq{i}.tif", lab.astype(np.uint16))
        lab[lab % 2 == 1] = 0   # the LQ label omitted half the cells
      tifffile.imwrite(root / name / "labels" / f"{name}{i}.tif", lab.astype(np.uint16))


def snapshot(root: Path) -> dict:
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                     if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("apply")
  make_folders(root)
  run("experiments.upgrade", [f"--hq_images={root}/hq/images", f"--hq_labels={root}/hq/labels",
                              f"--lq_images={root}/lq/images", f"--lq_labels={root}/lq/labels",
                              f"--out_dir={root}/run", "--tile=32", "--tile_margin=8", *TINY])
  return root


@pytest.mark.slow
def test_apply_reproduces_the_training_run(trained):
  root = trained
  assert (root / "run/model/model.json").is_file()
  proc = run("experiments.apply", [f"--model={root}/run/model", f"--images={root}/lq/images",
                                   f"--labels={root}/lq/labels", f"--out_dir={root}/applied"])
  names = sorted(p.name for p in (root / "run/upgraded").iterdir())
  assert names == [f"lq{i}.tif" for i in range(4, 8)]
  for n in names:   # bit for bit (48 px images on 32 px tiles: the tiled path)
    assert (root / "run/upgraded" / n).read_bytes() == (root / "applied/upgraded" / n).read_bytes()
    assert tifffile.imread(root / "applied/upgraded" / n).dtype == np.uint16
  rec = json.loads((root / "applied/apply.json").read_text())
  assert rec["output"] == "instances" and len(rec["upgraded"]) == 4
  # Both write the review queue, from the same probabilities.
  assert (root / "run/review.csv").read_text() == (root / "applied/review.csv").read_text()
  assert len(list((root / "applied/review").glob("*.png"))) == 4 and len(rec["review"]) == 4
  assert "wrote 4 upgraded label files" in proc.stdout
  # --output=mask: connected components of the same mask.
  run("experiments.apply", [f"--model={root}/run/model", f"--images={root}/lq/images",
                            f"--labels={root}/lq/labels", f"--out_dir={root}/masks",
                            "--output=mask"])
  for n in names:
    inst = tifffile.imread(root / "applied/upgraded" / n)
    comp = tifffile.imread(root / "masks/upgraded" / n)
    # The same mask, less the specks the instances drop (MIN_INSTANCE_PX).
    assert ((inst > 0) <= (comp > 0)).all()
    dropped = instances.components((comp > 0) & (inst == 0))
    assert (np.bincount(dropped.ravel())[1:] < instances.MIN_INSTANCE_PX).all()


@pytest.mark.slow
def test_apply_scores_the_labels_against_truth(trained, tmp_path):
  root = trained
  proc = run("experiments.apply", [f"--model={root}/run/model", f"--images={root}/lq/images",
                                   f"--labels={root}/lq/labels", f"--truth={root}/lq/truth",
                                   f"--out_dir={tmp_path}/scored"])
  scores = json.loads((tmp_path / "scored/apply.json").read_text())["scores"]
  # The LQ files keep the even ids exactly and omit the odd ones: by hand,
  # tp = even cells, fp = 0, fn = odd cells at every IoU threshold.
  truths = [tifffile.imread(p) for p in sorted((root / "lq/truth").glob("*.tif"))]
  even = sum(int(((np.unique(t) % 2 == 0) & (np.unique(t) > 0)).sum()) for t in truths)
  odd = sum(int((np.unique(t) % 2 == 1).sum()) for t in truths)
  assert scores["lq"]["images"] == 4
  assert scores["lq"]["f1@0.5"] == pytest.approx(2 * even / (2 * even + odd))
  assert scores["lq"]["dsb_score"] == pytest.approx(even / (even + odd))
  assert scores["lq"]["precision@0.75"] == 1.0
  up = [tifffile.imread(tmp_path / "scored/upgraded" / p.name)
        for p in sorted((root / "lq/truth").glob("*.tif"))]
  assert scores["upgraded"]["f1@0.5"] == pytest.approx(
      instances.summary_scores(truths, up)["f1@0.5"])
  assert "upgraded  against --truth (4 images): F1@0.5" in proc.stdout
  assert scores["flooded_vs_truth"] == [] and "flooded against --truth" in proc.stdout
  # A truth folder that does not pair with the images is refused, nothing written.
  (tmp_path / "t").mkdir()
  proc = run("experiments.apply", [f"--model={root}/run/model", f"--images={root}/lq/images",
                                   f"--labels={root}/lq/labels", f"--truth={tmp_path}/t",
                                   f"--out_dir={tmp_path}/refused"], check=False)
  assert proc.returncode == 2 and "--truth=" in proc.stderr and not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_apply_writes_cellpose_and_stardist_training_folders(trained, tmp_path):
  root = trained
  args = [f"--model={root}/run/model", f"--images={root}/lq/images", f"--labels={root}/lq/labels"]
  run("experiments.apply", args + [f"--out_dir={tmp_path}/cp", "--naming=cellpose"])
  run("experiments.apply", args + [f"--out_dir={tmp_path}/sd", "--naming=stardist"])
  stems = [f"lq{i}" for i in range(4, 8)]
  want = {s: (root / "run/upgraded" / f"{s}.tif").read_bytes() for s in stems}
  image = {s: (root / "lq/images" / f"{s}.tif").read_bytes() for s in stems}
  cp, sd = tmp_path / "cp/upgraded", tmp_path / "sd/upgraded"
  assert sorted(p.name for p in cp.iterdir()) == sorted(
      [f"{s}.tif" for s in stems] + [f"{s}_masks.tif" for s in stems])
  assert sorted(p.name for p in sd.iterdir()) == ["images", "masks"]
  for s in stems:   # the same labels, and each image's bytes beside them
    assert (cp / f"{s}_masks.tif").read_bytes() == (sd / "masks" / f"{s}.tif").read_bytes() == want[s]
    assert (cp / f"{s}.tif").read_bytes() == (sd / "images" / f"{s}.tif").read_bytes() == image[s]
  assert json.loads((tmp_path / "cp/apply.json").read_text())["naming"] == "cellpose"
  # An image Cellpose would read as masks is refused before anything is written.
  bad = tmp_path / "bad"
  for kind in ("images", "labels"):
    (bad / kind).mkdir(parents=True)
    (bad / kind / "x_masks.tif").write_bytes((root / f"lq/{kind}/lq4.tif").read_bytes())
  proc = run("experiments.apply", [f"--model={root}/run/model", f"--images={bad}/images",
                                   f"--labels={bad}/labels", f"--out_dir={tmp_path}/no",
                                   "--naming=cellpose"], check=False)
  assert proc.returncode == 2 and "--naming=cellpose" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case,culprit", [
    ("out_dir_is_model", "--out_dir"),
    ("upgrade_flag", "--width"),
    ("five_channels", "five.tif"),
    ("bad_tile", "tile"),
])
def test_apply_bad_inputs(trained, tmp_path, case, culprit):
  root = tmp_path / "c"
  shutil.copytree(trained / "lq", root / "lq")
  shutil.copytree(trained / "run/model", root / "model")
  args = {"model": root / "model", "images": root / "lq/images", "labels": root / "lq/labels",
          "out_dir": root / "out"}
  extra = []
  if case == "out_dir_is_model":
    args["out_dir"] = root / "model"
  elif case == "upgrade_flag":
    extra = ["--width=8"]
  elif case == "five_channels":
    tifffile.imwrite(root / "lq/images/five.tif", np.zeros((48, 48, 5), np.uint8))
    tifffile.imwrite(root / "lq/labels/five.tif", np.zeros((48, 48), np.uint16))
  elif case == "bad_tile":
    extra = ["--tile=100"]
  before = snapshot(root)
  proc = run("experiments.apply", [f"--{k}={v}" for k, v in args.items()] + extra, check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], lines
  assert snapshot(root) == before   # nothing created or changed


@pytest.mark.slow
def test_a_full_disk_stops_apply_in_one_line_and_the_rerun_finishes_it(trained, tmp_path,
                                                                        monkeypatch, capsys):
  # ENOSPC while the third label file is written (after part of it): one
  # line naming the file and its size, nothing under a final name that an
  # unfilled disk would not hold, and the rerun gives the uninterrupted files.
  import errno

  from absl import flags

  from experiments import apply as apply_cli
  from experiments import cli as cli_lib
  from upgrade_jax import rundir

  root = trained
  args = [f"--model={root}/run/model", f"--images={root}/lq/images", f"--labels={root}/lq/labels"]
  ref = root / "run"   # apply's files equal the training run's (test_apply_reproduces_...)
  out = tmp_path / "full"
  real, calls = tifffile.imwrite, []

  def fills_the_disk(path, *a, **k):
    calls.append(path)
    if len(calls) == 3:
      Path(path).write_bytes(b"half a file")
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(path, *a, **k)

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["apply", *args, f"--out_dir={out}"])
  try:
    plan = apply_cli.plan(out)
    monkeypatch.setattr(tifffile, "imwrite", fills_the_disk)
    with pytest.raises(SystemExit) as stop:
      cli_lib.one_line_errors(apply_cli.execute, out, *plan)
  finally:
    monkeypatch.undo()
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err.strip().splitlines()
  assert stop.value.code == 2 and len(err) == 1
  assert "lq6.tif: no space left" in err[0] and "MB" in err[0] and "rerun" in err[0]
  names = sorted(p.name for p in (out / "upgraded").iterdir())
  assert names == ["lq4.tif", "lq5.tif"]   # no partial file, no temporary, under any name
  for n in names:
    assert (out / "upgraded" / n).read_bytes() == (ref / "upgraded" / n).read_bytes()
  assert not (out / "apply.json").exists() and not (out / rundir.LOCK_NAME).exists()
  run("experiments.apply", args + [f"--out_dir={out}"])   # with space: the same files
  assert snapshot(out / "upgraded") == snapshot(ref / "upgraded")
  assert (out / "review.csv").read_text() == (ref / "review.csv").read_text()


# Killed while it writes the third label file (after part of it): a real
# SIGKILL, at a chosen point, of the process that runs experiments.apply.
_KILLED_APPLY = """
import os, signal
from pathlib import Path
import tifffile
real, calls = tifffile.imwrite, []
def killed_while_writing(path, *a, **k):
  calls.append(path)
  if len(calls) == 3:
    Path(path).write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
  return real(path, *a, **k)
tifffile.imwrite = killed_while_writing
"""


@pytest.mark.slow
def test_a_killed_apply_is_finished_by_its_rerun(trained, tmp_path):
  import signal

  from upgrade_jax import rundir

  root, out = trained, tmp_path / "killed"
  args = [f"--compilation_cache={CACHE}", f"--model={root}/run/model",
          f"--images={root}/lq/images", f"--labels={root}/lq/labels", f"--out_dir={out}"]
  proc = cli.run("experiments.apply", args, preamble=_KILLED_APPLY, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  ref = root / "run"   # apply's files equal the training run's (test_apply_reproduces_...)
  finals = sorted(p.name for p in (out / "upgraded").iterdir()
                  if not p.name.endswith(rundir.TEMP_SUFFIX))
  assert finals == ["lq4.tif", "lq5.tif"]   # the half-written third is not under its name
  assert [p.read_bytes() for p in out.rglob("*" + rundir.TEMP_SUFFIX)] == [b"half a file"]
  for n in finals:
    assert (out / "upgraded" / n).read_bytes() == (ref / "upgraded" / n).read_bytes()
  assert not (out / "apply.json").exists()
  run("experiments.apply", args[1:])   # the same command again finishes the folder
  assert snapshot(out / "upgraded") == snapshot(ref / "upgraded")
  assert (out / "review.csv").read_text() == (ref / "review.csv").read_text()
  assert json.loads((out / "apply.json").read_text())["upgraded"][-1].endswith("lq7.tif")
  left = [p.name for p in out.rglob("*") if p.name.endswith(rundir.TEMP_SUFFIX)
          or p.name == rundir.LOCK_NAME]
  assert left == []   # no temporary of the killed run, no lock
