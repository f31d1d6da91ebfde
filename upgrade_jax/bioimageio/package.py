"""The package: checks of what it will say, its files (cover, README, the
rdf description) and write_package, which validates the .zip before it gets
its name."""

from __future__ import annotations

import datetime
import io as _bytes_io
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import jax
import numpy as np
import pydantic
from bioimageio.spec import InvalidDescr, load_description, save_bioimageio_package
from bioimageio.spec.model import v0_5

import upgrade_jax
from upgrade_jax import export, files, rundir
from upgrade_jax.bioimageio.onnx_graph import ONNX_OPSET, onnx_model, run_onnx
from upgrade_jax.bioimageio.samples import Sample, package_inputs, reference_maps
from upgrade_jax.data import intensity
from upgrade_jax.metrics import FOREGROUND_THRESHOLD
from upgrade_jax.models.unet import MULTIPLE
from upgrade_jax.rundir import InputError

__all__ = ["MIN_SIDE", "TAGS", "CITATION", "DOI", "check_exportable", "check_metadata",
           "write_package"]

# Smallest side the package declares: one UNet block (smaller images work in
# the graph too; 16 keeps consumers' tiling away from meaningless slivers).
MIN_SIDE = MULTIPLE
# ONNX Runtime on the sample must match the JAX path this well, or
# write_package refuses (bioimageio.core's default test tolerance).
_MAX_ONNX_DIFF = 1e-3

TAGS = ("segmentation", "cell", "annotation", "2d", "onnx")
CITATION = ("Vadineanu, S., Pelt, D. M., Dzyubachyk, O., Batenburg, K. J. Reducing Manual "
            "Annotation Costs for Cell Segmentation by Upgrading Low-Quality Annotations. "
            "J. Imaging 2024, 10(7), 172.")
DOI = "10.3390/jimaging10070172"

_FILES = {"weights": "upgrader.onnx", "image": "test_image.npy", "lq_mask": "test_lq_mask.npy",
          "probability": "test_probability.npy", "cover": "cover.png", "readme": "README.md"}


# --------------------------------------------------------------------------
# Checks of what the package will say.

def check_exportable(upgrader: export.Upgrader) -> None:
  """Raises InputError (one line) unless the package can state this
  upgrader's input: an upgrade task, a normalisation the package expresses."""
  if upgrader.task.name != "upgrade":
    raise InputError(f"the model is a {upgrader.task.name!r} network, not an upgrader; "
                     "export the model/ folder of an upgrade run")
  if upgrader.normalisation not in intensity.NORMALISATIONS:
    raise InputError(f"the model's normalisation {upgrader.normalisation!r} is unknown to "
                     f"this upgrade_jax (it knows {intensity.NORMALISATIONS})")
  lo, hi = upgrader.percentiles
  if upgrader.normalisation == "percentile" and hi <= 1.0:
    # scale_range's max_percentile must exceed 1 (a guard against fractions).
    raise InputError(f"the model's percentiles ({lo:g}, {hi:g}): BioImage.IO's scale_range "
                     "takes a high percentile above 1 only; this model cannot be exported")


def check_metadata(name: str, authors, license_id: str) -> None:
  """Raises InputError (one line, naming the flag) unless `name`, `authors`
  and `license_id` are what BioImage.IO accepts (checked by its own types)."""
  field = v0_5.ModelDescr.model_fields["name"]
  try:
    pydantic.TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(name)
  except pydantic.ValidationError:
    raise InputError(f"--name={name!r}: a BioImage.IO name has 5-128 characters, only letters, "
                     "digits, spaces and _+-()") from None
  if not authors:
    raise InputError("--authors is empty; give the names of the people who trained the model")
  for a in authors:
    try:
      v0_5.Author(name=a)
    except pydantic.ValidationError:
      raise InputError(f"--authors: {a!r} is not a valid author name (no '/', not "
                       "empty)") from None
  try:
    v0_5.LicenseId(license_id)
  except (pydantic.ValidationError, ValueError):
    raise InputError(f"--license={license_id}: not an SPDX license identifier BioImage.IO "
                     "accepts (e.g. CC-BY-4.0, MIT, Apache-2.0)") from None


