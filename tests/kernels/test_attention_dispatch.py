"""The attention dispatcher: implementations agree on valid rows, refusals are explicit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels import attention as dispatch
from efficientlm.kernels.flash_attention import RelativeBias
from efficientlm.layers import masks
from efficientlm.layers.attention import (dot_product_attention, padding_segment_ids,
                                          segment_ids_from_block_mask)
from efficientlm.layers.position import RelativePositionBias
from tests.error_bounds import assert_within, attention_error_bounds

HEADS = {'mha': (4, 4), 'gqa': (4, 2), 'mqa': (4, 1)}


def _qkv(seed, batch=2, q_len=12, k_len=12, heads=4, kv_heads=2, depth=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (batch, q_len, heads, depth)).astype(dtype)
  k = jax.random.normal(ks[1], (batch, k_len, kv_heads, depth)).astype(dtype)
  v = jax.random.normal(ks[2], (batch, k_len, kv_heads, depth)).astype(dtype)
  return q, k, v


def _packed(batch, length):
  """Packed segment ids 1, 2 with right padding (0), and its validity."""
  seg = np.zeros((batch, length), np.int32)
  seg[0, :5], seg[0, 5:10] = 1, 2
  seg[1, :length - 1] = 1  # one padding position
  return jnp.asarray(seg), jnp.asarray(seg > 0)


@pytest.mark.parametrize('heads', sorted(HEADS))
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('packed', [False, True])
def test_pallas_equals_dense_xla_on_valid_rows(heads, causal, packed):
  """The flash kernel given the structure equals the models' dense-mask XLA attention."""
  num_heads, kv_heads = HEADS[heads]
  q, k, v = _qkv(0, heads=num_heads, kv_heads=kv_heads)
  seg, valid = _packed(2, 12)
  if not packed:
    seg, valid = None, jnp.ones((2, 12), bool)
  index = jnp.broadcast_to(jnp.arange(12), (2, 12))
  dense = masks.combine_masks(masks.make_attention_mask(valid, valid),
                              None if seg is None else masks.make_segment_mask(seg, seg),
                              masks.make_causal_mask(index, index) if causal else None)
  want = dot_product_attention(q, k, v, mask=dense)
  ids = padding_segment_ids(valid, seg)
  got = dispatch.attention(q, k, v, implementation='pallas', causal=causal, segment_ids=ids)
  rows = np.asarray(valid)
  bound = attention_error_bounds(q, k, v, mask=dense[:, 0])['out']
  assert_within(np.asarray(got)[rows], np.asarray(want)[rows], bound[rows])


def test_cross_attention_structure_from_block_mask_matches_dense():
  q, k, v = _qkv(1, q_len=6, k_len=10)
  dec_seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  enc_seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [1] * 7 + [0] * 3])
  dense = masks.combine_masks(masks.make_attention_mask(dec_seg > 0, enc_seg > 0),
                              masks.make_segment_mask(dec_seg, enc_seg))
  q_ids, kv_ids = segment_ids_from_block_mask(dense)
  np.testing.assert_array_equal(q_ids[:, :, None] == kv_ids[:, None, :], dense[:, 0])
  want = dot_product_attention(q, k, v, mask=dense)
  got = dispatch.attention(q, k, v, implementation='pallas', segment_ids=(q_ids, kv_ids))
  rows = np.asarray(dec_seg > 0)
  bound = attention_error_bounds(q, k, v, mask=dense[:, 0])['out']
  assert_within(np.asarray(got)[rows], np.asarray(want)[rows], bound[rows])
  assert np.all(np.asarray(got)[0, 5] == 0)  # a row reading no key: flash gives 0


def test_padding_segment_ids_are_exact_on_valid_rows():
  seg, valid = _packed(2, 12)
  ids = padding_segment_ids(valid, seg)
  allowed = ids[:, :, None] == ids[:, None, :]
  dense = masks.combine_masks(masks.make_attention_mask(valid, valid),
                              masks.make_segment_mask(seg, seg))[:, 0]
  np.testing.assert_array_equal(np.asarray(allowed)[np.asarray(valid)],
                                np.asarray(dense)[np.asarray(valid)])


