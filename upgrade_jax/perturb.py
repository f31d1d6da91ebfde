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

Why this module is longer than the ~400 lines of the others: P is one
concept, and its four components share private, bit-packed morphology and
presence/look-up helpers (custom_vmap rules included) that are tuned
together for speed (BUILD_NOTES, issue 16). Splitting them apart would make
those helpers public API without making any piece easier to read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FelzenszwalbConfig", 
    "PerturbConfig", "perturb", "omission", "inclusion", "bias",
    "salt_and_pepper", "perturb_counts", "COUNT_ROUNDINGS", "relabel_sequential",
    "felzenszwalb_objects",
    "check_labels",
]

# Floors and rounds of rate·n are taken in float32; a product within this
# distance of an integer counts as that integer (0.7·10 is 7, not 6).
_COUNT_EPS = 1e-4

# Bits per packed uint32 word (presence sets and bit-packed masks).
_WORD = 32


# --------------------------------------------------------------------------
# Argument checks.

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


# --------------------------------------------------------------------------
# Choosing a random subset of the ids present.

# XLA:CPU runs a vmapped (batched) scatter or gather with one multi-index per
# element, about 10× slower than a 1-D one. Presence and table look-ups are
# therefore written with `custom_vmap`: a batch of B maps becomes one 1-D
# scatter/gather into a table of B·(L+1) entries, ids offset by b·(L+1). The
# rules call the same functions again, so nested vmaps flatten too.

# Small id tables (at most _BITSET_IDS entries, i.e. 4 uint32 words) are
# handled as bitsets instead: XLA:CPU runs a scatter or gather one element at a
# time (~1-2 ns each, 4M per 64 maps of 256²), but vectorises bit arithmetic.
# Presence becomes an OR of one-hot bits over the pixels, a look-up a shift of
# the map's table word. 64 maps of 256² with 46 ids: presence 1.0-1.7 ms
# instead of 4-9 ms for the scatter. With more words each word costs one more
# pass over the pixels and the scatter wins again (~200 ids: equal).
_BITSET_IDS = 4 * _WORD


def _uses_bitset(table) -> bool:
  return table.dtype == jnp.bool_ and table.shape[-1] <= _BITSET_IDS


def _table_words(table):
  """(..., T) bool → (..., ceil(T/32)) uint32; entry i is bit i % 32 of word i // 32."""
  t = table.shape[-1]
  nw = -(-t // _WORD)
  bits = jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, nw * _WORD - t)])
  bits = bits.reshape(table.shape[:-1] + (nw, _WORD)).astype(jnp.uint32)
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(_WORD, dtype=jnp.uint32))
  return jnp.sum(bits * weights, axis=-1, dtype=jnp.uint32)


