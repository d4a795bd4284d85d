"""Decode attention: the Pallas kernel (interpret mode on CPU) against jnp references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels import decode_attention as da
from efficientlm.kernels.reference import decode_attention_reference
from efficientlm.layers.attention import dot_product_attention
from tests.error_bounds import assert_within, attention_error_bounds

SLOTS = 37  # not a multiple of any block_k used here
LENGTHS = (1, SLOTS, 13, 16)  # one slot, the full cache, mid-block, a block boundary


def _inputs(heads, kv_heads, dtype=jnp.float32, slots=SLOTS, d=16, lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  b = len(lengths)
  q = jnp.asarray(rng.normal(size=(b, heads, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, slots, kv_heads, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, slots, kv_heads, d)), dtype)
  return q, k, v, jnp.asarray(lengths, jnp.int32)


def _bound(q, k, v, lengths, scale=None):
  """Rounding-error bound (`error_bounds`) of the output: one query row per sequence."""
  mask = (np.arange(k.shape[1])[None, :] < np.asarray(lengths)[:, None])[:, None, :]
  return attention_error_bounds(q[:, None], k, v, scale=1.0 if scale is None else scale,
                                mask=mask, bfloat16=q.dtype == jnp.bfloat16)['out'][:, 0]


def _masked_attention(q, k, v, lengths):
  """The model's XLA attention with an explicit [b, 1, 1, slots] mask, one query position."""
  mask = (jnp.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
  return dot_product_attention(q[:, None], k, v, mask=mask)[:, 0]


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (8, 2), (4, 1)], ids=['mha', 'gqa', 'mqa'])
@pytest.mark.parametrize('num_splits', [1, 3, 8])
def test_pallas_matches_reference_float32(heads, kv_heads, num_splits):
  q, k, v, lengths = _inputs(heads, kv_heads)
  out = da.decode_attention(q, k, v, lengths, implementation='pallas', block_k=8,
                            num_splits=num_splits)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_within(out, decode_attention_reference(q, k, v, lengths), _bound(q, k, v, lengths))


def test_reference_and_kernel_match_model_attention():
  q, k, v, lengths = _inputs(8, 2)
  expected = _masked_attention(q, k, v, lengths)
  bound = _bound(q, k, v, lengths)
  assert_within(decode_attention_reference(q, k, v, lengths), expected, bound, 'reference')
  out = da.decode_attention(q, k, v, lengths, implementation='pallas', block_k=16, num_splits=2)
  assert_within(out, expected, bound, 'pallas')


def test_scale_multiplies_logits():
  q, k, v, lengths = _inputs(4, 2)
  expected = _masked_attention(q * 0.25, k, v, lengths)
  for implementation in ('xla', 'pallas'):
    out = da.decode_attention(q, k, v, lengths, scale=0.25, implementation=implementation,
                              block_k=8, num_splits=2)
    assert_within(out, expected, _bound(q, k, v, lengths, scale=0.25), implementation)


def test_bfloat16_within_tolerance():
  # bf16 has 8 significant bits (unit roundoff 2**-8); the kernel rounds the softmax weights to
  # bf16 before the value product, as the XLA attention does, and both round the output.
  q, k, v, lengths = _inputs(8, 2, dtype=jnp.bfloat16)
  out = da.decode_attention(q, k, v, lengths, implementation='pallas', block_k=8, num_splits=3)
  assert out.dtype == jnp.bfloat16
  expected = decode_attention_reference(q, k, v, lengths)
  assert_within(out.astype(jnp.float32), expected.astype(jnp.float32), _bound(q, k, v, lengths))


def test_block_larger_than_cache_and_many_splits():
  q, k, v, lengths = _inputs(2, 1, slots=5, lengths=(5, 2, 1))
  out = da.decode_attention(q, k, v, lengths, implementation='pallas', block_k=16, num_splits=8)
  assert_within(out, decode_attention_reference(q, k, v, lengths), _bound(q, k, v, lengths))


def test_slots_past_length_are_never_read():
  # NaN beyond each length would poison the output if a masked slot leaked into the sums.
  q, k, v, lengths = _inputs(4, 2)
  past = jnp.arange(SLOTS)[None, :, None, None] >= lengths[:, None, None, None]
  k_nan, v_nan = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
  out = da.decode_attention(q, k_nan, v_nan, lengths, implementation='pallas', block_k=8,
                            num_splits=3)
  assert_within(out, decode_attention_reference(q, k, v, lengths), _bound(q, k, v, lengths))


def test_empty_sequence_gives_zeros():
  q, k, v, lengths = _inputs(4, 2, lengths=(0, 9))
  for implementation in ('xla', 'pallas'):
    out = da.decode_attention(q, k, v, lengths, implementation=implementation, block_k=8)
    np.testing.assert_array_equal(out[0], 0.0)
    assert_within(out[1], _masked_attention(q, k, v, lengths)[1], _bound(q, k, v, lengths)[1],
                  implementation)


def test_padded_query_rows_for_gpu():
  # On GPU the group is padded to 16 query rows (Triton's minimum dot size); check that path.
  q, k, v, lengths = _inputs(6, 2)
  out = da._decode_pallas(q, k, v, lengths, scale=None, block_k=16, num_splits=2, min_rows=16,
                          interpret=True)
  assert_within(out, decode_attention_reference(q, k, v, lengths), _bound(q, k, v, lengths))


def test_auto_under_jit_with_traced_lengths():
  q, k, v, lengths = _inputs(8, 2)
  fn = jax.jit(lambda q, k, v, n: da.decode_attention(q, k, v, n, implementation='pallas',
                                                      block_k=8, num_splits=2))
  assert_within(fn(q, k, v, lengths), da.decode_attention(q, k, v, lengths),
                _bound(q, k, v, lengths))


@pytest.mark.parametrize('change,match', [
    (dict(heads=6, kv_heads=4), 'not divisible'),
    (dict(q_dim=8), 'head_dim'),
    (dict(lengths=(3, 4)), 'lengths'),
    (dict(v_slots=10), 'differ in shape'),
    (dict(implementation='cudnn'), 'implementation'),
    (dict(block_k=0), 'positive'),
    (dict(dtype=jnp.float16), 'float32 or bfloat16'),
])
def test_bad_inputs_raise(change, match):
  heads, kv_heads = change.get('heads', 4), change.get('kv_heads', 2)
  dtype = change.get('dtype', jnp.float32)
  q, k, v, lengths = _inputs(heads, kv_heads, dtype=dtype)
  if 'q_dim' in change:
    q = q[..., :change['q_dim']]
  if 'lengths' in change:
    lengths = jnp.asarray(change['lengths'], jnp.int32)
  if 'v_slots' in change:
    v = v[:, :change['v_slots']]
  with pytest.raises(ValueError, match=match):
    da.decode_attention(q, k, v, lengths, implementation=change.get('implementation', 'pallas'),
                        block_k=change.get('block_k', 8))
