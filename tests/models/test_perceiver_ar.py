"""Perceiver AR (models/perceiver_ar.py) against its definition: causality, the dense decoder it
must equal when every position is a latent, a numpy reference of the paper's equations with
fewer latents, the loss over the latents only, cached decoding against whole-sequence forwards,
and a short run through the trainer from the shipped gin."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import gin_config
from efficientlm.errors import ConfigError
from efficientlm.inference import decoding, kv_cache
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.model import DecoderOnlyModel
from efficientlm.models.perceiver_ar import (PerceiverAr, PerceiverArConfig, PerceiverArModel,
                                             params_from_decoder_only)
from tests import helpers
from tests.training import fake_data, tiny_run

VOCAB = 64
# Rotary, grouped-query attention, tied logits (helpers.TINY_DECODER) in three layers.
ROTARY = dataclasses.replace(helpers.TINY_DECODER, num_decoder_layers=3)
# T5's relative bias, gated MLP, separate logits, scanned layers.
RELATIVE = dataclasses.replace(helpers.TINY_T5, num_encoder_layers=0, num_decoder_layers=3,
                               scan_layers=True)


def _model(cfg, num_latents):
  return PerceiverArModel(PerceiverAr(cfg, PerceiverArConfig(num_latents)))


def _dense_params(cfg):
  dense = DecoderOnlyModel(DecoderOnly(cfg))
  return dense, jax.jit(lambda: helpers.init_params(dense, helpers.lm_batch(0, 2, 10, VOCAB)))()


@pytest.fixture(scope='module')
def rotary_params():
  """ROTARY's Perceiver AR parameters (they do not depend on N or L), from a dense decoder's."""
  return params_from_decoder_only(_dense_params(ROTARY)[1])


def _sequences(seed, batch, length):
  toks = np.random.default_rng(seed).integers(2, VOCAB, size=(batch, length)).astype(np.int32)
  toks[:, 0] = 0
  return jnp.asarray(toks)


def test_a_token_changes_no_latent_before_it(rotary_params):
  """Latents at positions 4..9; token 6 changed: latents 4 and 5 exactly as before, 6.. not."""
  logits_fn = jax.jit(_model(ROTARY, 6).logits)
  batch = helpers.lm_batch(1, 2, 10, VOCAB)
  logits = logits_fn(rotary_params, batch)
  bumped = logits_fn(rotary_params, helpers.bump(batch, 'decoder_input_tokens',
                                                 (slice(None), 6), VOCAB))
  np.testing.assert_array_equal(bumped[:, :2], logits[:, :2])
  assert np.abs(np.asarray(bumped[:, 2] - logits[:, 2])).max() > 1e-4
  # A token before every latent reaches them all through the cross-attention.
  early = logits_fn(rotary_params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), 1),
                                                VOCAB))
  assert np.abs(np.asarray(early[:, 0] - logits[:, 0])).max() > 1e-4


@pytest.mark.parametrize('cfg', [ROTARY, RELATIVE], ids=['rotary', 'relative_scanned'])
def test_with_every_position_a_latent_it_is_the_dense_decoder(cfg):
  """N = L: the cross-attention over all positions with a causal mask is causal
  self-attention, so the dense decoder's parameters give the dense decoder's logits (padding
  included: same masks)."""
  dense, dense_params = _dense_params(cfg)
  batch = helpers.lm_batch(2, 2, 10, VOCAB)
  model = _model(cfg, 10)
  params = params_from_decoder_only(dense_params)
  abstract = jax.eval_shape(lambda: helpers.init_params(model, batch))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
  np.testing.assert_allclose(jax.jit(model.logits)(params, batch),
                             jax.jit(dense.logits)(dense_params, batch), atol=2e-5, rtol=1e-5)


# --- an independent numpy reference of the definition (ROTARY's config) ------------------------


def _rms(x, scale):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def _rotary(x, positions):  # x [len, heads, d]; half-split pairs, wavelength 10_000
  half = x.shape[-1] // 2
  angle = positions[:, None, None] * 10_000.0**(-np.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _attention(p, h_q, h_kv, q_pos, kv_pos, allowed, cfg):
  """Grouped-query attention of one sequence by the definition; allowed [q, k] bool."""
  heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = _rotary((h_q @ p['query']['kernel']).reshape(len(h_q), heads, d), q_pos)
  k = _rotary((h_kv @ p['key']['kernel']).reshape(len(h_kv), kv_heads, d), kv_pos)
  v = (h_kv @ p['value']['kernel']).reshape(len(h_kv), kv_heads, d)
  out = np.zeros((len(h_q), heads, d))
  for h in range(heads):
    g = h // (heads // kv_heads)
    logits = np.where(allowed, q[:, h] @ k[:, g].T / np.sqrt(d), -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    out[:, h] = (weights / weights.sum(axis=1, keepdims=True)) @ v[:, g]
  return out.reshape(len(h_q), heads * d) @ p['out']['kernel']


def _mlp(p, h):
  u = h @ p['wi']['kernel']
  gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
  return gelu @ p['wo']['kernel']


def _reference(params, tokens, valid, n, cfg):
  """Logits [N, vocab] of one sequence: the cross-attend layer, the latent layers, the head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  dec, table = p['decoder'], p['token_embedder']['embedding']
  length = len(tokens)
  x = table[tokens]
  pos = np.arange(length, dtype=np.float64)
  lat = np.arange(length - n, length)
  first = dec['cross_attend_layer']
  h_kv = _rms(x, first['pre_self_attention_layer_norm']['scale'])
  allowed = (lat[:, None] >= np.arange(length)[None]) & valid[None]  # latent p sees j <= p
  z = x[lat] + _attention(first['self_attention'], h_kv[lat], h_kv, pos[lat], pos, allowed, cfg)
  z = z + _mlp(first['mlp'], _rms(z, first['pre_mlp_layer_norm']['scale']))
  causal = (lat[:, None] >= lat[None]) & valid[lat][None]
  for i in range(cfg.num_decoder_layers - 1):
    layer = dec['latent_layers'][f'layers_{i}']
    h = _rms(z, layer['pre_self_attention_layer_norm']['scale'])
    z = z + _attention(layer['self_attention'], h, h, pos[lat], pos[lat], causal, cfg)
    z = z + _mlp(layer['mlp'], _rms(z, layer['pre_mlp_layer_norm']['scale']))
  z = _rms(z, dec['decoder_norm']['scale'])
  return z @ table.T * cfg.emb_dim**-0.5


