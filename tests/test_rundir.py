"""The run folder's guards: input overlap, lock, stale temporary files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from upgrade_jax import rundir
from upgrade_jax.data import io


def test_check_out_dir_refuses_every_overlap_with_inputs(tmp_path):
  inp = tmp_path / "data" / "labels"
  inp.mkdir(parents=True)
  (inp / "a.tif").write_bytes(b"x")
  guard = rundir.InputGuard([inp])
  for bad in (inp, inp / "run", tmp_path / "data", tmp_path):
    with pytest.raises(rundir.InputError, match="--out_dir"):
      rundir.check_out_dir(bad, guard)
  os.symlink(tmp_path / "data", tmp_path / "alias")
  with pytest.raises(rundir.InputError, match="--out_dir"):
    rundir.check_out_dir(tmp_path / "alias" / "labels" / "run", guard)
  rundir.check_out_dir(tmp_path / "elsewhere" / "run", guard)  # fine, and creates nothing
  assert not (tmp_path / "elsewhere").exists()


def test_guard_refuses_outputs_that_are_inputs_by_any_name(tmp_path):
  src = tmp_path / "in" / "a.tif"
  src.parent.mkdir()
  io.write_labels(src, np.ones((3, 3), np.int32))
  guard = rundir.InputGuard([src.parent])
  out = tmp_path / "out"
  out.mkdir()
  os.link(src, out / "hard.tif")
  os.symlink(src, out / "soft.tif")
  os.symlink(src.parent, out / "linked_dir")
  for p in (out / "hard.tif", out / "soft.tif", out / "linked_dir" / "b.tif", src):
    with pytest.raises(rundir.InputError):
      guard.check_output(p)
  guard.check_output(out / "new.tif")


def test_remove_stale_temps_removes_only_its_own(tmp_path):
  (tmp_path / "upgraded").mkdir()
  stale = tmp_path / "upgraded" / f".a.tif.k3j2{rundir.TEMP_SUFFIX}"
  stale.write_bytes(b"partial")
  keep = [tmp_path / "upgraded" / "a.tif", tmp_path / ".hidden.tmp", tmp_path / "x.tmp"]
  for p in keep:
    p.write_bytes(b"user")
  assert rundir.remove_stale_temps(tmp_path) == [stale]
  assert not stale.exists() and all(p.exists() for p in keep)


_HOLD = """
import sys, time
from upgrade_jax import rundir
with rundir.RunLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(60)
"""


def test_lock_refuses_a_live_run_and_dies_with_a_killed_one(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(rundir.InputError, match=f"in use .*pid {proc.pid}"):
      with rundir.RunLock(tmp_path):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with rundir.RunLock(tmp_path):  # the killed run's lock is gone with it
    pass
  with rundir.RunLock(tmp_path):  # and a finished run's too
    assert (tmp_path / rundir.LOCK_NAME).is_file()
  assert not (tmp_path / rundir.LOCK_NAME).exists()   # a run that ends leaves no lock file
  with pytest.raises(RuntimeError), rundir.RunLock(tmp_path):   # nor one that fails
    raise RuntimeError("refused")
  assert not (tmp_path / rundir.LOCK_NAME).exists()


def test_check_owner_refuses_files_it_did_not_write(tmp_path):
  # No entry point overwrites a file it did not write.
  new, empty = tmp_path / "new", tmp_path / "empty"
  empty.mkdir()
  for d in (new, empty):
    rundir.check_owner(d, "apply")   # nothing to overwrite
  user = tmp_path / "user"
  user.mkdir()
  (user / "review.csv").write_text("mine")
  with pytest.raises(rundir.InputError, match="did not write .review.csv"):
    rundir.check_owner(user, "apply")
  # A folder an entry point marked is its own, and no other entry point's.
  ours = tmp_path / "ours"
  rundir.mark_owner(ours, "apply")
  (ours / "review.csv").write_text("written by apply")
  rundir.check_owner(ours, "apply")
  with pytest.raises(rundir.InputError, match="outputs of experiments.apply"):
    rundir.check_owner(ours, "advise")
  with rundir.RunLock(tmp_path / "locked", owner="sweep"):
    pass
  assert (tmp_path / "locked" / rundir.OWNER_NAME).read_text().strip() == "sweep"
  # Out_dirs of versions before the marker: recognised by their record files.
  old = tmp_path / "old"
  (old / "rep0").mkdir(parents=True)
  (old / "rep0" / "rep.json").write_text("{}")
  rundir.check_owner(old, "upgrade")
  with pytest.raises(rundir.InputError, match="experiments.upgrade"):
    rundir.check_owner(old, "apply")
  # What a killed run leaves (its temporary files) is not somebody's file.
  killed = tmp_path / "killed" / "upgraded"
  killed.mkdir(parents=True)
  (killed / f".a.tif.x{rundir.TEMP_SUFFIX}").write_bytes(b"partial")
  rundir.check_owner(killed.parent, "apply")
  with pytest.raises(ValueError, match="unknown owner"):
    rundir.check_owner(new, "nobody")


def test_a_write_that_runs_out_of_space_is_one_disk_full_line_and_leaves_nothing(tmp_path,
                                                                                 monkeypatch):
  import errno

  from upgrade_jax import files

  def no_space(self, data):
    Path.write_text(self, "half")   # part of the file reached the disk
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(Path, "write_bytes", no_space)
  with pytest.raises(rundir.DiskFull) as e:
    files.write_bytes(tmp_path / "out" / "big.png", b"x" * 3_000_000)
  monkeypatch.undo()
  msg = str(e.value)
  assert "big.png: no space left" in msg and "about 3.0 MB" in msg and "MB free" in msg
  assert isinstance(e.value, rundir.InputError) and "\n" not in msg   # the CLI's one line
  assert list((tmp_path / "out").iterdir()) == []   # no temporary, nothing under the name
  other = OSError(errno.EACCES, "Permission denied")
  assert rundir.disk_full(other, tmp_path / "x", 10) is None   # other errors stay themselves
