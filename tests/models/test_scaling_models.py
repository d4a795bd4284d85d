"""Scaling Transformer layers in the models (TransformerConfig.sparse_ffn / sparse_qkv) and the
Terraformer gin: cached decoding against the full forward pass (the gather FFN path and the
convolution state at decode steps), training, and the configuration errors. The layers are
checked against their definitions in tests/layers/test_sparse_{ffn,qkv}.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientlm import gin_config, partitioning
from efficientlm.inference import decoding, kv_cache
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.sparse_ffn import SparseFfnConfig
from efficientlm.layers.sparse_qkv import SparseQkvConfig
from efficientlm.models.config import TransformerConfig
from tests import helpers

SCALING = dict(sparse_ffn=SparseFfnConfig(block_size=4, controller_rank=4),
               sparse_qkv=SparseQkvConfig(num_modules=4))


def _init(model, batch):  # jitted: op by op, tracing the init costs more than compiling it
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return partitioning.unbox(jax.jit(model.init)(jax.random.key(0), batch)['params'])


def _sequences(seed, batch, length, vocab=64):
  toks = np.random.default_rng(seed).integers(2, vocab, size=(batch, length)).astype(np.int32)
  toks[:, 0] = 0
  return jnp.asarray(toks)


def test_cached_logits_equal_full_forward():
  """Right-padded prompts of different lengths, then steps (the FFN's gather path, the sparse
  Q/K/V convolution state, scanned layers' stacked caches): the full forward pass's logits at
  every position; generation runs end to end."""
  model = helpers.decoder_model(**SCALING, scan_layers=True)
  toks = _sequences(1, 3, 9)
  params = _init(model, {'decoder_input_tokens': toks,
                                       'decoder_target_tokens': toks})
  full = jax.jit(lambda p, t: model.module.apply({'params': p}, t))(params, toks)
  lengths = jnp.array([2, 6, 4])
  prompt = jnp.where(jnp.arange(6)[None] < lengths[:, None], toks[:, :6], 0)
  cache = kv_cache.init_cache(model, params, 3, 9)
  logits, cache = jax.jit(lambda *a: kv_cache.prefill(model, *a))(params, cache, prompt, lengths)
  for b in range(3):
    np.testing.assert_allclose(logits[b, :lengths[b]], full[b, :lengths[b]], atol=1e-4)
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  rows, positions = jnp.arange(3), lengths
  for _ in range(3):
    step_logits, cache = step(params, cache, toks[rows, positions], positions)
    np.testing.assert_allclose(step_logits, full[rows, positions], atol=1e-4)
    positions = positions + 1
  out = model.predict(params, jnp.array([[5, 6, 7], [8, 0, 0]]),
                      decoding.DecodeOptions(max_decode_length=4, eos_id=-1))
  assert out.tokens.shape == (2, 4) and (np.asarray(out.lengths) == 4).all()


def test_encoder_padding_reaches_no_real_position():
  """The encoder's sparse Q/K/V convolution is centered over the length: padding rows are zeroed
  before it, so a padded row's real positions equal the unpadded input's."""
  model = helpers.t5_model(**SCALING, num_encoder_layers=1, num_decoder_layers=1)
  batch = helpers.seq2seq_batch(0, 2, 8, 5, 64)
  params = _init(model, batch)
  encode = jax.jit(lambda p, t: model.module.apply({'params': p}, t, method='encode'))
  toks = np.array(batch['encoder_input_tokens'])
  toks[1, 4:] = 0
  np.testing.assert_allclose(encode(params, toks)[1, :4], encode(params, toks[1:, :4])[0],
                             rtol=1e-5, atol=1e-5)


def _terraformer_model():
  # The tiny gin, narrower (the combination is what is tested; compile time is what costs).
  gin_config.parse(['models/terraformer/decoder_tiny.gin'],
                   ['VOCAB_SIZE = 64', "ACTIVATION_DTYPE = 'float32'",
                    'model_config.TransformerConfig.emb_dim = 32',
                    'model_config.TransformerConfig.head_dim = 8',
                    'model_config.TransformerConfig.mlp_dim = 64', 'SPARSE_FFN_BLOCK_SIZE = 8'])
  return gin_config.macro('MODEL')


def test_terraformer_tiny_trains():
  """The gin's combination (LSH attention, reversible layers, sparse FFN and sparse Q/K/V):
  a few Adam steps on one batch lower the loss; gradients finite and nonzero for every sparse
  parameter (controller included)."""
  model = _terraformer_model()
  cfg = model.module.config
  assert cfg.residual == 'reversible' and cfg.token_mixers == ('lsh',)
  assert cfg.sparse_ffn is not None and cfg.sparse_qkv is not None
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = _init(model, batch)
  layer = params['decoder']['layers_0']
  assert {'controller_d1', 'controller_d2'} <= set(layer['mlp'])
  assert set(layer['self_attention']['sparse_qkv']) == {'multiplicative_d', 'multiplicative_e',
                                                        'query', 'value'}
  opt = optax.adam(3e-3)

  @jax.jit
  def train_step(params, state, i):
    (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch, jax.random.fold_in(jax.random.key(1), i))
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grads

  state = opt.init(params)
  losses = []
  for i in range(6):
    params, state, loss, grads = train_step(params, state, i)
    losses.append(float(loss))
    if i == 0:
      for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
      g = grads['decoder']['layers_1']
      for leaf in (g['mlp']['controller_d1'], g['mlp']['controller_d2'],
                   g['self_attention']['sparse_qkv']['multiplicative_d']):
        assert np.abs(np.asarray(leaf)).max() > 0
  assert losses[-1] < losses[0] - 0.05, losses
  # It decodes through model.predict. A cache of 16 slots (1 + 3 prompt tokens + 12 steps) is
  # one LSH chunk with the buckets of a 16-token sequence, where decoding is the training-time
  # function (layers/lsh_attention.py, "Decoding"): greedy tokens are the argmax of the
  # whole-sequence forward pass over the generated sequence.
  out = model.predict(params, jnp.array([[5, 6, 7]]),
                      decoding.DecodeOptions(max_decode_length=12, eos_id=-1))
  assert out.tokens.shape == (1, 12) and int(out.lengths[0]) == 12
  sequence = jnp.concatenate([jnp.array([[0, 5, 6, 7]]), out.tokens], axis=1)
  full = jax.jit(lambda p, t: model.module.apply({'params': p}, t))(params, sequence)
  np.testing.assert_array_equal(np.argmax(full[0, 3:15], -1), out.tokens[0])


BASE = helpers.TINY_DECODER


@pytest.mark.parametrize('overrides,message', [
    (dict(sparse_ffn=SparseFfnConfig(block_size=5)), 'mlp_dim 32 is not divisible by '
     'SparseFfnConfig.block_size 5'),
    (dict(sparse_ffn=SparseFfnConfig(block_size=4), moe=MoeConfig(num_experts=2)),
     'set one of sparse_ffn, moe to None'),
    (dict(sparse_qkv=SparseQkvConfig(num_modules=3)), 'emb_dim = 16 is not divisible'),
    (dict(sparse_qkv=SparseQkvConfig(num_modules=4), num_kv_heads=1, head_dim=2, num_heads=8),
     r'num_kv_heads \* head_dim = 2 is not divisible'),
])
def test_configuration_errors_name_the_fix(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **overrides)


def test_sparse_qkv_needs_an_attention_layer():
  from efficientlm.layers.h3 import H3Config  # pylint: disable=g-import-not-at-top
  from efficientlm.layers.ssm import SsmConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='no layer attends'):
    TransformerConfig(**{**dataclasses.asdict(BASE), 'token_mixers': ('h3',),
                         'h3': H3Config(SsmConfig(state_size=4)),
                         'sparse_qkv': SparseQkvConfig(num_modules=4)})
