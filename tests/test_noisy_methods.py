"""Table 3.3's competing methods: Partial Labelling's loss, Confident
Learning's targets, the UNet's features, and toy sets on which each method
beats naive training on the same noisy labels."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_discs
from upgrade_jax import engine
from upgrade_jax.baselines import confident, partial
from upgrade_jax.data import sampling
from upgrade_jax.data.types import concat
from upgrade_jax.metrics import pooled_dice_np
from upgrade_jax.models.unet import UNet
from upgrade_jax.perturb import PerturbConfig
from upgrade_jax.pipeline import methods
from upgrade_jax.pipeline.scenarios import partial_labels

TINY = (4, 8, 8, 8, 8)


def test_unet_features_leave_the_logits_unchanged():
  model = UNet(widths=TINY)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 24, 1))
  variables = engine.init_variables(model, 1, jax.random.PRNGKey(1))
  logits = model.apply(variables, x, train=False)
  logits2, feats = model.apply(variables, x, train=False, return_features=True)
  np.testing.assert_array_equal(logits, logits2)
  assert feats.shape == (2, 20, 24, TINY[0]) and float(feats.min()) >= 0.0


def _ce(logits, cls):
  logp = jax.nn.log_softmax(logits, -1)
  return -np.take_along_axis(np.asarray(logp), np.asarray(cls)[..., None], -1)[..., 0]


def test_supervised_term_is_cross_entropy_on_foreground_and_drawn_background():
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2))
  feats = jnp.ones((1, 4, 4, 3))
  codes = jnp.array([[1, 1, 0, 0]] * 4)[None]   # as many background as foreground pixels
  valid = jnp.ones((1, 4, 4), bool)
  # Rate n_fg / n_rest = 1: every background pixel is drawn.
  out = partial.partial_losses(jax.random.PRNGKey(1), logits, feats, codes, valid)
  want = _ce(logits, (codes == 1).astype(int)).mean()
  np.testing.assert_allclose(out["supervised"], want, rtol=1e-5)
  # No unlabelled pixel: no pseudo-label term.
  assert float(out["pseudo"]) == 0.0


def test_pseudo_labels_follow_the_nearer_centroid_above_gamma():
  # Features: labelled foreground e0, background e1; unlabelled pixels carry
  # e0 (-> pseudo foreground), e1 (-> background) or a mix (below gamma).
  e0, e1, mix = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
  feats = jnp.array([[e0, e0, e1, e1, e0, e1, mix, mix]], jnp.float32)[:, None]  # (1,1,8,2)
  codes = jnp.array([[[1, 1, 0, 0, -1, -1, -1, -1]]])
  valid = jnp.ones((1, 1, 8), bool)
  logits = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 8, 2))
  # The background draw is random (rate 2 / 6): take a key whose draw holds
  # both labelled background pixels and no unlabelled one.
  for seed in range(200):
    key = jax.random.PRNGKey(seed)
    drawn = np.asarray(jax.random.bernoulli(key, 2 / 6, codes.shape))[0, 0]
    if drawn[2] and drawn[3] and not drawn[4:].any():
      break
  out = partial.partial_losses(key, logits, feats, codes, valid, gamma=0.9)
  ce = _ce(logits, jnp.array([[[0, 0, 0, 0, 1, 0, 0, 0]]]))
  # Pixels 4 (-> 1) and 5 (-> 0) are pseudo-labelled; the mixes (cos 0.71) are not.
  np.testing.assert_allclose(out["pseudo"], ce[0, 0, 4:6].mean(), rtol=1e-5)
  # Orthogonal centroids, every feature on its own centroid: separation 0.
  np.testing.assert_allclose(out["separation"], 0.0, atol=1e-6)


def test_without_labelled_foreground_only_the_supervised_term_acts():
  codes = jnp.full((2, 8, 8), -1).at[:, :2].set(0)
  out = partial.partial_losses(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 2)),
                               jnp.ones((2, 8, 8, 4)), codes, jnp.ones((2, 8, 8), bool))
  assert all(np.isfinite(float(v)) for v in out.values())
  assert float(out["pseudo"]) == 0.0 and float(out["separation"]) == 0.0


def test_gradient_is_finite_where_features_are_zero():
  # ReLU features are often exactly 0 (and with no foreground, the
  # centroids too): the loss's gradient must stay finite there.
  codes = jnp.array([[[1, 1, 0, -1, -1, -1]]])
  valid = jnp.ones((1, 1, 6), bool)

  def loss(logits, feats):
    out = partial.partial_losses(jax.random.PRNGKey(0), logits, feats, codes, valid)
    return out["supervised"] + 0.1 * out["pseudo"] + 0.15 * out["separation"]

  for feats in (jnp.zeros((1, 1, 6, 3)), jnp.zeros((1, 1, 6, 3)).at[0, 0, 0].set(1.0)):
    grads = jax.grad(loss, argnums=(0, 1))(jnp.zeros((1, 1, 6, 2)), feats)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_ramp():
  got = [float(partial.ramp(s, 10, 20)) for s in (0, 10, 15, 20, 99)]
  np.testing.assert_allclose(got, [0, 0, 0.5, 1, 1])


def test_confident_learning_pair_makes_soft_targets():
  t = jnp.array([[[0, 4, confident.TO_FOREGROUND, confident.TO_BACKGROUND]]], jnp.int32)
  _, soft = engine.ConfidentLearning(confidence=0.8).pair(
      None, jnp.zeros((1, 1, 4, 1)), t, t, max_label=4, valid=None, train=True)
  np.testing.assert_allclose(soft, [[[0.0, 1.0, 0.8, 0.2]]], rtol=1e-6)


def test_partial_labels_mark_lq_background_unlabelled_inside_the_extent():
  ds = toy_discs(2, size=(24, 24), radius=(2, 4), extents=[(24, 24), (14, 16)])
  out = partial_labels(ds)
  valid = ds.valid_mask()
  np.testing.assert_array_equal(out.targets[valid & (ds.targets > 0)],
                                ds.targets[valid & (ds.targets > 0)])
  assert np.all(out.targets[valid & (ds.targets == 0)] == -1)
  assert np.all(out.targets[~valid] == 0)


def test_tasks_round_trip_through_json():
  for task in (engine.ConfidentLearning(confidence=0.7, folds=3),
               engine.PartialLabelling(gamma=0.8, ramp_end=200)):
    assert engine.task_from_json(task.to_json()) == task


# --------------------------------------------------------------------------
# Toy sets: 24 32x32 images of discs, a few with true labels ("HQ"), the
# rest with labels that omit cells; a clean test set. Tiny UNet, 100 steps.

def _toy(omission: float, seed: int, n_hq: int = 4):
  train = toy_discs(24, size=(32, 32), seed=1, radius=(3, 6))
  hq, truth = train.subset(np.arange(n_hq)), train.subset(np.arange(n_hq, 24))
  lq = sampling.make_lq(truth, PerturbConfig(omission_rate=omission), seed=seed)
  val = toy_discs(4, size=(32, 32), seed=2, radius=(3, 6))
  test = toy_discs(8, size=(32, 32), seed=3, radius=(3, 6))
  cfg = engine.TrainConfig(task=engine.Segment(), widths=TINY, crop=32, batch_size=8,
                           max_steps=100, steps_per_epoch=25, patience=100, log_every=1000,
                           lr=3e-3, seed=seed, ema_decay=0.0)
  # The raw weights (ema_decay 0): on this 100-step toy the weights' average
  # lifts naive training on 70% omission to 0.96 Dice, where Confident
  # Learning's corrected labels (0.93) no longer show; the comparison needs a
  # harder toy under the average (BUILD_NOTES, open problems).
  return hq, lq, val, test, cfg


def _test_dice(fit, test):
  pred = engine.predict(fit.state_best, test.images, extents=test.extents)
  return pooled_dice_np(pred, test.targets, test.valid_mask())


@dataclasses.dataclass(frozen=True)
class _CrossEntropy(engine.Segment):
  """Naive training with Partial Labelling's loss family: cross-entropy on
  every pixel, the LQ background read as background."""
  name: ClassVar[str] = "test_cross_entropy"

  def loss(self, logits, target, valid):
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.where(target, logp[..., 1], logp[..., 0])
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


@pytest.mark.slow
def test_partial_labelling_beats_naive_cross_entropy_on_omission(tmp_path):
  # 2 HQ slices, 90% omission: read as background, the omitted cells
  # outweigh the labelled ones (seeds 0, 1, 2: +0.08, +0.37, +0.29).
  hq, lq, val, test, cfg = _toy(omission=0.9, seed=2, n_hq=2)
  quiet = lambda m: None  # noqa: E731
  naive = engine.fit(dataclasses.replace(cfg, task=_CrossEntropy()), concat([hq, lq]), val,
                     tmp_path / "naive", log=quiet)
  pl = engine.fit(dataclasses.replace(cfg, task=engine.PartialLabelling()),
                  concat([hq, partial_labels(lq)]), val, tmp_path / "pl", log=quiet)
  d_naive, d_pl = _test_dice(naive, test), _test_dice(pl, test)
  print(f"omission 0.9: naive cross-entropy {d_naive:.4f}, partial labelling {d_pl:.4f}")
  assert d_pl > d_naive + 0.1


@pytest.mark.slow
def test_confident_learning_beats_naive_training_on_omission(tmp_path):
  hq, lq, val, test, cfg = _toy(omission=0.7, seed=1)
  quiet = lambda m: None  # noqa: E731
  train = concat([hq, lq])
  naive = engine.fit(cfg, train, val, tmp_path / "naive", log=quiet)

  class Cfg:  # the PipelineConfig fields a trainer reads
    segment, predict_batch = cfg, 8

  fit, info = methods.fit_confident_learning(Cfg, train, val, tmp_path / "cl", seed=1,
                                             options=engine.ConfidentLearning(), log=quiet,
                                             context=None)
  d_naive, d_cl = _test_dice(naive, test), _test_dice(fit, test)
  print(f"omission 0.7: naive {d_naive:.4f}, confident learning {d_cl:.4f}; "
        f"{info['to_foreground']} pixels corrected to foreground")
  # The teachers see the omitted cells as cells: most corrections add them.
  assert info["to_foreground"] > info["to_background"]
  assert d_cl > d_naive + 0.005