@pytest.mark.parametrize('implementation', ['xla', 'auto'])
def test_fewer_latents_follow_the_definition(rotary_params, implementation):
  """N = 4 of L = 11 (row 0 padded): the latents' logits equal the numpy reference; 'auto'
  passes the masks as structure (the kernels' bottom-right causal alignment)."""
  cfg = dataclasses.replace(ROTARY, attention_implementation=implementation)
  batch = helpers.lm_batch(3, 2, 11, VOCAB)
  logits = np.asarray(jax.jit(_model(cfg, 4).logits)(rotary_params, batch))
  assert logits.shape == (2, 4, VOCAB)
  for b in range(2):
    valid = batch['decoder_target_tokens'][b] > 0
    expected = _reference(rotary_params, batch['decoder_input_tokens'][b], valid, 4, ROTARY)
    real = valid[-4:]
    np.testing.assert_allclose(logits[b][real], expected[real], atol=2e-4, rtol=1e-4)


def test_the_loss_counts_only_the_last_n_targets(rotary_params):
  """L = 6, N = 2: row 0's last target is padding, so 3 targets count; the first four targets
  of each row change nothing; the loss is the reference's cross-entropy at the latents."""
  model = dataclasses.replace(_model(ROTARY, 2), z_loss=0.0)
  targets = np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 14, 15, 16]], np.int32)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  batch = {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
           'decoder_loss_weights': (targets > 0).astype(np.float32)}
  loss_sums = jax.jit(model.loss_sums)
  sums = loss_sums(rotary_params, batch)
  assert float(sums['num_tokens']) == 3.0
  logits = [_reference(rotary_params, inputs[b], targets[b] > 0, 2, ROTARY) for b in range(2)]
  log_probs = [l - np.log(np.exp(l).sum(-1, keepdims=True)) for l in logits]
  expected = -(log_probs[0][0, 9] + log_probs[1][0, 15] + log_probs[1][1, 16])
  np.testing.assert_allclose(float(sums['loss']), expected, rtol=1e-4)
  changed = dict(batch, decoder_target_tokens=np.where(np.arange(6) < 4, 3, targets))
  np.testing.assert_allclose(float(loss_sums(rotary_params, changed)['loss']), expected,
                             rtol=1e-4)
  scores = np.asarray(jax.jit(model.token_scores)(rotary_params, batch))
  assert scores.shape == (2, 6) and not scores[:, :4].any() and scores[0, 5] == 0
  np.testing.assert_allclose(scores.sum(), -expected, rtol=1e-4)


