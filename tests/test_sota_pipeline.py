"""Table 3.3's competing methods as pipeline scenarios: their sets, the run
key, and a tiny CLI run that carries them into results.json and the table."""

import json
from pathlib import Path

import cli
import numpy as np
import pytest
from conftest import XLA_CACHE

from upgrade_jax import engine, pipeline
from upgrade_jax.data.types import Dataset

ROOT = Path(__file__).resolve().parents[1]


def _ds(n, h, w, name):
  t = np.zeros((n, h, w), np.int32)
  t[:, 2:5, 2:5] = 1
  return Dataset(np.ones((n, h, w, 1), np.float32), t, np.zeros_like(t),
                 np.tile([h, w], (n, 1)).astype(np.int32), tuple(f"{name}{i}" for i in range(n)))


class _Forbidden:
  """Stands for the LQ slices' true labels: reading them fails the test."""

  def __getattr__(self, name):
    raise AssertionError(f"a competing method read the LQ truth ({name})")


def test_methods_train_on_hq_and_lq_as_labelled_never_on_lq_truth():
  hq, val, lq = _ds(2, 8, 8, "hq"), _ds(1, 8, 8, "val"), _ds(3, 8, 8, "lq")
  d = pipeline.RepData(hq, val, lq, _Forbidden(), _ds(1, 8, 8, "t"), _ds(1, 8, 8, "tl"),
                       _ds(1, 8, 8, "vl"))
  train, v = pipeline.REGISTRY["confident_learning"].data(d, None)
  assert train.names == ("hq0", "hq1", "lq0", "lq1", "lq2") and v.names == ("val0",)
  np.testing.assert_array_equal(train.targets[2:], lq.targets)
  train, v = pipeline.REGISTRY["partial_labelling"].data(d, None)
  assert train.names == ("hq0", "hq1", "lq0", "lq1", "lq2") and v.names == ("val0",)
  # HQ slices are fully labelled; the LQ slices' background is unlabelled.
  assert (train.targets[:2] >= 0).all()
  np.testing.assert_array_equal(train.targets[2:] == -1, lq.targets == 0)


def test_methods_are_opt_in_and_their_default_options_leave_the_run_key_alone():
  for s in ("confident_learning", "partial_labelling"):
    assert s in pipeline.SCENARIOS and s not in pipeline.DEFAULT_SCENARIOS
  cfg = pipeline.PipelineConfig()
  key = pipeline.run_key(cfg)
  assert "confident_learning" not in key and "partial_labelling" not in key
  other = pipeline.PipelineConfig(options=(engine.ConfidentLearning(folds=3),))
  assert pipeline.run_key(other)["confident_learning"] == {
      "name": "confident_learning", "confidence": 0.8, "folds": 3}
  assert other.options_of("confident_learning").folds == 3
  assert other.options_of("partial_labelling") == engine.PartialLabelling()
  assert other.options_of("hq") is None
  # Options equal to the defaults are the defaults: the same key.
  same = pipeline.PipelineConfig(options=(engine.PartialLabelling(),))
  assert pipeline.run_key(same) == key
  with pytest.raises(ValueError, match="not the options of a method"):
    pipeline.PipelineConfig(options=(engine.Segment(),))
  with pytest.raises(ValueError, match="one Task per method"):
    pipeline.PipelineConfig(options=(engine.ConfidentLearning(), engine.ConfidentLearning(folds=3)))


def test_registry_entries_are_complete_and_consistent():
  """Every scenario has its data, trainer and label; a method's options are
  the engine task of its name; the defaults are the paper's five."""
  assert pipeline.DEFAULT_SCENARIOS == ("hq", "lq", "hq_lq", "hq_upgraded", "oracle")
  for name, entry in pipeline.REGISTRY.items():
    assert entry.name == name and entry.label and callable(entry.data) and callable(entry.train)
    assert entry.cost({"hq_train": 2, "hq_val": 1, "lq": 9}, 5.0) >= 9
    if entry.options is not None:
      assert entry.options.name == name and entry.flag_prefix
  prefixes = [e.flag_prefix for e in pipeline.REGISTRY.values() if e.flag_prefix]
  assert len(set(prefixes)) == len(prefixes)


TINY = ["--n_volumes=5", "--volume_shape=6,96,96", "--n_test=1", "--n_hq=4", "--max_test=4",
        "--n_lq=6", "--width=4", "--crop=32", "--batch_size=4", "--max_steps=6",
        "--steps_per_epoch=3", "--log_every=3", "--patience=2"]


@pytest.mark.slow
def test_cli_runs_both_methods_into_results_and_table(tmp_path):
  out = tmp_path / "run"
  # The methods alone: their pairing with hq_upgraded is the generic one
  # (Results.summary, test_pipeline_e2e); one network fewer to compile here.
  args = TINY + ["--scenarios=confident_learning,partial_labelling",
                 "--threshold_baseline=false", f"--out_dir={out}", f"--compilation_cache={XLA_CACHE}"]
  proc = cli.run("experiments.upgrade", args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads((out / "results.json").read_text())
  assert set(d["segmentation_dice"]) == {"confident_learning", "partial_labelling"}
  assert d["labels"]["confident_learning"] and d["labels"]["partial_labelling"]
  assert "Confident learn." in proc.stdout and "Partial labels" in proc.stdout
  rep = json.loads((out / "rep0" / "rep.json").read_text())
  info = rep["methods"]["confident_learning"]
  assert len(info["q"]) == 2 and info["pixels"] > 0
  assert rep["methods"]["partial_labelling"]["unlabelled_pixels"] > 0
  for sub in ("teacher0", "teacher1", "student"):
    assert (out / "rep0" / "seg_confident_learning" / sub).is_dir()
  assert (out / "scenarios.png").stat().st_size > 1000
