"""The Scaling Transformer's sparse Q/K/V (layers/sparse_qkv.py) against its definition in numpy
loops, lax's 2D convolution, and its own decoding and packing equivalences; its wiring into
MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.attention import AttentionMask, MultiHeadAttention
from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.layers.sparse_qkv import SparseQkv, SparseQkvConfig, module_conv, multiplicative

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, S = 8, 4, 2, 4, 4  # M = 2; query 4 per module, K/V 2
CONFIG = SparseQkvConfig(num_modules=S, length_kernel=3, module_kernel=3, value_module_kernel=1)


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _layer(**kw):
  return SparseQkv(CONFIG, HEADS, HEAD_DIM, KV_HEADS, **kw)


def _init(module, *args):
  return partitioning.unbox(jax.jit(module.init)(jax.random.key(0), *args)['params'])


def _np_reference(p, x, causal, valid=None):
  """Loops over the paper's definition: Y[t, s, m] = sum_i x_i D[i, s] E[i, m]; then per
  projection out[t, s, n] = sum_{h, w, m} Y[t + h - a, s + w - c, m] C[h, w, m, n] with a = K_L - 1
  (causal) or (K_L - 1) / 2, c = (K_S - 1) / 2, zero outside; padding rows of Y zeroed first."""
  x = np.asarray(x, np.float64)
  b, length, _ = x.shape
  d, e = np.asarray(p['multiplicative_d']), np.asarray(p['multiplicative_e'])
  y = np.zeros((b, length, S, e.shape[1]))
  for s in range(S):
    for m in range(e.shape[1]):
      y[:, :, s, m] = sum(x[:, :, i] * d[i, s] * e[i, m] for i in range(D_MODEL))
  if valid is not None:
    y = y * np.asarray(valid)[:, :, None, None]
  outs = {}
  for name in ('query', 'key', 'value'):
    kernel = np.asarray(p[name])
    kl, ks, _, n_out = kernel.shape
    a = kl - 1 if causal else (kl - 1) // 2
    out = np.zeros((b, length, S, n_out))
    for t in range(length):
      for s in range(S):
        for h in range(kl):
          for w in range(ks):
            tt, ss = t + h - a, s + w - (ks - 1) // 2
            if 0 <= tt < length and 0 <= ss < S:
              out[:, t, s] += y[:, tt, ss] @ kernel[h, w]
    outs[name] = out.reshape(b, length, -1, HEAD_DIM)
  return outs


@pytest.mark.parametrize('causal', [True, False])
def test_layer_equals_the_numpy_definition(causal):
  x = _x((2, 6, D_MODEL))
  layer = _layer(causal=causal)
  p = _init(layer, x)
  valid = None if causal else jnp.arange(6)[None] < jnp.array([[6], [4]])
  mask = None if valid is None else (valid[:, None, :, None] & valid[:, None, None, :])
  q, k, v = jax.jit(lambda p, x: layer.apply({'params': p}, x, mask))(p, x)
  ref = _np_reference(p, x, causal, valid)
  assert q.shape == (2, 6, HEADS, HEAD_DIM) and k.shape == v.shape == (2, 6, KV_HEADS, HEAD_DIM)
  for name, got in zip(('query', 'key', 'value'), (q, k, v)):
    np.testing.assert_allclose(got, ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_convolution_equals_lax_conv_and_multiplicative_equals_einsum_of_products():
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.normal(size=(2, 7, S, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
  expected = jax.lax.conv_general_dilated(y, kernel, (1, 1), ((2, 0), (1, 1)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = jax.jit(module_conv, static_argnames='causal')(y, kernel, jnp.arange(7)[None],
                                                      causal=True)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  x, d, e = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 6), (6, S), (6, 2)))
  # Y[s] = (x * D[:, s]) E: the gated-then-projected form of the paper's figure.
  gated = np.stack([np.asarray(x) * np.asarray(d)[:, s] for s in range(S)], axis=1)
  np.testing.assert_allclose(jax.jit(multiplicative)(x, d, e), gated @ np.asarray(e), rtol=1e-5,
                             atol=1e-5)


def test_packed_examples_do_not_see_each_other():
  """Two examples packed in one row (positions restart) give what each gives alone."""
  x = _x((1, 7, D_MODEL), seed=2)
  layer = _layer()
  p = _init(layer, x)
  run = jax.jit(lambda x, pos: layer.apply({'params': p}, x, None, pos))
  packed = run(x, jnp.array([[0, 1, 2, 0, 1, 2, 3]]))
  first = run(x[:, :3], jnp.arange(3)[None])
  second = run(x[:, 3:], jnp.arange(4)[None])
  for got, a, b in zip(packed, first, second):  # numpy: eager jnp ops compile one by one
    np.testing.assert_allclose(got, np.concatenate([a, b], axis=1), rtol=1e-5, atol=1e-6)


def test_prefill_and_steps_equal_the_whole_sequence():
  """Right-padded prompts of different lengths, then one token per row: the conv_state gives the
  whole sequence's Q, K, V at every position."""
  x = _x((3, 7, D_MODEL), seed=3)
  p = _init(_layer(), x)
  full = jax.jit(lambda x: _layer().apply({'params': p}, x))(x)
  lengths = jnp.array([1, 4, 2])
  valid = jnp.arange(4)[None] < lengths[:, None]
  mask = valid[:, None, :, None] & valid[:, None, None, :]
  prompt = jnp.where(valid[..., None], x[:, :4], 99.0)  # padding junk must not matter

  def call(decode, cache, x, mask=None):
    return _layer(decode=decode).apply({'params': p, **cache}, x, mask, mutable=['cache'])

  _, cache = jax.jit(lambda x: call('init', {}, x))(prompt)
  assert cache['cache']['conv_state'].shape == (3, 2, S, D_MODEL // S)
  out, cache = jax.jit(lambda c, x, m: call('prefill', c, x, m))(cache, prompt, mask)
  # Slices and rows picked in numpy: eager jax indexing compiles a program per op and shape.
  full, lengths, x = [np.asarray(a) for a in full], np.asarray(lengths), np.asarray(x)
  for b in range(3):
    for got, ref in zip(out, full):
      np.testing.assert_allclose(np.asarray(got)[b, :lengths[b]], ref[b, :lengths[b]], rtol=1e-5,
                                 atol=1e-5)
  step = jax.jit(lambda c, x: call('step', c, x))
  rows, positions = np.arange(3), lengths
  for _ in range(3):
    out, cache = step(cache, x[rows, positions][:, None])
    for got, ref in zip(out, full):
      np.testing.assert_allclose(np.asarray(got)[:, 0], ref[rows, positions], rtol=1e-5,
                                 atol=1e-5)
    positions = positions + 1


def _attention_tree(mask=None, **kw):
  x = _x((2, 8, D_MODEL))
  layer = MultiHeadAttention(HEADS, HEAD_DIM, **kw)
  return jax.eval_shape(lambda: partitioning.unbox(layer.init(
      {'params': jax.random.key(0), 'lsh': jax.random.key(1)}, x, x, mask,
      q_positions=jnp.arange(8)[None], kv_positions=jnp.arange(8)[None])['params']))


def test_attention_trees_dense_unchanged_sparse_replaces_the_projections():
  assert set(_attention_tree(num_kv_heads=KV_HEADS)) == {'query', 'key', 'value', 'out'}
  sparse = _attention_tree(num_kv_heads=KV_HEADS, sparse_qkv=CONFIG, causal=True)
  assert set(sparse) == {'sparse_qkv', 'out'}
  assert set(sparse['sparse_qkv']) == {'multiplicative_d', 'multiplicative_e', 'query', 'key',
                                       'value'}
  assert sparse['sparse_qkv']['key'].shape == (3, 3, 2, KV_HEADS * HEAD_DIM // S)
  with pytest.raises(ValueError, match='cross-attention keeps the dense ones'):
    _attention_tree(sparse_qkv=CONFIG, cross_attention=True)


def test_sparse_attention_equals_attention_over_the_sparse_projections():
  """MultiHeadAttention with sparse_qkv is dense attention over SparseQkv's Q, K, V (checked by
  hand: causal softmax of q k^T / sqrt(d), grouped heads) and the 'out' projection."""
  x = _x((1, 5, D_MODEL), seed=4)
  layer = MultiHeadAttention(HEADS, HEAD_DIM, num_kv_heads=KV_HEADS, sparse_qkv=CONFIG,
                             causal=True, scale_logits=True)
  causal = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  p = _init(layer, x, x, causal)
  out = jax.jit(lambda p: layer.apply({'params': p}, x, x, causal))(p)
  q, k, v = (np.asarray(a[0], np.float64) for a in jax.jit(
      lambda p: _layer(causal=True).apply({'params': p}, x))(p['sparse_qkv']))
  heads = []
  for h in range(HEADS):
    logits = q[:, h] @ k[:, h // (HEADS // KV_HEADS)].T / np.sqrt(HEAD_DIM)
    logits = np.where(np.tril(np.ones((5, 5))) > 0, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((w / w.sum(-1, keepdims=True)) @ v[:, h // (HEADS // KV_HEADS)])
  ref = np.concatenate(heads, axis=-1) @ np.asarray(p['out']['kernel'])
  np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)


def test_lsh_layers_get_no_key_convolution():
  ids = jnp.ones((2, 8), jnp.int32)
  tree = _attention_tree(AttentionMask(None, ids, ids, causal=True), sparse_qkv=CONFIG,
                         causal=True, rotary=True,
                         lsh=LshConfig(num_hashes=1, chunk_length=4))
  assert set(tree['sparse_qkv']) == {'multiplicative_d', 'multiplicative_e', 'query', 'value'}


def test_bad_configurations_name_the_fix():
  with pytest.raises(ValueError, match='module_kernel must be odd'):
    SparseQkvConfig(module_kernel=2)
  with pytest.raises(ValueError, match='pick num_modules dividing it'):
    _layer().init(jax.random.key(0), _x((1, 3, 6)))  # d_model 6, 4 modules
  with pytest.raises(ValueError, match='odd length_kernel'):
    SparseQkv(SparseQkvConfig(num_modules=S, length_kernel=2), HEADS, HEAD_DIM, KV_HEADS,
              causal=False).init(jax.random.key(0), _x((1, 3, D_MODEL)))
