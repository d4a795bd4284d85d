"""The recorded layer inputs: X X^T sums against inputs recomputed by hand in numpy (an RMS-normed
embedding; tokens routed to each expert by the router's argmax), padding left out."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.compression import hessians
from efficientlm.errors import ConfigError
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import MoeLayer
from tests import helpers
from tests.compression.tiny_model import BATCH, LENGTH, VOCAB, init_params, model_32
from tests.training import tiny_run


def test_first_layer_attention_inputs_are_the_normed_embeddings_of_real_tokens():
  # The run mode's model, shardings and batch shape: the same program as its capture.
  model, partitioner = model_32(), tiny_run.partitioner()
  batch = helpers.lm_batch(0, BATCH, LENGTH, VOCAB)  # row 0 ends in 3 padding positions
  params = init_params(model)
  with partitioner.context():
    sums = hessians.capture(model, 'decoder/layers_0', params, partitioner.shard_batch(batch))
  params = jax.device_get(params)
  layer = 'decoder/layers_0/'
  assert sorted(sums) == sorted(layer + k for k in (
      'mlp/wi/kernel', 'mlp/wo/kernel', 'self_attention/key/kernel', 'self_attention/out/kernel',
      'self_attention/query/kernel', 'self_attention/value/kernel'))
  embedded = np.asarray(params['token_embedder']['embedding'])[batch['decoder_input_tokens']]
  scale = np.asarray(params['decoder']['layers_0']['pre_self_attention_layer_norm']['scale'])
  normed = embedded / np.sqrt(np.mean(embedded ** 2, -1, keepdims=True) + 1e-6) * scale
  real = normed[batch['decoder_target_tokens'] > 0].astype(np.float64)
  for name in ('query', 'key', 'value'):
    gram, count = sums[f'{layer}self_attention/{name}/kernel']
    np.testing.assert_allclose(np.asarray(gram), real.T @ real, rtol=2e-5, atol=1e-4)
    assert float(count) == len(real) == BATCH * LENGTH - 3
  for gram, count in sums.values():
    assert float(count) == len(real)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


NUM_EXPERTS, D, F = 4, 8, 16


def _moe_layer(dispatch):
  # Capacity for every token; ragged_dot compiles fastest on CPU (the capture ignores which).
  return MoeLayer(MoeConfig(NUM_EXPERTS, layout='all', dispatch=dispatch, eval_capacity_factor=8.0,
                            grouped_matmul='ragged_dot'), F)


@pytest.fixture(scope='module')
def moe_params():
  """Shared by both dispatch modes (the same parameters)."""
  x = np.zeros((2, 12, D), np.float32)
  return partitioning.unbox(jax.jit(_moe_layer('dropping').init)(jax.random.key(1), x)['params'])


@pytest.mark.parametrize('dispatch', ['dropless', 'dropping'])
def test_each_expert_sees_the_tokens_routed_to_it(dispatch, moe_params):
  num_experts, d, params, layer = NUM_EXPERTS, D, moe_params, _moe_layer(dispatch)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 12, d)))

  @jax.jit
  def record(p, x):
    sums = {}
    with nn.intercept_methods(hessians.recorder('', {}, sums)):
      layer.apply({'params': p}, x, mutable=['moe'])
    return sums

  sums = record(params, x)
  assert sorted(sums) == ['expert/wi_0/kernel', 'expert/wi_1/kernel', 'expert/wo/kernel']
  tokens = x.reshape(-1, d).astype(np.float64)
  choice = np.argmax(tokens @ np.asarray(params['router']['router_weights']['w']['kernel']), -1)
  experts = {k: np.asarray(v['kernel'], np.float64) for k, v in params['expert'].items()}
  for e in range(num_experts):
    mine = tokens[choice == e]
    hidden = _gelu(mine @ experts['wi_0'][e]) * (mine @ experts['wi_1'][e])
    for name, inputs in (('wi_0', mine), ('wi_1', mine), ('wo', hidden)):
      gram, count = sums[f'expert/{name}/kernel']
      np.testing.assert_allclose(np.asarray(gram)[e], inputs.T @ inputs, rtol=1e-4, atol=1e-4)
      assert float(count[e]) == len(mine)


def test_too_few_calibration_tokens_say_how_many_more():
  with pytest.raises(ConfigError, match=r'only 40 tokens for its 64 inputs.*at least 24 more '
                     r'tokens: raise CALIBRATION_SEQUENCES by about 6 \(it received 4 tokens per'):
    hessians.check_tokens('decoder/layers_0/mlp/wo/kernel', 40.0, 64, 10)
  with pytest.raises(ConfigError, match='expert 2 of decoder/layers_1/mlp/expert/wo/kernel only '
                     '5 tokens.*by about 118 .*PRUNE_LAYER_KINDS'):
    hessians.check_tokens('decoder/layers_1/mlp/expert/wo/kernel', [70.0, 80.0, 5.0], 64, 10)
  hessians.check_tokens('decoder/layers_0/mlp/wo/kernel', 64.0, 64, 10)  # enough
