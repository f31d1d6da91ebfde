"""Private: which ids a label map holds, id-table look-ups, a uniform choice of ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bits per packed uint32 word (presence sets and bit-packed masks).
_WORD = 32

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

