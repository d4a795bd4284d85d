"""KV-cache decoding against full forward passes, and the search algorithms against naive and
exhaustive references."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.inference import decoding, kv_cache
from tests.helpers import decoder_model, init_params, t5_model

DECODER_VARIANTS = {
    'mqa_rotary': dict(num_kv_heads=1),
    'gqa_relative_scanned': dict(num_kv_heads=2, position_embedding='relative',
                                 scale_attention_logits=False, scan_layers=True),
    'mha_relative_parallel': dict(num_kv_heads=None, position_embedding='relative',
                                  parallel_block=True, mlp_activations=('gelu', 'linear')),
}


@functools.partial(jax.jit, static_argnums=0)
def _init(model):
  """Jitted here and below (op by op, compiling each op costs more than the whole program);
  the model static, so the tests that share a variant share one compiled init."""
  return model.module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']


def _decoder(variant, **overrides):
  model = decoder_model(**DECODER_VARIANTS[variant], **overrides)
  return model, _init(model)


def _sequences(seed, batch, length, vocab):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
  toks[:, 0] = 0  # decoder inputs start with 0
  return jnp.asarray(toks)


def _jitted(model):
  """kv_cache.prefill and .step of `model`, jitted (op by op, compiling each op costs more)."""
  return (jax.jit(lambda *args: kv_cache.prefill(model, *args)),
          jax.jit(lambda *args: kv_cache.step(model, *args)))


@pytest.mark.parametrize('variant', sorted(DECODER_VARIANTS))
def test_cached_logits_equal_full_forward_decoder_only(variant):
  model, params = _decoder(variant)
  toks = _sequences(1, 3, 10, 64)
  full = jax.jit(lambda p, t: model.module.apply({'params': p}, t))(params, toks)
  lengths = jnp.array([2, 6, 4])
  prompt = jnp.where(jnp.arange(6)[None] < lengths[:, None], toks[:, :6], 0)
  cache = kv_cache.init_cache(model, params, 3, 12)
  # Only the KV heads are cached.
  kv_heads = model.module.config.num_kv_heads or model.module.config.num_heads
  assert {leaf.shape[-2] for leaf in jax.tree.leaves(cache)} == {kv_heads}
  prefill, step = _jitted(model)
  logits, cache = prefill(params, cache, prompt, lengths)
  for b in range(3):
    np.testing.assert_allclose(logits[b, :lengths[b]], full[b, :lengths[b]], atol=2e-5)
  positions = lengths
  rows = jnp.arange(3)
  for _ in range(4):  # every sequence continues from its own position
    step_logits, cache = step(params, cache, toks[rows, positions], positions)
    np.testing.assert_allclose(step_logits, full[rows, positions], atol=2e-5)
    positions = positions + 1


def test_cached_logits_equal_full_forward_encoder_decoder():
  model = t5_model(num_kv_heads=2)
  enc = _sequences(2, 2, 7, 64).at[:, 0].set(5).at[1, 5:].set(0)  # second input padded
  dec = _sequences(3, 2, 5, 64)
  params = jax.jit(model.module.init)(jax.random.key(0), enc, dec)['params']
  full = jax.jit(lambda p: model.module.apply({'params': p}, enc, dec))(params)
  cache = kv_cache.init_cache(model, params, 2, 6, encoder_length=7)
  prefill, step = _jitted(model)
  logits, cache = prefill(params, cache, dec[:, :1], jnp.array([1, 1]), enc)
  np.testing.assert_allclose(logits[:, 0], full[:, 0], atol=2e-5)
  for i in range(1, 5):
    step_logits, cache = step(params, cache, dec[:, i], jnp.array([i, i]), enc)
    np.testing.assert_allclose(step_logits, full[:, i], atol=2e-5)


def test_prefix_lm_prefill_attends_bidirectionally():
  model = decoder_model(num_kv_heads=1)
  model = type(model)(model.module, prefix_lm=True)
  params = jax.jit(model.module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  toks = _sequences(4, 1, 6, 64)
  causal = jnp.array([[1, 1, 1, 1, 0, 0]])  # the prompt is 4 tokens
  full = jax.jit(lambda p: model.module.apply({'params': p}, toks,
                                              decoder_causal_attention=causal))(params)
  cache = kv_cache.init_cache(model, params, 1, 8)
  prefill, step = _jitted(model)
  logits, cache = prefill(params, cache, toks[:, :4], jnp.array([4]))
  np.testing.assert_allclose(logits[0], full[0, :4], atol=2e-5)
  step_logits, _ = step(params, cache, toks[:, 4], jnp.array([4]))
  np.testing.assert_allclose(step_logits[0], full[0, 4], atol=2e-5)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, toks, enc):
  """One compiled forward per model, shared by every row and test (the model static)."""
  if enc is None:
    return model.module.apply({'params': params}, toks)
  return model.module.apply({'params': params}, enc[None], toks)


def _naive_greedy(model, params, prompt, steps, encoder_tokens=None, length=12):
  """Greedy decoding by full forward passes over the growing sequence (no cache). The sequence
  is right-padded to `length`, so one compiled forward serves every step and prompt: the decoder
  is causal and, without targets, counts every position as real, so the padding after the last
  token leaves that token's logits unchanged."""
  seq = [0] + ([] if encoder_tokens is not None else [int(t) for t in prompt if t])
  assert len(seq) + steps <= length
  out = []
  for _ in range(steps):
    logits = _forward(model, params, jnp.array([seq + [0] * (length - len(seq))]),
                      encoder_tokens)
    out.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    seq.append(out[-1])
  return out


