"""The training engine (upgrade_jax.engine): crops, task pairs, learning, early stopping, resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_discs
from upgrade_jax import parallel
from upgrade_jax import engine as T
from upgrade_jax.metrics import pooled_dice_np
from upgrade_jax.perturb import PerturbConfig, perturb
from upgrade_jax.rundir import InputError

REPO = Path(__file__).resolve().parents[1]
TINY = (4, 8, 8, 8, 8)


def _coded_data(n=3, h=20, w=24, extents=((20, 24), (11, 24), (20, 13))):
  """Every pixel's value encodes (sample, row, col): crops can be traced."""
  i, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
  code = (i * 10000 + y * 100 + x).astype(np.int32)
  return parallel.DeviceData(jnp.asarray(code[..., None].astype(np.float32)),
                             jnp.asarray(code), jnp.asarray(code + 1),
                             jnp.asarray(np.array(extents, np.int32)))


@pytest.mark.parametrize("flips", [False, True])
def test_sample_crops_stay_inside_extents(flips):
  data = _coded_data()
  batch = jax.jit(T.sample_crops, static_argnums=(2, 3, 4))(
      jax.random.PRNGKey(0), data, 64, 8, flips)
  assert batch.images.shape == (64, 8, 8, 1) and batch.valid.shape == (64, 8, 8)
  ext = np.asarray(data.extents)
  seen_flip = False
  for img, tgt, oth, valid in zip(*map(np.asarray, batch)):
    np.testing.assert_array_equal(img[..., 0], tgt)
    np.testing.assert_array_equal(oth, tgt + 1)
    # Undo flips by sorting the codes back into raster order.
    if tgt[0, 0] > tgt[-1, -1] or tgt[0, 0] > tgt[0, -1]:
      seen_flip = True
    rows = np.sort(tgt[:, 0] // 100 % 100)
    cols = np.sort(tgt[0, :] % 100)
    i = tgt[0, 0] // 10000
    # A contiguous window of one sample ...
    assert np.all(tgt // 10000 == i)
    np.testing.assert_array_equal(np.diff(rows), 1)
    np.testing.assert_array_equal(np.diff(cols), 1)
    # ... inside its extent (the crop fits in every extent dimension >= 8),
    # so every pixel is valid.
    assert rows[-1] < ext[i, 0] and cols[-1] < ext[i, 1]
    assert valid.all()
  assert seen_flip == flips


def test_sample_crops_larger_than_extent_mark_padding_invalid():
  data = _coded_data()
  batch = T.sample_crops(jax.random.PRNGKey(1), data, 32, 16, False)
  ext = np.asarray(data.extents)
  for tgt, valid in zip(np.asarray(batch.targets), np.asarray(batch.valid)):
    i = tgt[0, 0] // 10000
    rows, cols = tgt // 100 % 100, tgt % 100
    np.testing.assert_array_equal(valid, (rows < ext[i, 0]) & (cols < ext[i, 1]))
    if ext[i, 0] < 16:
      assert rows[0, 0] == 0  # a sample smaller than the crop starts at 0


def test_upgrade_pair_is_image_plus_perturbed_label():
  ds = toy_discs(4, size=(32, 32))
  pc = PerturbConfig(omission_rate=0.5, salt_pepper_prob=0.2)
  task = T.Upgrade(perturb=pc)
  valid = np.ones((4, 32, 32), bool)
  valid[:, 20:] = False
  key = jax.random.PRNGKey(3)
  args = (jnp.asarray(ds.images), jnp.asarray(ds.targets), jnp.asarray(ds.others))
  inputs, target = task.pair(key, *args, max_label=ds.max_label,
                             valid=jnp.asarray(valid), train=False)
  assert inputs.shape == (4, 32, 32, 2)
  np.testing.assert_array_equal(inputs[..., 0], ds.images[..., 0])
  np.testing.assert_array_equal(target, ds.targets > 0)
  # Oracle: perturb called directly with the same per-sample keys.
  keys = jax.random.split(jax.random.split(key, 3)[0], 4)
  lq = np.stack([np.asarray(perturb(k, t, o, pc, max_label=ds.max_label))
                 for k, t, o in zip(keys, ds.targets, ds.others)])
  np.testing.assert_array_equal(inputs[..., 1], lq & valid)
  assert not np.any(np.asarray(inputs[:, 20:, :, 1]))  # no salt on padding
  # label_dropout = 1 zeroes the label channel in training only.
  drop = T.Upgrade(perturb=pc, label_dropout=1.0)
  x_train, _ = drop.pair(key, *args, max_label=ds.max_label,
                         valid=jnp.asarray(valid), train=True)
  assert not np.any(np.asarray(x_train[..., 1]))
  x_val, _ = drop.pair(key, *args, max_label=ds.max_label,
                       valid=jnp.asarray(valid), train=False)
  np.testing.assert_array_equal(x_val, inputs)


def test_strength_mix_draws_weaker_perturbations():
  ds = toy_discs(64, size=(16, 16), discs=(2, 3), radius=(2, 3))
  pc = PerturbConfig(salt_pepper_prob=0.4)
  args = (jnp.asarray(ds.images), jnp.asarray(ds.targets), jnp.asarray(ds.others))
  valid = jnp.ones(ds.targets.shape, bool)
  flips = {}
  for mix in (False, True):
    task = T.Upgrade(perturb=pc, strength_mix=mix)
    x, t = task.pair(jax.random.PRNGKey(0), *args,
                     max_label=ds.max_label, valid=valid, train=True)
    flips[mix] = np.mean(np.asarray(x[..., 1]) != np.asarray(t), axis=(1, 2))
  # Fixed rate: each sample flips ~0.4 of its pixels (p is the fraction
  # flipped); mixed: U[0, 0.4].
  assert np.all(np.abs(flips[False] - 0.4) < 0.15)
  assert abs(flips[True].mean() - 0.2) < 0.06 and flips[True].min() < 0.1


def test_segment_pair():
  ds = toy_discs(2, size=(16, 16))
  x, t = T.Segment().pair(
      jax.random.PRNGKey(0), jnp.asarray(ds.images), jnp.asarray(ds.targets),
      jnp.asarray(ds.others), max_label=ds.max_label, valid=None, train=True)
  np.testing.assert_array_equal(x, ds.images)
  np.testing.assert_array_equal(t, ds.targets > 0)
  assert T.network_channels(T.TrainConfig(task="segment"), 3) == 3
  assert T.network_channels(T.TrainConfig(task="upgrade"), 3) == 4


def test_config_validation():
  with pytest.raises(ValueError, match="task"):
    T.TrainConfig(task="denoise")
  with pytest.raises(ValueError, match="label_dropout"):
    T.Upgrade(label_dropout=1.5)
  with pytest.raises(ValueError, match="widths"):
    T.TrainConfig(widths=(4, 8))
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="batch_size"):
    parallel.check_batch(0, mesh)


def _toy_config(**changes):
  """The toy upgrade run; the tests below share its compiled step."""
  base = dict(task=T.Upgrade(perturb=PerturbConfig(omission_rate=0.5)),
              widths=(8, 16, 16, 16, 16), crop=48, batch_size=8,
              max_steps=200, steps_per_epoch=50, log_every=50,
              checkpoint_every=1000)
  return T.TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def toy_sets():
  return tuple(toy_discs(n, seed=s) for n, s in ((16, 0), (4, 1), (6, 2)))


@pytest.mark.slow
def test_toy_upgrade_learns(tmp_path, toy_sets):
  """Discs on a noisy background, half of them omitted from the label input:
  the network must restore them from the image. Dice > 0.9 within 200 steps."""
  train, val, test = toy_sets
  cfg = _toy_config()
  lines = []
  result = T.fit(cfg, train, val, tmp_path, log=lines.append)
  assert result.best_val_dice > 0.9
  assert [h["step"] for h in result.history] == [50, 100, 150, 200]
  assert any("img/s" in s and "ETA" in s for s in lines)
  # Upgrade held-out LQ labels (omission with another key).
  keys = jax.random.split(jax.random.PRNGKey(42), len(test))
  lq = np.stack([np.asarray(perturb(k, t, o, cfg.task.perturb, max_label=test.max_label))
                 for k, t, o in zip(keys, test.targets, test.others)])
  upgraded = T.predict(result.state_best, test.images, lq, batch_size=4)
  lq_dice = pooled_dice_np(lq, test.targets)
  up_dice = pooled_dice_np(upgraded, test.targets)
  assert lq_dice < 0.8 and up_dice > 0.9, (lq_dice, up_dice)


def test_early_stopping_keeps_best_and_finished_run_returns(tmp_path, toy_sets):
  train, val, _ = toy_sets
  # lr ~ 0: validation Dice soon stops improving (only BatchNorm statistics
  # move), and the run must stop `patience` epochs after its best one.
  cfg = _toy_config(lr=1e-9, max_steps=400, steps_per_epoch=3, patience=3)
  result = T.fit(cfg, train, val, tmp_path, log=lambda s: None)
  vals = [h["val_dice"] for h in result.history]
  best_epoch = int(np.argmax(vals))  # first maximum
  last = result.history[-1]["step"]
  assert last < cfg.max_steps
  assert len(vals) == best_epoch + 1 + cfg.patience
  assert result.best_step == 3 * (best_epoch + 1)
  assert result.best_val_dice == max(vals)
  # The kept parameters reproduce the best validation Dice.
  valset = T.make_val_set(cfg, val, max(train.max_label, val.max_label))
  assert T.evaluate(result.state_best, valset) == pytest.approx(result.best_val_dice)
  assert int(result.state_last.step) == last
  # Same workdir again: the finished run is returned without training.
  lines = []
  again = T.fit(cfg, train, val, tmp_path, log=lines.append)
  assert again.resumed_from == last and again.history == result.history
  assert not any(s.startswith("step ") for s in lines)
  for a, b in zip(jax.tree.leaves(again.state_best.params),
                  jax.tree.leaves(result.state_best.params)):
    np.testing.assert_array_equal(a, b)
  # Another config in the same workdir is refused.
  with pytest.raises(ValueError, match="another config .*seed: 0 -> 1"):
    T.fit(_toy_config(seed=1), train, val, tmp_path, log=lambda s: None)
  # The checkpoint also keeps the caller's context (the pipeline's
  # data, LQ perturbation, seeds) and a digest of the data; a resume with
  # another context, or other data of the same shapes, is refused too.
  with pytest.raises(T.ConfigMismatch, match=r"context\.lq_perturb"):
    T.fit(cfg, train, val, tmp_path, log=lambda s: None,
          context={"lq_perturb": {"omission_rate": 0.3}})
  other = train.replace(images=train.images[::-1].copy())
  with pytest.raises(T.ConfigMismatch, match="train_digest"):
    T.fit(cfg, other, val, tmp_path, log=lambda s: None)


def test_a_corrupted_checkpoint_is_replaced_by_the_one_before(tmp_path, toy_sets):
  train, val, _ = toy_sets
  cfg = _toy_config(max_steps=8, steps_per_epoch=2, checkpoint_every=2, patience=100)
  work, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
  full = T.fit(cfg, train, val, work, log=lambda s: None)
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [6, 8]

  def rot(step):   # bytes of the step's saved arrays flip on disk
    for f in (p for p in (ckpt / str(step)).rglob("*") if p.is_file() and p.stat().st_size > 4096):
      data = bytearray(f.read_bytes())
      data[len(data) // 3::97] = bytes(b ^ 0x5A for b in data[len(data) // 3::97])
      f.write_bytes(bytes(data))

  rot(8)
  lines = []
  again = T.fit(cfg, train, val, work, log=lines.append)
  warn = [line for line in lines if line.startswith("WARNING")]
  assert len(warn) == 1 and "resuming from step 6 instead" in warn[0] and "/8" in warn[0]
  assert again.resumed_from == 6
  for a, b in zip(jax.tree.leaves((again.state_best.params, again.state_last.params)),
                  jax.tree.leaves((full.state_best.params, full.state_last.params))):
    np.testing.assert_array_equal(a, b)   # the steps since were replayed exactly
  rot(6), rot(8)
  with pytest.raises(InputError, match="every checkpoint is corrupted"):
    T.fit(cfg, train, val, work, log=lambda s: None)


def _small_disk(path: Path, size: str) -> Path:
  """A tmpfs of `size` mounted at path (root only; the test is skipped
  elsewhere): a real file system that fills up, under Orbax's C++ writes too."""
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
  return path


def test_a_full_disk_stops_a_checkpoint_in_one_line_and_the_rerun_resumes(
    tmp_path, toy_sets, monkeypatch, capsys):
  # The disk fills up (another process's file) before a checkpoint, twice.
  # Run 1: the free-space check refuses the step before it is written.
  # Run 2 (resumed): the disk fills after that check passed, and Orbax's own
  # array writes (TensorStore, in C++) fail with ENOSPC. Run 3, with space,
  # resumes and ends where an uninterrupted run ends.
  from upgrade_jax.engine import checkpoints
  from upgrade_jax.engine.checkpoints import Checkpoints
  from upgrade_jax.rundir import DiskFull

  train, val, _ = toy_sets
  cfg = _toy_config(max_steps=8, steps_per_epoch=2, checkpoint_every=2, patience=100)
  full = T.fit(cfg, train, val, tmp_path / "ref", log=lambda s: None)
  disk = _small_disk(tmp_path / "disk", "24m")
  try:
    work, real, saves = disk / "run", Checkpoints.save, []

    def the_disk_fills_up(self, state, best, record):
      saves.append(record.step)
      if len(saves) in (2, 3):   # before run 1's second save and run 2's first
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
          f.write(b"\1" * (st.f_bavail * st.f_frsize - 8192))
      return real(self, state, best, record)

    monkeypatch.setattr(Checkpoints, "save", the_disk_fills_up)
    for run, said in ((1, "not enough space"), (2, "no space left")):
      if run == 2:
        monkeypatch.setattr(checkpoints, "check_space", lambda path, needed: None)
      capsys.readouterr()
      with pytest.raises(DiskFull) as stop:
        T.fit(cfg, train, val, work, log=lambda s: None)
      msg = str(stop.value)
      assert f"checkpoints/{saves[-1]}: {said}" in msg and "MB" in msg and "\n" not in msg
      assert capsys.readouterr().err == ""   # Orbax's threads' reports of it are dropped
      # Only complete steps are there: no partial step, under any name.
      assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [str(saves[0])]
      (disk / "filler").unlink()   # the user frees space and reruns
    monkeypatch.undo()
    assert saves[1] == saves[2] > saves[0]   # run 2 resumed from run 1's step
    again = T.fit(cfg, train, val, work, log=lambda s: None)
    assert again.resumed_from == saves[0]
    for a, b in zip(jax.tree.leaves((again.state_best.params, again.state_last.params)),
                    jax.tree.leaves((full.state_best.params, full.state_last.params))):
      np.testing.assert_array_equal(a, b)
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


_RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, jax
from conftest import toy_discs
from upgrade_jax import engine as T
from upgrade_jax.perturb import PerturbConfig

workdir, out, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
if kill:   # SIGKILL right after the first checkpoint (step 5) is committed
  import os, signal
  from upgrade_jax.engine.checkpoints import Checkpoints
  real = Checkpoints.save
  def save_then_die(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
  Checkpoints.save = save_then_die
cfg = T.TrainConfig(task=T.Upgrade(perturb=PerturbConfig(omission_rate=0.5,
                                                         salt_pepper_prob=0.01)),
                    widths=(4, 8, 8, 8, 8), crop=32, batch_size=4, max_steps=30,
                    steps_per_epoch=10,
                    log_every=1, checkpoint_every=5, seed=7)
train = toy_discs(8, size=(32, 32), seed=0)
val = toy_discs(4, size=(32, 32), seed=1)
r = T.fit(cfg, train, val, workdir, log=lambda s: None)
leaves = jax.tree.leaves((r.state_last.params, r.state_last.batch_stats,
                          r.state_last.opt_state, r.state_best.params))
np.savez(out, *[np.asarray(x) for x in leaves],
         history=np.array([[h["step"], h["loss"], h["val_dice"]] for h in r.history]),
         resumed=np.array(-1 if r.resumed_from is None else r.resumed_from))
"""


@pytest.mark.slow
def test_killed_run_resumes_to_same_parameters(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_RESUME_SCRIPT.format(tests=str(REPO / "tests")))
  env = dict(os.environ, PYTHONPATH=str(REPO),
             # One compile for the three runs; executables are the same.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))

  def run(workdir, out, how, **kw):
    return subprocess.Popen([sys.executable, str(script), str(workdir),
                             str(out), how], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

  full = run(tmp_path / "full", tmp_path / "full.npz", "run")
  _, err = full.communicate(timeout=300)
  assert full.returncode == 0, err.decode()[-3000:]

  # A real SIGKILL of the training process mid-run, at a known point: right
  # after its first checkpoint is committed (the loop goes on to step 30).
  proc = run(tmp_path / "killed", tmp_path / "unused.npz", "kill")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
  assert not (tmp_path / "unused.npz").exists()
  assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()
          if p.name.isdigit()] == ["5"]

  resumed = run(tmp_path / "killed", tmp_path / "resumed.npz", "run")
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err.decode()[-3000:]

  a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
  assert int(a["resumed"]) == -1 and int(b["resumed"]) == 5
  assert a["history"].shape == (3, 3)
  np.testing.assert_allclose(a["history"], b["history"], rtol=1e-6)
  leaf_keys = [k for k in a.files if k.startswith("arr_")]
  assert len(leaf_keys) > 50
  for k in leaf_keys:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_ema_update_by_hand():
  ema, p = {"w": np.float32([1.0, 2.0])}, {"w": np.float32([3.0, 0.0])}
  # Step 1: d = min(0.99, 2/11); step 1000: d = 0.99.
  for step, d in ((1, 2 / 11), (1000, 0.99)):
    out = T.ema_update(ema, p, step, 0.99)
    np.testing.assert_allclose(out["w"], [1 * d + 3 * (1 - d), 2 * d], rtol=1e-6)
  assert T.ema_update(ema, p, 5, 0.0) is p


def test_train_step_averages_the_weights_and_prediction_uses_the_average(toy_sets):
  train = toy_sets[0]
  cfg = _toy_config()
  mesh = parallel.make_mesh()
  state = T.create_train_state(cfg, T.network_channels(cfg, train.channels),
                               jax.random.PRNGKey(0), mesh)
  p0 = jax.tree.map(np.array, state.params)   # copies: the step donates the state
  step = T.make_train_step(cfg, mesh, train.max_label)
  new, _ = step(state, parallel.place_dataset(train, mesh))
  p1 = jax.tree.map(np.asarray, new.params)
  d = 2 / 11   # the first update's decay
  for e, a, b in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(p0),
                     jax.tree.leaves(p1)):
    np.testing.assert_allclose(e, a * d + b * (1 - d), rtol=1e-5, atol=1e-7)
  assert new.variables["params"] is new.ema_params
  # decay 0: the raw weights, and the next step (which donates both) runs.
  cfg0 = _toy_config(ema_decay=0.0)
  s0 = T.create_train_state(cfg0, T.network_channels(cfg0, train.channels),
                            jax.random.PRNGKey(0), mesh)
  step0 = T.make_train_step(cfg0, mesh, train.max_label)
  data = parallel.place_dataset(train, mesh)
  s0, _ = step0(*step0(s0, data)[:1], data)
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s0.ema_params)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0),
                                                       jax.tree.leaves(p1)))
  # with_variables (the best checkpoint) sets both, so a prediction of
  # state_best cannot fall back to another average.
  best = new.with_variables({"params": p0, "batch_stats": new.batch_stats})
  for a, b, c in zip(jax.tree.leaves(best.params), jax.tree.leaves(best.ema_params),
                     jax.tree.leaves(p0)):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)


def test_checkpoint_records_of_other_layouts_are_refused():
  # Layouts 1 and 2 have no weight average: refused with the out_dir named,
  # as is a layout newer than this package's.
  from upgrade_jax.engine.checkpoints import RECORD_LAYOUT, LoopRecord
  from upgrade_jax.rundir import InputError
  new = _toy_config().to_json()
  for layout, words in ((None, "older"), (2, "older"), (RECORD_LAYOUT + 1, "newer")):
    d = {"config": new, "data": {}, **({} if layout is None else {"layout": layout})}
    with pytest.raises(InputError, match=f"here.*{words}"):
      LoopRecord.from_json(d, "here")
  assert LoopRecord.from_json({"config": new, "data": {}, "layout": RECORD_LAYOUT,
                               "step": 7}, "here").step == 7


def test_step_config_is_the_cache_key():
  # Fits that differ only in loop settings, seed or lr share one compiled step;
  # any field the step reads makes another.
  a = _toy_config()
  assert a.step == _toy_config(max_steps=3, patience=1, seed=5, lr=0.1).step
  assert hash(a.step) == hash(_toy_config(seed=9).step)
  assert a.step != _toy_config(crop=32).step
  assert a.step != _toy_config(task=T.Upgrade(perturb=PerturbConfig(omission_rate=0.4))).step


def _record():
  from upgrade_jax.engine.checkpoints import LoopRecord
  return LoopRecord(config={}, data={})


def test_plateau_drops_the_learning_rate_then_stops():
  """By hand: patience 2, one drop. Epochs 3-4 do not beat epoch 2, so epoch
  4 drops the rate and starts a stage; epoch 5 improves, 6-7 do not: stop."""
  rec = _record()
  drops, stopped = [], None
  for epoch, v in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.69, 0.9], start=1):
    rec.step = 10 * epoch
    entry, _ = rec.close_epoch(v, None, patience=2, max_steps=1000, lr_drops=1)
    if entry.get("lr_drop"):
      drops.append(epoch)
    if rec.finished:
      stopped = epoch
      break
  assert drops == [4] and stopped == 7
  assert rec.stop_reason == "early stop (patience 2, after 1 lr drop)"
  assert (rec.best_val_dice, rec.best_step, rec.best_epoch, rec.lr_drops) == (0.7, 50, 5, 1)
  # No drops left: the first plateau ends the run, as before the option.
  rec = _record()
  for epoch, v in enumerate([0.5, 0.6, 0.6, 0.55], start=1):
    entry, _ = rec.close_epoch(v, None, patience=2, max_steps=1000)
    assert "lr_drop" not in entry
  assert rec.finished and rec.stop_reason == "early stop (patience 2)"
  # Growth 1: the best came 5 epochs into the stage, so the stage waits 5
  # epochs, not 2; a stage after a drop counts its own epochs from the drop.
  rec, drops = _record(), []
  vals = [0.1, 0.2, 0.3, 0.4, 0.5] + [0.5] * 5 + [0.6] + [0.6] * 5
  for epoch, v in enumerate(vals, start=1):
    entry, _ = rec.close_epoch(v, None, patience=2, max_steps=1000, lr_drops=1,
                               patience_growth=1.0)
    if entry.get("lr_drop"):
      drops.append(epoch)
    if rec.finished:
      break
  assert drops == [10] and rec.stage_start == 10
  # Stage 2's best is its first epoch (11): it waits max(2, ceil(1 * 1)) = 2.
  assert epoch == 13 and rec.stop_reason == "early stop (patience 2, after 1 lr drop)"
  # Anneal 0.5: the plateau at epoch 4 starts ceil(0.5 * 4) = 2 epochs at
  # 0.5 (1 + cos(pi j / 3)) = 0.75 and 0.25 of the rate; no early stop meanwhile,
  # the best (epoch 5) is still kept, and the run stops after the 2nd.
  rec, factors = _record(), []
  for epoch, v in enumerate([0.5, 0.6, 0.6, 0.55, 0.9, 0.1, 0.1], start=1):
    rec.step = 10 * epoch
    entry, _ = rec.close_epoch(v, None, patience=2, max_steps=1000, anneal=0.5)
    factors.append(entry.get("anneal_lr"))
    if rec.finished:
      break
  assert factors == [None, None, None, pytest.approx(0.75), pytest.approx(0.25), None]
  assert rec.stop_reason == "annealed (2 epochs from a plateau at step 40)"
  assert (rec.best_val_dice, rec.best_step, rec.anneal_start, rec.anneal_epochs) == (0.9, 50, 4, 2)
  # The cap ends a run whose rule has not, in the same epoch.
  rec = _record()
  rec.step = 100
  rec.close_epoch(0.5, None, patience=2, max_steps=100, lr_drops=1)
  assert rec.finished and rec.stop_reason == "max_steps"


def test_fit_lowers_the_learning_rate_at_a_plateau_then_anneals(tmp_path, toy_sets):
  from upgrade_jax.engine.checkpoints import anneal_cosine
  train, val, _ = toy_sets
  cfg = _toy_config(lr=1e-9, max_steps=400, steps_per_epoch=3, patience=2, lr_drops=1,
                    lr_drop_factor=0.25, anneal=1.0)
  lines = []
  result = T.fit(cfg, train, val, tmp_path, log=lines.append)
  dropped = [h["epoch"] for h in result.history if h.get("lr_drop")]
  assert len(dropped) == 1 and result.lr_drops == 1
  assert any(s.startswith("plateau at step") and "2.5e-10" in s for s in lines)
  # The second plateau anneals from the dropped rate over as many epochs as
  # came before it (anneal 1.0), then the run stops.
  start = next(h["epoch"] for h in result.history if "anneal_lr" in h)
  assert start > dropped[0] and result.anneal_epochs == start
  assert len(result.history) == 2 * start and result.steps == 3 * 2 * start
  assert result.stop_reason == (f"annealed ({start} epochs from a plateau at step "
                                f"{3 * start})")
  assert any("annealing the learning rate from 2.5e-10" in s for s in lines)
  summary = result.summary(cfg.max_steps)
  assert (summary["lr_drops"], summary["anneal_epochs"], summary["hit_cap"]) == (1, start, False)
  last = 0.25e-9 * anneal_cosine(start, start)
  assert T.learning_rate(result.state_last) == pytest.approx(last)
  # The rate is in the checkpoint: the finished run comes back with it.
  again = T.fit(cfg, train, val, tmp_path, log=lambda s: None)
  assert T.learning_rate(again.state_last) == pytest.approx(last)
  assert (again.lr_drops, again.anneal_epochs) == (1, start)


def test_a_run_from_before_a_new_field_resumes_with_its_default(toy_sets):
  from upgrade_jax.engine.checkpoints import LoopRecord
  train, val, _ = toy_sets
  cfg = _toy_config()
  record = LoopRecord.fresh(cfg, train, val)
  del record.config["lr_drops"]
  T.check_resumable(record, cfg, train, val, "here")
  with pytest.raises(T.ConfigMismatch, match="lr_drops: 0 -> 1"):
    T.check_resumable(record, _toy_config(lr_drops=1), train, val, "here")


def test_learning_rate_schedule_fields_are_validated():
  for bad in (dict(lr_drops=-1), dict(lr_drop_factor=1.0), dict(lr_drop_factor=0.0),
              dict(patience_growth=-0.5), dict(anneal=-1.0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      T.TrainConfig(**bad)


def test_sets_of_any_size_share_one_compiled_step(toy_sets):
  """The step proper depends on the batch, not on the set: Segment networks
  trained on sets of 16 and 4 samples (other largest ids too) compile it
  once, and only the small gather per set. Upgrade's P reads max_label, so
  its step is built per bound."""
  big, small, _ = toy_sets
  assert big.max_label != small.max_label or len(big) != len(small)
  cfg = _toy_config(task=T.Segment(), widths=(4, 4, 4, 4, 4), crop=32)
  mesh = parallel.make_mesh()
  steps = [T.make_train_step(cfg, mesh, ds.max_label) for ds in (big, small)]
  assert steps[0].core is steps[1].core and isinstance(steps[0], T.TrainStep)
  before = steps[0].core._cache_size()
  for step, ds in zip(steps, (big, small)):
    state = T.create_train_state(cfg, 1, jax.random.PRNGKey(0), mesh)
    state, m = step(state, parallel.place_dataset(ds, mesh))
    assert np.isfinite(float(m["loss"]))
  # The streamed placement's batch (put_batch) runs the same program.
  streamed = T.make_train_step(cfg, mesh, big.max_label, streamed=True)
  state = T.create_train_state(cfg, 1, jax.random.PRNGKey(0), mesh)
  idx = np.asarray(T.draw_indices(np.asarray(state.rng), 0, len(big), cfg.batch_size))
  streamed(state, parallel.put_batch(big, idx, mesh,
                                     labels_as=parallel.label_dtype(big.targets, big.others)))
  assert steps[0].core._cache_size() - before == 1
  assert steps[0].gather._cache_size() == 2
  up = _toy_config()
  assert T.make_train_step(up, mesh, 3).core is not T.make_train_step(up, mesh, 9).core