def _last_logits(params, tokens, position, num_latents):
  """The whole-sequence model's logits at `position` when it is the last input: the reference
  on tokens[:position + 1], whose latents are its last min(N, position + 1) positions."""
  n = min(num_latents, position + 1)
  return _reference(params, np.asarray(tokens[:position + 1]), np.ones(position + 1, bool), n,
                    ROTARY)[-1]


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_prefill_and_steps_equal_whole_forwards(rotary_params, scan):
  """Right-padded prompts of 2, 7 and 5 tokens, N = 4, then steps: the logits at position p
  equal the whole-sequence model's on tokens[:p + 1], windows shorter than N included. Scanned
  layers keep the first layer's cache under a layer axis of 1 (the batch on axis 1)."""
  cfg = dataclasses.replace(ROTARY, scan_layers=scan)
  model = _model(cfg, 4)
  params = rotary_params
  if scan:  # the same values with the latent layers stacked
    params = jax.tree.map(lambda a: a, rotary_params)
    layers = params['decoder']['latent_layers']
    params['decoder']['latent_layers'] = {
        'layers': jax.tree.map(lambda *a: jnp.stack(a), layers['layers_0'], layers['layers_1'])}
  toks = _sequences(4, 3, 11)
  lengths = jnp.array([2, 7, 5])
  prompt = jnp.where(jnp.arange(7)[None] < lengths[:, None], toks[:, :7], 0)
  cache = kv_cache.init_cache(model, params, 3, 11)
  assert kv_cache.cache_length(cache) == 11
  batch_axis = {x.shape.index(3) for x in jax.tree.leaves(cache)}
  assert batch_axis == {1 if scan else 0}
  logits, cache = jax.jit(lambda *a: kv_cache.prefill(model, *a))(params, cache, prompt, lengths)
  for b in range(3):
    np.testing.assert_allclose(logits[b, lengths[b] - 1],
                               _last_logits(rotary_params, toks[b], int(lengths[b]) - 1, 4),
                               atol=1e-4, rtol=1e-4)
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  positions = lengths
  for _ in range(3):
    step_logits, cache = step(params, cache, toks[jnp.arange(3), positions], positions)
    for b in range(3):
      np.testing.assert_allclose(step_logits[b],
                                 _last_logits(rotary_params, toks[b], int(positions[b]), 4),
                                 atol=1e-4, rtol=1e-4)
    positions = positions + 1


def test_greedy_predict_equals_argmax_of_whole_forwards(rotary_params):
  """model.predict (prefill, then a while-loop of steps) against greedy decoding by whole
  forward passes (the reference) over the growing sequence."""
  model = _model(ROTARY, 3)
  out = model.predict(rotary_params, jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]]),
                      decoding.DecodeOptions(max_decode_length=4, eos_id=-1))
  for row, prompt in enumerate([[5, 6, 7, 8], [9, 10]]):
    seq = [0] + prompt
    for _ in range(4):
      seq.append(int(np.argmax(_last_logits(rotary_params, seq, len(seq) - 1, 3))))
    assert list(np.asarray(out.tokens[row])) == seq[-4:]