# --------------------------------------------------------------------------
# The package's files.

def _cover_png(sample: Sample, probs: np.ndarray) -> bytes:
  """PNG bytes, 2:1: the image, its LQ label, the upgraded mask (p > 0.5)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  img = sample.raw.mean(-1)
  lo, hi = np.percentile(img, [1, 99.8])
  fig = Figure(figsize=(6, 3), dpi=100)
  FigureCanvasAgg(fig)
  panels = [(img, "image", "gray", (lo, hi if hi > lo else lo + 1)),
            (sample.labels > 0, "LQ label", "magma", (0, 1)),
            (probs[0] > FOREGROUND_THRESHOLD, "upgraded", "magma", (0, 1))]
  for i, (a, title, cmap, (vmin, vmax)) in enumerate(panels):
    ax = fig.add_axes([i / 3 + 0.01, 0.02, 1 / 3 - 0.02, 0.86])
    ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
  buf = _bytes_io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return buf.getvalue()


def _normalisation_text(upgrader: export.Upgrader) -> str:
  lo, hi = upgrader.percentiles
  return {
      "percentile": f"each channel of each image maps its percentiles {lo:g} and {hi:g} to 0 "
                    "and 1, without clipping (csbdeep's `normalize`, as StarDist and Cellpose); "
                    "the package states it as the preprocessing `scale_range` "
                    f"(min_percentile {lo:g}, max_percentile {hi:g}, axes y and x)",
      "max": "each image is divided by its maximum (the paper's); BioImage.IO has no such "
             "preprocessing step, so the ONNX graph does it and `image` takes raw intensities",
      "volume": "in training each slice was divided by its stack's maximum; on one image (as "
                "here, and in upgrade_jax's apply) that is its own maximum, which the ONNX "
                "graph computes",
      "none": "none: the network read the raw intensities as float32",
  }[upgrader.normalisation]


def _readme(upgrader: export.Upgrader, sample: Sample, diff: float, file_name: str) -> str:
  """README.md of the package, from the upgrader and model.json."""
  meta = upgrader.meta or {}
  train = meta.get("train") or {}
  cfg = train.get("config") or {}
  p = upgrader.task.perturb
  k = upgrader.model.num_classes
  lines = [
      "# Upgrade low-quality cell annotations (upgrade_jax)", "",
      "This model upgrades a **low-quality (LQ) cell-segmentation label** to a high-quality "
      "one. Given an image and a quickly drawn or otherwise sloppy label of it (cells "
      "missed, other objects drawn as cells, boundaries too wide or too tight), it predicts "
      "for every pixel the probability that it belongs to a target cell in a high-quality "
      "annotation. Threshold it at 0.5 for the upgraded mask. It is the upgrade network "
      "u_θ(image, P(HQ)) → HQ of Vadineanu et al. (J. Imaging 2024), trained with "
      "upgrade_jax on a few high-quality labels perturbed by P.", "",
      "## Inputs", "",
      f"- `image` (batch, channel, y, x), float32, {upgrader.image_channels} channel(s) "
      f"(upgrade_jax's '{upgrader.channels}' policy: "
      + ("convert RGB images to grey first, with the ITU-R 601 luma weights"
         if upgrader.channels == "grey" else "grey images repeated to 3 channels") + "). "
      "Raw intensities: the preprocessing normalises them.",
      "- `lq_mask` (batch, 1, y, x), float32: the LQ label of the same image, as an "
      "instance label image (ids) or a 0/1 mask; the preprocessing binarizes it at 0.5, "
      "so every labelled pixel counts as foreground.",
      f"- Any y and x of at least {MIN_SIDE} px: the graph pads the image with zeros at the "
      "bottom and right to upgrade_jax's shape bucket (a multiple of 16) and crops the "
      "output back, so the probabilities equal upgrade_jax's own up to float rounding for "
      f"images of at most {upgrader.tiling.tile} px a side (larger ones run whole; "
      "upgrade_jax's apply tiles them, with differences of order 1e-6 at the seams).", "",
      "## Normalisation", "",
      (lambda t: t[0].upper() + t[1:])(_normalisation_text(upgrader)) + ".", "",
      "## Output", "",
      "- `probability` (batch, channel, y, x), float32 in [0, 1]: channel 0 is the "
      "foreground probability, the softmax of the network's two foreground logits"
      + (" (channel 1: the probability of a cell's interior, away from its boundary, "
         "= foreground · sigmoid(third logit); upgrade_jax splits touching cells on it)"
         if k == 3 else "") + ". The upgraded mask is channel 0 > 0.5; upgrade_jax's "
      "`python -m experiments.apply` also splits it into instances seeded by the LQ ones.", "",
      "## Training", "",
      f"- Network: UNet (Ronneberger et al. 2015) with widths {list(upgrader.model.widths)}, "
      "BatchNorm and ReLU, input = image channels + the LQ mask channel, "
      f"{k} output logits.",
      f"- Perturbation P that turned the HQ training labels into LQ ones (drawn fresh each "
      f"step): omission rate {p.omission_rate:g}, inclusion rate {p.inclusion_rate:g}, "
      f"salt-and-pepper {p.salt_pepper_prob:g}, bias up to {p.bias_max} px"
      + (" per instance" if p.per_instance_bias else "") + "; label dropout "
      f"{upgrader.task.label_dropout:g}" + (", rates mixed per sample"
                                            if upgrader.task.strength_mix else "") + ".",
      "- Loss: soft Dice on the foreground" + (" plus soft Dice on the interior" if k == 3
                                               else "") + "; Adam.",
  ]
  if cfg:
    lines.append(f"- Schedule: {cfg.get('max_steps')} steps at most, batch "
                 f"{cfg.get('batch_size')} of {cfg.get('crop')} px crops, learning rate "
                 f"{cfg.get('lr')}, weights' average (EMA) {cfg.get('ema_decay')}, seed "
                 f"{cfg.get('seed')}.")
  if "best_val_dice" in train:
    lines.append(f"- Best validation Dice {train['best_val_dice']:.4f} at step "
                 f"{train.get('best_step')} (on HQ validation labels perturbed by P; "
                 "optimistic for real LQ labels).")
  if upgrader.hq_foreground_fraction is not None:
    lines.append(f"- Densest HQ training image: {upgrader.hq_foreground_fraction:.3f} of its "
                 "pixels foreground.")
  lines.append(f"- Saved by upgrade_jax {meta.get('package_version', upgrade_jax.__version__)}"
               f", jax {(meta.get('versions') or {}).get('jax', jax.__version__)}; exported by "
               f"upgrade_jax {upgrade_jax.__version__} on {datetime.date.today().isoformat()}.")
  lines += [
      "", "## Validation", "",
      f"The test tensors are {sample.source}: the test output is upgrade_jax's JAX "
      "prediction on it. ONNX Runtime on the preprocessed test input reproduced it with a "
      f"largest absolute difference of {diff:.1e} at export. To check the package:", "",
      "```python",
      "from bioimageio.core import test_model",
      f"print(test_model(\"{file_name}\").status)   # passed",
      "```", "",
      "Judge an upgrade on your own data by comparing a few upgraded labels with labels an "
      "expert checked (upgrade_jax: `python -m experiments.apply --truth=DIR`).", "",
      "## Citation", "", f"{CITATION} https://doi.org/{DOI}", "",
  ]
  return "\n".join(lines)


def _axes(channel_names, *, ref: str | None, output: bool = False):
  """(batch, channel, y, x) axes; y and x parameterized (>= MIN_SIDE, any
  step: the graph pads) or, with `ref`, the size of that tensor's."""
  def space(a):
    if ref is None:
      return v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=v0_5.ParameterizedSize(
          min=MIN_SIDE, step=1))
    cls = v0_5.SpaceOutputAxis if output else v0_5.SpaceInputAxis
    return cls(id=v0_5.AxisId(a), size=v0_5.SizeReference(tensor_id=v0_5.TensorId(ref),
                                                          axis_id=v0_5.AxisId(a)))
  return [v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(channel_names)),
          space("y"), space("x")]


