"""models/conv.py against flax.linen (the oracle): forward values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgrade_jax.models import conv

TOL = dict(rtol=1e-4, atol=1e-4)


def _vjp_all(f, *args):
  """Output and the VJP of f at args for a fixed random cotangent."""
  y, vjp = jax.vjp(f, *args)
  ct = jax.random.normal(jax.random.PRNGKey(7), y.shape, y.dtype)
  return y, vjp(ct)


@pytest.mark.parametrize("shape,cout,ksize,padding", [
    ((2, 9, 7, 3), 5, (3, 3), "SAME"),     # odd sizes, odd channels
    ((1, 8, 8, 16), 16, (3, 3), "SAME"),
    ((2, 6, 11, 2), 32, (3, 3), "VALID"),
    ((1, 10, 9, 4), 3, (3, 3), ((2, 0), (1, 1))),
    ((2, 5, 5, 8), 2, (1, 1), "SAME"),     # the head
    ((1, 7, 6, 3), 4, (2, 3), "SAME"),     # even kernel: SAME pads 0 before, 1 after
])
def test_conv_matches_flax_conv(shape, cout, ksize, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = nn.Conv(cout, ksize, padding=padding)
  ours = conv.get_conv("xla")(features=cout, kernel_size=ksize, padding=padding)
  params = ref.init(jax.random.PRNGKey(1), x)
  # Same parameter tree, so checkpoints do not depend on the implementation.
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)  # non-zero bias

  y_ref, g_ref = _vjp_all(lambda p, x: ref.apply(p, x), params, x)
  y, g = _vjp_all(lambda p, x: ours.apply(p, x), params, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, **TOL)


def test_xla_conv_forward_is_the_direct_sum_for_few_channels():
  # Cin <= SMALL_CIN: no convolution in the forward (the fused multiply-adds),
  # XLA's convolution in the gradient; more channels: XLA's convolution.
  k = jnp.ones((3, 3, conv.SMALL_CIN, 8))
  pads = ((1, 1), (1, 1))
  small = jax.make_jaxpr(conv.conv2d_xla, static_argnums=2)(
      jnp.ones((1, 6, 6, conv.SMALL_CIN)), k, pads)
  assert "conv_general_dilated" not in str(small)
  grad = jax.make_jaxpr(jax.grad(lambda k: conv.conv2d_xla(jnp.ones((1, 6, 6, conv.SMALL_CIN)),
                                                          k, pads).sum()))(k)
  assert "conv_general_dilated" in str(grad)
  big = jax.make_jaxpr(conv.conv2d_xla, static_argnums=2)(
      jnp.ones((1, 6, 6, conv.SMALL_CIN + 1)), jnp.ones((3, 3, conv.SMALL_CIN + 1, 8)), pads)
  assert "conv_general_dilated" in str(big)


def test_get_conv_unknown_and_bad_padding():
  with pytest.raises(ValueError, match="unknown"):
    conv.get_conv("winograd")
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="padding"):
    conv.Conv(2, (3, 3), padding="CIRCULAR").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    conv.Conv(2, (3, 3)).init(jax.random.PRNGKey(0), jnp.zeros((4, 4, 1)))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 5), (3, 4, 4, 1)])
def test_max_pool_2x2_matches_flax(shape):
  x = jax.random.normal(jax.random.PRNGKey(5), shape)
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  y_ref, (g_ref,) = _vjp_all(ref, x)
  y, (g,) = _vjp_all(conv.max_pool_2x2, x)
  assert y.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g, g_ref, **TOL)


def test_max_pool_2x2_ties_go_to_one_position_like_flax():
  # Ties (ReLU zeros, repeated values) must not multiply the gradient.
  x = jnp.array([[0., 0., 1., 1.], [0., 0., 1., 2.],
                 [3., 3., 0., -1.], [3., 3., 0., 0.]])[None, :, :, None]
  ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * jnp.arange(1., 5.).reshape(1, 2, 2, 1)))(x)
  got = jax.grad(lambda x: jnp.sum(conv.max_pool_2x2(x) * jnp.arange(1., 5.).reshape(1, 2, 2, 1)))(x)
  np.testing.assert_array_equal(got, ref)
  # Each window passes its cotangent to exactly one input.
  np.testing.assert_array_equal(got.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4).sum(1),
                                [1., 2., 3., 4.])


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (4, 8, 8, 16)])
def test_batch_norm_relu_matches_flax(shape):
  x = 2.0 + 3.0 * jax.random.normal(jax.random.PRNGKey(6), shape)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  ours = conv.BatchNormReLU(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v = ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(v)
  c = shape[-1]
  params = {"params": {"scale": 1.0 + 0.5 * jnp.arange(c) / c - 0.4, "bias": 0.3 - 0.1 * jnp.arange(c)}}

  def run(m):
    def f(p, x):
      y, upd = m.apply({**p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
      return y, upd
    return f

  ref_f = lambda p, x: jax.nn.relu(run(ref)(p, x)[0])
  y_ref, g_ref = _vjp_all(ref_f, params, x)
  y, g = _vjp_all(lambda p, x: run(ours)(p, x)[0], params, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
  # Running statistics: same update as flax.
  _, s_ref = run(ref)(params, x)
  _, s = run(ours)(params, x)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):
    np.testing.assert_allclose(a, b, **TOL)
  # Eval mode uses the running statistics.
  y_eval = ours.clone(use_running_average=True).apply({**params, **s}, x)
  y_eval_ref = jax.nn.relu(ref.clone(use_running_average=True).apply({**params, **s_ref}, x))
  np.testing.assert_allclose(y_eval, y_eval_ref, **TOL)
