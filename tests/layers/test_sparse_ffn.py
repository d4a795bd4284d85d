"""The Scaling Transformer's sparse FFN (layers/sparse_ffn.py) against the paper's definition in
numpy, the dense MlpBlock, and its own masked path (the gather path must equal it)."""

import math


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers import sparse_ffn
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.sparse_ffn import SparseFfnConfig, SparseMlpBlock

D_MODEL, MLP, N = 8, 24, 4  # 6 blocks of 4 units
CONFIG = SparseFfnConfig(block_size=N, controller_rank=3)


def _np_gelu(x):  # tanh approximation, as T5.1.1 / MlpBlock's 'gelu'
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _init(module, x):
  return partitioning.unbox(jax.jit(module.init)({'params': jax.random.key(0)}, x)['params'])


def _run(module, p, x):  # jitted: op by op, dispatching costs more than these tiny layers
  return jax.jit(lambda p, x: module.apply({'params': p}, x))(p, x)


def _x(shape=(2, 5, D_MODEL), seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reference(p, x, selected, activations):
  """The paper's layer written out: y = (prod_i act_i(x W_i) * mask) W_o, the mask one-hot of
  `selected` [..., blocks] within each block of N consecutive units."""
  x = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  acts = {'gelu': _np_gelu, 'linear': lambda v: v, 'relu': lambda v: np.maximum(v, 0)}
  names = ['wi'] if len(activations) == 1 else [f'wi_{i}' for i in range(len(activations))]
  hidden = np.ones((x.shape[0], MLP))
  for name, act in zip(names, activations):
    hidden = hidden * acts[act](x @ np.asarray(p[name]['kernel'], np.float64))
  selected = np.asarray(selected).reshape(x.shape[0], MLP // N)
  mask = np.zeros((x.shape[0], MLP))
  for t in range(x.shape[0]):
    for block in range(MLP // N):
      mask[t, block * N + selected[t, block]] = 1.0
  return (hidden * mask) @ np.asarray(p['wo']['kernel'], np.float64)


def _argmax_selection(p, x):
  logits = (np.asarray(x, np.float64).reshape(-1, D_MODEL) @ np.asarray(p['controller_d1'])
            @ np.asarray(p['controller_d2']))
  return logits.reshape(-1, MLP // N, N).argmax(-1)


@pytest.mark.parametrize('activations', [('gelu', 'linear'), ('relu',)])
def test_all_units_mode_is_the_dense_mlp_block(activations):
  x = _x()
  dense = MlpBlock(MLP, activations)
  sparse = SparseMlpBlock(MLP, SparseFfnConfig(block_size=N, all_units=True), activations)
  params = _init(dense, x)
  assert jax.tree.map(np.shape, _init(sparse, x)) == jax.tree.map(np.shape, params)
  np.testing.assert_allclose(_run(sparse, params, x), _run(dense, params, x), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('activations', [('gelu', 'linear'), ('relu',)])
def test_masked_path_equals_the_numpy_definition(activations):
  x = _x()
  module = SparseMlpBlock(MLP, CONFIG, activations)
  p = _init(module, x)
  out = _run(module, p, x)
  ref = _reference(p, x, _argmax_selection(p, x), activations)
  np.testing.assert_allclose(np.asarray(out).reshape(-1, D_MODEL), ref, rtol=1e-5, atol=1e-5)
  # Sparse indeed: not the dense layer's output.
  dense = _run(MlpBlock(MLP, activations), p, x)
  assert np.abs(np.asarray(dense) - np.asarray(out)).max() > 1e-2


@pytest.mark.parametrize('activations', [('gelu', 'linear'), ('relu',)])
def test_decode_gather_path_equals_masked_path(activations):
  x = _x((3, 1, D_MODEL), seed=2)  # decoding-shaped: one token per row
  masked = SparseMlpBlock(MLP, CONFIG, activations)
  p = _init(masked, x)
  gathered = SparseMlpBlock(MLP, CONFIG, activations, decode=True)
  np.testing.assert_allclose(_run(gathered, p, x), _run(masked, p, x), rtol=1e-5, atol=1e-6)


def test_straight_through_forward_is_one_unit_per_block_and_backward_is_the_softmax():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(7, 6, N)), jnp.float32)
  rng, tau = jax.random.key(4), 0.7
  mask = sparse_ffn.straight_through_mask(logits, tau, rng)
  noisy = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  assert set(np.unique(np.asarray(mask))) == {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), 1.0)
  np.testing.assert_array_equal(np.asarray(mask).argmax(-1), np.asarray(noisy).argmax(-1))
  # The noise changes some choices (it is drawn), the deterministic mask is the plain argmax.
  assert (np.asarray(noisy).argmax(-1) != np.asarray(logits).argmax(-1)).any()
  np.testing.assert_array_equal(np.asarray(sparse_ffn.straight_through_mask(logits, tau))
                                .argmax(-1), np.asarray(logits).argmax(-1))
  weights = jnp.asarray(np.random.default_rng(5).normal(size=logits.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda l: jnp.sum(sparse_ffn.straight_through_mask(l, tau, rng) * weights)))(
      logits)
  softmax_grad = jax.jit(jax.grad(lambda l: jnp.sum(jax.nn.softmax(
      (l + jax.random.gumbel(rng, l.shape, jnp.float32)) / tau) * weights)))(logits)
  np.testing.assert_allclose(grad, softmax_grad, rtol=1e-5, atol=1e-7)


def test_training_mode_samples_with_noise_and_matches_the_definition():
  x = _x((2, 6, D_MODEL), seed=6)
  module = SparseMlpBlock(MLP, CONFIG, ('gelu', 'linear'), sow_selection=True)
  p = _init(module, x)
  out, state = jax.jit(lambda p, x: module.apply(
      {'params': p}, x, deterministic=False, rngs={'dropout': jax.random.key(7)},
      mutable=['intermediates']))(p, x)
  selected = np.asarray(state['intermediates']['selected'][0])
  assert selected.shape == (2, 6, MLP // N) and selected.min() >= 0 and selected.max() < N
  np.testing.assert_allclose(np.asarray(out).reshape(-1, D_MODEL),
                             _reference(p, x, selected, ('gelu', 'linear')), rtol=1e-5, atol=1e-5)
  assert (selected.reshape(-1, MLP // N) != _argmax_selection(p, x)).any()  # Gumbel noise


def test_controller_gets_finite_nonzero_gradients_in_training():
  x = _x((2, 6, D_MODEL), seed=8)
  module = SparseMlpBlock(MLP, CONFIG, ('gelu', 'linear'))
  p = _init(module, x)
  target = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

  def loss(p):
    y = module.apply({'params': p}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
    return jnp.sum((y - target)**2)

  grads = jax.jit(jax.grad(loss))(p)
  for name in ('controller_d1', 'controller_d2'):
    g = np.asarray(grads[name])
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_flops_and_parameter_counts_are_their_closed_forms():
  x = _x()
  module = SparseMlpBlock(MLP, CONFIG, ('gelu', 'linear'))
  p = _init(module, x)
  assert module.num_params(D_MODEL) == sum(math.prod(v.shape) for v in jax.tree.leaves(p))
  flops = module.flops(D_MODEL)
  assert flops['dense'] == 3 * D_MODEL * MLP
  assert flops['sparse_decode'] == 3 * (D_MODEL * MLP // N) + 3 * (D_MODEL + MLP)
  dense = SparseMlpBlock(MLP, SparseFfnConfig(block_size=N, all_units=True), ('relu',))
  assert dense.num_params(D_MODEL) == 2 * D_MODEL * MLP == dense.flops(D_MODEL)['sparse_decode']


def test_bad_configurations_name_the_fix():
  with pytest.raises(ValueError, match='multiple of block_size'):
    SparseMlpBlock(10, CONFIG).init(jax.random.key(0), _x())
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    SparseFfnConfig(block_size=0)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    SparseFfnConfig(temperature=0.0)


def test_logical_axes_are_those_of_the_mlp_block():
  x = _x()
  boxed = jax.eval_shape(SparseMlpBlock(MLP, CONFIG, ('gelu', 'linear')).init, jax.random.key(0),
                         x)['params']
  axes = partitioning.logical_axes(boxed)
  assert axes['wi_0']['kernel'] == ('embed', 'mlp') and axes['wo']['kernel'] == ('mlp', 'embed')
  assert axes['controller_d2'] == ('controller_rank', 'mlp')
  # Every name has a rule in every preset (sharded init resolves them).
  for preset in partitioning.RULE_PRESETS:
    partitioning.param_specs(boxed, preset, {'data': 1, 'model': 1, 'fsdp': 1})

