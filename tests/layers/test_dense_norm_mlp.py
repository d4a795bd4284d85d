"""RMSNorm, MLP blocks and projections against numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.dense import DenseGeneral, Embed
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.norms import RMSNorm


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_rmsnorm_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
  got = RMSNorm(epsilon=1e-6).apply({'params': {'scale': scale}}, x)
  want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('activations', [('gelu', 'linear'), ('relu',), ('silu', 'linear')])
def test_mlp_formula_and_names(activations):
  x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32)
  block = MlpBlock(intermediate_dim=16, activations=activations)
  params = partitioning.unbox(block.init(jax.random.key(0), x)['params'])
  acts = {'gelu': gelu_tanh, 'relu': lambda z: np.maximum(z, 0), 'linear': lambda z: z,
          'silu': lambda z: z / (1 + np.exp(-z))}
  names = ['wi'] if len(activations) == 1 else ['wi_0', 'wi_1']
  assert sorted(params) == sorted(names + ['wo'])
  hidden = np.ones((2, 3, 16), np.float32)
  for name, act in zip(names, activations):
    hidden = hidden * acts[act](x @ np.asarray(params[name]['kernel']))
  want = hidden @ np.asarray(params['wo']['kernel'])
  np.testing.assert_allclose(block.apply({'params': params}, x), want, rtol=1e-4, atol=1e-5)


def test_unknown_activation_is_rejected():
  with pytest.raises(ValueError, match='Unknown activation'):
    MlpBlock(4, ('gleu',)).init(jax.random.key(0), jnp.ones((1, 2, 4)))


def test_dense_general_flattened_kernel_over_two_axes():
  """Kernel stored [heads*hd, d] (T5X layout) contracts [b, l, heads, hd] inputs."""
  x = np.random.default_rng(2).normal(size=(2, 3, 4, 5)).astype(np.float32)
  dense = DenseGeneral(6, ('joined_kv', 'embed'), axis=(-2, -1))
  params = partitioning.unbox(dense.init(jax.random.key(0), x)['params'])
  assert params['kernel'].shape == (20, 6)
  want = x.reshape(2, 3, 20) @ np.asarray(params['kernel'])
  np.testing.assert_allclose(dense.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def test_embed_lookup_one_hot_and_attend():
  table = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
  ids = jnp.array([[1, 0, 9]])
  for one_hot in (False, True):
    emb = Embed(10, 4, one_hot=one_hot)
    np.testing.assert_allclose(emb.apply({'params': {'embedding': table}}, ids), table[[1, 0, 9]][None],
                               rtol=1e-6)
  q = np.ones((1, 2, 4), np.float32)
  np.testing.assert_allclose(
      Embed(10, 4).apply({'params': {'embedding': table}}, q, method='attend'), q @ table.T,
      rtol=1e-5)
