"""The entry points as a new user meets them: the advisor in user
mode with the README's command, `sweep --collect` over a user-mode sweep,
`reproduce` with a bad entry or a stray argument, and out_dirs holding files
an entry point did not write. Every refusal: exit 2, one line on stderr, no
traceback, nothing new on disk, no input changed."""

import json
from pathlib import Path

import cli
import numpy as np
import pytest
import tifffile

from conftest import XLA_CACHE, toy_discs
from test_cli_inputs import _snapshot, assert_refused

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width=4", "--crop=32", "--batch_size=4", "--max_steps=4", "--steps_per_epoch=2",
        "--patience=2", f"--compilation_cache={XLA_CACHE}"]


def _cli(module, *args, timeout=300):
  return cli.run(module, args, timeout=timeout)


def _pairs(root: Path, names, seed=0, stack=None):
  """Image/label folders of toy discs (uint8 images, uint16 labels); `stack`:
  one name saved as a 3-slice stack."""
  ds = toy_discs(len(names) + 2, (48, 48), seed=seed)
  for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True)
  for i, name in enumerate(names):
    img = (ds.images[i, ..., 0].clip(0, 1) * 200).astype(np.uint8)
    lab = ds.targets[i].astype(np.uint16)
    if name == stack:
      nxt = (ds.images[i + 1, ..., 0].clip(0, 1) * 200).astype(np.uint8)
      img = np.stack([img, nxt, img])
      lab = np.stack([lab, ds.targets[i + 1].astype(np.uint16), lab])
    tifffile.imwrite(root / "images" / f"{name}.tif", img, photometric="minisblack")
    tifffile.imwrite(root / "labels" / f"{name}.tif", lab, photometric="minisblack")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("user")
  _pairs(root / "HQ", [f"hq{i}" for i in range(6)], seed=0, stack="hq5")
  _pairs(root / "LQ", [f"lq{i}" for i in range(3)], seed=1)
  return root


