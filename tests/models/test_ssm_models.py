"""H3, GSS and FNet layers in the models (TransformerConfig.token_mixers / encoder_token_mixers):
recurrent decoding against full forward passes, local attention windows, and the errors of
what they cannot do. The layers themselves are checked against their definitions in
tests/layers/test_ssm.py and test_fourier_mixing.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.errors import ConfigError
from efficientlm.inference import decoding, kv_cache
from efficientlm.layers.fourier_mixing import FourierConfig
from efficientlm.layers.gss import GssConfig
from efficientlm.layers.h3 import H3Config
from efficientlm.layers.ssm import SsmConfig
from efficientlm.models.config import TransformerConfig
from tests import helpers

_SSM = SsmConfig(state_size=8)
MIXERS = {
    'h3': dict(token_mixers=('h3',), h3=H3Config(_SSM, head_dim=2, shift_size=3)),
    'gss_blocked_s4d': dict(token_mixers=('gss', 's4d'), s4d=_SSM,
                            gss=GssConfig(SsmConfig(state_size=8, convolution='blocked',
                                                    block_size=4))),
    'h3_attention_window_scanned': dict(token_mixers=('h3', 'attention'),
                                        h3=H3Config(_SSM, shift_size=3), attention_window=3,
                                        num_decoder_layers=4, scan_layers=True),
}


def _sequences(seed, batch, length, vocab=64):
  toks = np.random.default_rng(seed).integers(2, vocab, size=(batch, length)).astype(np.int32)
  toks[:, 0] = 0
  return jnp.asarray(toks)


@pytest.mark.parametrize('name', sorted(MIXERS))
def test_cached_logits_equal_full_forward(name):
  """Prefill of right-padded prompts of different lengths, then steps: the recurrent states
  (and the hybrid's windowed KV cache) give the full forward pass's logits."""
  model = helpers.decoder_model(**MIXERS[name])
  toks = _sequences(1, 3, 11)
  params = helpers.init_params(model, {'decoder_input_tokens': toks,
                                       'decoder_target_tokens': toks})
  full = jax.jit(lambda p, t: model.module.apply({'params': p}, t))(params, toks)
  lengths = jnp.array([2, 7, 4])
  prompt = jnp.where(jnp.arange(7)[None] < lengths[:, None], toks[:, :7], 0)
  cache = kv_cache.init_cache(model, params, 3, 11)
  prefill = jax.jit(lambda *a: kv_cache.prefill(model, *a))
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  logits, cache = prefill(params, cache, prompt, lengths)
  for b in range(3):
    np.testing.assert_allclose(logits[b, :lengths[b]], full[b, :lengths[b]], atol=1e-4)
  rows, positions = jnp.arange(3), lengths
  for _ in range(4):
    step_logits, cache = step(params, cache, toks[rows, positions], positions)
    np.testing.assert_allclose(step_logits, full[rows, positions], atol=1e-4)
    positions = positions + 1


def test_a_recurrent_decoder_has_no_kv_cache_and_decodes_any_length():
  model = helpers.decoder_model(**MIXERS['h3'])
  params = helpers.init_params(model, helpers.lm_batch(0, 1, 4, 64))
  cache = kv_cache.init_cache(model, params, 2, 4)
  names = {str(getattr(k, 'key', k)) for path, _ in jax.tree_util.tree_leaves_with_path(cache)
           for k in path}
  assert 'cached_key' not in names and {'ssm_state', 'shift_state'} <= names
  assert kv_cache.cache_length(cache) is None
  out = model.predict(params, jnp.array([[5, 6, 7], [8, 0, 0]]),
                      decoding.DecodeOptions(max_decode_length=9, eos_id=-1))
  assert out.tokens.shape == (2, 9)


def test_attention_window_hides_keys_that_far_back():
  """One windowed attention layer: a token `window` or more positions back cannot change a
  logit (exactly: masked), one inside the window does."""
  model = helpers.decoder_model(num_decoder_layers=1, attention_window=3)
  toks = _sequences(2, 2, 10)
  batch = {'decoder_input_tokens': toks, 'decoder_target_tokens': jnp.ones_like(toks)}
  params = helpers.init_params(model, batch)
  logits_fn = jax.jit(model.logits)  # one program for both batches
  logits = logits_fn(params, batch)
  far = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), 5), 64))
  np.testing.assert_array_equal(far[:, 8:], logits[:, 8:])
  assert np.abs(np.asarray(far[:, 7] - logits[:, 7])).max() > 1e-4


def test_fnet_encoder_has_no_attention_and_ignores_padding_tokens():
  """The encoder's FNet layers have no parameters and zero padding before their transforms:
  the embedding of the padding id (0) reaches no real position of the encoder output (its
  other layers are position-wise), so changing it changes nothing there."""
  model = helpers.t5_model(encoder_token_mixers=('fnet',), fourier=FourierConfig())
  batch = helpers.seq2seq_batch(0, 2, 8, 6, 64)
  params = helpers.init_params(model, batch)
  assert 'attention' not in params['encoder']['layers_0']
  assert 'self_attention' in params['decoder']['layers_0']
  inputs = np.array(batch['encoder_input_tokens'])
  inputs[:, 5:] = 0
  real = inputs > 0
  encode = jax.jit(lambda p: model.module.apply({'params': p}, inputs, method='encode'))
  table = params['token_embedder']['embedding']
  before = np.asarray(encode(params))
  after = np.asarray(encode(dict(params, token_embedder={'embedding': table.at[0].add(3.0)})))
  np.testing.assert_array_equal(after[real], before[real])
  assert np.abs(after[~real] - before[~real]).max() > 1e-3


def _config(**overrides):
  return TransformerConfig(**{**dict(num_encoder_layers=0, num_decoder_layers=2), **overrides})


@pytest.mark.parametrize('overrides,fix', [
    (dict(token_mixers=('h3',)), 'H3Config'),
    (dict(token_mixers=('gss',)), 'GssConfig'),
    (dict(token_mixers=('attention',), encoder_token_mixers=('fnet',), num_encoder_layers=2),
     'FourierConfig'),
    (dict(token_mixers=('fnet',), fourier=FourierConfig()), 'encoder_token_mixers'),
    (dict(token_mixers=('h3',), h3=H3Config(), num_encoder_layers=2), 'encoder_token_mixers'),
    (dict(token_mixers=('h3',), h3=H3Config(), attention_implementation='pallas'),
     "attention_implementation = 'xla'"),
    (dict(attention_window=4, attention_implementation='pallas'), "'xla'"),
    (dict(attention_window=-1), '>= 0'),
])
def test_what_cannot_work_is_refused_at_config_time(overrides, fix):
  with pytest.raises(ValueError, match=fix):
    _config(**overrides)


def test_packed_examples_are_refused_with_the_fix():
  model = helpers.decoder_model(**MIXERS['h3'])
  batch = helpers.lm_batch(0, 2, 8, 64)
  params = helpers.init_params(model, batch)
  packed = dict(batch, decoder_segment_ids=np.ones((2, 8), np.int32),
                decoder_positions=np.tile(np.arange(8, dtype=np.int32), (2, 1)))
  with pytest.raises(ConfigError, match='pack = False'):
    model.logits(params, packed)
