"""The BioImage.IO export (upgrade_jax/bioimageio/) and `python -m experiments.export`."""

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from conftest import require_extra  # noqa: E402

onnx = require_extra("onnx", "pip install -e '.[export]'")
require_extra("onnxruntime", "pip install -e '.[export]'")
require_extra("bioimageio.spec", "pip install -e '.[export]'")
bioimageio_core = require_extra("bioimageio.core", "pip install -e '.[export]'")

import cli  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from ruyaml import YAML  # noqa: E402  (bioimageio.spec's YAML reader)

from conftest import XLA_CACHE, toy_discs  # noqa: E402
from upgrade_jax import bioimageio as bx  # noqa: E402
from upgrade_jax import export  # noqa: E402
from upgrade_jax.engine import TrainConfig, create_train_state  # noqa: E402
from upgrade_jax.engine.tasks import Upgrade  # noqa: E402
from upgrade_jax.rundir import InputError  # noqa: E402

# ONNX Runtime against the JAX path (export.sample_maps), measured on these
# tiny upgraders and on the width-16 quickstart model (256², 1.2e-7;
# 2026-12-07): 6e-8 to 2e-7 at every size tried, so 1e-5 leaves margin for
# other CPUs' summation orders and still catches a wrong layer (on the
# 70x130 case below: BatchNorm at its initial statistics 5.4e-2, padding to a
# multiple of 16 instead of predict_image's shape bucket 7.2e-4).
TOL = 1e-5
SAMPLE_HW = (100, 90)   # not multiples of 16: the graph pads, as predict_image


