"""A saved upgrader as a BioImage.IO model package (format 0.5, ONNX weights).

    onnx_model(upgrader)                      the UNet u_θ as an ONNX graph
    read_sample / synthetic_sample            the (image, LQ label) pair of the test tensors
    package_inputs                            the package's preprocessing, in numpy
    write_package(path, upgrader, sample, ...) the .zip: rdf.yaml, weights, test tensors,
                                              cover, README; validated, then renamed

The three modules:

    onnx_graph.py   the ONNX graph of the UNet: onnx_model, run_onnx, padded_sizes
    samples.py      Sample, sample_from_arrays, read_sample, synthetic_sample,
                    package_inputs, reference_maps
    package.py      check_exportable, check_metadata, the cover, the README, the
                    rdf description and write_package

The package takes two inputs and gives one output:

    image        (batch, channel, y, x) float32 raw intensities, C channels of the
                 upgrader's channel policy; the preprocessing states the
                 normalisation ("percentile": scale_range over y, x per image)
    lq_mask      (batch, 1, y, x) float32: the LQ label (instance ids or a 0/1
                 mask), binarized at 0.5 by the preprocessing
    probability  (batch, K, y, x) float32: u_θ's foreground probability (the
                 softmax of the two foreground logits), plus the interior
                 probability as channel 1 for an upgrader with boundaries

Why two inputs, not one two-channel input: BioImage.IO preprocessing applies
to a whole tensor, so one tensor could not get scale_range on its image
channels and binarize on its mask channel; with two, every consumer
(bioimageio.core, and tools that read rdf.yaml) runs each tensor's own
preprocessing and hands the ONNX graph exactly what the network sees, and
a user passes an instance label image as it is.

Why the graph is written with onnx.helper and not converted by jax2onnx
(0.17.1, measured 2026-12-07): jax2onnx converts the UNet faithfully at one
fixed input size (max |Δp| 1e-7), but not with symbolic height and width
(the direct small-Cin conv's and the max-pool's slices of symbolic sizes
fail to lower), and its graph of the width-4 UNet has 2116 nodes (the direct
conv becomes Slice/Expand/Mul chains). The UNet's layers are few and known
(models/unet.py), so the graph here has ~70 standard nodes (Conv with the
BatchNorm folded in, Relu, MaxPool, ConvTranspose, Concat, Softmax), takes
any batch, height and width, and pads inside the graph exactly as
`tiling.predict_image` does: zeros at the bottom/right up to the image's
shape bucket. So an image no larger than the upgrader's tile gives the
probabilities `export.sample_maps` gives (float32 rounding apart); a larger
one runs whole, where `apply` would tile it (seams ≤ 5e-6, BUILD_NOTES.md).
`write_package` checks ONNX Runtime against the JAX path on the sample
before it writes anything under the final name.
"""

from __future__ import annotations

from upgrade_jax.bioimageio.onnx_graph import ONNX_OPSET, onnx_model, padded_sizes, run_onnx
from upgrade_jax.bioimageio.package import (CITATION, DOI, MIN_SIDE, TAGS, check_exportable,
                                            check_metadata, write_package)
from upgrade_jax.bioimageio.samples import (Sample, package_inputs, read_sample, reference_maps,
                                            sample_from_arrays, synthetic_sample)

__all__ = ["ONNX_OPSET", "MIN_SIDE", "TAGS", "CITATION", "DOI", "Sample", "padded_sizes",
           "onnx_model", "run_onnx", "sample_from_arrays", "read_sample", "synthetic_sample",
           "package_inputs", "reference_maps", "check_metadata", "check_exportable",
           "write_package"]
