"""LSH attention layers in the models (TransformerConfig.token_mixers = ('lsh', ...)): the shared
query/key tree, causality, the hashing randomness in training and evaluation, and the errors of
what they cannot do. The layer itself is checked against dense attention and a numpy reference in
tests/layers/test_lsh_attention.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.models.config import TransformerConfig
from tests import helpers


def _decoder(lsh=LshConfig(num_hashes=2, chunk_length=4), **overrides):
  return helpers.decoder_model(token_mixers=('lsh',), lsh=lsh, num_kv_heads=None, **overrides)


def test_queries_are_keys_no_key_projection():
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = jax.eval_shape(lambda: helpers.init_params(_decoder(), batch))  # the tree only
  attention = params['decoder']['layers_0']['self_attention']
  assert set(attention) == {'query', 'value', 'out'}


def test_one_chunk_is_strictly_causal():
  """With one chunk every earlier token is a candidate whatever the hashes: a later token
  cannot change an earlier logit. (With several chunks it can, through the sort: module
  docstring of layers/lsh_attention.py.)"""
  model = _decoder(LshConfig(num_hashes=2, chunk_length=16))
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = helpers.init_params(model, batch)
  logits_fn = jax.jit(model.logits)  # one program for both batches
  logits = logits_fn(params, batch)
  t = 9
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64))
  # Up to rounding: the later token moves in the bucket sort, which reorders the sums.
  np.testing.assert_allclose(changed[:, :t], logits[:, :t], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(changed[:, t] - logits[:, t])).max() > 1e-3


def test_fixed_rotations_in_evaluation_fresh_ones_in_training():
  model = _decoder()
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = helpers.init_params(model, batch)
  logits = jax.jit(model.logits)  # one program without an rng, one for both rngs
  np.testing.assert_array_equal(logits(params, batch), logits(params, batch))
  a = logits(params, batch, rng=jax.random.key(1))
  b = logits(params, batch, rng=jax.random.key(2))
  assert np.abs(np.asarray(a - b)).max() > 1e-4  # other buckets, other candidates
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: model.loss_fn(p, batch, jax.random.key(3))[0]))(params)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_what_lsh_cannot_do_is_a_clear_error():
  lsh = LshConfig()
  with pytest.raises(ValueError, match='set TransformerConfig.lsh'):
    TransformerConfig(token_mixers=('lsh',), position_embedding='rotary')
  with pytest.raises(ValueError, match="set position_embedding = 'rotary'"):
    TransformerConfig(token_mixers=('lsh',), lsh=lsh)
  with pytest.raises(ValueError, match='set num_kv_heads = None'):
    TransformerConfig(token_mixers=('lsh',), lsh=lsh, position_embedding='rotary', num_kv_heads=1)
  with pytest.raises(ValueError, match='set scan_layers = False'):
    TransformerConfig(token_mixers=('lsh',), lsh=lsh, position_embedding='rotary',
                      scan_layers=True)
  model = _decoder()
  batch = helpers.lm_batch(0, 1, 16, 64)
  params = helpers.init_params(model, batch)
  with pytest.raises(ValueError, match='chunk_length = 4 must divide the length 14'):
    jax.jit(model.logits)(params, helpers.lm_batch(0, 1, 14, 64))
  packed = dict(batch, decoder_segment_ids=np.ones((1, 16), np.int32),
                decoder_positions=np.arange(16, dtype=np.int32)[None])
  with pytest.raises(ValueError, match='do not support packed examples'):
    jax.jit(model.logits)(params, packed)