def test_more_latents_than_tokens_is_refused_with_the_fix():
  """Training, scoring or evaluating on rows shorter than N is refused; initializing is not (the
  parameters do not depend on N, and inference initializes on short dummies)."""
  model = _model(ROTARY, 12)
  batch = helpers.lm_batch(0, 2, 10, VOCAB)
  params = jax.eval_shape(lambda: helpers.init_params(model, helpers.lm_batch(0, 2, 4, VOCAB)))
  with pytest.raises(ValueError, match=r'num_latents = 12 exceeds the sequence length 10: set '
                     r'num_latents <= 10'):
    jax.eval_shape(model.loss_fn, params, batch)


@pytest.mark.parametrize('overrides,fix', [
    (dict(attention_window=2), 'set attention_window = 0'),
    (dict(parallel_block=True), 'set parallel_block = False'),
    (dict(num_decoder_layers=0), 'num_decoder_layers must be >= 1'),
])
def test_what_the_stack_cannot_honour_is_refused(overrides, fix):
  model = _model(dataclasses.replace(ROTARY, **overrides), 4)
  with pytest.raises(ValueError, match=fix):
    jax.eval_shape(lambda: helpers.init_params(model, helpers.lm_batch(0, 2, 10, VOCAB)))


def test_packed_rows_are_refused_with_the_fix():
  model = _model(ROTARY, 4)
  batch = dict(helpers.lm_batch(0, 2, 10, VOCAB), decoder_segment_ids=np.ones((2, 10), np.int32))
  with pytest.raises(ConfigError, match='pack = False'):
    jax.eval_shape(lambda: helpers.init_params(model, batch))


@pytest.mark.parametrize('value', [0, -3, 2.5, True])
def test_bad_num_latents_is_refused(value):
  with pytest.raises(ValueError, match='num_latents'):
    PerceiverArConfig(value)


@pytest.mark.slow  # compiles a sharded train step, saves and restores a checkpoint
def test_shipped_gin_trains_through_the_trainer_and_predicts(tmp_path):
  """models/perceiver_ar/decoder_tiny.gin (4 latents of 8-token rows) through the trainer on
  tiny_run's counting sequences: the loss falls far below an initialized model's, and predict
  continues the count."""
  gin_config.parse(['models/perceiver_ar/decoder_tiny.gin'],
                   [f'VOCAB_SIZE = {tiny_run.VOCAB}', 'NUM_LATENTS = 4',
                    "ACTIVATION_DTYPE = 'float32'"])
  model = gin_config.macro('MODEL')
  assert isinstance(model, PerceiverArModel) and model.num_latents == 4
  batch = fake_data.CountingIterator(tiny_run.BATCH, tiny_run.LENGTH, tiny_run.VOCAB,
                                     seed=7).batch(0)  # rows the run never saw
  initial = jax.jit(lambda: model.loss_fn(helpers.init_params(model, batch), batch)[1])()
  metrics = tiny_run.train(tmp_path, 10, model=model, checkpoint_every=10,
                           async_checkpointing=False)
  assert metrics['num_tokens'] == tiny_run.BATCH * 4  # the latents' targets only
  assert metrics['cross_entropy'] < 0.25 * float(initial['cross_entropy'])
  step, trained = tiny_run.latest_params(tmp_path, model)
  assert step == 10
  prompts = batch['decoder_target_tokens'][:2, :5]
  out = model.predict(trained, jnp.asarray(prompts),
                      decoding.DecodeOptions(max_decode_length=3, eos_id=-1))
  counted = (prompts[:, -1:] - 2 + np.arange(1, 4)) % (tiny_run.VOCAB - 2) + 2
  np.testing.assert_array_equal(out.tokens, counted)