def _image_channel_names(upgrader: export.Upgrader) -> list[str]:
  if upgrader.image_channels == 1:
    return ["intensity"]
  if upgrader.image_channels == 3 and upgrader.channels == "rgb":
    return ["red", "green", "blue"]
  return [f"channel{i}" for i in range(upgrader.image_channels)]


def _description(upgrader: export.Upgrader, work: Path, *, name: str, authors, license_id: str,
                 parameters: int) -> v0_5.ModelDescr:
  """The ModelDescr of the files in `work`."""
  f32 = v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))
  pre = [f32]
  if upgrader.normalisation == "percentile":
    lo, hi = upgrader.percentiles
    pre += [v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
        axes=[v0_5.AxisId("y"), v0_5.AxisId("x")], min_percentile=lo, max_percentile=hi)), f32]
  k = upgrader.model.num_classes
  meta = upgrader.meta or {}
  cfg = (meta.get("train") or {}).get("config") or {}
  image = v0_5.InputTensorDescr(
      id=v0_5.TensorId("image"), axes=_axes(_image_channel_names(upgrader), ref=None),
      description="raw intensities of the image whose label is upgraded",
      data=v0_5.IntervalOrRatioDataDescr(type="float32"), preprocessing=pre,
      test_tensor=v0_5.FileDescr(source=work / _FILES["image"]))
  # binarize gives bool; the graph takes float32, so ensure_dtype follows it.
  lq = v0_5.InputTensorDescr(
      id=v0_5.TensorId("lq_mask"), axes=_axes(["lq_mask"], ref="image"),
      description="the low-quality label: instance ids or a 0/1 mask (> 0.5 is foreground)",
      data=v0_5.IntervalOrRatioDataDescr(type="float32"),
      preprocessing=[f32, v0_5.BinarizeDescr(kwargs=v0_5.BinarizeKwargs(threshold=0.5)), f32],
      test_tensor=v0_5.FileDescr(source=work / _FILES["lq_mask"]))
  out = v0_5.OutputTensorDescr(
      id=v0_5.TensorId("probability"),
      axes=_axes(["foreground", "interior"][:2 if k == 3 else 1], ref="image", output=True),
      description="probability of the upgraded (high-quality) label's foreground"
                  + (" and of cell interiors" if k == 3 else ""),
      data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
      test_tensor=v0_5.FileDescr(source=work / _FILES["probability"]))
  known = {"training_batch_size": cfg.get("batch_size"), "initial_learning_rate": cfg.get("lr")}
  training = v0_5.TrainingDetails(
      loss_function="soft Dice" + (" (foreground + interior)" if k == 3 else ""),
      optimizer="Adam", training_preprocessing=_normalisation_text(upgrader),
      **{key: v for key, v in known.items() if v is not None})
  config = v0_5.Config(
      bioimageio=v0_5.BioimageioConfig(
          architecture_type="U-Net",
          architecture_description=f"2-D UNet, widths {list(upgrader.model.widths)}, "
                                   "BatchNorm, 2x2 max-pool, 2x2 transposed-conv up-sampling; "
                                   "input image channels + LQ mask",
          task="annotation upgrade (semantic segmentation)", target_structure=["cells"],
          model_parameter_count=parameters, training=training,
          out_of_scope_use="Labels unlike those it was trained on (another imaging "
                           "modality, other cell types, other label errors than its P): "
                           "check a few upgrades against expert labels first."),
      # model.json as saved (task, P, input policy, tiling, training facts).
      upgrade_jax={key: meta[key] for key in ("format", "format_version", "package_version",
                                              "model", "task", "input", "prediction", "train",
                                              "versions") if key in meta})
  p = upgrader.task.perturb
  return v0_5.ModelDescr(
      name=name,
      description="Upgrades a low-quality cell-segmentation label (missed cells, spurious "
                  "objects, biased boundaries) to a high-quality foreground probability, "
                  "given the image: the upgrade network u_theta of Vadineanu et al. (J. Imaging "
                  f"2024), trained with upgrade_jax under P (omission {p.omission_rate:g}, "
                  f"inclusion {p.inclusion_rate:g}, bias up to {p.bias_max} px).",
      authors=[v0_5.Author(name=a) for a in authors],
      cite=[v0_5.CiteEntry(text=CITATION, doi=DOI)],
      license=v0_5.LicenseId(license_id),
      tags=list(TAGS),
      documentation=v0_5.FileDescr(source=work / _FILES["readme"]),
      covers=[v0_5.FileDescr(source=work / _FILES["cover"])],
      inputs=[image, lq], outputs=[out],
      weights=v0_5.WeightsDescr(onnx=v0_5.OnnxWeightsDescr(
          source=work / _FILES["weights"], opset_version=ONNX_OPSET,
          comment="written with onnx.helper from the Flax variables by upgrade_jax "
                  f"{upgrade_jax.__version__} (BatchNorm folded into the convolutions)")),
      config=config)