def _bitset_present(ids, size: int):
  """(B, N) int ids → (B, size) bool: which of 0..size-1 occur (others ignored).

  Per word of the bitset: one-hot bits per pixel, ORed over 8 contiguous
  chunks of the pixels (an elementwise, vectorised pass over the whole map),
  then a reduce over the remaining N/8 per map. The 8-chunk split is what
  keeps the big pass vectorised; a reduce or deeper OR trees over all N ran
  3-20× slower (XLA:CPU does not vectorise an OR reduction).
  """
  b, n = ids.shape
  chunks = 8
  pad = (-n) % chunks
  if pad:
    ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
  valid = (ids >= 0) & (ids < size)
  one = jnp.left_shift(jnp.uint32(1), (ids & (_WORD - 1)).astype(jnp.uint32))
  word_of = jnp.right_shift(ids, 5)
  words = []
  for j in range(-(-size // _WORD)):
    x = jnp.where(valid & (word_of == j), one, jnp.uint32(0))
    x = x.reshape(b, chunks, -1)
    y = x[:, 0]
    for c in range(1, chunks):
      y = y | x[:, c]
    words.append(jax.lax.reduce(y, jnp.uint32(0), jax.lax.bitwise_or, (1,)))
  words = jnp.stack(words, axis=-1)                                  # (B, nw)
  bits = jnp.right_shift(words[..., None], jnp.arange(_WORD, dtype=jnp.uint32)) & 1
  return bits.reshape(b, -1)[:, :size].astype(jnp.bool_)


def _bitset_lookup(table, ids):
  """table[b, clip(ids[b])] for a (B, T) bool table and (B, ...) int ids."""
  t = table.shape[-1]
  words = _table_words(table)                                        # (B, nw)
  words = words.reshape(words.shape + (1,) * (ids.ndim - 1))
  ids = jnp.clip(ids, 0, t - 1)
  word_of = jnp.right_shift(ids, 5)
  w = words[:, 0]
  for j in range(1, words.shape[1]):
    w = jnp.where(word_of == j, words[:, j], w)
  return (jnp.right_shift(w, (ids & (_WORD - 1)).astype(jnp.uint32)) & 1).astype(jnp.bool_)


@jax.custom_batching.custom_vmap
def _present_ids(ids, table):
  """table.at[ids].set(True) for a flat int32 `ids` in [0, T) and a (T,) bool `table`.

  (Callers clip the ids first; out-of-range ids are not a supported input.)
  """
  if _uses_bitset(table):
    return table | _bitset_present(ids.reshape(1, -1), table.shape[-1])[0]
  return table.at[ids].set(True, mode="drop")


@_present_ids.def_vmap
def _present_ids_vmap(axis_size, in_batched, ids, table):
  ids_b, table_b = in_batched
  if not ids_b:
    ids = jnp.broadcast_to(ids, (axis_size, *ids.shape))
  if not table_b:
    table = jnp.broadcast_to(table, (axis_size, *table.shape))
  size = table.shape[-1]
  if _uses_bitset(table):
    # Plain jnp code: an outer vmap batches it without another rule.
    return table | _bitset_present(ids.reshape(axis_size, -1), size), True
  offsets = (jnp.arange(axis_size, dtype=jnp.int32) * size).reshape(
      (axis_size,) + (1,) * (ids.ndim - 1))
  flat = _present_ids((ids + offsets).reshape(-1), table.reshape(-1))
  return flat.reshape(axis_size, size), True


@jax.custom_batching.custom_vmap
def _lookup(table, ids):
  """table[ids] for a (T,) `table` and int32 `ids` of any shape (in range)."""
  if _uses_bitset(table):
    return _bitset_lookup(table[None], ids[None])[0]
  return jnp.take(table, ids, mode="clip")


@_lookup.def_vmap
def _lookup_vmap(axis_size, in_batched, table, ids):
  table_b, ids_b = in_batched
  if not table_b:
    return _lookup(table, ids), ids_b
  if not ids_b:
    ids = jnp.broadcast_to(ids, (axis_size, *ids.shape))
  if _uses_bitset(table):
    return _bitset_lookup(table, ids), True
  size = table.shape[-1]
  offsets = (jnp.arange(axis_size, dtype=jnp.int32) * size).reshape(
      (axis_size,) + (1,) * (ids.ndim - 1))
  return _lookup(table.reshape(-1), ids + offsets), True


def _present(labels, max_label: int):
  """(max_label + 1,) bool: which ids occur in `labels` (index 0 is False)."""
  lab = jnp.clip(labels, 0, max_label).reshape(-1)
  present = _present_ids(lab, jnp.zeros((max_label + 1,), jnp.bool_))
  return present.at[0].set(False)


def _choose(key, present, count):
  """(L,) bool: exactly `count` of the True entries of `present`, uniformly.

  Uniform random scores, absent ids pushed to +inf; the `count` smallest win.
  This is a uniform draw without replacement among the present ids.
  """
  scores = jnp.where(present, jax.random.uniform(key, present.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores))
  return present & (rank < count)


COUNT_ROUNDINGS = ("stochastic", "floor", "authors")
# The one default of the count rule (PerturbConfig and the functions use it).
DEFAULT_COUNT_ROUNDING = "stochastic"


def _count(key, rate, n, rounding: str):
  """int32 scalar: how many of n objects a rate r removes (or adds).

  r·n is rarely an integer (4-5 cells per slice), and the rule decides the
  effective rate:
    "stochastic": floor(r·n) + Bernoulli(frac(r·n)); its expectation is
        exactly r·n, so the effective rate equals the nominal one on average.
    "floor": floor(r·n); biased low (30% of 4 cells removes 1 = 25%, of 3
        removes 0).
    "authors": max(1, int(r·n)) when n > 0 and r > 0, else 0 (the authors'
        code); biased high at small r·n.

  Args:
    key: PRNG key (used only by "stochastic").
    rate: float scalar in [0, 1] (may be traced).
    n: int scalar (may be traced).
    rounding: one of COUNT_ROUNDINGS (static).
  """
  r = jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
  x = r * n.astype(jnp.float32)
  base = jnp.floor(x + _COUNT_EPS)
  if rounding == "floor":
    k = base
  elif rounding == "authors":
    k = jnp.where((n > 0) & (r > 0), jnp.maximum(base, 1.0), 0.0)
  elif rounding == "stochastic":
    # frac is 0 when x is within _COUNT_EPS of an integer (0.7·10 is exactly 7).
    frac = jnp.clip(x - base, 0.0, 1.0)
    k = base + (jax.random.uniform(key) < frac).astype(jnp.float32)
  else:
    raise ValueError(f"count rounding {rounding!r} unknown; choose one of "
                     f"{list(COUNT_ROUNDINGS)}")
  return jnp.minimum(k, n.astype(jnp.float32)).astype(jnp.int32)


def _omitted(key, labels, rate, max_label: int, rounding: str):
  """((L+1,) bool ids dropped, (L+1,) bool ids present) of an omission."""
  k_choose, k_count = jax.random.split(key)
  present = _present(labels, max_label)
  k = _count(k_count, rate, jnp.sum(present), rounding)
  return _choose(k_choose, present, k), present


def _included(key, others, rate, max_label: int, rounding: str):
  """((L+1,) bool ids of `others` painted, (L+1,) bool ids present)."""
  k_choose, k_count = jax.random.split(key)
  present = _present(others, max_label)
  k = _count(k_count, rate, jnp.sum(present), rounding)
  return _choose(k_choose, present, k), present


# --------------------------------------------------------------------------
# The four components.

def omission(key, labels, rate, *, max_label: int, rounding: str = DEFAULT_COUNT_ROUNDING):
  """Drops k ≈ rate·n of the n instances present, chosen uniformly.

  k follows `rounding` (see `_count`): by default floor(rate·n) plus a
  Bernoulli(frac(rate·n)) extra, so E[k] = rate·n exactly.

  Args:
    key: PRNG key.
    labels: (H, W) int instance map, ids in [0, max_label].
    rate: scalar in [0, 1] (may be traced, e.g. a per-sample rate under vmap).
    max_label: static bound on the ids.
    rounding: static count rule, one of COUNT_ROUNDINGS.

  Returns:
    (H, W) int32: `labels` with the dropped instances set to 0.
  """
  check_labels("labels", labels, max_label)
  _check_rate("omission rate", rate)
  labels = jnp.asarray(labels, jnp.int32)
  drop, _ = _omitted(key, labels, rate, max_label, rounding)
  lab = jnp.clip(labels, 0, max_label)
  return jnp.where(_lookup(drop, lab), 0, lab)


def inclusion(key, labels, others, rate, *, max_label: int,
              rounding: str = DEFAULT_COUNT_ROUNDING):
  """Paints k ≈ rate·m of the m objects of `others` into `labels`.

  Objects are painted on background pixels only (they never overwrite a target
  instance). A painted object of id j in `others` gets id `max_label + j`, so it
  cannot collide with an existing id; the output ids are in [0, 2·max_label].
  k follows `rounding`, the same rule as omission (see `_count`).

  Args:
    key: PRNG key.
    labels: (H, W) int target instance map, ids in [0, max_label].
    others: (H, W) int non-target instance map, ids in [0, max_label].
    rate: scalar in [0, 1] (may be traced).
    max_label: static bound on the ids of both maps.
    rounding: static count rule, one of COUNT_ROUNDINGS.

  Returns:
    (H, W) int32 instance map.
  """
  check_labels("labels", labels, max_label)
  check_labels("others", others, max_label)
  _check_rate("inclusion rate", rate)
  labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, max_label)
  others = jnp.clip(jnp.asarray(others, jnp.int32), 0, max_label)
  add, _ = _included(key, others, rate, max_label, rounding)
  paint = _lookup(add, others) & (labels == 0)
  return jnp.where(paint, others + max_label, labels)


def salt_and_pepper(key, mask, prob):
  """Flips each pixel with probability `prob`: background becomes foreground
  (salt) and foreground becomes background (pepper).

  `prob` is the expected fraction of pixels *changed*. (A replacement by a fair
  coin, as skimage's `random_noise(mode="s&p", amount=p)` does, changes only
  p/2 of a binary mask; the paper's "salt and pepper noise with a 10%
  probability" reads as 10% of pixels wrong, see BUILD_NOTES, issue 10.)

  Args:
    key: PRNG key.
    mask: (H, W) bool (or int; >0 is foreground).
    prob: scalar in [0, 1] (may be traced).

  Returns:
    (H, W) bool.
  """
  _check_rate("salt_and_pepper prob", prob)
  mask = jnp.asarray(mask) > 0
  return jnp.where(_flips(key, mask.shape, prob), ~mask, mask)


def _flips(key, shape, prob):
  """(H, W) bool: True with probability prob, independently per pixel."""
  p = jnp.clip(jnp.asarray(prob, jnp.float32), 0.0, 1.0)
  return jax.random.uniform(key, shape) < p


def _salt_and_pepper_labels(key, labels, prob, noise_id):
  """Salt-and-pepper on an instance map: flipped background pixels get id
  `noise_id`, flipped instance pixels become background."""
  flip = _flips(key, labels.shape, prob)
  return jnp.where(flip, jnp.where(labels > 0, 0, noise_id), labels)


def _shift(x, axis, step, fill):
  """x shifted by `step` (+1/-1) along `axis`, the vacated edge set to `fill`."""
  n = x.shape[axis]
  edge_shape = list(x.shape)
  edge_shape[axis] = 1
  edge = jnp.broadcast_to(jnp.asarray(fill, x.dtype), edge_shape)
  if step > 0:
    body = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
    return jnp.concatenate([edge, body], axis=axis)
  body = jax.lax.slice_in_dim(x, 1, n, axis=axis)
  return jnp.concatenate([body, edge], axis=axis)


def _max3x3(x, fill):
  """3×3 max filter (separable), outside pixels equal to `fill`."""
  r = jnp.maximum(x, jnp.maximum(_shift(x, -1, 1, fill), _shift(x, -1, -1, fill)))
  return jnp.maximum(r, jnp.maximum(_shift(r, -2, 1, fill), _shift(r, -2, -1, fill)))


def _min3x3(x, fill):
  r = jnp.minimum(x, jnp.minimum(_shift(x, -1, 1, fill), _shift(x, -1, -1, fill)))
  return jnp.minimum(r, jnp.minimum(_shift(r, -2, 1, fill), _shift(r, -2, -1, fill)))


def _draw_bias(key, q_max):
  """q uniform in 1..q_max and the operation (True = dilate) with p = ½."""
  kq, kop = jax.random.split(key)
  q = jax.random.randint(kq, (), 1, q_max + 1)
  dilate = jax.random.bernoulli(kop, 0.5)
  return q, dilate


def _pack_rows(mask):
  """(H, W) bool → (H, ceil(W/32)) uint32; pixel j is bit j % 32 of word j // 32.

  Padding bits beyond W are 0.
  """
  h, w = mask.shape
  wp = -(-w // _WORD) * _WORD
  m = jnp.pad(mask, ((0, 0), (0, wp - w))).reshape(h, wp // _WORD, _WORD)
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(_WORD, dtype=jnp.uint32))
  return jnp.sum(m.astype(jnp.uint32) * weights, axis=-1, dtype=jnp.uint32)


def _unpack_rows(words, width: int):
  """Inverse of `_pack_rows`: (H, n_words) uint32 → (H, width) bool."""
  bits = jnp.right_shift(words[..., None], jnp.arange(_WORD, dtype=jnp.uint32)) & 1
  return bits.reshape(words.shape[0], -1)[:, :width].astype(jnp.bool_)


def _dilate3x3_packed(x, fill):
  """One 3×3 binary dilation of packed rows; `fill` (0 or ~0) outside."""
  prev_w = _shift(x, -1, 1, fill)   # word w-1 (fill left of the image)
  next_w = _shift(x, -1, -1, fill)  # word w+1 (fill right of the image)
  left = jnp.left_shift(x, 1) | jnp.right_shift(prev_w, _WORD - 1)    # pixel j-1
  right = jnp.right_shift(x, 1) | jnp.left_shift(next_w, _WORD - 1)   # pixel j+1
  h = x | left | right
  return h | _shift(h, -2, 1, fill) | _shift(h, -2, -1, fill)


def _word_shift(x, s: int, fill):
  """Packed rows whose pixel j holds pixel j + s of `x` (static 0 < |s| < 32).

  A pixel shift is a bit shift of each word plus the bits carried in from the
  neighbouring word; beyond the first/last word the carried bits are `fill`.
  """
  if s > 0:
    nxt = _shift(x, -1, -1, fill)   # word w+1
    return jnp.right_shift(x, s) | jnp.left_shift(nxt, _WORD - s)
  prv = _shift(x, -1, 1, fill)      # word w-1
  return jnp.left_shift(x, -s) | jnp.right_shift(prv, _WORD + s)


def _dilate_square_packed(x, q, fill, q_max: int):
  """Dilation of packed rows by the (2q+1)×(2q+1) square, `fill` outside.

  Equal to q 3×3 dilations (the Minkowski sum of q 3×3 squares is the
  (2q+1)² square, and on a rectangle the clipped iterations lose nothing), but
  done as one separable pass per axis: OR of the row shifts -q..q, then of the
  pixel shifts -q..q along the row, each a static shift selected by `s <= q`.
  Needs q_max < 32 (a pixel shift reaches only the neighbouring word).
  """
  zero = jnp.zeros_like(x)
  n = x.shape[0]
  edge = jnp.broadcast_to(fill, (q_max,) + x.shape[1:]).astype(x.dtype)
  padded = jnp.concatenate([edge, x, edge], axis=0)
  v = x
  for s in range(1, q_max + 1):
    both = (jax.lax.slice_in_dim(padded, q_max - s, q_max - s + n, axis=0) |
            jax.lax.slice_in_dim(padded, q_max + s, q_max + s + n, axis=0))
    v = v | jnp.where(s <= q, both, zero)
  h = v
  for s in range(1, q_max + 1):
    both = _word_shift(v, s, fill) | _word_shift(v, -s, fill)
    h = h | jnp.where(s <= q, both, zero)
  return h


def _binary_bias(mask, q, dilate, q_max: int):
  """q dilations or erosions of a bool mask with a 3×3 square, border = 0.

  Why it is fast: rows are packed 32 pixels to a uint32 word, so one word-op
  does 32 pixels. Erosion with background outside is the complement of a
  dilation of the complement with foreground outside, so one code path serves
  both and there is no `lax.cond` (which vmap would turn into computing both
  branches). q 3×3 dilations are one dilation by the (2q+1)² square, done as
  two separable passes of static shifts (`_dilate_square_packed`), so shapes
  are static and q may be traced. Padding bits of the last word act as
  outside pixels (0 for dilation, 1 after the complement for erosion), which
  is exactly the border rule.

  For q_max >= 32 it falls back to q_max rounds of a 3×3 dilation in a rolled
  loop. That loop stays rolled on purpose: unrolled, XLA fuses the whole chain
  into the unpacking and recomputes it for each of the 32 bits (100× slower).
  """
  width = mask.shape[-1]
  packed = _pack_rows(mask)
  x = jnp.where(dilate, packed, ~packed)
  fill = jnp.where(dilate, jnp.uint32(0), ~jnp.uint32(0))

  if q_max < _WORD:
    # A while loop that runs once (zero times for q = 0, the identity) is the
    # fusion boundary: without it XLA fuses the passes into the unpacking and
    # recomputes them for each of the 32 bits of a word. Its trip count is
    # data-dependent, so XLA cannot inline it (optimization_barrier and a
    # reduce formulation did not stop the fusion).
    _, x = jax.lax.while_loop(
        lambda c: c[0] < (q > 0).astype(jnp.int32),
        lambda c: (c[0] + 1, _dilate_square_packed(c[1], q, fill, q_max)),
        (jnp.int32(0), x))
  else:
    def body(i, y):
      return jnp.where(i < q, _dilate3x3_packed(y, fill), y)

    x = jax.lax.fori_loop(0, q_max, body, x)
  x = jnp.where(dilate, x, ~x)
  return _unpack_rows(x, width)


def _instance_bias(labels, q, dilate, q_max: int):
  """Per-instance dilation (into background only) or erosion, q times."""
  big = jnp.iinfo(jnp.int32).max

  def grow(y):
    # Background takes the largest neighbouring id; instances keep theirs.
    return jnp.where(y == 0, _max3x3(y, 0), y)

  def shrink(y):
    # A pixel survives if its whole 3×3 neighbourhood is the same instance.
    same = (_max3x3(y, big) == y) & (_min3x3(y, 0) == y)
    return jnp.where(same, y, 0)

  def body(i, y):
    return jnp.where(i < q, jnp.where(dilate, grow(y), shrink(y)), y)

  return jax.lax.fori_loop(0, q_max, body, labels)


def bias(key, labels, q_max: int, *, per_instance: bool = False):
  """Dilates or erodes (p = ½ each) q times, q uniform in 1..q_max.

  The structuring element is the 3×3 all-ones square and pixels outside the
  image count as background: exactly `scipy.ndimage.binary_dilation` /
  `binary_erosion(mask, np.ones((3, 3)), iterations=q, border_value=0)`.

  Args:
    key: PRNG key.
    labels: (H, W) bool mask or int instance map (>0 is foreground).
    q_max: static int >= 1.
    per_instance: if True, each instance grows only into background (a pixel
      claimed by two instances goes to the larger id) and shrinks on its own,
      so touching instances never merge; `labels` must then be an int map.

  Returns:
    (H, W) bool mask, or, with per_instance=True, an (H, W) int32 label map.
  """
  if not isinstance(q_max, (int, np.integer)) or isinstance(q_max, bool) or q_max < 1:
    raise ValueError(f"bias q_max must be an int >= 1, got {q_max!r}")
  q, dilate = _draw_bias(key, int(q_max))
  labels = jnp.asarray(labels)
  if per_instance:
    _check_int_labels("labels", labels)
    return _instance_bias(labels.astype(jnp.int32), q, dilate, int(q_max))
  return _binary_bias(labels > 0, q, dilate, int(q_max))


# --------------------------------------------------------------------------
# The composition.

@dataclasses.dataclass(frozen=True)
class PerturbConfig:
  """Which perturbations P applies, and how strongly.

  Attributes:
    omission_rate: fraction r of target instances dropped, in [0, 1].
    inclusion_rate: fraction r of `others` objects added, in [0, 1].
    bias_max: q_max for the dilate/erode bias; 0 switches bias off.
    per_instance_bias: bias each instance on its own (never merges cells).
    salt_pepper_prob: expected fraction of pixels flipped (salt and pepper).
    count_rounding: how omission and inclusion turn rate·n into a count of
      objects, one of COUNT_ROUNDINGS (see `_count`); "stochastic" has
      expectation exactly rate·n.
  """

  omission_rate: float = 0.0
  inclusion_rate: float = 0.0
  bias_max: int = 0
  per_instance_bias: bool = False
  salt_pepper_prob: float = 0.0
  count_rounding: str = DEFAULT_COUNT_ROUNDING

  def __post_init__(self):
    if self.count_rounding not in COUNT_ROUNDINGS:
      raise ValueError(f"PerturbConfig.count_rounding {self.count_rounding!r} unknown; "
                       f"choose one of {list(COUNT_ROUNDINGS)}")
    for name in ("omission_rate", "inclusion_rate", "salt_pepper_prob"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"PerturbConfig.{name} must lie in [0, 1], got {v!r}")
    if (not isinstance(self.bias_max, (int, np.integer)) or isinstance(self.bias_max, bool)
        or self.bias_max < 0):
      raise ValueError(f"PerturbConfig.bias_max must be an int >= 0, got {self.bias_max!r}")

  @property
  def is_identity(self) -> bool:
    return (self.omission_rate == 0 and self.inclusion_rate == 0 and
            self.bias_max == 0 and self.salt_pepper_prob == 0)


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


# --------------------------------------------------------------------------
# Host helpers (numpy / scikit-image, not jittable).

def relabel_sequential(labels) -> np.ndarray:
  """Host: renumbers the ids of an instance map to 1..n in order of first id.

  Args:
    labels: (..., H, W) non-negative integer array.

  Returns:
    int32 array of the same shape; 0 stays 0, the k-th smallest id becomes k.
  """
  arr = np.asarray(labels)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"labels must be integer, got dtype {arr.dtype}")
  if arr.size and arr.min() < 0:
    raise ValueError(f"labels has negative ids (min {arr.min()})")
  ids, inverse = np.unique(arr, return_inverse=True)
  if ids.size and ids[0] != 0:
    inverse = inverse + 1  # no background present: ids start at 1
  return inverse.reshape(arr.shape).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class FelzenszwalbConfig:
  """Which Felzenszwalb segments become inclusion candidates.

  Attributes:
    scale, sigma, min_size: `skimage.segmentation.felzenszwalb` parameters.
      The defaults are larger than skimage's (100, 0.8, 20): on EPFL slices
      those gave ~1800 segments covering 87% of the image, so 70% inclusion
      made labels no annotator would draw (BUILD_NOTES, issue 5).
    max_overlap: a segment is kept if at most this fraction of it overlaps
      the targets (0 keeps only segments entirely on background).
    max_area_fraction: segments larger than this fraction of the image are
      background regions, not objects, and are dropped.
  """

  scale: float = 300.0
  sigma: float = 1.0
  min_size: int = 100
  max_overlap: float = 0.0
  max_area_fraction: float = 0.05


def felzenszwalb_objects(image, labels, config: FelzenszwalbConfig = FelzenszwalbConfig(), *,
                         area_range: tuple[float, float] | None = None) -> np.ndarray:
  """Host: Felzenszwalb segments that do not overlap the targets, as `others`.

  The paper's case study (§3.3.4) draws its inclusions from these: plausible
  but wrong objects an annotator might outline.

  Args:
    image: (H, W) or (H, W, C) image.
    labels: (H, W) int target instance map.
    config: the segmentation and filter settings.
    area_range: optional (min, max) area in pixels of a kept segment, e.g.
      the range of the target cells' areas, so inclusions look like cells.

  Returns:
    (H, W) int32 instance map with ids 1..m, zero on every target pixel.
  """
  from skimage.segmentation import felzenszwalb  # host-only dependency

  img = np.asarray(image, dtype=np.float32)
  lab = np.asarray(labels)
  if lab.ndim != 2:
    raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
  if img.shape[:2] != lab.shape:
    raise ValueError(f"image shape {img.shape} does not match labels {lab.shape}")
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  channel_axis = -1 if img.ndim == 3 else None
  segments = felzenszwalb(img, scale=config.scale, sigma=config.sigma,
                          min_size=config.min_size, channel_axis=channel_axis)
  n_seg = int(segments.max()) + 1
  area = np.bincount(segments.ravel(), minlength=n_seg)
  on_target = np.bincount(segments.ravel(), weights=(lab > 0).ravel(), minlength=n_seg)
  keep = ((on_target <= config.max_overlap * area)
          & (area <= config.max_area_fraction * lab.size))
  if area_range is not None:
    keep &= (area >= area_range[0]) & (area <= area_range[1])
  out = np.where(keep[segments] & (lab == 0), segments + 1, 0)
  return relabel_sequential(out)
