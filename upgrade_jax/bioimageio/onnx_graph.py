"""The UNet u_θ of a saved upgrader as an ONNX graph, and ONNX Runtime on it.

Why the graph is written with onnx.helper and how it pads: the docstring of
upgrade_jax/bioimageio/__init__.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

import upgrade_jax
from upgrade_jax import export
from upgrade_jax.engine.tiling import shape_bucket
from upgrade_jax.models.unet import POOL_LEVELS
from upgrade_jax.rundir import InputError

__all__ = ["ONNX_OPSET", "padded_sizes", "onnx_model", "run_onnx"]

# Opset 17 / IR 8: read by every ONNX Runtime since 1.12 (2022), so the
# package runs in older consumers too; it has every op the UNet needs.
ONNX_OPSET = 17
_IR_VERSION = 8
# models/unet.py's ConvBlock: BatchNormReLU(epsilon=1e-5). Folded into the
# convolutions here; the JAX-vs-ONNX check in write_package catches a change.
_BN_EPSILON = 1e-5
# The padding table goes up to sides of 2**24 px (a ladder size).
_MAX_SIDE = 2 ** 24


def padded_sizes(tile: int) -> np.ndarray:
  """(K,) int64, ascending: the side lengths the graph pads an axis to. An
  axis of n px pads to the smallest entry >= n: `tiling.shape_bucket(n,
  tile)` for n <= tile (what predict_image pads a whole image to), the
  uncapped ladder above (predict_image would tile there), up to 2**24."""
  sizes = {shape_bucket(n, tile) for n in range(1, tile + 1)}
  s = tile
  while s < _MAX_SIDE:
    s = shape_bucket(s + 1, _MAX_SIDE)
    sizes.add(s)
  return np.array(sorted(sizes), np.int64)


class _Graph:
  """The nodes and initializers of a graph being built, with unique names."""

  def __init__(self):
    self.nodes, self.initializers, self._count = [], [], 0

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, array, hint: str = "c") -> str:
    name = self.name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def op(self, op_type: str, inputs, hint: str | None = None, **attrs) -> str:
    out = self.name(hint or op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
    return out


def _conv_block(g: _Graph, x: str, params: dict, stats: dict, name: str) -> str:
  """models/unet.py's ConvBlock: 2 x (3x3 conv, BatchNorm, ReLU), each
  BatchNorm (running averages) folded into its conv: W·a, bias - mean·a with
  a = scale / sqrt(var + eps), in float64, then float32."""
  for i in range(2):
    kernel = np.asarray(params[f"Conv_{i}"]["kernel"], np.float64)      # (3, 3, Cin, F) HWIO
    bn, st = params[f"BatchNorm_{i}"], stats[f"BatchNorm_{i}"]
    a = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(st["var"], np.float64)
                                                     + _BN_EPSILON)
    w = (kernel * a).transpose(3, 2, 0, 1).astype(np.float32)            # OIHW
    b = (np.asarray(bn["bias"], np.float64) - np.asarray(st["mean"], np.float64) * a)
    x = g.op("Conv", [x, g.const(w, f"{name}_w{i}"), g.const(b.astype(np.float32),
                                                               f"{name}_b{i}")],
             hint=f"{name}_conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = g.op("Relu", [x], hint=f"{name}_relu{i}")
  return x


def _check_variables(upgrader: export.Upgrader) -> tuple[dict, dict]:
  """(params, batch_stats) of the UNet, refused in one line unless they are
  the layers this graph knows."""
  variables = upgrader.variables
  if set(variables) != {"params", "batch_stats"}:
    raise InputError(f"the upgrader's variables hold {sorted(variables)}, not params and "
                     "batch_stats of the UNet; export a model saved by this upgrade_jax")
  params, stats = variables["params"], variables["batch_stats"]
  blocks = [f"down{i}" for i in range(POOL_LEVELS)] + ["bottleneck"] + [
      f"up{i}" for i in range(POOL_LEVELS)]
  want = set(blocks) | {f"upconv{i}" for i in range(POOL_LEVELS)} | {"head"}
  if set(params) != want or set(stats) != set(blocks):
    raise InputError(f"the upgrader's network has layers {sorted(params)}, not the UNet of "
                     "upgrade_jax.models.unet this exporter writes; use a matching upgrade_jax")
  return params, stats


def onnx_model(upgrader: export.Upgrader) -> onnx.ModelProto:
  """u_θ as an ONNX model (opset ONNX_OPSET), inference mode.

  Inputs: "image" (B, C, H, W) float32, normalised as the network sees it
  ("max"/"volume" upgraders: raw, the graph divides each image by its
  maximum, as intensity.normalise does); "lq_mask" (B, 1, H, W) float32 0/1.
  Output: "probability" (B, K, H, W) float32, K = 1 (foreground) or 2
  (foreground, interior) for an upgrader with boundaries. Any B, H, W >= 1.

  Raises:
    InputError: the upgrader is not an upgrade network this graph can express.
  """
  # package.py imports this module, so its check is imported here.
  from upgrade_jax.bioimageio.package import check_exportable

  check_exportable(upgrader)
  params, stats = _check_variables(upgrader)
  g = _Graph()
  c = upgrader.image_channels
  image, mask = "image", "lq_mask"
  if upgrader.normalisation in ("max", "volume"):
    # intensity.normalise's "max" on one image (and "volume" as apply reads
    # one image): x / max(x, 0) over all pixels and channels, all-zero if
    # that max is 0. No BioImage.IO preprocessing divides by the maximum.
    top = g.op("ReduceMax", [image], hint="image_max", axes=[1, 2, 3], keepdims=1)
    zero = g.const(np.zeros((), np.float32), "zero")
    image = g.op("Where", [g.op("Greater", [top, zero]), g.op("Div", [image, top]), zero],
                 hint="image_normalised")
  x = g.op("Concat", [image, mask], hint="network_input", axis=1)
  # Pad to the shape bucket (zeros, bottom/right) as predict_image does.
  shape = g.op("Shape", [x], hint="input_shape")
  table = g.const(padded_sizes(upgrader.tiling.tile), "padded_sizes")
  big = g.const(np.array(np.iinfo(np.int64).max, np.int64), "no_size")
  sides, pads = [], []
  for axis in (2, 3):
    n = g.op("Slice", [shape, g.const(np.array([axis], np.int64)),
                       g.const(np.array([axis + 1], np.int64))], hint=f"side{axis}")
    fits = g.op("GreaterOrEqual", [table, n])
    padded = g.op("ReduceMin", [g.op("Where", [fits, table, big])], hint=f"padded{axis}",
                  keepdims=1)
    sides.append(n)
    pads.append(g.op("Sub", [padded, n], hint=f"pad{axis}"))
  pad_spec = g.op("Concat", [g.const(np.zeros(6, np.int64), "no_pad")] + pads,
                  hint="pads", axis=0)
  x = g.op("Pad", [x, pad_spec], hint="padded_input", mode="constant")
  # The UNet (models/unet.py), NCHW.
  skips = []
  for level in range(POOL_LEVELS):
    x = _conv_block(g, x, params[f"down{level}"], stats[f"down{level}"], f"down{level}")
    skips.append(x)
    x = g.op("MaxPool", [x], hint=f"pool{level}", kernel_shape=[2, 2], strides=[2, 2])
  x = _conv_block(g, x, params["bottleneck"], stats["bottleneck"], "bottleneck")
  for level in reversed(range(POOL_LEVELS)):
    p = params[f"upconv{level}"]
    # UpConv2x2 puts x[h, w] · kernel[1-i, 1-j] at (2h+i, 2w+j): ConvTranspose
    # with W[c, f, i, j] = kernel[::-1, ::-1][i, j, c, f].
    w = np.asarray(p["kernel"], np.float32)[::-1, ::-1].transpose(2, 3, 0, 1)
    x = g.op("ConvTranspose", [x, g.const(np.ascontiguousarray(w), f"upconv{level}_w"),
                               g.const(np.asarray(p["bias"], np.float32), f"upconv{level}_b")],
             hint=f"upconv{level}", kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Concat", [skips[level], x], hint=f"skip{level}", axis=1)
    x = _conv_block(g, x, params[f"up{level}"], stats[f"up{level}"], f"up{level}")
  head = params["head"]
  k = upgrader.model.num_classes
  x = g.op("Conv", [x, g.const(np.asarray(head["kernel"], np.float32).transpose(3, 2, 0, 1),
                               "head_w"),
                    g.const(np.asarray(head["bias"], np.float32), "head_b")],
           hint="logits_padded", kernel_shape=[1, 1])
  logits = g.op("Slice", [x, g.const(np.zeros(2, np.int64)), g.op("Concat", sides, axis=0),
                          g.const(np.array([2, 3], np.int64))], hint="logits")

  def channels(lo, hi, hint):
    return g.op("Slice", [logits, g.const(np.array([lo], np.int64)),
                          g.const(np.array([hi], np.int64)), g.const(np.array([1], np.int64))],
                hint=hint)

  # losses.foreground_probs: softmax of logits 0 (background) and 1 (cell);
  # with boundaries also interior = foreground · sigmoid(logit 2).
  soft = g.op("Softmax", [channels(0, 2, "fg_logits")], hint="softmax", axis=1)
  fg = g.op("Slice", [soft, g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64)),
                      g.const(np.array([1], np.int64))], hint="foreground")
  if k == 3:
    interior = g.op("Mul", [fg, g.op("Sigmoid", [channels(2, 3, "interior_logit")])],
                    hint="interior")
    g.nodes.append(helper.make_node("Concat", [fg, interior], ["probability"], axis=1))
  else:
    g.nodes.append(helper.make_node("Identity", [fg], ["probability"]))
  maps = 2 if k == 3 else 1
  dims = ["batch", None, "height", "width"]

  def info(name, channels_):
    shape_ = [channels_ if d is None else d for d in dims]
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape_)

  graph = helper.make_graph(
      g.nodes, "upgrade_unet", [info("image", c), info("lq_mask", 1)],
      [info("probability", maps)], initializer=g.initializers,
      doc_string="u_theta of upgrade_jax (Vadineanu et al., J. Imaging 2024): image + LQ mask "
                 "-> foreground probability")
  model = helper.make_model(graph, producer_name="upgrade_jax",
                            producer_version=upgrade_jax.__version__,
                            opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
  model.ir_version = _IR_VERSION
  onnx.checker.check_model(model, full_check=True)
  return model


def run_onnx(model_bytes: bytes, image: np.ndarray, lq_mask: np.ndarray) -> np.ndarray:
  """ONNX Runtime (CPU) on (B, C, H, W) image and (B, 1, H, W) mask, both
  float32 as the graph takes them; returns (B, K, H, W) float32."""
  session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
  return session.run(["probability"], {"image": np.asarray(image, np.float32),
                                       "lq_mask": np.asarray(lq_mask, np.float32)})[0]
