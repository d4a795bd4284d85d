"""Flash attention options against the reference: T5 relative-position bias and block sparsity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels.block_sparse import bigbird_block_mask, num_blocks
from efficientlm.kernels.flash_attention import RelativeBias, flash_attention
from efficientlm.kernels.flash_reference import attention_mask, flash_attention_reference
from efficientlm.layers.position import RelativePositionBias, relative_position_bucket
from tests.error_bounds import assert_within, attention_error_bounds


def _inputs(seed, batch, q_len, k_len, heads, kv_heads, depth, buckets=32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (batch, q_len, heads, depth))
  k = jax.random.normal(ks[1], (batch, k_len, kv_heads, depth))
  v = jax.random.normal(ks[2], (batch, k_len, kv_heads, depth))
  table = jax.random.normal(ks[3], (heads, buckets))
  q_seg = jnp.sort(jax.random.randint(ks[4], (batch, q_len), 0, 3), axis=1)[:, ::-1]
  kv_seg = jnp.sort(jax.random.randint(ks[5], (batch, k_len), 0, 3), axis=1)[:, ::-1]
  cotangent = jax.random.normal(ks[6], q.shape)
  return (q, k, v, table), (q_seg, kv_seg), cotangent


def _module_bias(table, q_len, k_len, num_buckets, max_distance, bidirectional):
  """[1, heads, q, k] from the model's own layer, with positions aligned bottom-right."""
  module = RelativePositionBias(table.shape[0], num_buckets, max_distance)
  q_pos = jnp.arange(q_len) + (k_len - q_len)
  return module.apply({'params': {'rel_embedding': table}}, q_pos, jnp.arange(k_len),
                      bidirectional)


def _buckets(q_len, k_len, num_buckets, max_distance, bidirectional):
  """[q_len, k_len] bucket of each pair, positions aligned bottom-right as in _module_bias."""
  q_pos = np.arange(q_len)[:, None] + (k_len - q_len)
  return np.asarray(relative_position_bucket(jnp.arange(k_len)[None, :] - q_pos, bidirectional,
                                             num_buckets, max_distance))


def _assert_close(fn, want_fn, args, cotangent, bounds):
  """Values and gradients w.r.t. every arg (q, k, v[, table]) of sum(fn(*args) * cotangent),
  within the float32 rounding bounds of `error_bounds.attention_error_bounds`."""
  def grads(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent),
                            argnums=tuple(range(len(args)))))(*args)
  got, want = (jax.jit(fn)(*args), *grads(fn)), (jax.jit(want_fn)(*args), *grads(want_fn))
  for name, g, w in zip(('out', 'dq', 'dk', 'dv', 'dtable'), got, want):
    assert g.shape == w.shape, name
    assert np.isfinite(np.asarray(g)).all(), name
    assert_within(g, w, bounds[name], name)
  return got[0]


# Lengths are no multiples of the 16-wide blocks; q_len != k_len both ways. max_distance 40
# makes the log buckets and the last (clipped) bucket all occur at these lengths.
@pytest.mark.parametrize('causal, bidirectional, q_len, k_len', [
    (False, True, 37, 54), (True, False, 50, 29), (True, True, 45, 45)])
def test_relative_bias_matches_reference(causal, bidirectional, q_len, k_len):
  buckets, max_distance = 16, 40
  args, seg, ct = _inputs(0, 2, q_len, k_len, 8, 2, 16, buckets)

  def kernel(q, k, v, table):
    rb = RelativeBias(table, buckets, max_distance, bidirectional)
    return flash_attention(q, k, v, causal=causal, scale=0.3, implementation='pallas',
                           block_q=16, block_k=16, relative_bias=rb, segment_ids=seg)

  def reference(q, k, v, table):
    bias = _module_bias(table, q_len, k_len, buckets, max_distance, bidirectional)
    return flash_attention_reference(q, k, v, causal=causal, scale=0.3, bias=bias,
                                     q_segment_ids=seg[0], kv_segment_ids=seg[1])

  q, k, v, table = args
  bounds = attention_error_bounds(
      q, k, v, ct, scale=0.3, mask=attention_mask(q_len, k_len, causal=causal,
                                                  q_segment_ids=seg[0], kv_segment_ids=seg[1]),
      bias=_module_bias(table, q_len, k_len, buckets, max_distance, bidirectional),
      bias_buckets=_buckets(q_len, k_len, buckets, max_distance, bidirectional),
      num_buckets=buckets)
  _assert_close(kernel, reference, args, ct, bounds)


def test_relative_bias_xla_path_and_jit_pytree():
  # 'xla' materializes the same bias; RelativeBias passes through jit with the table as leaf.
  (q, k, v, table), _, _ = _inputs(1, 1, 20, 24, 4, 4, 16)
  fn = jax.jit(lambda rb: flash_attention(q, k, v, relative_bias=rb, implementation='xla'))
  got = fn(RelativeBias(table, 32, 128, False))
  bias = _module_bias(table, 20, 24, 32, 128, False)
  want = flash_attention_reference(q, k, v, bias=bias)
  assert_within(got, want, attention_error_bounds(q, k, v, bias=bias)['out'])


def test_relative_bias_bad_table_raises():
  q = jnp.zeros((1, 8, 4, 16))
  with pytest.raises(ValueError, match='heads=4, num_buckets=32'):
    flash_attention(q, q, q, relative_bias=RelativeBias(jnp.zeros((2, 32))))


