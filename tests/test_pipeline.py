"""Algorithm 1 end to end: the CLI, resume, user mode, the report."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from upgrade_jax import pipeline, report
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.perturb import PerturbConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

TINY = ["--n_volumes=4", "--volume_shape=6,96,96", "--n_test=1", "--n_hq=4", "--max_test=4",
        "--n_lq=6", "--width=4", "--crop=32", "--batch_size=4", "--max_steps=6",
        "--steps_per_epoch=3", "--log_every=3", "--patience=2"]


# One persistent XLA cache for every CLI run of this session (not ~/.cache).
CACHE = tempfile.mkdtemp(prefix="upgrade_jax_xla_")


def run_cli(args, module="experiments.upgrade", check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [f"--compilation_cache={CACHE}", *args]
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def tree_digest(path: Path) -> str:
  h = hashlib.sha256()
  for p in sorted(path.rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(path)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


@pytest.mark.slow
def test_cli_end_to_end_and_resume(tmp_path):
  out = tmp_path / "run"
  args = TINY + ["--scenarios=hq_upgraded", "--reps=2", f"--out_dir={out}"]
  proc = run_cli(args)
  assert "Annotations" in proc.stdout and "Segmentation" in proc.stdout  # the table
  d = json.loads((out / "results.json").read_text())
  for k in ("lq", "upgraded"):
    assert set(d["annotation_dice"][k]) >= {"mean", "std", "per_rep"}
    assert len(d["annotation_dice"][k]["per_rep"]) == 2
    assert 0.0 <= d["annotation_dice"][k]["mean"] <= 1.0
  assert set(d["segmentation_dice"]) == {"hq_upgraded", "threshold"}
  assert "hq_upgraded_vs_threshold" in d["wilcoxon"]
  for k in ("config", "versions", "timings"):
    assert d[k]
  assert d["config"]["upgrade"]["task"]["perturb"]["omission_rate"] == 0.7
  # Issue 13: instance scores beside Dice, and the saved upgrader of rep 0.
  assert set(d["annotation_instances"]) == {"lq", "upgraded"}
  assert len(d["annotation_instances"]["upgraded"]["f1@0.5"]["per_rep"]) == 2
  assert "Instances" in proc.stdout and (out / "model" / "model.json").is_file()
  assert d["versions"]["jax"]
  # mean/std really are the statistics of the per-rep values.
  per = d["segmentation_dice"]["hq_upgraded"]["per_rep"]
  assert d["segmentation_dice"]["hq_upgraded"]["mean"] == pytest.approx(np.mean(per))
  assert d["segmentation_dice"]["hq_upgraded"]["std"] == pytest.approx(np.std(per))
  csv_text = (out / "results.csv").read_text()
  assert csv_text.startswith("kind,name,rep,dice")
  for fig in ("scenarios.png", "overlays.png"):
    assert (out / fig).stat().st_size > 1000
  tifs = sorted((out / "upgraded").glob("*.tif"))
  assert len(tifs) == 6  # one per LQ slice (--n_lq=6)
  lab = tifffile.imread(tifs[0])
  assert lab.dtype == np.uint16 and lab.ndim == 2
  # Same command again: every repetition is already finished, nothing retrains.
  before = json.loads((out / "rep0" / "rep.json").read_text())
  proc2 = run_cli(args)
  assert proc2.stdout.count("already finished") == 2
  assert "training the upgrade network" not in proc2.stdout
  assert json.loads((out / "rep0" / "rep.json").read_text()) == before


def test_cli_rejects_bad_flags(tmp_path):
  cases = [
      (["--omission_rate=1.5"], "omission_rate"),
      (["--scenarios=hq,nonsense"], "scenarios"),
      (["--hq_images=/tmp"], "user mode needs all"),
      (["--volume_shape=4,64"], "volume_shape"),
  ]
  for extra, needle in cases:
    proc = run_cli(extra + [f"--out_dir={tmp_path / 'x'}"], check=False)
    assert proc.returncode != 0, extra
    assert needle in proc.stderr + proc.stdout, (extra, proc.stderr[-500:])
  proc = run_cli([f"--out_dir={tmp_path / 'x'}", "--data=folder"], check=False)
  assert proc.returncode != 0 and "data_dir" in proc.stderr + proc.stdout


def _write_folder(root: Path, images, labels, names):
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir(parents=True)
  for img, lab, name in zip(images, labels, names):
    tifffile.imwrite(root / "images" / f"{name}.tif", img)
    tifffile.imwrite(root / "labels" / f"{name}.tif", lab)


def _user_mode(tmp_path, hq, lq, extra=()):
  out = tmp_path / "out"
  digest = {p: tree_digest(p) for p in (hq, lq)}
  run_cli(["--hq_images", str(hq / "images"), "--hq_labels", str(hq / "labels"),
           "--lq_images", str(lq / "images"), "--lq_labels", str(lq / "labels"),
           "--width=4", "--crop=32", "--batch_size=4", "--max_steps=4",
           "--steps_per_epoch=2", "--log_every=2", f"--out_dir={out}", *extra])
  for p, dig in digest.items():
    assert tree_digest(p) == dig, f"input folder {p} was modified"
  return out


@pytest.mark.slow
def test_user_mode_writes_one_label_file_per_lq_image(tmp_path):
  from upgrade_jax.data import synthetic
  vols = synthetic.generate("hl60", seed=1, n_volumes=2, shape=(6, 64, 80), keep_empty=True)
  imgs = [v.image[z] for v in vols for z in range(v.num_slices)]
  labs = [v.target[z].astype(np.uint16) for v in vols for z in range(v.num_slices)]
  hq, lq = tmp_path / "hq", tmp_path / "lq"
  _write_folder(hq, imgs[:4], labs[:4], [f"hq{i}" for i in range(4)])
  lq_names = ["a_lq", "b_lq", "c_lq"]
  _write_folder(lq, [i[:48, :72] for i in imgs[4:7]], [(l[:48, :72] > 0).astype(np.uint8)
                                                      for l in labs[4:7]], lq_names)
  out = _user_mode(tmp_path, hq, lq, extra=["--scenarios=hq_upgraded"])
  files = sorted(p.name for p in (out / "upgraded").glob("*.tif"))
  assert files == [f"{n}.tif" for n in lq_names]
  for n in lq_names:
    lab = tifffile.imread(out / "upgraded" / f"{n}.tif")
    assert lab.shape == (48, 72) and lab.dtype == np.uint16
  assert (out / "seg_hq_upgraded").is_dir()
  assert json.loads((out / "results.json").read_text())["n_lq"] == 3


@pytest.mark.slow
@pytest.mark.shared_data
def test_user_mode_on_dsb2018_split(tmp_path):
  src = SHARED / "dsb2018"
  if not (src / "images").is_dir():
    pytest.skip(f"shared data not found at {src}")
  from upgrade_jax.data import io
  from upgrade_jax.perturb import omission, relabel_sequential
  import jax
  names = sorted(p.stem for p in (src / "images").glob("*.tif"))
  grey = [n for n in names if io.read_image(src / "images" / f"{n}.tif").ndim == 2]
  small = [n for n in grey if io.read_labels(src / "labels" / f"{n}.tif").shape == (256, 256)]
  hq_names, lq_names = small[:6], small[6:9]
  hq, lq = tmp_path / "hq", tmp_path / "lq"
  for d in (hq, lq):
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir(parents=True)
  for n in hq_names:  # links: the inputs are the shared files themselves
    os.symlink(src / "images" / f"{n}.tif", hq / "images" / f"{n}.tif")
    os.symlink(src / "labels" / f"{n}.tif", hq / "labels" / f"{n}.tif")
  for i, n in enumerate(lq_names):
    os.symlink(src / "images" / f"{n}.tif", lq / "images" / f"{n}.tif")
    gt = relabel_sequential(io.read_labels(src / "labels" / f"{n}.tif"))
    low = np.asarray(omission(jax.random.key(i), gt, 0.7, max_label=int(gt.max())))
    tifffile.imwrite(lq / "labels" / f"{n}.tif", low.astype(np.uint16))
  out = _user_mode(tmp_path, hq, lq)
  for n in lq_names:
    up = tifffile.imread(out / "upgraded" / f"{n}.tif")
    assert up.shape == (256, 256) and up.dtype == np.uint16
  assert sorted(p.stem for p in (out / "upgraded").glob("*.tif")) == sorted(lq_names)


# --------------------------------------------------------------------------
# Library pieces, no training.

def _ds(n, h, w, fill=1, name="s"):
  t = np.zeros((n, h, w), np.int32)
  t[:, 2:5, 2:5] = fill
  return Dataset(np.ones((n, h, w, 1), np.float32), t, np.zeros_like(t),
                 np.tile([h, w], (n, 1)).astype(np.int32), tuple(f"{name}{i}" for i in range(n)))


def test_concat_pads_and_keeps_extents():
  a, b = _ds(2, 8, 10, name="a"), _ds(3, 12, 6, name="b")
  c = concat([a, b])
  assert c.images.shape == (5, 12, 10, 1)
  np.testing.assert_array_equal(c.extents, [[8, 10]] * 2 + [[12, 6]] * 3)
  assert c.names == ("a0", "a1", "b0", "b1", "b2")
  assert c.valid_mask()[0, 9:].sum() == 0 and c.valid_mask()[2, :, 6:].sum() == 0


def test_scenarios_train_on_the_right_sets():
  hq, val, lq = _ds(2, 8, 8, name="hq"), _ds(1, 8, 8, name="val"), _ds(3, 8, 8, name="lq")
  up = _ds(3, 8, 8, name="up")
  d = pipeline.RepData(hq, val, lq, lq, _ds(1, 8, 8), _ds(1, 8, 8), _ds(1, 8, 8, name="vlq"))
  names = {s: pipeline.SCENARIO_DATA[s](d, up) for s in pipeline.SCENARIOS}
  assert names["hq"][0].names == ("hq0", "hq1")
  assert names["lq"][0].names == ("lq0", "lq1", "lq2") and names["lq"][1].names == ("vlq0",)
  assert len(names["hq_lq"][0]) == 5 and names["hq_lq"][1].names == ("val0",)
  assert names["hq_upgraded"][0].names[-1] == "up2"


def test_summary_statistics_and_wilcoxon():
  reps = [{"rep": i, "annotation_dice": {"lq": 0.5 + 0.01 * i, "upgraded": 0.9 - 0.01 * i},
           "segmentation_dice": {"hq": 0.7 + 0.02 * i, "hq_upgraded": 0.8 + 0.01 * i}}
          for i in range(6)]
  res = pipeline.Results(pipeline.PipelineConfig(), reps, {"total_s": 1.0})
  s = res.summary()
  assert s["annotation_dice"]["lq"]["mean"] == pytest.approx(0.525)
  assert s["segmentation_dice"]["hq"]["std"] == pytest.approx(np.std([0.7 + 0.02 * i
                                                                      for i in range(6)]))
  # All six differences positive: the exact two-sided p is 2/2**6.
  assert s["wilcoxon"]["hq_upgraded_vs_hq"] == pytest.approx(2 / 64)
  table = report.format_table({**s, "reps": reps}, paper={"upgraded": 0.91})
  assert "HQ + upgraded" in table and "0.91" in table and "p = 0.03125" in table


def test_pipeline_config_validation():
  with pytest.raises(ValueError, match="scenarios"):
    pipeline.PipelineConfig(scenarios=("hq", "bogus"))
  with pytest.raises(ValueError, match="data_dir"):
    pipeline.DataConfig(source="epfl_mito")
  with pytest.raises(ValueError, match="others"):
    pipeline.DataConfig(others="everything")
  with pytest.raises(ValueError, match="lq_source"):
    pipeline.PipelineConfig(lq_source="oracle")


def test_imperfect_hq_is_perturbed_instances():
  ds = _ds(2, 16, 16)
  ds.targets[:, 8:12, 8:12] = 2
  out = pipeline._imperfect(ds, PerturbConfig(omission_rate=0.5), seed=0)
  for t in out.targets:
    assert len(np.unique(t)) == 2  # one of the two cells left, relabelled 1


def test_sweep_figure_and_parser(tmp_path):
  from experiments import sweep  # noqa: F401  (defines the flags)
  pts = [(x, {"annotation_dice": {"lq": {"mean": 0.5, "std": 0.01}, "upgraded": {"mean": m, "std": 0.02}},
              "segmentation_dice": {"hq": {"mean": 0.7, "std": 0.0}}})
         for x, m in ((5, 0.8), (10, 0.85), (20, 0.9))]
  report.plot_sweep(pts, tmp_path / "s.png", xlabel="n_hq")
  assert (tmp_path / "s.png").stat().st_size > 1000
  assert sweep.parse_sweep("n_hq=5,10") == ("n_hq", ["5", "10"])
  assert sweep.parse_sweep("volume_shape=4,64,64;8,64,64") == (
      "volume_shape", ["4,64,64", "8,64,64"])
  from upgrade_jax.rundir import InputError
  with pytest.raises(InputError, match="not a flag"):
    sweep.parse_sweep("bogus=1,2")
