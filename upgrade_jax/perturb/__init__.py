"""P: the perturbation function that turns high-quality labels into low-quality ones.

The paper (Vadineanu et al., 2024, §2.2) models sloppy annotation with four
components, always applied in this order:

    omission → inclusion → salt-and-pepper → bias

Every function here is pure, jittable and vmappable, takes its PRNG key first,
and is a deterministic function of that key. Labels are int32 instance maps of
shape (H, W): 0 = background, 1..n = objects. `max_label` is static: the
largest id the caller will pass (use `relabel_sequential` on the host first).

Example:
  >>> cfg = PerturbConfig(omission_rate=0.7, bias_max=6)
  >>> f = jax.jit(jax.vmap(functools.partial(perturb, config=cfg, max_label=64),
  ...                      in_axes=(0, 0, 0)))
  >>> lq = f(keys, labels, others)            # (B, H, W) bool

Argument checks: static arguments (dtypes, `max_label`, `q_max`, the config) are
always checked. Values (rates, ids) are checked only when they are concrete,
i.e. when called eagerly. Under `jit` nothing can be checked: ids outside
[0, max_label] are clipped into that range (so an id above `max_label` is
treated like `max_label`, a negative id like background) and rates are clipped
to [0, 1]. Validate with `check_labels` on the host before tracing.

The package: `config` (PerturbConfig and the count rules), `components` (the
four components), `compose` (P itself and its object counts), `checks`; the
private `_presence` and `_morphology` hold the bit-packed kernels (with their
custom_vmap rules) that the components share, tuned together for speed.
Host-side label helpers (relabel_sequential, Felzenszwalb objects) live in
`upgrade_jax.data.labels`.
"""

from upgrade_jax.perturb.checks import check_labels
from upgrade_jax.perturb.components import bias, inclusion, omission, salt_and_pepper
from upgrade_jax.perturb.compose import perturb, perturb_counts
from upgrade_jax.perturb.config import (COUNT_EPS, COUNT_ROUNDINGS, DEFAULT_COUNT_ROUNDING,
                                        PerturbConfig)

__all__ = ["PerturbConfig", "perturb", "perturb_counts", "omission", "inclusion", "bias",
           "salt_and_pepper", "check_labels", "COUNT_ROUNDINGS", "DEFAULT_COUNT_ROUNDING",
           "COUNT_EPS"]
