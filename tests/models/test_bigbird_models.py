"""BigBird layers in the models (TransformerConfig.token_mixers = ('bigbird', ...)): a dense
checkpoint's tree, causality, padding, hybrids under scan, and the errors of what they cannot do.
The layer itself is checked against dense masked attention in tests/layers/test_bigbird.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.bigbird import BigBirdConfig
from efficientlm.models.config import TransformerConfig
from tests import helpers

BIGBIRD = BigBirdConfig(block_size=4, num_window_blocks=1, num_global_blocks=1,
                        num_random_blocks=1)


def _decoder(**overrides):
  return helpers.decoder_model(token_mixers=('bigbird',), bigbird=BIGBIRD, **overrides)


def test_a_dense_checkpoint_has_the_same_tree_and_differs_only_in_attention_pattern():
  """Same parameter names and shapes as dense attention (a dense checkpoint loads as is); with
  the same weights the logits differ, since far keys are not read (16 tokens, 4 blocks)."""
  batch = helpers.lm_batch(0, 2, 16, 64)
  dense = helpers.decoder_model()
  params = helpers.init_params(dense, batch)
  sparse_tree = jax.eval_shape(lambda: helpers.init_params(_decoder(), batch))  # shapes only
  assert helpers.param_shapes(sparse_tree) == helpers.param_shapes(params)
  sparse, full = jax.jit(_decoder().logits)(params, batch), jax.jit(dense.logits)(params, batch)
  # The first two blocks read every earlier key in both models (window + global): equal there.
  np.testing.assert_allclose(sparse[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(sparse[:, 12:] - full[:, 12:])).max() > 1e-4


def test_decoder_only_bigbird_is_causal_and_padding_is_invisible():
  model = _decoder(position_embedding='relative')
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = helpers.init_params(model, batch)
  logits_fn = jax.jit(model.logits)  # one program for the three same-shaped batches
  logits = logits_fn(params, batch)
  t = 9
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64))
  np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
  assert np.abs(np.asarray(changed[:, t] - logits[:, t])).max() > 1e-4
  # Row 0 ends in 3 padding targets: changing those tokens changes no other position.
  padded = dict(batch, decoder_target_tokens=np.where(
      batch['decoder_target_tokens'] > 0, batch['decoder_target_tokens'], 0))
  np.testing.assert_array_equal(logits_fn(params, padded)[:, :13], logits[:, :13])


def test_t5_with_bigbird_in_encoder_and_decoder_trains_and_its_decoder_is_causal():
  """Bidirectional (encoder, 5 blocks) and causal (decoder, 4 blocks) patterns in one model;
  cross-attention stays dense."""
  model = helpers.t5_model(token_mixers=('bigbird',), bigbird=BIGBIRD)
  batch = helpers.seq2seq_batch(0, 2, 20, 16, 64)
  params = helpers.init_params(model, batch)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))(params)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  logits_fn = jax.jit(model.logits)  # one program for the three same-shaped batches
  logits = logits_fn(params, batch)
  t = 10
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64))
  np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
  encoder_changed = logits_fn(params, helpers.bump(batch, 'encoder_input_tokens', (0, 15), 64))
  assert np.abs(np.asarray(encoder_changed[0] - logits[0])).max() > 1e-4


def test_a_hybrid_pattern_alternates_layers():
  """('bigbird', 'attention') over 4 layers: layers 0 and 2 are block-sparse, 1 and 3 dense. A
  model whose layers are all dense equals it when the sparse layers' pattern is full (here
  a window of 2 blocks and the global block cover every earlier key of 4 blocks)."""
  hybrid = dict(token_mixers=('bigbird', 'attention'), num_decoder_layers=4)
  full = BigBirdConfig(block_size=4, num_window_blocks=2, num_global_blocks=1,
                       num_random_blocks=0)
  batch = helpers.lm_batch(0, 2, 16, 64)
  dense = helpers.decoder_model(num_decoder_layers=4)
  params = helpers.init_params(dense, batch)
  valid = batch['decoder_target_tokens'] > 0  # padding rows differ (they read no key)
  dense_logits = jax.jit(dense.logits)(params, batch)
  np.testing.assert_allclose(
      np.asarray(jax.jit(helpers.decoder_model(bigbird=full, **hybrid).logits)(params, batch))[
          valid], np.asarray(dense_logits)[valid], rtol=1e-5, atol=1e-5)
  sparse = helpers.decoder_model(bigbird=BigBirdConfig(block_size=2, num_random_blocks=1),
                                 **hybrid)
  assert np.abs(np.asarray(jax.jit(sparse.logits)(params, batch) - dense_logits)).max() > 1e-4


def test_what_bigbird_cannot_do_is_a_clear_error():
  with pytest.raises(ValueError, match="set TransformerConfig.bigbird"):
    TransformerConfig(token_mixers=('bigbird',))
  with pytest.raises(ValueError, match='set scan_layers = False'):
    TransformerConfig(token_mixers=('bigbird',), bigbird=BIGBIRD, scan_layers=True)
  with pytest.raises(ValueError, match="bigbird layers run on 'xla'"):
    TransformerConfig(token_mixers=('bigbird',), bigbird=BIGBIRD, attention_implementation='cudnn')
  model = _decoder()
  batch = helpers.lm_batch(0, 1, 16, 64)
  params = helpers.init_params(model, batch)
  packed = dict(batch, decoder_segment_ids=np.ones((1, 16), np.int32),
                decoder_positions=np.arange(16, dtype=np.int32)[None])
  with pytest.raises(ValueError, match='do not support packed examples: set DatasetConfig.pack'):
    jax.jit(model.logits)(params, packed)
  with pytest.raises(ValueError, match='block_size'):
    jax.jit(model.logits)(params, helpers.lm_batch(0, 1, 14, 64))  # 14 tokens: not a multiple of 4
  with pytest.raises(ValueError, match="'bigbird' cannot decode with a KV cache"):
    model.predict(params, jnp.asarray(batch['decoder_target_tokens'][:, :3]))
