"""P itself: omission → inclusion → salt-and-pepper → bias, and its object counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from upgrade_jax.perturb.checks import check_labels
from upgrade_jax.perturb.components import (_included, _omitted, _salt_and_pepper_labels, bias,
                                            inclusion, omission)
from upgrade_jax.perturb.config import PerturbConfig


def perturb(key, labels, others, config: PerturbConfig, *, max_label: int,
            rates=None):
  """P(labels): omission → inclusion → salt-and-pepper → bias.

  A component whose rate is 0 in `config` is skipped (the identity, and no
  random numbers are drawn for it). The four components use independent
  sub-keys of `key`, so switching one on does not change the others' draws.

  Args:
    key: PRNG key.
    labels: (H, W) int32 target instance map, ids in [0, max_label].
    others: (H, W) int32 non-target objects for inclusion, ids in
      [0, max_label] (zeros when there are none).
    config: a PerturbConfig (static under jit).
    max_label: static bound on the ids.
    rates: optional (3,) float array overriding (omission_rate,
      inclusion_rate, salt_pepper_prob) with traced values, e.g. per-sample
      strengths under vmap. A component switched off in `config` stays off.

  Returns:
    (H, W) bool low-quality mask.
  """
  if not isinstance(config, PerturbConfig):
    raise ValueError(f"config must be a PerturbConfig, got {type(config).__name__}")
  check_labels("labels", labels, max_label)
  check_labels("others", others, max_label)
  k_om, k_in, k_sp, k_bias = jax.random.split(key, 4)
  om, inc, sp = ((config.omission_rate, config.inclusion_rate, config.salt_pepper_prob)
                 if rates is None else (rates[0], rates[1], rates[2]))
  y = jnp.clip(jnp.asarray(labels, jnp.int32), 0, max_label)
  if config.omission_rate > 0:
    y = omission(k_om, y, om, max_label=max_label, rounding=config.count_rounding)
  if config.inclusion_rate > 0:
    y = inclusion(k_in, y, others, inc, max_label=max_label,
                  rounding=config.count_rounding)
  if config.salt_pepper_prob > 0:
    y = _salt_and_pepper_labels(k_sp, y, sp, noise_id=2 * max_label + 1)
  if config.bias_max > 0:
    y = bias(k_bias, y if config.per_instance_bias else y > 0, config.bias_max,
             per_instance=config.per_instance_bias)
  return y > 0


def perturb_counts(key, labels, others, config: PerturbConfig, *, max_label: int):
  """The object counts behind `perturb(key, labels, others, config)`.

  Same key, same draws: the omission and inclusion choices here are exactly
  those `perturb` makes with this key, so callers can report the effective
  rates of a fixed LQ set (omitted / targets, included / others).

  Args:
    key, labels, others, config, max_label: as for `perturb`.

  Returns:
    (4,) int32: [target instances, omitted, other objects, included].
  """
  if not isinstance(config, PerturbConfig):
    raise ValueError(f"config must be a PerturbConfig, got {type(config).__name__}")
  k_om, k_in, _, _ = jax.random.split(key, 4)
  labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, max_label)
  others = jnp.clip(jnp.asarray(others, jnp.int32), 0, max_label)
  drop, targets = _omitted(k_om, labels, config.omission_rate, max_label,
                           config.count_rounding)
  add, objects = _included(k_in, others, config.inclusion_rate, max_label,
                           config.count_rounding)
  if config.omission_rate == 0:
    drop = jnp.zeros_like(drop)
  if config.inclusion_rate == 0:
    add = jnp.zeros_like(add)
  return jnp.stack([jnp.sum(targets), jnp.sum(drop), jnp.sum(objects),
                    jnp.sum(add)]).astype(jnp.int32)