def tiny_upgrader(*, boundaries=False, normalisation="percentile", seed=1):
  """Width 4, random init, with BatchNorm statistics and affine parameters
  drawn away from their init (so the folded BatchNorm is really tested)."""
  cfg = TrainConfig(widths=(4, 8, 8, 8, 8), task=Upgrade(boundaries=boundaries))
  state = create_train_state(cfg, 2, jax.random.PRNGKey(seed))
  up = export.upgrader_from_state(state, image_channels=1, normalisation=normalisation)
  rng = np.random.default_rng(seed)
  draws = {"mean": lambda s: rng.normal(0, 0.2, s), "var": lambda s: rng.uniform(0.3, 2, s),
           "scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.2, s)}

  def perturb(path, v):
    draw = draws.get(path[-1].key)
    return v if draw is None else draw(np.shape(v)).astype(np.float32)

  return dataclasses.replace(up, variables=jax.tree_util.tree_map_with_path(
      perturb, up.variables))


def snapshot(root: Path) -> dict:
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                     if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def run_export(*args):
  return cli.run("experiments.export", [f"--compilation_cache={XLA_CACHE}", *args],
                 timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A saved tiny upgrader, a sample pair on disk, and the package the CLI made."""
  root = tmp_path_factory.mktemp("bioimageio")
  export.save_upgrader(root / "model", tiny_upgrader(),
                       train={"best_val_dice": 0.5, "best_step": 3})
  ds = toy_discs(1, SAMPLE_HW, seed=4, discs=(5, 8), radius=(4, 6))
  tifffile.imwrite(root / "image.tif", (ds.images[0, ..., 0] * 1000).clip(0).astype(np.uint16))
  lq = ds.targets[0].copy()
  lq[lq % 2 == 1] = 0   # an LQ label with instance ids, half the cells omitted
  tifffile.imwrite(root / "lq.tif", lq.astype(np.uint16))
  (root / "out").mkdir()
  proc = run_export(f"--model={root}/model", "--format=bioimageio",
                    f"--out={root}/out/upgrader.zip", f"--sample_image={root}/image.tif",
                    f"--sample_labels={root}/lq.tif", "--authors=Test Author")
  assert proc.returncode == 0, proc.stderr
  return root, proc


def test_the_cli_writes_one_validated_package(exported):
  root, proc = exported
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1 and "wrote" in lines[0] and "validation valid-format" in lines[0]
  assert sorted(p.name for p in (root / "out").iterdir()) == ["upgrader.zip"]   # no leftovers
  mode = (root / "out/upgrader.zip").stat().st_mode & 0o777
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask   # as readable by the group as any file `open` makes
  with zipfile.ZipFile(root / "out/upgrader.zip") as z:
    assert sorted(z.namelist()) == sorted(["rdf.yaml", "upgrader.onnx", "test_image.npy",
                                           "test_lq_mask.npy", "test_probability.npy",
                                           "cover.png", "README.md"])
    rdf = YAML(typ="safe").load(z.read("rdf.yaml"))
    readme = z.read("README.md").decode()
    assert z.read("cover.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
  assert [t["id"] for t in rdf["inputs"]] == ["image", "lq_mask"]
  image, lq = rdf["inputs"]
  ranges = [p for p in image["preprocessing"] if p["id"] == "scale_range"]
  assert ranges == [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0,
                                                     "max_percentile": 99.8}}]
  assert {"id": "binarize", "kwargs": {"threshold": 0.5}} in lq["preprocessing"]
  assert lq["preprocessing"][-1] == {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
  assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["foreground"]
  assert set(bx.TAGS) <= set(rdf["tags"]) and rdf["license"] == "CC-BY-4.0"
  assert rdf["cite"][0]["doi"] == "10.3390/jimaging10070172"
  assert rdf["authors"] == [{"name": "Test Author"}]
  assert rdf["weights"]["onnx"]["opset_version"] == bx.ONNX_OPSET
  assert "10.3390/jimaging10070172" in readme and "## Validation" in readme
  assert "Best validation Dice 0.5000 at step 3" in readme   # read from model.json


def test_bioimageio_spec_validates_and_core_tests_the_package(exported):
  from bioimageio.spec import load_description

  path = exported[0] / "out/upgrader.zip"
  descr = load_description(path, perform_io_checks=True)
  assert descr.validation_summary.status in ("valid-format", "passed")
  summary = bioimageio_core.test_model(path)
  failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
  assert summary.status == "passed", failed
  # The test-outputs case and the parametrized sizes (16-18 px, batch 1 and 2) ran.
  names = " ".join(d.name for d in summary.details)
  assert "Reproduce test outputs" in names and "batch_size: 2" in names


def test_onnx_runtime_reproduces_the_jax_probabilities(exported):
  root = exported[0]
  up = export.load_upgrader(root / "model")
  image, lq = export.load_sample(root / "image.tif", root / "lq.tif", up)
  fg, interior = export.sample_maps(up, image, lq)
  assert interior is None
  with zipfile.ZipFile(root / "out/upgrader.zip") as z:
    model = z.read("upgrader.onnx")
    test_in = np.load(zipfile.Path(z, "test_image.npy").open("rb"))
    test_lq = np.load(zipfile.Path(z, "test_lq_mask.npy").open("rb"))
    test_out = np.load(zipfile.Path(z, "test_probability.npy").open("rb"))
  assert test_in.shape == (1, 1) + SAMPLE_HW and test_out.shape == (1, 1) + SAMPLE_HW
  np.testing.assert_allclose(test_out[0, 0], fg, atol=1e-6)   # the JAX path's own output
  # The package's preprocessing (scale_range, binarize) on its raw test input,
  # then the graph: 100x90 is padded inside it to predict_image's bucket.
  got = bx.run_onnx(model, *bx.package_inputs(up, test_in[0].transpose(1, 2, 0),
                                              test_lq[0, 0]))
  assert np.abs(got[0, 0] - fg).max() <= TOL
  # A multiple of 16, batch 2, straight on the normalised input the network sees.
  crop = (slice(0, 64), slice(0, 80))
  ref = export.sample_maps(up, image[crop], lq[crop])[0]
  x = np.stack([image[crop].transpose(2, 0, 1)] * 2)
  m = np.stack([(lq[crop] > 0)[None].astype(np.float32)] * 2)
  got = bx.run_onnx(model, x, m)
  assert got.shape == (2, 1, 64, 80) and np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("boundaries,normalisation", [(True, "percentile"), (False, "max")])
def test_the_graph_matches_jax_with_boundaries_and_max_normalisation(boundaries, normalisation):
  up = tiny_upgrader(boundaries=boundaries, normalisation=normalisation, seed=2)
  ds = toy_discs(1, (70, 130), seed=5)
  raw = (ds.images[0] * 800).clip(0).astype(np.uint16)
  sample = bx.sample_from_arrays(up, raw, ds.targets[0], "toy")
  ref = bx.reference_maps(up, sample)
  assert ref.shape == ((2 if boundaries else 1), 70, 130)
  # "max" is computed inside the graph from the raw intensities.
  got = bx.run_onnx(bx.onnx_model(up).SerializeToString(),
                    *bx.package_inputs(up, sample.raw, sample.labels))[0]
  assert np.abs(got - ref).max() <= TOL


def test_a_failed_validation_leaves_nothing(exported, tmp_path, monkeypatch):
  root = exported[0]
  up = export.load_upgrader(root / "model")
  sample = bx.read_sample(up, root / "image.tif", root / "lq.tif")

  def fails(*args, **kwargs):
    raise RuntimeError("validation failed")

  monkeypatch.setattr(bx.package, "load_description", fails)
  monkeypatch.setattr(bx.package.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  (tmp_path / "out").mkdir()
  with pytest.raises(RuntimeError, match="validation failed"):
    bx.write_package(tmp_path / "out/u.zip", up, sample, name="tiny upgrader",
                     authors=["A"], license_id="MIT")
  assert not list((tmp_path / "out").iterdir()) and not list((tmp_path / "tmp").iterdir())
  with pytest.raises(InputError, match="--license=nope"):
    bx.check_metadata("tiny upgrader", ["A"], "nope")


@pytest.mark.parametrize("case,culprit", [
    ("missing_model", "--model="),
    ("existing_out", "--overwrite"),
    ("out_in_model", "inside --model"),
])
def test_the_cli_refuses_bad_inputs_in_one_line(exported, tmp_path, case, culprit):
  root = tmp_path / "c"
  root.mkdir()
  model = exported[0] / "model"
  out = root / "upgrader.zip"
  if case == "missing_model":
    model = root / "no_model"
  elif case == "existing_out":
    out.write_bytes(b"a user's file")
  elif case == "out_in_model":
    out = model / "upgrader.zip"
  before, model_before = snapshot(root), snapshot(exported[0] / "model")
  proc = run_export(f"--model={model}", f"--out={out}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], lines
  assert snapshot(root) == before and snapshot(exported[0] / "model") == model_before
