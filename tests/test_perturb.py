"""Tests of P against independent oracles (scipy.ndimage, hand counts)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings, strategies as st, HealthCheck

from upgrade_jax import perturb as P
from upgrade_jax.data import labels as host_labels
from upgrade_jax.perturb import _morphology, _presence, components

SQUARE = np.ones((3, 3), bool)


def random_instances(rng, h, w, n, r=(2, 6)):
  """(h, w) int32 map of n random discs, relabelled 1..k; touches borders."""
  yy, xx = np.mgrid[:h, :w]
  lab = np.zeros((h, w), np.int32)
  for i in range(n):
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    rad = rng.uniform(*r)
    lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad) & (lab == 0)] = i + 1
  return host_labels.relabel_sequential(lab)


def scipy_bias(mask, q, dilate):
  op = ndi.binary_dilation if dilate else ndi.binary_erosion
  return op(mask, structure=SQUARE, iterations=q, border_value=0)


# Jitted once per shape: eager dispatch of every small op would dominate.
binary_bias = jax.jit(_morphology._binary_bias, static_argnums=3)
instance_bias = jax.jit(_morphology._instance_bias, static_argnums=3)


def n_ids(lab):
  u = np.unique(np.asarray(lab))
  return int(np.count_nonzero(u))


# ---------------------------------------------------------------- bias

@pytest.mark.parametrize("shape", [(37, 45), (64, 64), (5, 70), (33, 31)])
@pytest.mark.parametrize("dilate", [True, False])
def test_bias_matches_scipy_every_q(shape, dilate):
  rng = np.random.default_rng(hash((shape, dilate)) % 2**32)
  q_max = 6
  for density in (0.3, 0.7):
    mask = rng.random(shape) < density
    mask[0, :] = True  # objects touching the border
    mask[:, -1] = True
    for q in range(1, q_max + 1):
      got = binary_bias(mask, q, dilate, q_max)
      np.testing.assert_array_equal(np.asarray(got), scipy_bias(mask, q, dilate),
                                    err_msg=f"q={q} dilate={dilate} shape={shape}")


def test_bias_public_api_draws_q_and_operation():
  rng = np.random.default_rng(0)
  mask = rng.random((40, 50)) < 0.5
  seen = set()
  draw = jax.jit(lambda k: components._draw_bias(k, 4))
  bias = jax.jit(lambda k, m: P.bias(k, m, 4))
  for i in range(80):
    key = jax.random.key(i)
    q, dilate = draw(key)
    got = np.asarray(bias(key, mask))
    np.testing.assert_array_equal(got, scipy_bias(mask, int(q), bool(dilate)))
    seen.add((int(q), bool(dilate)))
  # q uniform over 1..q_max and both operations occur.
  assert {q for q, _ in seen} == {1, 2, 3, 4}
  assert {d for _, d in seen} == {True, False}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(1, 1), (1, 33), (7, 32), (40, 70), (19, 5)]),
       q=st.integers(1, 5), dilate=st.booleans(), seed=st.integers(0, 2**31 - 1),
       density=st.floats(0.0, 1.0))
def test_bias_hypothesis_against_scipy(shape, q, dilate, seed, density):
  mask = np.random.default_rng(seed).random(shape) < density
  got = binary_bias(mask, q, dilate, 5)
  np.testing.assert_array_equal(np.asarray(got), scipy_bias(mask, q, dilate))


@pytest.mark.parametrize("q_max,qs", [(31, (1, 17, 31)), (40, (1, 33, 40))])
def test_bias_large_q_matches_scipy(q_max, qs):
  # q_max = 31 is the largest for the separable shift passes (a shift stays
  # within the neighbouring word); from 32 on the rolled 3×3 loop is used.
  rng = np.random.default_rng(q_max)
  mask = rng.random((45, 100)) < 0.03
  mask[:, 0] = True
  for q in qs:
    for dilate in (True, False):
      m = mask if dilate else ~mask
      got = binary_bias(m, q, dilate, q_max)
      np.testing.assert_array_equal(np.asarray(got), scipy_bias(m, q, dilate),
                                    err_msg=f"q={q} dilate={dilate}")


def test_bias_q_zero_is_identity():
  mask = np.random.default_rng(3).random((20, 40)) < 0.5
  for q_max in (6, 40):
    for dilate in (True, False):
      np.testing.assert_array_equal(np.asarray(binary_bias(mask, 0, dilate, q_max)), mask)


# ---------------------------------------------------------------- id tables

@pytest.mark.parametrize("size", [1, 31, 32, 33, 100, 128, 129, 300])
def test_presence_and_lookup_match_numpy(size):
  # Tables of <= 128 ids go through the bitset path, larger ones through the
  # scatter/gather; both, batched and not, must equal the plain definitions.
  # Ids in range, as the callers guarantee (they clip first).
  rng = np.random.default_rng(size)
  ids = rng.integers(0, size, (3, 50, 37)).astype(np.int32)
  ids[1] = np.clip(ids[1], 0, size // 2)  # some ids absent
  table = rng.random((3, size)) < 0.3
  want_present = np.zeros((3, size), bool)
  for b in range(3):
    want_present[b, ids[b]] = True
  want_present |= table
  want_lookup = np.stack([table[b][ids[b]] for b in range(3)])
  present = jax.jit(jax.vmap(lambda i, t: _presence._present_ids(i.reshape(-1), t)))
  lookup = jax.jit(jax.vmap(_presence._lookup))
  np.testing.assert_array_equal(np.asarray(present(ids, table)), want_present)
  np.testing.assert_array_equal(np.asarray(lookup(table, ids)), want_lookup)
  for b in range(3):
    np.testing.assert_array_equal(
        np.asarray(_presence._present_ids(jnp.asarray(ids[b]).reshape(-1), jnp.asarray(table[b]))),
        want_present[b])
    np.testing.assert_array_equal(np.asarray(_presence._lookup(jnp.asarray(table[b]), ids[b])),
                                  want_lookup[b])
  # Nested vmap, and an unbatched table with batched ids.
  nested = jax.jit(jax.vmap(jax.vmap(_presence._lookup)))
  np.testing.assert_array_equal(
      np.asarray(nested(table[None].repeat(2, 0), ids[None].repeat(2, 0))),
      np.stack([want_lookup] * 2))
  shared = jax.jit(jax.vmap(_presence._lookup, in_axes=(None, 0)))
  np.testing.assert_array_equal(np.asarray(shared(table[0], ids)),
                                np.stack([table[0][i] for i in ids]))
  nested_present = jax.jit(jax.vmap(jax.vmap(lambda i, t: _presence._present_ids(i.reshape(-1), t))))
  np.testing.assert_array_equal(
      np.asarray(nested_present(ids[None].repeat(2, 0), table[None].repeat(2, 0))),
      np.stack([want_present] * 2))


def test_per_instance_erosion_is_union_of_instance_erosions():
  rng = np.random.default_rng(1)
  lab = random_instances(rng, 48, 48, 25, r=(3, 8))
  for q in (1, 2, 3):
    got = np.asarray(instance_bias(lab, q, False, 4))
    want = np.zeros_like(lab)
    for i in range(1, lab.max() + 1):
      want[scipy_bias(lab == i, q, False)] = i
    np.testing.assert_array_equal(got, want)


def test_per_instance_dilation_never_merges_and_covers_union():
  rng = np.random.default_rng(2)
  lab = random_instances(rng, 48, 48, 25, r=(3, 8))
  for q in (1, 3):
    got = np.asarray(instance_bias(lab, q, True, 4))
    # Original pixels keep their ids; no id is lost or created.
    np.testing.assert_array_equal(got[lab > 0], lab[lab > 0])
    assert set(np.unique(got)) == set(np.unique(lab))
    # The union grows exactly like a binary dilation of the union.
    np.testing.assert_array_equal(got > 0, scipy_bias(lab > 0, q, True))
    # Each instance stays inside the dilation of itself.
    for i in range(1, lab.max() + 1):
      assert not np.any((got == i) & ~scipy_bias(lab == i, q, True))


def test_per_instance_keeps_touching_cells_apart():
  lab = np.zeros((20, 20), np.int32)
  lab[5:15, 2:10] = 1
  lab[5:15, 10:18] = 2  # touching along a column
  for dilate in (True, False):
    got = np.asarray(instance_bias(lab, 2, dilate, 2))
    assert set(np.unique(got)) == {0, 1, 2}
    if not dilate:
      # Each cell erodes on its own, so a gap opens between them.
      assert not np.any(got[:, 9:11])
  out = P.bias(jax.random.key(0), lab, 3, per_instance=True)
  assert out.dtype == jnp.int32


# ---------------------------------------------------------------- omission

@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0])
def test_omission_drops_exactly_floor_rate_n(rate):
  rng = np.random.default_rng(3)
  lab = random_instances(rng, 64, 64, 30)
  n = n_ids(lab)
  for seed in range(5):
    out = np.asarray(P.omission(jax.random.key(seed), lab, rate, max_label=40,
                                rounding="floor"))
    assert n_ids(out) == n - math.floor(rate * n)
    # Subset: every kept pixel is unchanged; instances go whole or not at all.
    assert np.all((out == lab) | (out == 0))
    for i in np.unique(lab[lab > 0]):
      kept = out[lab == i]
      assert np.all(kept == i) or np.all(kept == 0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 30), rate_pct=st.integers(0, 1000), seed=st.integers(0, 10**6))
def test_omission_counts_hypothesis(n, rate_pct, seed):
  rate = rate_pct / 1000
  lab = np.zeros((8, 40), np.int32)
  ids = np.random.default_rng(seed).permutation(np.arange(1, 31))[:n]  # sparse ids
  lab.reshape(-1)[:n] = ids
  out = np.asarray(P.omission(jax.random.key(seed), lab, rate, max_label=30,
                              rounding="floor"))
  assert n_ids(out) == n - math.floor(rate * n)
  # Stochastic rounding removes floor(r·n) or one more, never anything else.
  out = np.asarray(P.omission(jax.random.key(seed), lab, rate, max_label=30))
  assert n - n_ids(out) in {math.floor(rate * n), min(n, math.floor(rate * n) + 1)}


def test_omission_is_uniform_over_instances():
  lab = np.arange(1, 11, dtype=np.int32).reshape(2, 5)
  f = jax.jit(jax.vmap(lambda k: P.omission(k, lab, 0.5, max_label=10)))
  out = np.asarray(f(jax.random.split(jax.random.key(0), 4000)))
  freq = (out == 0).mean(axis=0).reshape(-1)
  np.testing.assert_allclose(freq, 0.5, atol=0.04)


# ---------------------------------------------------------------- inclusion

@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_inclusion_adds_floor_rate_m_objects_on_background(rate):
  rng = np.random.default_rng(4)
  lab = random_instances(rng, 64, 64, 12)
  others = random_instances(rng, 64, 64, 15)
  others[lab > 0] = 0  # others are other cells: not on the targets
  others = host_labels.relabel_sequential(others)
  m = n_ids(others)
  max_label = 20
  for seed in range(4):
    out = np.asarray(P.inclusion(jax.random.key(seed), lab, others, rate, max_label=max_label,
                                 rounding="floor"))
    np.testing.assert_array_equal(out[lab > 0], lab[lab > 0])  # targets untouched
    added = out > max_label
    assert not np.any(added & (lab > 0))
    added_ids = np.unique(out[added]) - max_label
    assert len(added_ids) == math.floor(rate * m)
    # Each painted object is the whole `others` object (on background).
    for j in added_ids:
      np.testing.assert_array_equal(out == j + max_label, (others == j) & (lab == 0))


def test_inclusion_never_overwrites_overlapping_targets():
  lab = np.zeros((10, 10), np.int32)
  lab[2:6, 2:6] = 1
  others = np.zeros_like(lab)
  others[4:8, 4:8] = 1  # overlaps the target
  out = np.asarray(P.inclusion(jax.random.key(0), lab, others, 1.0, max_label=2))
  np.testing.assert_array_equal(out[lab == 1], 1)
  np.testing.assert_array_equal(out == 3, (others == 1) & (lab == 0))


def test_inclusion_count_rules():
  lab = np.zeros((4, 4), np.int32)
  others = np.array([[1, 2, 3, 0]] * 4, np.int32)  # m = 3, 0.5·3 = 1.5
  count = lambda seed, rounding: n_ids(np.asarray(P.inclusion(  # noqa: E731
      jax.random.key(seed), lab, others, 0.5, max_label=3, rounding=rounding)))
  assert count(0, "floor") == 1 and count(0, "authors") == 1
  assert {count(s, "stochastic") for s in range(40)} == {1, 2}


# ---------------------------------------------------------------- count rules

def _mean_count(fn, n_keys=4000):
  keys = jax.random.split(jax.random.key(123), n_keys)
  return np.asarray(jax.jit(jax.vmap(fn))(keys)).astype(np.float64)


@pytest.mark.parametrize("n,rate", [(4, 0.3), (5, 0.7), (3, 0.5), (4, 0.1)])
def test_stochastic_omission_is_unbiased(n, rate):
  # E[removed] must be r·n: with 4-5 cells, floor(r·n) removed 17-20% at r=0.3.
  lab = np.arange(1, n + 1, dtype=np.int32).reshape(1, n)
  removed = _mean_count(lambda k: n - jnp.sum(jnp.bincount(
      P.omission(k, lab, rate, max_label=8).reshape(-1), length=9)[1:] > 0))
  x = rate * n
  sd = math.sqrt((x - math.floor(x)) * (1 - (x - math.floor(x))) / len(removed))
  assert abs(removed.mean() - x) <= 5 * sd + 1e-9, (removed.mean(), x)
  assert set(np.unique(removed)) <= {math.floor(x), math.floor(x) + 1}


def test_stochastic_inclusion_is_unbiased():
  lab = np.zeros((1, 5), np.int32)
  others = np.arange(1, 6, dtype=np.int32).reshape(1, 5)   # m = 5, 0.3·5 = 1.5
  included = _mean_count(lambda k: jnp.sum(
      P.inclusion(k, lab, others, 0.3, max_label=5) > 0))
  assert abs(included.mean() - 1.5) <= 5 * math.sqrt(0.25 / len(included))


def test_floor_and_authors_rules():
  lab = np.arange(1, 5, dtype=np.int32).reshape(1, 4)   # n = 4
  removed = lambda rate, rounding: 4 - n_ids(np.asarray(P.omission(  # noqa: E731
      jax.random.key(0), lab, rate, max_label=4, rounding=rounding)))
  assert removed(0.3, "floor") == 1 and removed(0.1, "floor") == 0
  assert removed(0.1, "authors") == 1 and removed(0.0, "authors") == 0  # max(1, int(r·n))
  assert removed(0.7, "authors") == 2 and removed(1.0, "authors") == 4
  empty = np.zeros((1, 4), np.int32)
  assert n_ids(np.asarray(P.omission(jax.random.key(0), empty, 0.5, max_label=4,
                                     rounding="authors"))) == 0
  with pytest.raises(ValueError, match="count_rounding"):
    P.PerturbConfig(count_rounding="round")


def test_perturb_counts_match_perturb():
  # The counts are those of the very draws `perturb` makes with the same key,
  # counted independently from the output mask.
  cfg = P.PerturbConfig(omission_rate=0.3, inclusion_rate=0.3)
  for s in range(6):
    lab, others = make_pair(s)
    key = jax.random.key(s)
    mask = np.asarray(P.perturb(key, lab, others, cfg, max_label=20))
    counts = np.asarray(P.perturb_counts(key, lab, others, cfg, max_label=20))
    ids = np.unique(lab[lab > 0])
    oids = np.unique(others[others > 0])
    omitted = sum(not mask[lab == i].any() for i in ids)
    included = sum(mask[others == j].all() for j in oids)
    assert counts.tolist() == [len(ids), omitted, len(oids), included]


# ---------------------------------------------------------------- salt and pepper

def test_salt_and_pepper_frequencies():
  mask = np.zeros((200, 200), bool)
  mask[:, :100] = True
  for prob in (0.0, 0.1, 0.5, 1.0):
    out = np.asarray(P.salt_and_pepper(jax.random.key(5), mask, prob))
    flipped = (out != mask).mean()
    # prob is the fraction of pixels changed, salt and pepper alike.
    assert abs(flipped - prob) < 0.01, (prob, flipped)
    assert abs((out & ~mask).mean() * 2 - prob) < 0.015
    assert abs((~out & mask).mean() * 2 - prob) < 0.015
  np.testing.assert_array_equal(P.salt_and_pepper(jax.random.key(0), mask, 0.0), mask)


# ---------------------------------------------------------------- composition

def make_pair(seed=0, h=48, w=40):
  rng = np.random.default_rng(seed)
  lab = random_instances(rng, h, w, 14)
  others = random_instances(rng, h, w, 8)
  others[lab > 0] = 0
  return lab, host_labels.relabel_sequential(others)


def test_perturb_identity_config():
  lab, others = make_pair()
  out = P.perturb(jax.random.key(0), lab, others, P.PerturbConfig(), max_label=20)
  np.testing.assert_array_equal(np.asarray(out), lab > 0)


def test_perturb_is_the_documented_composition():
  lab, others = make_pair(1)
  cfg = P.PerturbConfig(omission_rate=0.5, inclusion_rate=0.5, bias_max=3,
                        salt_pepper_prob=0.05)
  key = jax.random.key(7)
  k_om, k_in, k_sp, k_bias = jax.random.split(key, 4)
  y = P.omission(k_om, lab, 0.5, max_label=20)
  y = P.inclusion(k_in, y, others, 0.5, max_label=20)
  y = P.salt_and_pepper(k_sp, y > 0, 0.05)
  want = P.bias(k_bias, y, 3)
  got = P.perturb(key, lab, others, cfg, max_label=20)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_perturb_per_instance_bias_composition():
  lab, others = make_pair(2)
  cfg = P.PerturbConfig(omission_rate=0.3, bias_max=2, per_instance_bias=True)
  key = jax.random.key(3)
  k_om, _, _, k_bias = jax.random.split(key, 4)
  y = P.omission(k_om, lab, 0.3, max_label=20)
  want = np.asarray(P.bias(k_bias, y, 2, per_instance=True)) > 0
  got = np.asarray(P.perturb(key, lab, others, cfg, max_label=20))
  np.testing.assert_array_equal(got, want)


def test_jit_equals_eager_and_vmap_equals_loop():
  cfg = P.PerturbConfig(omission_rate=0.7, inclusion_rate=0.3, bias_max=4,
                        salt_pepper_prob=0.02)
  pairs = [make_pair(s) for s in range(5)]
  labs = np.stack([p[0] for p in pairs])
  oth = np.stack([p[1] for p in pairs])
  keys = jax.random.split(jax.random.key(11), 5)
  eager = [np.asarray(P.perturb(k, l, o, cfg, max_label=20)) for k, l, o in zip(keys, labs, oth)]
  jitted = jax.jit(functools.partial(P.perturb, max_label=20), static_argnums=3)
  for k, l, o, e in zip(keys, labs, oth, eager):
    np.testing.assert_array_equal(np.asarray(jitted(k, l, o, cfg)), e)
  vm = jax.jit(jax.vmap(functools.partial(P.perturb, max_label=20), in_axes=(0, 0, 0, None)),
               static_argnums=3)
  np.testing.assert_array_equal(np.asarray(vm(keys, labs, oth, cfg)), np.stack(eager))


def test_nested_vmap_matches_loop():
  # Nested vmaps go through the custom_vmap rules twice.
  lab, others = make_pair(3)
  labs = np.stack([lab, lab[::-1], lab[:, ::-1], lab[::-1, ::-1]]).reshape(2, 2, *lab.shape)
  keys = jax.random.split(jax.random.key(0), 4).reshape(2, 2)
  f = functools.partial(P.omission, rate=0.5, max_label=20)
  got = jax.jit(jax.vmap(jax.vmap(f)))(keys, labs)
  for i in range(2):
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(got[i, j]), np.asarray(f(keys[i, j], labs[i, j])))


def test_traced_rates_under_vmap():
  lab, others = make_pair(4)
  n = n_ids(lab)
  rates = jnp.array([0.0, 0.5, 1.0])
  f = jax.vmap(lambda k, r: P.omission(k, lab, r, max_label=20, rounding="floor"))
  out = np.asarray(f(jax.random.split(jax.random.key(0), 3), rates))
  assert [n_ids(o) for o in out] == [n - math.floor(r * n) for r in (0.0, 0.5, 1.0)]


def test_keys_determine_output():
  lab, others = make_pair(5)
  cfg = P.PerturbConfig(omission_rate=0.5, bias_max=3, salt_pepper_prob=0.1)
  a = np.asarray(P.perturb(jax.random.key(1), lab, others, cfg, max_label=20))
  b = np.asarray(P.perturb(jax.random.key(1), lab, others, cfg, max_label=20))
  c = np.asarray(P.perturb(jax.random.key(2), lab, others, cfg, max_label=20))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call, match", [
    (lambda l: P.omission(jax.random.key(0), l, 1.5, max_label=20), "omission rate"),
    (lambda l: P.omission(jax.random.key(0), l, -0.1, max_label=20), "omission rate"),
    (lambda l: P.inclusion(jax.random.key(0), l, l, 2.0, max_label=20), "inclusion rate"),
    (lambda l: P.salt_and_pepper(jax.random.key(0), l > 0, 1.1), "salt_and_pepper prob"),
    (lambda l: P.bias(jax.random.key(0), l, 0), "q_max"),
    (lambda l: P.bias(jax.random.key(0), l, 2.5), "q_max"),
    (lambda l: P.omission(jax.random.key(0), l.astype(np.float32), 0.5, max_label=20), "integer"),
    (lambda l: P.omission(jax.random.key(0), l - 1, 0.5, max_label=20), "negative"),
    (lambda l: P.omission(jax.random.key(0), l, 0.5, max_label=3), "above max_label=3"),
    (lambda l: P.inclusion(jax.random.key(0), l, l * 10, 0.5, max_label=20), "others"),
    (lambda l: P.omission(jax.random.key(0), l, 0.5, max_label=0), "max_label"),
    (lambda l: P.perturb(jax.random.key(0), l, l, {"omission_rate": 0.5}, max_label=20), "PerturbConfig"),
])
def test_errors_name_the_argument(call, match):
  lab, _ = make_pair()
  with pytest.raises(ValueError, match=match):
    call(lab)


@pytest.mark.parametrize("kwargs, match", [
    (dict(omission_rate=1.2), "omission_rate"),
    (dict(inclusion_rate=-0.5), "inclusion_rate"),
    (dict(salt_pepper_prob=2), "salt_pepper_prob"),
    (dict(bias_max=-1), "bias_max"),
    (dict(bias_max=2.0), "bias_max"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    P.PerturbConfig(**kwargs)


def test_under_jit_out_of_range_ids_are_clipped_not_raised():
  lab = np.array([[0, 1, 2, 50]], np.int32)
  f = jax.jit(lambda l: P.omission(jax.random.key(0), l, 0.0, max_label=2))
  np.testing.assert_array_equal(np.asarray(f(lab)), [[0, 1, 2, 2]])


# ---------------------------------------------------------------- host helpers

def test_relabel_sequential():
  lab = np.array([[0, 7, 7], [3, 0, 100]])
  np.testing.assert_array_equal(host_labels.relabel_sequential(lab), [[0, 2, 2], [1, 0, 3]])
  np.testing.assert_array_equal(host_labels.relabel_sequential(np.array([[5, 9]])), [[1, 2]])
  with pytest.raises(ValueError, match="integer"):
    host_labels.relabel_sequential(np.zeros((2, 2), np.float32))


def test_felzenszwalb_objects_avoid_targets():
  rng = np.random.default_rng(6)
  lab = random_instances(rng, 64, 64, 6, r=(4, 8))
  img = ndi.gaussian_filter(rng.random((64, 64)), 2) + 0.5 * (lab > 0)
  others = host_labels.felzenszwalb_objects(
      img, lab, host_labels.FelzenszwalbConfig(scale=20, sigma=0.8, min_size=10, max_area_fraction=0.2))
  assert others.shape == lab.shape and others.dtype == np.int32
  assert not np.any((others > 0) & (lab > 0))
  ids = np.unique(others[others > 0])
  np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
  assert len(ids) > 0
  with pytest.raises(ValueError, match="does not match"):
    host_labels.felzenszwalb_objects(img[:10], lab)