@pytest.mark.parametrize('bidirectional,causal', [(True, False), (False, True)])
def test_relative_bias_table_equals_the_models_dense_bias(bidirectional, causal):
  q, k, v = _qkv(2, heads=4, kv_heads=4)
  table = jax.random.normal(jax.random.key(3), (4, 32))
  pos = jnp.arange(12)[None]
  bias = RelativePositionBias(4).apply({'params': {'rel_embedding': table}}, pos, pos,
                                       bidirectional)
  want = dispatch.attention(q, k, v, causal=causal, bias=bias)
  rb = RelativeBias(table, 32, 128, bidirectional)
  np.testing.assert_array_equal(dispatch.attention(q, k, v, causal=causal, bias=rb), want)
  got = dispatch.attention(q, k, v, implementation='pallas', causal=causal, bias=rb)
  mask = masks.make_causal_mask(pos, pos)[:, 0] if causal else None
  assert_within(got, want, attention_error_bounds(q, k, v, mask=mask, bias=bias)['out'])


def test_xla_with_a_dense_mask_alone_is_dot_product_attention_bitwise():
  q, k, v = _qkv(4)
  seg, valid = _packed(2, 12)
  dense = masks.combine_masks(masks.make_attention_mask(valid, valid),
                              masks.make_segment_mask(seg, seg))
  bias = jax.random.normal(jax.random.key(5), (1, 4, 12, 12))
  np.testing.assert_array_equal(dispatch.attention(q, k, v, mask=dense, bias=bias),
                                dot_product_attention(q, k, v, mask=dense, bias=bias))


@pytest.mark.parametrize('kwargs,reason', [
    (dict(bias=jnp.zeros((1, 4, 12, 12))), 'relative position bias'),
    (dict(mask=jnp.ones((1, 1, 12, 12), bool)), 'dense attention mask'),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), 'dropout'),
])
def test_explicit_pallas_refuses_what_the_kernel_cannot_apply(kwargs, reason):
  q, k, v = _qkv(6)
  with pytest.raises(ValueError, match=reason):
    dispatch.attention(q, k, v, implementation='pallas', **kwargs)
  # 'auto' runs them (on xla) instead.
  assert dispatch.attention(q, k, v, implementation='auto', **kwargs).shape == q.shape


def test_cudnn_off_gpu_and_unknown_names_raise():
  q, k, v = _qkv(7, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match='cuDNN attention needs a GPU'):
    dispatch.attention(q, k, v, implementation='cudnn', causal=True)
  with pytest.raises(ValueError, match='choose from'):
    dispatch.attention(q, k, v, implementation='flash')


def test_auto_is_xla_on_cpu_and_pallas_on_gpu_where_it_applies(monkeypatch):
  q, k, v = _qkv(8)
  assert jax.default_backend() == 'cpu'
  assert dispatch.select_implementation('auto', q) == 'xla'
  np.testing.assert_array_equal(dispatch.attention(q, k, v, implementation='auto', causal=True),
                                dispatch.attention(q, k, v, implementation='xla', causal=True))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert dispatch.select_implementation('auto', q) == 'pallas'
  assert dispatch.select_implementation('auto', q, bias=jnp.zeros((1, 4, 12, 12))) == 'xla'
  assert dispatch.select_implementation('auto', q, mask=jnp.ones((1, 1, 12, 12), bool)) == 'xla'
  with pytest.raises(ValueError, match='float16 or bfloat16'):
    dispatch.select_implementation('cudnn', q)  # float32
  assert dispatch.select_implementation('cudnn', q.astype(jnp.bfloat16)) == 'cudnn'


def test_pallas_gradients_match_xla_on_valid_rows():
  q, k, v = _qkv(9, heads=4, kv_heads=1)
  seg, valid = _packed(2, 12)
  ids = padding_segment_ids(valid, seg)
  # The loss ignores padding rows: their output cotangent is 0.
  cotangent = jax.random.normal(jax.random.key(10), q.shape) * valid[:, :, None, None]

  def loss(impl, q, k, v):
    out = dispatch.attention(q, k, v, implementation=impl, causal=True, segment_ids=ids)
    return jnp.sum(out * cotangent)

  got = jax.jit(jax.grad(lambda *a: loss('pallas', *a), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *a: loss('xla', *a), argnums=(0, 1, 2)))(q, k, v)
  index = jnp.arange(12)[None]
  mask = (ids[:, :, None] == ids[:, None, :]) & (index[:, None, :] <= index[:, :, None])
  bounds = attention_error_bounds(q, k, v, cotangent, mask=mask)
  for name, g, w in zip(('dq', 'dk', 'dv'), got, want):
    assert_within(g, w, bounds[name], name)
