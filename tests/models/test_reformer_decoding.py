"""Decoding the Reformer's pieces with a cache: reversible stacks (prefill + steps against the
whole-sequence forward pass) and LSH attention (its decoding rule against a numpy reference of
bucket matching, against dense causal attention when every bucket collides, and against the
training-time layer where one chunk makes them the same function: layers/lsh_attention.py,
"Decoding"). The Terraformer gin's generation is in tests/models/test_scaling_models.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.inference import kv_cache
from efficientlm.layers import lsh_attention
from efficientlm.layers.attention import MultiHeadAttention, dot_product_attention
from efficientlm.layers.lsh_attention import LshConfig
from tests import helpers


def _init(model, toks):  # jitted: op by op, tracing the init costs more than compiling it
  batch = {'decoder_input_tokens': toks, 'decoder_target_tokens': toks}
  return partitioning.unbox(jax.jit(model.init)(jax.random.key(0), batch)['params'])


def _sequences(seed, batch, length, vocab=64):
  toks = np.random.default_rng(seed).integers(2, vocab, size=(batch, length)).astype(np.int32)
  toks[:, 0] = 0
  return jnp.asarray(toks)


def _assert_cached_equals_full(model, params, toks, lengths, steps, atol=1e-4):
  """Right-padded prompts of `lengths` tokens prefilled, then `steps` one-token steps: each
  position's logits equal the whole-sequence forward pass's."""
  full = jax.jit(lambda p, t: model.module.apply({'params': p}, t))(params, toks)
  batch, length = toks.shape
  width = int(max(lengths))
  prompt = jnp.where(jnp.arange(width)[None] < lengths[:, None], toks[:, :width], 0)
  cache = kv_cache.init_cache(model, params, batch, length)
  logits, cache = jax.jit(lambda *a: kv_cache.prefill(model, *a))(params, cache, prompt, lengths)
  for b in range(batch):
    np.testing.assert_allclose(logits[b, :lengths[b]], full[b, :lengths[b]], atol=atol)
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  rows, positions = jnp.arange(batch), lengths
  for _ in range(steps):
    step_logits, cache = step(params, cache, toks[rows, positions], positions)
    np.testing.assert_allclose(step_logits, full[rows, positions], atol=atol)
    positions = positions + 1
  return cache, full


def test_reversible_decoding_equals_full_forward():
  """Dense (grouped-query, rotary) attention in reversible layers with chunked feed-forward:
  prefill + greedy-style steps reproduce the training-time forward's logits at every position,
  from the training parameter tree; the caches sit where a standard layer's do."""
  model = helpers.decoder_model(residual='reversible', reversible_ff_chunks=3)
  toks = _sequences(1, 2, 9)
  params = _init(model, toks)
  assert set(params['decoder']['layers_1']) == {'pre_self_attention_layer_norm',
                                                'self_attention', 'pre_mlp_layer_norm', 'mlp'}
  cache, full = _assert_cached_equals_full(model, params, toks, jnp.array([3, 5]), steps=4)
  assert set(cache['decoder']['layers_0']['self_attention']) == {'cached_key', 'cached_value'}
  # Not the standard stack's function (else the check above would not test the reversible one).
  standard = helpers.decoder_model(reversible_ff_chunks=1)
  logits = jax.jit(lambda p, t: standard.module.apply({'params': p}, t))(params, toks)
  assert np.abs(np.asarray(logits) - np.asarray(full)).max() > 1e-2


def test_reversible_encoder_decoder_decoding_equals_full_forward():
  """The decoder's F holds cross-attention (cached keys of the encoder output at prefill)."""
  model = helpers.t5_model(residual='reversible', num_encoder_layers=1, num_decoder_layers=2)
  batch = helpers.seq2seq_batch(0, 2, 6, 5, 64)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = partitioning.unbox(jax.jit(model.init)(jax.random.key(0), batch)['params'])
  enc, dec = batch['encoder_input_tokens'], batch['decoder_input_tokens']
  full = jax.jit(lambda p: model.module.apply({'params': p}, enc, dec))(params)
  cache = kv_cache.init_cache(model, params, 2, 5, encoder_length=enc.shape[1])
  logits, cache = jax.jit(lambda *a: kv_cache.prefill(model, *a))(
      params, cache, dec[:, :1], jnp.array([1, 1]), enc)
  np.testing.assert_allclose(logits[:, 0], full[:, 0], atol=1e-4)
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  for t in range(1, 5):
    step_logits, cache = step(params, cache, dec[:, t], jnp.array([t, t]), enc)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-4)


# --- LSH attention decoding -------------------------------------------------------------------


def _reference_decode(qk, v, rotations, config):
  """Numpy, one query at a time, the rule written as training combines rounds: per round r the
  earlier keys in the query's bucket (hash = argmax [x R_r, -x R_r]), a softmax with the self
  logit -1e5 and, with count_duplicates, - log N_tj; rounds weighted by softmax of their
  log-normalizers. qk [L, h, d], v [L, h, dv], rotations [h, R, d, n/2] -> [L, h, dv]."""
  length, heads, _ = qk.shape
  rounds = rotations.shape[1]
  out = np.zeros(v.shape, np.float64)
  for h in range(heads):
    buckets = np.zeros((rounds, length), np.int64)
    for r in range(rounds):
      for j in range(length):
        proj = qk[j, h] @ rotations[h, r]
        buckets[r, j] = int(np.argmax(np.concatenate([proj, -proj])))
    for t in range(length):
      shares = [[buckets[r, j] == buckets[r, t] for j in range(t + 1)] for r in range(rounds)]
      counts = np.sum(shares, axis=0)
      zs, outs = [], []
      for r in range(rounds):
        members = [j for j in range(t + 1) if shares[r][j]]
        logits = []
        for j in members:
          s = -1e5 if j == t else qk[t, h] @ qk[j, h] / np.linalg.norm(qk[j, h])
          logits.append(s - (np.log(counts[j]) if config.count_duplicates else 0.0))
        logits = np.array(logits)
        z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        zs.append(z)
        outs.append(np.exp(logits - z) @ v[members, h])
      weights = np.exp(np.array(zs) - max(zs))
      out[t, h] = (weights / weights.sum()) @ np.array(outs)
  return out, buckets