def test_greedy_equals_naive_decoding_with_different_prompt_lengths():
  model, params = _decoder('gqa_relative_scanned')
  prompts = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]])
  options = decoding.DecodeOptions(max_decode_length=5, eos_id=-1)
  out = model.predict(params, prompts, options)
  for b in range(3):
    assert out.tokens[b].tolist() == _naive_greedy(model, params, prompts[b], 5)
  np.testing.assert_array_equal(out.lengths, [5, 5, 5])


def test_greedy_encoder_decoder_equals_naive_decoding():
  model = t5_model()
  enc = jnp.array([[5, 6, 7, 8], [9, 10, 11, 0]])
  params = init_params(model, {'encoder_input_tokens': enc,
                               'decoder_input_tokens': jnp.zeros((2, 3), jnp.int32)})
  out = model.predict(params, enc, decoding.DecodeOptions(max_decode_length=4, eos_id=-1))
  for b in range(2):
    assert out.tokens[b].tolist() == _naive_greedy(model, params, None, 4, enc[b])


def test_eos_stops_a_sequence_and_pads_after_it():
  model, params = _decoder('mqa_rotary')
  prompts = jnp.array([[5, 6, 7], [9, 0, 0]])
  free = model.predict(params, prompts, decoding.DecodeOptions(max_decode_length=6, eos_id=-1))
  first = free.tokens[0].tolist()
  # Sequence 0 stops at the first token (after the first) that it had not produced before.
  j = next(j for j in range(1, 6) if first[j] not in first[:j])
  eos = first[j]
  out = model.predict(params, prompts, decoding.DecodeOptions(max_decode_length=6, eos_id=eos))
  assert out.tokens[0].tolist() == first[:j + 1] + [0] * (5 - j)
  assert int(out.lengths[0]) == j + 1
  row = free.tokens[1].tolist()
  stop = row.index(eos) + 1 if eos in row else 6
  assert out.tokens[1].tolist() == row[:stop] + [0] * (6 - stop)


def test_filter_logits_hand_built():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: (np.asarray(x[0]) > decoding.NEG_INF / 2).tolist()
  assert kept(decoding.filter_logits(logits, top_k=2)) == [True, True, False, False, False]
  # Nucleus 0.8: 0.5 + 0.2 < 0.8, so 0.15 is needed too; 0.1 is not.
  assert kept(decoding.filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
  assert kept(decoding.filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
  # Permuted logits keep the same tokens.
  perm = jnp.array([3, 0, 4, 1, 2])
  assert kept(decoding.filter_logits(logits[:, perm], top_p=0.8)) == [False, True, False, True,
                                                                      True]


def test_sampling_is_reproducible_from_a_seed():
  model, params = _decoder('mqa_rotary')
  prompts = jnp.array([[5, 6, 7], [9, 0, 0]])
  options = decoding.DecodeOptions(method='sample', max_decode_length=8, eos_id=-1,
                                   temperature=2.0)
  a = model.predict(params, prompts, options, rng=jax.random.key(7))
  b = model.predict(params, prompts, options, rng=jax.random.key(7))
  c = model.predict(params, prompts, options, rng=jax.random.key(8))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  greedy = model.predict(params, prompts, decoding.DecodeOptions(max_decode_length=8, eos_id=-1))
  top1 = model.predict(params, prompts, decoding.DecodeOptions(
      method='sample', top_k=1, max_decode_length=8, eos_id=-1), rng=jax.random.key(9))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  with pytest.raises(ValueError, match='rng'):
    model.predict(params, prompts, options)


def test_beam_search_with_enough_beams_is_exact_search():
  vocab, steps = 5, 3
  model, params = _decoder('mqa_rotary', vocab_size=vocab)
  prompt = jnp.array([[2, 3]])
  out = model.predict(params, prompt, decoding.DecodeOptions(
      method='beam', num_beams=vocab**(steps - 1), max_decode_length=steps, eos_id=-1,
      length_penalty=0.0))
  # Exhaustive: score every continuation by a full forward pass (all of them in one batch).
  conts = np.array(list(itertools.product(range(vocab), repeat=steps)), np.int32)
  seqs = np.concatenate([np.tile([[0, 2, 3]], (len(conts), 1)), conts], axis=1)
  logp = np.asarray(jax.jit(lambda p: jax.nn.log_softmax(
      model.module.apply({'params': p}, seqs), -1))(params))
  scores = logp[np.arange(len(conts))[:, None], 2 + np.arange(steps), conts].sum(1)
  best = int(np.argmax(scores))
  best_score = float(scores[best])
  assert out.tokens[0].tolist() == conts[best].tolist()
  np.testing.assert_allclose(out.scores[0], best_score, rtol=1e-5)


def test_one_beam_is_greedy():
  model, params = _decoder('gqa_relative_scanned')
  prompts = jnp.array([[5, 6, 7], [9, 0, 0]])
  greedy = model.predict(params, prompts, decoding.DecodeOptions(max_decode_length=5, eos_id=-1))
  beam = model.predict(params, prompts, decoding.DecodeOptions(
      method='beam', num_beams=1, max_decode_length=5, eos_id=-1))
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)


def test_prompt_longer_than_the_cache_is_refused():
  model, params = _decoder('mqa_rotary')
  prompts = jnp.array([[5, 6, 7, 8]])
  with pytest.raises(ValueError, match='cache'):
    decoding.generate(model, params, prompts, decoding.DecodeOptions(max_decode_length=4),
                      cache_length=6)
  cache = kv_cache.init_cache(model, params, 1, 3)
  with pytest.raises(ValueError, match='does not fit the KV cache'):
    kv_cache.prefill(model, params, cache, jnp.array([[0, 5, 6, 7]]), jnp.array([4]))
  with pytest.raises(ValueError, match='temperature'):
    decoding.DecodeOptions(temperature=0.0)
