"""Convolution implementations for the UNet (a small registry).

`get_conv(impl)` returns a Linen module class with the signature and parameter
names of `flax.linen.Conv` ('kernel' (kh, kw, Cin, Cout), 'bias' (Cout,)), so
checkpoints do not depend on the implementation.
"""

import flax.linen as nn

_IMPLS = {"xla": nn.Conv}


def get_conv(impl: str = "xla"):
  try:
    return _IMPLS[impl]
  except KeyError:
    raise ValueError(f"conv impl {impl!r} unknown; choose one of {sorted(_IMPLS)}") from None