def _lsh_layer(config, decode):
  return MultiHeadAttention(num_heads=2, head_dim=4, lsh=config, causal=True, decode=decode,
                            layer_index=1)


@pytest.mark.parametrize('count_duplicates', [True, False])
def test_lsh_prefill_and_steps_equal_numpy_bucket_matching(count_duplicates):
  """The layer's cached decoding (prefill of 4 tokens, then 3 steps) against the reference,
  with the evaluation rotations of its layer, from its own projections."""
  config = LshConfig(num_hashes=3, chunk_length=4, num_buckets=4,
                     count_duplicates=count_duplicates)
  batch, length, slots, prompt = 2, 7, 8, 4
  x = jax.random.normal(jax.random.key(3), (batch, length, 8))
  causal = jnp.tril(jnp.ones((prompt, prompt), bool))[None, None]
  variables = jax.jit(_lsh_layer(config, 'init').init)(
      jax.random.key(0), jnp.zeros((batch, slots, 8)), jnp.zeros((batch, slots, 8)),
      jnp.tril(jnp.ones((slots, slots), bool))[None, None])
  params, cache = partitioning.unbox(variables['params']), variables['cache']
  # Jitted once per mode (op by op costs more than compiling): the steps share one program.
  jitted = {mode: jax.jit(lambda v, x, m, p, mode=mode: _lsh_layer(config, mode).apply(
      v, x, x, m, q_positions=p, mutable=['cache'])) for mode in ('prefill', 'step')}

  def run(mode, variables, x, mask, positions):
    return jitted[mode](variables, x, mask, positions)

  out, state = run('prefill', {'params': params, 'cache': cache}, x[:, :prompt], causal,
                   jnp.arange(prompt)[None])
  outs = [out]
  for t in range(prompt, length):
    mask = (jnp.arange(slots) <= t)[None, None, None]
    out, state = run('step', {'params': params, **state}, x[:, t:t + 1], mask,
                     jnp.full((batch, 1), t))
    outs.append(out)
  decoded = np.concatenate([np.asarray(o) for o in outs], axis=1)

  rotations = np.asarray(lsh_attention.random_rotations(
      lsh_attention.eval_rng(config, 1), 2, 4, 3, 4), np.float64)
  def kernel(name):  # T5X's 2D kernels: [embed, heads * d] in, [heads * d, embed] out
    w = np.asarray(params[name]['kernel'], np.float64)
    return w.reshape(2, 4, 8) if name == 'out' else w.reshape(8, 2, 4)

  xs = np.asarray(x, np.float64)
  for b in range(batch):
    qk = np.einsum('le,ehd->lhd', xs[b], kernel('query'))
    v = np.einsum('le,ehd->lhd', xs[b], kernel('value'))
    attended, buckets = _reference_decode(qk, v, rotations, config)
    # Not degenerate: some earlier keys share a bucket in some rounds only, some in none.
    shared = buckets[:, None, :] == buckets[:, :, None]
    assert (shared.any(0) & ~shared.all(0)).any() and (~shared.any(0)).any()
    expected = np.einsum('lhd,hde->le', attended, kernel('out'))
    np.testing.assert_allclose(decoded[b], expected, rtol=1e-4, atol=1e-5)
  assert set(state['cache']) == {'cached_key', 'cached_value', 'cached_buckets'}


def test_lsh_decoding_with_one_bucket_is_dense_causal_attention_without_self():
  """Every token in one bucket in every round: dense causal attention over the normalized
  keys, the token itself excluded unless it is the only one (the first token)."""
  config = LshConfig(num_hashes=2, chunk_length=4)
  b, length, heads, d = 2, 6, 3, 4
  qk, v = jax.random.normal(jax.random.key(1), (2, b, length, heads, d))
  buckets = jnp.zeros((b, length, heads, 2), jnp.int32)
  index = jnp.arange(length)[None]
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  got = jax.jit(lambda qk, v: lsh_attention.lsh_decode_attention(
      qk, qk, v, buckets, buckets, index, index, causal, config))(qk, v)
  keys = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
  earlier = jnp.tril(jnp.ones((length, length), bool), k=-1)[None, None]
  dense = jax.jit(lambda qk, keys, v: dot_product_attention(qk, keys, v, mask=earlier))(
      qk, keys, v)
  np.testing.assert_allclose(got[:, 1:], dense[:, 1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 0], v[:, 0], rtol=1e-6)  # nothing else to read


def test_lsh_one_chunk_decoding_equals_training_forward():
  """With one chunk (chunk_length = the length) and a fixed number of buckets, training-time LSH
  attention reads whole buckets, which is the decoding rule: a model's cached logits equal its
  whole-sequence (evaluation) logits (in a Reformer: reversible layers)."""
  lsh = LshConfig(num_hashes=2, chunk_length=8, num_buckets=4)
  toks = _sequences(2, 2, 8)
  model = helpers.decoder_model(token_mixers=('lsh',), lsh=lsh, num_kv_heads=None,
                                residual='reversible')
  params = _init(model, toks)
  cache, _ = _assert_cached_equals_full(model, params, toks, jnp.array([2, 5]), steps=3)
  assert cache['decoder']['layers_1']['self_attention']['cached_buckets'].shape == (2, 8, 4, 2)
