"""The state of a run: UNet variables, Adam, the step and the base key.

  create_train_state   a fresh TrainState for a TrainConfig
  TrainState           the pytree the train step donates and returns

Randomness: the state carries a base key; step s uses fold_in(rng, s). A run
is therefore a pure function of (config, data), and a resumed run replays the
exact random stream of an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from upgrade_jax import parallel
from upgrade_jax.engine.config import TrainConfig
from upgrade_jax.engine.tasks import Task
from upgrade_jax.models.unet import MULTIPLE, UNet

__all__ = ["TrainState", "create_train_state", "ema_update", "init_variables",
           "learning_rate", "network_channels", "scale_learning_rate", "set_learning_rate"]


class TrainState(flax.struct.PyTreeNode):
  """The whole mutable state of a run (a pytree; `model` and `tx` are static).

  step: () int32 number of completed steps; params, batch_stats: UNet
  variables; ema_params: the exponential moving average of params (Polyak
  averaging, `TrainConfig.ema_decay`), what validation, selection and
  prediction use; opt_state: Adam state; rng: (2,) uint32 base key (step s
  uses fold_in(rng, s)). Static: the UNet, the optimizer and the task the
  network learns (prediction builds its input through the task).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any
  model: UNet = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  task: Task = flax.struct.field(pytree_node=False, default=None)

  @property
  def variables(self) -> dict:
    """The variables a prediction uses: the averaged params (`ema_params`)
    with the running BatchNorm statistics. The train step differentiates
    `params`, never these."""
    return {"params": self.ema_params, "batch_stats": self.batch_stats}

  def with_variables(self, variables: dict) -> "TrainState":
    """This state predicting with `variables` ({'params', 'batch_stats'}):
    both params and their average set to them (e.g. the best checkpoint)."""
    return self.replace(params=variables["params"],
                        ema_params=jax.tree.map(jnp.copy, variables["params"]),
                        batch_stats=variables["batch_stats"])

  def arrays(self) -> dict:
    """The checkpointed part, as a plain dict of arrays."""
    return {"step": self.step, "params": self.params,
            "batch_stats": self.batch_stats, "opt_state": self.opt_state,
            "rng": self.rng, "ema_params": self.ema_params}


def _raw_key(key) -> jax.Array:
  """Typed or raw PRNG key -> raw (2,) uint32 key (checkpoint friendly)."""
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(f"expected a threefry PRNG key, got {key.dtype}{key.shape}")
  return key


