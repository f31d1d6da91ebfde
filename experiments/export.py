r"""A saved upgrader as a package other tools run: train once, share the model.

    python -m experiments.export --model=RUN/model --format=bioimageio \
        --out=upgrader.zip [--sample_image=TIF --sample_labels=TIF] \
        [--name=... --authors=A,B --license=CC-BY-4.0] [--overwrite]

writes a BioImage.IO model package (format 0.5; upgrade_jax/bioimageio/):
rdf.yaml, the ONNX weights, test tensors computed by upgrade_jax's own
prediction on one (image, LQ label) pair, a cover image and a README. The
pair is --sample_image with --sample_labels, or else a slice of the
synthetic microscope (--sample_preset) with an LQ label drawn by the
model's own perturbation P. The package is validated by bioimageio.spec
before it gets its name; `bioimageio.core.test_model(OUT)` then tests it.

As every entry point, it checks each flag, the model folder, the sample
files and --out before creating anything; a problem is one line on stderr
and exit code 2. It never writes inside the model folder, and it replaces
an existing --out only with --overwrite. Needs the `export` extra:
pip install -e '.[export]'.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from absl import app, flags

from experiments import cli
from upgrade_jax.data.synthetic import PRESETS

F = flags.FLAGS


def _bioimageio(plan: dict) -> dict:
  """The BioImage.IO writer: plan -> write_package's summary."""
  from upgrade_jax import bioimageio as bx

  sample = plan["sample"] or bx.synthetic_sample(plan["upgrader"], preset=F.sample_preset)
  return bx.write_package(plan["out"], plan["upgrader"], sample, name=F.name,
                          authors=plan["authors"], license_id=F.license, guard=plan["guard"])


# --format's registry: format -> (writer, the modules its extra provides).
FORMATS = {"bioimageio": (_bioimageio, ("onnx", "onnxruntime", "bioimageio.spec"))}

# Shared with experiments.apply (the same folder, the same meaning): either
# module may be imported first in one process.
flags.DEFINE_string("model", None, "The model/ folder a training run left (out_dir/model).",
                    allow_override=True)
flags.DEFINE_enum("format", "bioimageio", sorted(FORMATS), "Package format.")
flags.DEFINE_string("out", None, "The package file to write (a .zip, in an existing folder).")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (default: refuse).")
flags.DEFINE_string("sample_image", None, "An image for the package's test tensors (with "
                    "--sample_labels; default: a synthetic microscope slice).")
flags.DEFINE_string("sample_labels", None, "The LQ label file of --sample_image.")
flags.DEFINE_enum("sample_preset", "hl60", sorted(PRESETS), "Without --sample_image: the "
                  "synthetic microscope's preset of the test sample.")
flags.DEFINE_string("name", "upgrade_jax LQ label upgrader", "The package's name (5-128 "
                    "letters, digits, spaces, _+-()).")
flags.DEFINE_list("authors", None, "Who trained the model, comma-separated (default: your "
                  "login name).")
flags.DEFINE_string("license", "CC-BY-4.0", "SPDX license identifier of the package.")


def _check_out(out: Path) -> None:
  from upgrade_jax.rundir import InputError

  if out.suffix.lower() != ".zip":
    raise InputError(f"--out={out}: a BioImage.IO package is a .zip file; give a name "
                     "ending in .zip")
  if out.is_symlink() or out.exists():
    if out.is_dir():
      raise InputError(f"--out={out} is a folder; give the path of the .zip to write")
    if not F.overwrite:
      raise InputError(f"--out={out} exists; add --overwrite to replace it, or choose "
                       "another --out")
  parent = out.parent
  if not parent.is_dir():
    raise InputError(f"--out={out}: the folder {parent} does not exist; create it or choose "
                     "another --out")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise InputError(f"--out={out}: cannot write in {parent} (permission denied); choose a "
                     "writable folder")


def plan() -> dict:
  """Checks every flag, the model, the sample and --out; creates nothing.
  Returns what the writer needs."""
  import importlib.util

  from upgrade_jax import export, rundir
  from upgrade_jax.rundir import InputError

  for name in ("model", "out"):
    if not getattr(F, name):
      raise InputError(f"--{name} is required")
  if F.distributed:
    raise InputError("--distributed does not apply to experiments.export (one process "
                     "writes one file); remove it")
  if bool(F.sample_image) != bool(F.sample_labels):
    given, missing = (("--sample_image", "--sample_labels") if F.sample_image
                      else ("--sample_labels", "--sample_image"))
    raise InputError(f"{given} needs {missing} too (the image and its LQ label file)")
  if F["sample_preset"].present and F.sample_image:
    raise InputError("--sample_preset applies only without --sample_image; remove one")
  for flag in ("sample_image", "sample_labels"):
    if getattr(F, flag) and not Path(getattr(F, flag)).is_file():
      raise InputError(f"--{flag}={getattr(F, flag)} is not a file; give an image file")
  out = Path(F.out)
  _check_out(out)
  upgrader = export.load_upgrader(F.model)
  model_dir = Path(F.model).resolve()
  if model_dir in out.parent.resolve().parents or out.parent.resolve() == model_dir:
    raise InputError(f"--out={out} lies inside --model={F.model}; nothing is written into the "
                     "model folder: choose --out elsewhere")
  guard = rundir.InputGuard([F.model, F.sample_image, F.sample_labels])
  guard.check_output(out)   # never inside the model folder, never over a sample file
  writer, modules = FORMATS[F.format]
  missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None
             or importlib.util.find_spec(m) is None]
  if missing:
    raise InputError(f"--format={F.format} needs {', '.join(missing)}: pip install "
                     "'upgrade_jax[export]'")
  from upgrade_jax import bioimageio as bx

  if F.authors is None:
    try:
      authors = [getpass.getuser()]
    except (KeyError, OSError):   # no login name (e.g. a container's bare uid)
      raise InputError("--authors is required here (no login name to default to)") from None
  else:
    authors = [a.strip() for a in F.authors if a.strip()]
  bx.check_exportable(upgrader)
  bx.check_metadata(F.name, authors, F.license)
  sample = None
  if F.sample_image:
    sample = bx.read_sample(upgrader, F.sample_image, F.sample_labels)
  else:
    want = 1 if upgrader.channels == "grey" else 3   # the microscope's grey under the policy
    if want != upgrader.image_channels:
      raise InputError(f"--model={F.model} takes {upgrader.image_channels} channel(s), the "
                       f"synthetic microscope's images have {want} under its "
                       f"'{upgrader.channels}' policy; give --sample_image and --sample_labels")
  return {"upgrader": upgrader, "out": out, "guard": guard, "sample": sample,
          "authors": authors, "writer": writer}


def main(argv):
  cli.refuse_arguments(argv)
  cli.setup_runtime()
  p = cli.one_line_errors(plan, checking=True)
  s = cli.one_line_errors(p["writer"], p)
  h, w = s["shape"]
  cli.log_line(f"wrote {s['path']} ({s['bytes'] / 1e6:.2f} MB, {F.format} package): "
               f"validation {s['status']}; ONNX Runtime vs upgrade_jax on the {h}x{w} test "
               f"sample: max |dp| {s['max_abs_diff']:.1e}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
