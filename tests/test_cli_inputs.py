"""Bad and unusual inputs to the CLI: one line, no traceback, nothing written.

Each case builds tiny user folders (toy discs, 48x48), breaks one thing, runs
`python -m experiments.upgrade` as a user would and asserts: a non-zero exit,
exactly one line on stderr that names the culprit, no traceback, no new file
or folder anywhere under the case's folder, and every input byte-identical.
None of them trains: every error is found before anything is created.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import cli
import numpy as np
import pytest
import tifffile

from conftest import toy_discs
from upgrade_jax import rundir

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--width=4", "--crop=32", "--batch_size=4", "--max_steps=2", "--steps_per_epoch=2"]


def _make_user_folders(root: Path) -> None:
  ds = toy_discs(7, (48, 48), seed=0)
  for name, idx in (("hq", range(4)), ("lq", range(4, 7))):
    for sub in ("images", "labels"):
      (root / name / sub).mkdir(parents=True)
    for i in idx:
      img = (ds.images[i, ..., 0] * 1000).clip(0).astype(np.uint16)
      tifffile.imwrite(root / name / "images" / f"{name}{i}.tif", img)
      tifffile.imwrite(root / name / "labels" / f"{name}{i}.tif", ds.targets[i].astype(np.uint16))


def _user_args(root: Path, **over) -> list[str]:
  d = {"hq_images": root / "hq/images", "hq_labels": root / "hq/labels",
       "lq_images": root / "lq/images", "lq_labels": root / "lq/labels",
       "out_dir": root / "out", **over}
  return [f"--{k}={v}" for k, v in d.items()] + QUICK


def _snapshot(root: Path) -> dict:
  """Every path under root -> sha256 of its bytes (files), 'dir' or 'link'."""
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    if p.is_symlink():
      out[rel] = "link:" + os.readlink(p)
    elif p.is_dir():
      out[rel] = "dir"
    else:
      out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


# Each case: (id, setup(root) -> args, culprit substring of the error line).
# setup breaks the fresh folders under root and returns the CLI arguments.

def _rm(path):
  def setup(root):
    (root / path).unlink()
    return _user_args(root)
  return setup


def _write(path, data, user_over=None):
  def setup(root):
    p = root / path
    if isinstance(data, bytes):
      p.write_bytes(data)
    else:
      tifffile.imwrite(p, data)
    return _user_args(root, **(user_over or {}))
  return setup


def _flags(*extra, **over):
  def setup(root):
    return _user_args(root, **over) + list(extra)
  return setup


def _synthetic(*extra):
  def setup(root):
    return [f"--out_dir={root / 'out'}", "--n_volumes=3", "--volume_shape=8,96,96",
            "--n_test=1", *extra]
  return setup


def _all_zero_hq(root):
  for p in (root / "hq/labels").iterdir():
    tifffile.imwrite(p, np.zeros((48, 48), np.uint16))
  return _user_args(root)


def _one_hq(root):
  for i in (1, 2, 3):
    (root / f"hq/images/hq{i}.tif").unlink()
    (root / f"hq/labels/hq{i}.tif").unlink()
  return _user_args(root)


def _empty_folder(root):
  for p in (root / "lq/images").iterdir():
    p.unlink()
  return _user_args(root)


def _out_is_file(root):
  (root / "out").write_text("not a folder")
  return _user_args(root)


def _out_under_file(root):
  (root / "afile").write_text("x")
  return _user_args(root, out_dir=root / "afile/sub")


def _iterate_on_last_output(root):
  # The data-loss layout: a previous run left out/upgraded/<name>.tif; the
  # user now upgrades those labels again into the same out_dir.
  (root / "out/upgraded").mkdir(parents=True)
  for p in (root / "lq/labels").iterdir():
    shutil.copy(p, root / "out/upgraded" / p.name)
  (root / "out/results.json").write_text("{}")
  return _user_args(root, lq_labels=root / "out/upgraded")


def _upgraded_links_to_input(root):
  (root / "out").mkdir()
  os.symlink(root / "lq/labels", root / "out/upgraded")
  return _user_args(root)


def _out_is_link_to_input_parent(root):
  os.symlink(root / "lq", root / "alias")
  return _user_args(root, out_dir=root / "alias")


def _input_link_into_out(root):
  # The LQ labels folder the user gives is a link to a folder inside out_dir.
  (root / "out/mine").mkdir(parents=True)
  for p in (root / "lq/labels").iterdir():
    shutil.copy(p, root / "out/mine" / p.name)
  os.symlink(root / "out/mine", root / "lqlabels_link")
  return _user_args(root, lq_labels=root / "lqlabels_link")


def _lq_images_are_hq_images(root):
  shutil.rmtree(root / "lq")
  (root / "lq/labels").mkdir(parents=True)
  os.symlink(root / "hq/images", root / "lq/images")
  for p in (root / "hq/labels").iterdir():
    shutil.copy(p, root / "lq/labels" / p.name)
  return _user_args(root)


def _five_channels(root):
  p = root / "lq/images/lq4.tif"
  img = tifffile.imread(p)
  tifffile.imwrite(p, np.stack([img] * 5, -1), photometric="minisblack", planarconfig="contig")
  return _user_args(root)


def _duplicate_stem(root):
  shutil.copy(root / "lq/labels/lq4.tif", root / "lq/labels/lq4.tiff")
  return _user_args(root)


def _nan_image(root):
  img = tifffile.imread(root / "hq/images/hq2.tif").astype(np.float32)
  img[3, 3] = np.nan
  tifffile.imwrite(root / "hq/images/hq2.tif", img)
  return _user_args(root)


def _inf_image(root):
  img = tifffile.imread(root / "lq/images/lq5.tif").astype(np.float32)
  img[0, :4] = np.inf
  tifffile.imwrite(root / "lq/images/lq5.tif", img)
  return _user_args(root)


def _stack_pair(folder, name, z_image, z_label, label_hw=(48, 48)):
  def setup(root):
    tifffile.imwrite(root / folder / "images" / f"{name}.tif",
                     np.ones((z_image, 48, 48), np.uint16), photometric="minisblack")
    lab = np.zeros((z_label, *label_hw), np.uint16)
    lab[:, 5:9, 5:9] = 1
    tifffile.imwrite(root / folder / "labels" / f"{name}.tif", lab, photometric="minisblack")
    return _user_args(root)
  return setup


def _label_4d(root):
  tifffile.imwrite(root / "hq/labels/hq1.tif", np.zeros((2, 3, 48, 48), np.uint16),
                   photometric="minisblack")
  return _user_args(root)


_LAB = np.zeros((48, 48), np.uint16)
CASES = [
    ("missing_label_partner", _rm("hq/labels/hq1.tif"), "hq1.tif"),
    ("missing_image_partner", _rm("lq/images/lq5.tif"), "lq5.tif"),
    ("shape_mismatch", _write("hq/labels/hq2.tif", np.zeros((40, 48), np.uint16)), "hq2.tif"),
    ("float_labels", _write("lq/labels/lq4.tif", np.full((48, 48), 0.5, np.float32)),
     "lq4.tif"),
    ("negative_labels", _write("hq/labels/hq0.tif", np.full((48, 48), -1, np.int16)), "hq0.tif"),
    ("corrupt_tiff", _write("hq/images/hq3.tif", b"II*\x00garbage" * 10), "hq3.tif"),
    ("empty_tiff", _write("lq/images/lq6.tif", b""), "lq6.tif"),
    ("3d_labels_in_2d_folder", _write("hq/labels/hq1.tif", np.zeros((5, 48, 48), np.uint16)),
     "hq1.tif"),
    ("3d_image_in_2d_folder", _write("lq/images/lq4.tif", np.zeros((5, 48, 48), np.uint16)),
     "lq4.tif"),
    # User mode takes (Z, H, W) stacks, but only as image + label pairs.
    ("stack_z_mismatch", _stack_pair("lq", "lq4", 5, 4), "lq4.tif"),
    ("stack_label_4d", _label_4d, "hq1.tif"),
    ("z_consistent_in_user_mode", _flags("--z_consistent"), "--z_consistent"),
    ("z_consistent_with_felzenszwalb", _synthetic("--z_consistent", "--others=felzenszwalb"),
     "--z_consistent"),
    ("stack_hw_mismatch", _stack_pair("hq", "hq0", 3, 3, label_hw=(48, 40)), "hq0.tif"),
    ("nan_pixels", _nan_image, "hq2.tif"),
    ("inf_pixels", _inf_image, "lq5.tif"),
    ("all_zero_hq_labels", _all_zero_hq, "--hq_labels"),
    ("one_hq_pair", _one_hq, "--hq_images"),
    ("empty_lq_folder", _empty_folder, "lq/images"),
    ("missing_folder", _flags(lq_labels="/nonexistent/labels"), "--lq_labels"),
    ("five_channel_image", _five_channels, "lq4.tif"),
    ("duplicate_stem", _duplicate_stem, "lq4"),
    ("lq_images_are_hq_images", _lq_images_are_hq_images, "--lq_images"),
    ("rate_above_one", _flags("--omission_rate=1.5"), "--omission_rate"),
    ("negative_bias", _flags("--bias_max=-1"), "--bias_max"),
    ("n_hq_in_user_mode", _flags("--n_hq=3"), "--n_hq"),
    ("unsupported_scenario", _flags("--scenarios=hq,hq_upgraded"), "--scenarios"),
    ("unknown_flag", _flags("--omision_rate=0.5"), "omision_rate"),
    ("positional_argument", _flags("stray"), "stray"),
    ("out_dir_is_a_file", _out_is_file, "--out_dir"),
    ("out_dir_under_a_file", _out_under_file, "--out_dir"),
    ("out_dir_equals_input", _flags(out_dir="{root}/hq/labels"), "--out_dir"),
    ("out_dir_inside_input", _flags(out_dir="{root}/lq/images/run"), "--out_dir"),
    ("out_dir_contains_input", _flags(out_dir="{root}/hq"), "--out_dir"),
    ("iterate_on_last_output", _iterate_on_last_output, "--out_dir"),
    ("out_subfolder_links_to_input", _upgraded_links_to_input, "--out_dir"),
    ("out_dir_links_to_input", _out_is_link_to_input_parent, "--out_dir"),
    ("input_links_into_out_dir", _input_link_into_out, "--out_dir"),
    ("synthetic_too_many_hq", _synthetic("--n_hq=500"), "--n_hq"),
    ("synthetic_too_thin", _synthetic("--volume_shape=1,24,24", "--n_hq=2"), "--volume_shape"),
    ("synthetic_hq_volumes_too_many", _synthetic("--hq_volumes=5"), "--hq_volumes"),
    ("synthetic_hq_pool_too_small", _synthetic("--hq_volumes=1", "--n_hq=9"), "--hq_volumes"),
    ("synthetic_n_test_all", _synthetic("--n_test=3"), "--n_test"),
    ("synthetic_with_data_dir", _synthetic("--data_dir=/tmp"), "--data_dir"),
    ("folder_without_data_dir", lambda root: [f"--out_dir={root / 'out'}", "--data=folder"],
     "data_dir"),
    ("others_labels_without_user_mode", _synthetic("--others_labels=/tmp"), "--others_labels"),
    ("cost_budget_below_hq_cost", _synthetic("--cost_budget=10", "--n_hq=4"), "--cost_budget"),
    # The competing methods' options: only with their scenario, and consistent.
    ("method_flag_without_its_scenario", _synthetic("--cl_confidence=0.9"),
     "--cl_confidence"),
    ("partial_labelling_ramp_reversed", _synthetic(
        "--scenarios=hq,partial_labelling", "--pl_ramp_start=200", "--pl_ramp_end=100"),
     "ramp_start"),
    # Process flags: checked before JAX starts (a bad one would hang or fail later).
    ("process_flags_without_distributed", _synthetic("--num_processes=2", "--process_id=1"),
     "--distributed"),
    ("process_id_without_count", _synthetic("--distributed", "--process_id=0"),
     "--num_processes"),
    ("process_id_out_of_range", _synthetic("--distributed", "--num_processes=2",
                                           "--process_id=2"), "--process_id=2"),
    ("coordinator_address_without_port", _synthetic(
        "--distributed", "--coordinator_address=localhost", "--num_processes=2",
        "--process_id=0"), "--coordinator_address"),
]


def run_cli(args, module="experiments.upgrade"):
  return cli.run(module, ["--compilation_cache=", *args], timeout=300)


def assert_refused(proc, culprit, before, root):
  err = proc.stderr.strip()
  assert proc.returncode != 0, (proc.stdout[-2000:], err[-2000:])
  assert "Traceback" not in proc.stderr + proc.stdout, err[-3000:]
  assert len(err.splitlines()) == 1, err
  assert err.startswith("error: ") and culprit in err, err
  assert _snapshot(root) == before, "something under the case folder changed or was created"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line(case, tmp_path):
  _, setup, culprit = case
  root = tmp_path / "case"
  _make_user_folders(root)
  args = [a.replace("{root}", str(root)) for a in setup(root)]
  before = _snapshot(root)
  assert_refused(run_cli(args), culprit, before, root)


def test_read_only_out_dir_is_refused(tmp_path):
  root = tmp_path / "case"
  _make_user_folders(root)
  locked = root / "locked"
  locked.mkdir()
  if os.geteuid() == 0:  # root writes anywhere except in an immutable folder
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
      pytest.skip("chattr +i is not available here")
  else:
    locked.chmod(0o555)
  try:
    before = _snapshot(root)
    proc = run_cli(_user_args(root, out_dir=locked / "run"))
    assert_refused(proc, "--out_dir", before, root)
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(locked)], check=True)
    else:
      locked.chmod(0o755)


def test_sweep_bad_value_is_refused_before_any_point_runs(tmp_path):
  root = tmp_path / "case"
  root.mkdir()
  before = _snapshot(root)
  proc = run_cli(_synthetic("--sweep=n_hq=2,500")(root), module="experiments.sweep")
  assert_refused(proc, "--n_hq", before, root)


def test_real_run_cleans_its_temporaries_writes_readable_files_and_refuses_iterating(tmp_path):
  """A real (tiny) user-mode run: a killed run's temporary file is removed,
  outputs are group-readable, and upgrading its own output again into the
  same out_dir (the data-loss layout) is refused with nothing changed."""
  root = tmp_path / "case"
  _make_user_folders(root)
  stale = root / "out/upgraded" / f".lq4.tif.x1y2{rundir.TEMP_SUFFIX}"
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b"partial")
  env_umask = os.umask(0o002)
  try:
    proc = run_cli(_user_args(root))
  finally:
    os.umask(env_umask)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not stale.exists()
  outs = sorted((root / "out/upgraded").iterdir())
  assert [p.name for p in outs] == ["lq4.tif", "lq5.tif", "lq6.tif"]
  for p in outs + [root / "out/results.json"]:
    assert p.stat().st_mode & 0o060 == 0o060, (p, oct(p.stat().st_mode))
  before = _snapshot(root)
  proc = run_cli(_user_args(root, lq_labels=root / "out/upgraded"))
  assert_refused(proc, "--out_dir", before, root)
  # A rerun with another config is refused inside its lock: it leaves
  # nothing either, the lock file included (a finished run leaves none).
  assert not (root / "out" / rundir.LOCK_NAME).exists()
  proc = run_cli(_user_args(root) + ["--omission_rate=0.3"])
  assert_refused(proc, "another config", before, root)