def _lecun_like_init(key, shapes):
  """Variables with Flax's default initialisers, from one random draw.

  Kernels (any 'kernel' leaf, fan_in = prod(shape[:-1])) get lecun_normal
  (truncated normal in [-2, 2], variance 1/fan_in, as flax.linen.Conv and
  ConvTranspose); BatchNorm 'scale' and 'var' are ones; every other leaf
  (biases, BatchNorm 'bias' and 'mean') is zeros. Why not `model.init`: it
  draws each kernel with its own truncated-normal graph, and XLA takes ~10 s
  on CPU to compile the UNet's ~20 of them; one flat draw compiles in ~1 s.
  The values differ from `model.init`'s, not their distribution.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [getattr(path[-1], "key", None) for path, _ in flat]
  sizes = [math.prod(s.shape) if n == "kernel" else 0
           for n, (_, s) in zip(names, flat)]
  z = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for name, size, (_, s) in zip(names, sizes, flat):
    if name == "kernel":
      fan_in = math.prod(s.shape[:-1])
      # 0.8796... is the std of a standard normal truncated to [-2, 2].
      std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
      out.append((z[offset:offset + size].reshape(s.shape) * std).astype(s.dtype))
      offset += size
    elif name in ("scale", "var"):
      out.append(jnp.ones(s.shape, s.dtype))
    else:
      out.append(jnp.zeros(s.shape, s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def init_variables(model: UNet, input_channels: int, key) -> dict:
  """{'params', 'batch_stats'} of `model` for inputs with `input_channels`."""
  dummy = jax.ShapeDtypeStruct((1, MULTIPLE, MULTIPLE, input_channels), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), key, dummy)
  return _init_jit(key, _Hashable(shapes))


class _Hashable:
  """Wraps a pytree of ShapeDtypeStructs so it can be a static jit argument."""

  def __init__(self, tree):
    self.tree = tree
    self._key = str(jax.tree_util.tree_structure(tree)) + str(
        [(s.shape, str(s.dtype)) for s in jax.tree.leaves(tree)])

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Hashable) and self._key == other._key


@functools.partial(jax.jit, static_argnums=1)
def _init_jit(key, shapes: _Hashable):
  return _lecun_like_init(key, shapes.tree)


@functools.lru_cache(maxsize=None)
def _optimizer() -> optax.GradientTransformation:
  # Adam with the learning rate as state (inject_hyperparams), not a
  # constant: `tx` is a static field of TrainState, so a single object for
  # every lr lets jit reuse one compiled step across fits and lrs.
  return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def ema_update(ema, params, step, decay: float):
  """The moving average after `step` (the number of the update, from 1):
  ema * d + params * (1 - d) with d = min(decay, (1 + step) / (10 + step)),
  so the first updates follow the fast-moving weights instead of the
  random init (TensorFlow's ExponentialMovingAverage with num_updates).
  decay 0 keeps ema = params. Pytrees of f32 arrays; jittable."""
  if decay == 0.0:
    return params
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: e * d + p * (1.0 - d), ema, params)


def learning_rate(state: TrainState) -> float:
  """The Adam learning rate the state's next step uses (a host float)."""
  return float(jax.device_get(state.opt_state.hyperparams["learning_rate"]))


def _replace_learning_rate(state: TrainState, new_of_old) -> TrainState:
  # The rate is optimizer state (inject_hyperparams): replacing it reuses the
  # compiled step, a checkpoint carries it, and the new value keeps the old
  # one's sharding.
  hp = dict(state.opt_state.hyperparams)
  old = hp["learning_rate"]
  hp["learning_rate"] = jax.device_put(new_of_old(old), old.sharding)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hp))


def scale_learning_rate(state: TrainState, factor: float) -> TrainState:
  """`state` with its learning rate times `factor` (a plateau's drop)."""
  return _replace_learning_rate(state, lambda old: old * jnp.float32(factor))


def set_learning_rate(state: TrainState, value: float) -> TrainState:
  """`state` with its learning rate set to `value` (an anneal's epoch)."""
  return _replace_learning_rate(state, lambda old: jnp.asarray(value, old.dtype))


def network_channels(config: TrainConfig, image_channels: int) -> int:
  """Input channels of the network of `config.task` on images with C channels."""
  return image_channels + config.task.extra_channels


def create_train_state(config: TrainConfig, input_channels: int, key,
                       mesh=None) -> TrainState:
  """A fresh TrainState: UNet(config.widths) with `input_channels` inputs.

  Args:
    config: the run's TrainConfig.
    input_channels: image channels plus the task's extra channels (see
      `network_channels`).
    key: PRNG key; split into the init key and the run's base key.
    mesh: if given, the state is replicated over it.
  """
  if input_channels < 1:
    raise ValueError(f"input_channels must be >= 1, got {input_channels}")
  model = UNet(widths=config.widths, num_classes=config.task.num_classes,
               conv_impl=config.conv_impl)
  k_init, k_run = jax.random.split(_raw_key(key))
  variables = init_variables(model, input_channels, k_init)
  tx = _optimizer()
  params = variables["params"]
  opt_state = tx.init(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(config.lr, jnp.float32)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables["batch_stats"],
                     opt_state=opt_state, rng=k_run,
                     ema_params=jax.tree.map(jnp.copy, params),  # own buffers: both are donated
                     model=model, tx=tx, task=config.task)
  if mesh is not None:
    state = parallel.replicate_tree(state, mesh)
  return state