def test_the_readmes_advise_command_runs_on_hq_folders_alone_and_resumes(folders, tmp_path):
  readme = (ROOT / "README.md").read_text()
  cmd = "python -m experiments.advise --hq_images=HQ/images --hq_labels=HQ/labels --out_dir=advice"
  assert cmd in readme   # the command tested here is the README's
  args = [f"--hq_images={folders / 'HQ/images'}", f"--hq_labels={folders / 'HQ/labels'}",
          f"--out_dir={tmp_path / 'advice'}", "--fractions=0.5,1.0", *TINY]
  before = _snapshot(folders)
  proc = _cli("experiments.advise", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads((tmp_path / "advice/advice.json").read_text())
  assert d["n_train"] + d["n_val"] == 8   # 5 images + a 3-slice stack
  assert "val_dice" in d and "test_dice" not in d   # no test set in user mode
  assert (tmp_path / "advice/advice.png").stat().st_size > 0
  assert _snapshot(folders) == before   # inputs untouched
  again = _cli("experiments.advise", *args)
  assert again.returncode == 0 and "already finished" in again.stdout + again.stderr
  assert json.loads((tmp_path / "advice/advice.json").read_text())["points"] == d["points"]
  # Half of the user folders is still refused, in one line.
  root = tmp_path / "half"
  root.mkdir()
  snap = _snapshot(root)
  half = _cli("experiments.advise", f"--hq_images={folders / 'HQ/images'}",
              f"--out_dir={root / 'out'}", *TINY)
  assert half.returncode == 2
  assert_refused(half, "--hq_labels", snap, root)


@pytest.fixture(scope="module")
def user_sweep(folders, tmp_path_factory):
  """A finished 2-point user-mode sweep (its points hold model/ folders)."""
  out = tmp_path_factory.mktemp("sweep") / "s"
  proc = _cli("experiments.sweep", f"--hq_images={folders / 'HQ/images'}",
              f"--hq_labels={folders / 'HQ/labels'}", f"--lq_images={folders / 'LQ/images'}",
              f"--lq_labels={folders / 'LQ/labels'}", "--sweep=omission_rate=0.3,0.6",
              f"--out_dir={out}", *TINY, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_collect_of_a_user_mode_sweep(user_sweep):
  d = json.loads((user_sweep / "sweep.json").read_text())   # written by the run itself
  assert d["kind"] == "user" and [p["value"] for p in d["points"]] == [0.3, 0.6]
  assert all(0 <= p["upgrade_best_val_dice"] <= 1 for p in d["points"])
  (user_sweep / "sweep.json").unlink()
  proc = _cli("experiments.sweep", "--sweep=omission_rate=0.3,0.6", f"--out_dir={user_sweep}",
              "--collect")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((user_sweep / "sweep.json").read_text()) == d
  assert (user_sweep / "sweep_omission_rate.png").stat().st_size > 0


# A sweep killed in its second point, right after that point's first
# checkpoint: a real SIGKILL, at a chosen point, of the sweep's process.
_KILLED_SWEEP = """
import os, signal
from upgrade_jax.engine.checkpoints import Checkpoints
real = Checkpoints.save
def save_then_die(self, *a, **k):
  real(self, *a, **k)
  if "omission_rate=0.6" in str(self.directory):
    os.kill(os.getpid(), signal.SIGKILL)
Checkpoints.save = save_then_die
"""


@pytest.mark.slow
def test_a_sweep_killed_in_a_point_resumes_it_to_the_uninterrupted_files(user_sweep, folders,
                                                                        tmp_path):
  import shutil
  import signal

  from experiments.sweep import USER_KEYS

  out = tmp_path / "s"
  shutil.copytree(user_sweep, out)   # point 0 finished; point 1 to run
  for p in (out / "omission_rate=0.6", out / "sweep.json", out / "sweep_omission_rate.png"):
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  args = [f"--hq_images={folders / 'HQ/images'}", f"--hq_labels={folders / 'HQ/labels'}",
          f"--lq_images={folders / 'LQ/images'}", f"--lq_labels={folders / 'LQ/labels'}",
          "--sweep=omission_rate=0.3,0.6", f"--out_dir={out}", *TINY]
  proc = cli.run("experiments.sweep", args, preamble=_KILLED_SWEEP, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  point = out / "omission_rate=0.6"
  assert not (point / "results.json").exists() and list(point.rglob("checkpoints/*"))
  again = _cli("experiments.sweep", *args, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from step" in again.stdout   # the killed point goes on from its checkpoint
  for name in ("omission_rate=0.3", "omission_rate=0.6"):
    a = json.loads((user_sweep / name / "results.json").read_text())
    b = json.loads((out / name / "results.json").read_text())
    assert {k: a.get(k) for k in USER_KEYS} == {k: b.get(k) for k in USER_KEYS}
    assert a["upgrade_best_val_dice"] is not None
    assert _snapshot(out / name / "upgraded") == _snapshot(user_sweep / name / "upgraded")
  assert (json.loads((out / "sweep.json").read_text())
          == json.loads((user_sweep / "sweep.json").read_text()))


def test_collect_refuses_what_it_cannot_collect_before_writing(user_sweep, tmp_path):
  import shutil
  copy = tmp_path / "s"
  shutil.copytree(user_sweep, copy)
  for p in (copy / "sweep.json", copy / "sweep_omission_rate.png"):
    p.unlink()
  (copy / "omission_rate=0.6/results.json").write_text(json.dumps({"something": 1}))
  before = _snapshot(tmp_path)
  proc = _cli("experiments.sweep", "--sweep=omission_rate=0.3,0.6", f"--out_dir={copy}",
              "--collect")
  assert_refused(proc, "results.json", before, tmp_path)
  assert proc.returncode == 2


@pytest.mark.parametrize("args, culprit", [
    (["--only=nope"], "--only=nope"),
    (["table_3_1_inc"], "--only=table_3_1_inc"),
    (["--scale=paper", "--only=epfl"], "--scale=paper"),
    (["--scale=paper", "--records=docs/reproduction/reps"], "--records"),
], ids=["unknown_entry", "stray_argument", "paper_scale_not_a_row", "paper_scale_cpu_record"])
def test_reproduce_refuses_bad_entries_with_one_line(tmp_path, args, culprit):
  before = _snapshot(tmp_path)
  given = {a.split("=")[0] for a in args}
  paths = [f"--{k}={tmp_path / v}" for k, v in (("out_root", "runs"), ("doc", "doc.md"),
                                               ("records", "rec")) if f"--{k}" not in given]
  proc = _cli("experiments.reproduce", *paths, *args)
  assert proc.returncode == 2
  assert_refused(proc, culprit, before, tmp_path)


def test_reproduce_at_paper_scale_writes_its_own_document(tmp_path):
  proc = _cli("experiments.reproduce", "--scale=paper", "--norun",
              f"--out_root={tmp_path / 'runs'}", f"--records={tmp_path / 'rec'}",
              f"--doc={tmp_path / 'paper.md'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (tmp_path / "paper.md").read_text()
  assert md.startswith("# Table 3.1 at the paper's scale") and "paper_scale.cfg" in md
  assert md.count("not run yet") == 8 and "Table 3.2" not in md   # its rows only
  status = _cli("experiments.reproduce", "--scale=paper", "--status", "--only=table_3_1_bias",
                f"--out_root={tmp_path / 'runs'}", f"--records={tmp_path / 'rec'}",
                f"--doc={tmp_path / 'paper.md'}")
  lines = status.stdout.strip().splitlines()
  assert len(lines) == 2 and all("paper_scale.cfg" in line for line in lines)


def test_apply_refuses_an_out_dir_with_a_users_file(user_sweep, folders, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "review.csv").write_text("my own notes\n")
  before = _snapshot(tmp_path)
  proc = _cli("experiments.apply", f"--model={user_sweep / 'omission_rate=0.3/model'}",
              f"--images={folders / 'LQ/images'}", f"--labels={folders / 'LQ/labels'}",
              f"--out_dir={out}", f"--compilation_cache={XLA_CACHE}")
  assert_refused(proc, "did not write", before, tmp_path)
  assert proc.returncode == 2


def test_entry_points_refuse_each_others_out_dirs(user_sweep, folders, tmp_path):
  # An advise run into a training run's out_dir would mix (and could overwrite) its files.
  point = user_sweep / "omission_rate=0.3"
  before = _snapshot(user_sweep)
  proc = _cli("experiments.advise", f"--hq_images={folders / 'HQ/images'}",
              f"--hq_labels={folders / 'HQ/labels'}", f"--out_dir={point}", *TINY)
  assert_refused(proc, "experiments.upgrade", before, user_sweep)
  assert proc.returncode == 2