def _token_mask(block_mask, q_len, k_len, block_q, block_k):
  """The block mask at token level, built independently of `block_sparse.expand_block_mask`."""
  rows = np.arange(q_len)[:, None] // block_q
  cols = np.arange(k_len)[None, :] // block_k
  return jnp.asarray(np.asarray(block_mask)[rows, cols])[None]


def _sparse_pair(block_mask, causal, seg, block_q=16, block_k=16, **kwargs):
  def kernel(q, k, v):
    return flash_attention(q, k, v, causal=causal, segment_ids=seg, implementation='pallas',
                           block_q=block_q, block_k=block_k, block_mask=block_mask, **kwargs)

  def reference(q, k, v):
    mask = _token_mask(block_mask, q.shape[1], k.shape[1], block_q, block_k)
    q_seg, kv_seg = (None, None) if seg is None else seg
    return flash_attention_reference(q, k, v, causal=causal, mask=mask, q_segment_ids=q_seg,
                                     kv_segment_ids=kv_seg, scale=kwargs.get('scale', 1.0))

  def bounds(q, k, v, cotangent):
    mask = _token_mask(block_mask, q.shape[1], k.shape[1], block_q, block_k)
    q_seg, kv_seg = (None, None) if seg is None else seg
    structural = attention_mask(q.shape[1], k.shape[1], causal=causal, q_segment_ids=q_seg,
                                kv_segment_ids=kv_seg)
    mask = mask if structural is None else jnp.logical_and(mask, structural)
    return attention_error_bounds(q, k, v, cotangent, scale=kwargs.get('scale', 1.0), mask=mask)

  return kernel, reference, bounds


def test_bigbird_block_mask_pattern():
  mask = bigbird_block_mask(8, 8, window_blocks=1, num_global=2, num_random=2, seed=3)
  assert mask.dtype == bool and mask.shape == (8, 8)
  assert mask[:2].all() and mask[:, :2].all()  # global rows and columns
  for i in range(8):
    for j in range(8):
      if abs(i - j) <= 1:
        assert mask[i, j]
  # Rows 2..6 have 3 band + 2 global blocks (row 7: 2 band) and exactly 2 random ones more.
  band_and_global = np.array([(np.abs(i - np.arange(8)) <= 1) | (np.arange(8) < 2)
                              for i in range(2, 8)])
  np.testing.assert_array_equal((mask[2:] & ~band_and_global).sum(1), 2)
  np.testing.assert_array_equal(mask, bigbird_block_mask(8, 8, window_blocks=1, num_global=2,
                                                         num_random=2, seed=3))
  assert (mask != bigbird_block_mask(8, 8, window_blocks=1, num_global=2, num_random=2,
                                     seed=4)).any()


# GQA, lengths no multiple of the blocks (the mask has a partial last row and column).
@pytest.mark.parametrize('causal, segmented', [(False, False), (True, True)])
def test_block_sparse_matches_reference(causal, segmented):
  args, seg, ct = _inputs(2, 2, 100, 90, 4, 2, 16)
  block_mask = bigbird_block_mask(num_blocks(100, 16), num_blocks(90, 32), window_blocks=0,
                                  num_global=1, num_random=1, seed=1)
  kernel, reference, bounds = _sparse_pair(block_mask, causal, seg if segmented else None,
                                           block_k=32, scale=0.3)
  _assert_close(kernel, reference, args[:3], ct, bounds(*args[:3], ct))


def test_block_sparse_empty_row_outputs_zero_and_skips_loads():
  # Query block 1 reads nothing; key block 2 is read by nobody and holds NaN values, which a
  # kernel that masked its logits instead of skipping the block would spread via 0 * NaN.
  (q, k, v, _), _, ct = _inputs(3, 1, 48, 48, 4, 4, 16)
  block_mask = np.ones((3, 3), bool)
  block_mask[1] = False
  block_mask[:, 2] = False
  kernel, reference, bounds = _sparse_pair(block_mask, False, None)
  out = _assert_close(kernel, reference, (q, k, v), ct, bounds(q, k, v, ct))
  np.testing.assert_array_equal(np.asarray(out[:, 16:32]), 0.0)
  poisoned = v.at[:, 32:].set(jnp.nan)
  got = jax.jit(kernel)(q, k, poisoned)
  # The same program on the same values read: bitwise equal.
  np.testing.assert_array_equal(np.asarray(got), np.asarray(out))
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * ct), argnums=(0, 1)))(
      q, k, poisoned)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_block_sparse_with_relative_bias_and_xla_path():
  (q, k, v, table), seg, _ = _inputs(4, 1, 40, 40, 4, 4, 16)
  block_mask = bigbird_block_mask(3, 3, window_blocks=0, num_global=1, num_random=0)
  rb = RelativeBias(table, 32, 128, True)
  got = flash_attention(q, k, v, relative_bias=rb, block_mask=block_mask, block_q=16,
                        block_k=16, implementation='pallas')
  xla = flash_attention(q, k, v, relative_bias=rb, block_mask=block_mask, block_q=16,
                        block_k=16, implementation='xla')
  bias, mask = _module_bias(table, 40, 40, 32, 128, True), _token_mask(block_mask, 40, 40, 16, 16)
  want = flash_attention_reference(q, k, v, bias=bias, mask=mask)
  bound = attention_error_bounds(q, k, v, bias=bias, mask=mask)['out']
  assert_within(got, want, bound, 'pallas')
  assert_within(xla, want, bound, 'xla')


def test_block_mask_of_other_block_size_raises():
  q = jnp.zeros((1, 100, 4, 16))
  with pytest.raises(ValueError, match=r'need \(2, 2\)'):
    flash_attention(q, q, q, block_mask=np.ones((7, 7), bool), block_q=64, block_k=64)
