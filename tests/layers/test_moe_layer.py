"""The MoE layer: dropless equals dropping when nothing drops; identical experts reduce to the
router probability times a dense MLP; jitter only in training; clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import MoeLayer

D, F, E = 8, 16, 4


def _layer(**kw):
  return MoeLayer(MoeConfig(E, layout='all', **kw), F)


def _init(layer, x, seed=1):
  # Jitted: run eagerly, init compiles each op of the forward pass as its own program.
  return jax.jit(lambda rng: partitioning.unbox(layer.init(rng, x)['params']))(
      jax.random.key(seed))


@pytest.mark.parametrize('k,renormalize', [(1, False), (2, False), (2, True)])
def test_dropless_equals_dropping_when_nothing_drops(k, renormalize):
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  kw = dict(num_selected_experts=k, renormalize_gates=renormalize, eval_capacity_factor=2.0 * E)
  dropping, dropless = _layer(dispatch='dropping', **kw), _layer(dispatch='dropless', **kw)
  params = _init(dropping, x)

  def run(layer, p, x):
    y, state = layer.apply({'params': p}, x, mutable=['moe'])
    return y, state

  # Jitted: op by op, compiling each op costs more than the whole layer.
  (y1, s1), (y2, s2) = (jax.jit(lambda p, x, layer=layer: run(layer, p, x))(params, x)
                        for layer in (dropping, dropless))
  assert float(s1['moe']['fraction_dropped'][0]) == 0.0  # capacity really is large enough
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s2['moe']['expert_load'][0], s1['moe']['expert_load'][0], atol=1e-6)

  def grads(layer):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(run(layer, p, x)[0])),
                            argnums=(0, 1)))(params, x)

  g1, g2 = grads(dropping), grads(dropless)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g2, g1)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize('capacity_factor', [8.0, 0.5])
def test_identical_experts_give_router_probability_times_dense_mlp(capacity_factor):
  """Top-1 routing over E copies of one dense MLP: kept tokens get p_top1 * mlp(x), dropped
  tokens 0. Which tokens are dropped is re-derived here in numpy (position order per group)."""
  x = jax.random.normal(jax.random.key(0), (2, 8, D))
  dense = MlpBlock(F, ('gelu', 'linear'))
  dense_params = _init(dense, x, seed=2)
  layer = _layer(eval_capacity_factor=capacity_factor, min_expert_capacity=1)
  params = _init(layer, x)
  params['expert'] = {name: {'kernel': jnp.stack([dense_params[name]['kernel']] * E)}
                      for name in ('wi_0', 'wi_1', 'wo')}
  y = np.asarray(jax.jit(lambda p: layer.apply({'params': p}, x, mutable=['moe'])[0])(params))
  mlp = np.asarray(jax.jit(lambda p: dense.apply({'params': p}, x))(dense_params))

  probs = _softmax(np.asarray(x) @ np.asarray(params['router']['router_weights']['w']['kernel']))
  capacity = max(round(capacity_factor * 8 / E), 1)
  dropped = 0
  for g in range(2):
    used = np.zeros(E, int)
    for t in range(8):
      e = int(np.argmax(probs[g, t]))
      if used[e] < capacity:
        used[e] += 1
        np.testing.assert_allclose(y[g, t], probs[g, t, e] * mlp[g, t], rtol=1e-4, atol=1e-6)
      else:
        dropped += 1
        np.testing.assert_array_equal(y[g, t], 0.0)
  assert (dropped > 0) == (capacity_factor < 1)  # the small capacity really drops tokens


@pytest.mark.parametrize('max_group_size,groups', [(4, 3), (5, 3), (7, 2), (12, 1), (100, 1)])
def test_groups_of_at_most_a_given_size(max_group_size, groups):
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  per_sequence = _layer(eval_capacity_factor=8.0)
  grouped = _layer(eval_capacity_factor=8.0, max_group_size=max_group_size)
  params = _init(per_sequence, x)
  # The fewest groups of at most max_group_size tokens that split the 12 tokens evenly.
  assert grouped._groups(x).shape == (groups, 12 // groups, D)  # pylint: disable=protected-access
  # Nothing drops either way, so regrouping the 12 tokens leaves every output unchanged.
  run = lambda layer: jax.jit(lambda p: layer.apply({'params': p}, x, mutable=['moe'])[0])(params)
  np.testing.assert_allclose(run(grouped), run(per_sequence), atol=1e-6)


def test_router_jitter_only_in_training():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  layer = _layer(router_jitter=0.5, train_capacity_factor=8.0, eval_capacity_factor=8.0)
  params = _init(layer, x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(deterministic, key):
    return layer.apply({'params': params}, x, deterministic, mutable=['moe'],
                       rngs={'jitter': jax.random.key(key)})[0]

  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert np.abs(np.asarray(run(False, 0) - run(False, 1))).max() > 1e-4


def test_experts_choose_in_a_causal_decoder_is_an_error():
  x = jnp.ones((1, 4, D))
  with pytest.raises(ValueError, match='cannot be used in a causal decoder'):
    MoeLayer(MoeConfig(E, layout='all', router='experts_choose'), F, causal=True).init(
        jax.random.key(0), x)


@pytest.mark.parametrize('kwargs,match', [
    (dict(train_capacity_factor=0.0), 'capacity factors must be > 0'),
    (dict(num_selected_experts=5), 'num_selected_experts 5'),
    (dict(router='experts_choose', dispatch='dropless'), 'dropless dispatch'),
    (dict(layout='sometimes'), "layout 'sometimes'"),
])
def test_bad_moe_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MoeConfig(E, **kwargs)


def test_sparse_layouts():
  mixed = MoeConfig(8, num_sparse_encoder_layers=6, num_sparse_decoder_layers=3)
  assert [i for i, s in enumerate(mixed.sparse_layers(12, 'encoder')) if s] == [1, 3, 5, 7, 9,
                                                                                 11]
  assert [i for i, s in enumerate(mixed.sparse_layers(12, 'decoder')) if s] == [3, 7, 11]
  assert MoeConfig(8, layout='every', period=3).sparse_layers(6, 'decoder') == (
      False, False, True, False, False, True)
  assert MoeConfig(8, layout='explicit', decoder_layers=(0, 2)).sparse_layers(3, 'decoder') == (
      True, False, True)
  with pytest.raises(ValueError, match='num_sparse_encoder_layers = 5 must divide'):
    MoeConfig(8, num_sparse_encoder_layers=5).sparse_layers(12, 'encoder')
  with pytest.raises(ValueError, match=r'decoder_layers \[7\]'):
    MoeConfig(8, layout='explicit', decoder_layers=(7,)).sparse_layers(4, 'decoder')
