"""Argument checks of P: static arguments always, values only when concrete."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_rate(name: str, rate) -> None:
  if _is_concrete(rate):
    r = np.asarray(rate)
    if r.size and (np.any(~np.isfinite(r)) or np.any(r < 0) or np.any(r > 1)):
      raise ValueError(f"{name} must lie in [0, 1], got {rate!r}")


def _check_int_labels(name: str, labels) -> None:
  dtype = jnp.asarray(labels).dtype if not hasattr(labels, "dtype") else labels.dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer instance map, got dtype {dtype}")


def check_labels(name: str, labels, max_label: int) -> None:
  """Raises ValueError unless `labels` holds integer ids in [0, max_label].

  Value checks run only on concrete arrays (eagerly); see the module docstring.
  """
  if not isinstance(max_label, (int, np.integer)) or max_label < 1:
    raise ValueError(f"max_label must be a positive int, got {max_label!r}")
  _check_int_labels(name, labels)
  if _is_concrete(labels):
    arr = np.asarray(labels)
    if arr.size:
      lo, hi = int(arr.min()), int(arr.max())
      if lo < 0:
        raise ValueError(f"{name} has negative ids (min {lo}); ids must be >= 0")
      if hi > max_label:
        raise ValueError(f"{name} has id {hi} above max_label={max_label}; "
                         "pass a larger max_label or relabel_sequential first")
