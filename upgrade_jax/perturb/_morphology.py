"""Private: 3x3 morphology on label maps and on bit-packed binary masks (bias)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from upgrade_jax.perturb._presence import _WORD


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