def write_package(path, upgrader: export.Upgrader, sample: Sample, *, name: str, authors,
                  license_id: str, guard: rundir.InputGuard | None = None) -> dict:
  """Writes the BioImage.IO package of `upgrader` to `path` (a .zip), atomically.

  Builds every file in a private temporary folder, checks ONNX Runtime
  against the JAX path on `sample`, zips the package beside `path` under a
  temporary name, loads it with bioimageio.spec's validation (io checks
  included) and only then renames it to `path`; on any failure nothing is
  left (the temporary folder and file are removed).

  Args:
    path: the .zip to write (replaced if it exists: the caller decides).
    upgrader: what to export (check_exportable).
    sample: the test tensors' pair (read_sample / synthetic_sample).
    name, authors, license_id: the package's metadata (check_metadata).
    guard: the caller's inputs; writing over one raises InputError.

  Returns:
    {"path", "bytes", "status" (bioimageio.spec's), "max_abs_diff" (ONNX
    Runtime vs JAX on the sample), "shape" (H, W), "outputs" (K)}.

  Raises:
    InputError for an upgrader or metadata the package cannot state;
    RuntimeError when the ONNX graph or the package fails its check (a bug).
  """
  path = Path(path)
  if guard is not None:
    guard.check_output(path)
  check_exportable(upgrader)
  check_metadata(name, authors, license_id)
  model = onnx_model(upgrader)
  model_bytes = model.SerializeToString()
  expected = reference_maps(upgrader, sample)
  got = run_onnx(model_bytes, *package_inputs(upgrader, sample.raw, sample.labels))[0]
  diff = float(np.abs(got - expected).max())
  if not diff <= _MAX_ONNX_DIFF:
    raise RuntimeError(f"the ONNX graph does not reproduce the JAX network on the sample "
                       f"(max |dp| {diff:.2e} > {_MAX_ONNX_DIFF:g}); this is a bug of "
                       "upgrade_jax.bioimageio, please report it")
  parameters = sum(int(np.size(v)) for v in jax.tree.leaves(upgrader.variables["params"]))
  work = Path(tempfile.mkdtemp(prefix="upgrade_jax_bioimageio_"))
  status = {}
  try:
    (work / _FILES["weights"]).write_bytes(model_bytes)
    np.save(work / _FILES["image"], sample.raw.transpose(2, 0, 1)[None].astype(np.float32))
    np.save(work / _FILES["lq_mask"], sample.labels[None, None].astype(np.float32))
    np.save(work / _FILES["probability"], expected[None])
    (work / _FILES["cover"]).write_bytes(_cover_png(sample, expected))
    (work / _FILES["readme"]).write_text(_readme(upgrader, sample, diff, path.name))
    descr = _description(upgrader, work, name=name, authors=authors, license_id=license_id,
                         parameters=parameters)

    def save_and_validate(tmp):
      save_bioimageio_package(descr, output_path=Path(tmp))
      # The zip as written, read back with every check (files, hashes, test
      # tensors against the axes) before it gets its final name.
      loaded = load_description(Path(tmp), perform_io_checks=True)
      status["status"] = loaded.validation_summary.status
      if isinstance(loaded, InvalidDescr) or status["status"] not in ("valid-format", "passed"):
        raise RuntimeError(f"the written package fails bioimageio.spec's validation: "
                           f"{' '.join(loaded.validation_summary.format().split())[:2000]}")

    files.atomic_write(path, save_and_validate)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return {"path": str(path), "bytes": path.stat().st_size, "status": status["status"],
          "max_abs_diff": diff, "shape": tuple(sample.labels.shape),
          "outputs": int(expected.shape[0])}
