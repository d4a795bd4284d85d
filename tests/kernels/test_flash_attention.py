"""Flash attention Pallas kernels (interpret mode on CPU) against the plain-jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels.flash_attention import flash_attention
from efficientlm.kernels.flash_reference import attention_mask, flash_attention_reference
from efficientlm.layers import masks
from efficientlm.layers.attention import dot_product_attention
from tests.error_bounds import assert_within, attention_error_bounds

HEADS = {'mha': (4, 4), 'gqa': (8, 2), 'mqa': (8, 1)}


def _inputs(seed, batch, q_len, k_len, heads, kv_heads, depth, dtype=jnp.float32, segments=3):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (batch, q_len, heads, depth), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (batch, k_len, kv_heads, depth), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (batch, k_len, kv_heads, depth), jnp.float32).astype(dtype)
  # Sorted ids, like packed sequences, with the last segment id 0 (padding) on the right.
  q_seg = jnp.sort(jax.random.randint(ks[3], (batch, q_len), 0, segments), axis=1)[:, ::-1]
  kv_seg = jnp.sort(jax.random.randint(ks[4], (batch, k_len), 0, segments), axis=1)[:, ::-1]
  cotangent = jax.random.normal(ks[5], q.shape, jnp.float32).astype(dtype)
  return q, k, v, (q_seg, kv_seg), cotangent


def _value_and_grads(fn, q, k, v, cotangent):
  """Output and (dq, dk, dv) of sum(fn(q, k, v) * cotangent), jitted."""
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))
  out = jax.jit(fn)(q, k, v)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _compare(q, k, v, cotangent, **kwargs):
  """Kernel vs float32 reference on the same input values, values and gradients, within the
  rounding-error bound of `error_bounds` (with the kernel's bfloat16 roundings for bf16 input)."""
  seg = kwargs.pop('segment_ids', None)
  block_q, block_k = kwargs.pop('block_q', 16), kwargs.pop('block_k', 16)
  q_seg, kv_seg = (None, None) if seg is None else seg

  def kernel(q, k, v):
    return flash_attention(q, k, v, segment_ids=seg, implementation='pallas', block_q=block_q,
                           block_k=block_k, **kwargs)

  def reference(q, k, v):
    return flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), q_segment_ids=q_seg,
                                     kv_segment_ids=kv_seg, **kwargs)

  out, grads = _value_and_grads(kernel, q, k, v, cotangent)
  want_out, want_grads = _value_and_grads(reference, q, k, v, cotangent)
  assert out.shape == q.shape and out.dtype == q.dtype
  mask = attention_mask(q.shape[1], k.shape[1], causal=kwargs.get('causal', False),
                        q_segment_ids=q_seg, kv_segment_ids=kv_seg, window=kwargs.get('window'))
  bounds = attention_error_bounds(q, k, v, cotangent, scale=kwargs.get('scale', 1.0), mask=mask,
                                  bfloat16=q.dtype == jnp.bfloat16)
  for name, got, want in zip(('out', 'dq', 'dk', 'dv'), (out, *grads), (want_out, *want_grads)):
    assert got.shape == want.shape, name
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all(), name
    assert_within(got, want, bounds[name], name)
  return out


# Lengths are no multiples of the 16-wide blocks, and q_len != k_len both ways. The cases cover
# every pair of option values (each head layout causal and not, segmented and not; all four
# causal x segmented combinations), not the full product: each case compiles the kernels anew.
@pytest.mark.parametrize('heads, causal, segmented', [
    ('mha', False, False), ('mha', True, True), ('gqa', True, False), ('gqa', False, True),
    ('mqa', False, False), ('mqa', True, True)])
def test_float32_matches_reference(heads, causal, segmented):
  q_len, k_len = (37, 54) if segmented else (50, 29)  # offsets 17, -21
  q, k, v, seg, ct = _inputs(0, 2, q_len, k_len, *HEADS[heads], 16)
  _compare(q, k, v, ct, causal=causal, scale=0.3,
           segment_ids=seg if segmented else None)


@pytest.mark.parametrize('heads', ['gqa', 'mqa'])
def test_bfloat16_matches_reference(heads):
  # bf16 inputs, float32 reference on the same (rounded) inputs. The kernel rounds P and dS to
  # bf16 before its matmuls (as FlashAttention does): the bound counts those roundings.
  q, k, v, seg, ct = _inputs(1, 2, 45, 45, *HEADS[heads], 32, dtype=jnp.bfloat16)
  _compare(q, k, v, ct, causal=True, scale=32**-0.5, segment_ids=seg,
           block_q=32, block_k=16)


def test_rows_without_keys_output_zero():
  # Causal with q_len > k_len (bottom-right aligned): the first 24 queries see no key.
  q, k, v, _, ct = _inputs(2, 1, 40, 16, 4, 2, 16)
  out = _compare(q, k, v, ct, causal=True)
  np.testing.assert_array_equal(np.asarray(out[:, :24]), 0.0)
  assert np.abs(np.asarray(out[:, 24:])).min() > 0


def test_head_dim_padding_and_one_block():
  # head_dim 24 is padded to 32; lengths shorter than one 64-wide default block.
  q, k, v, seg, ct = _inputs(3, 2, 20, 30, 4, 2, 24)
  _compare(q, k, v, ct, segment_ids=seg, block_q=64, block_k=64)


@pytest.mark.parametrize('causal', [False, True])
def test_sliding_window(causal):
  q, k, v, seg, ct = _inputs(4, 2, 48, 64, 4, 2, 16)
  _compare(q, k, v, ct, causal=causal, window=20, segment_ids=seg,
           scale=0.5)


def test_reference_matches_dot_product_attention():
  # Independent masks from layers.masks; dot_product_attention's finite MASK_VALUE averages
  # fully masked rows uniformly where the reference outputs 0, so compare only rows with keys.
  # q_len > k_len: under bottom-right alignment the first 8 queries precede every key.
  q, k, v, seg, _ = _inputs(5, 2, 40, 32, 8, 2, 16)
  q_pos = jnp.broadcast_to(jnp.arange(40) - 8, (2, 40))
  k_pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
  mask = masks.combine_masks(masks.make_causal_mask(q_pos, k_pos),
                             masks.make_segment_mask(*seg))
  want = dot_product_attention(q, k, v, mask=mask)
  got = flash_attention_reference(q, k, v, causal=True, q_segment_ids=seg[0],
                                  kv_segment_ids=seg[1])
  np.testing.assert_array_equal(
      np.asarray(attention_mask(40, 32, causal=True, q_segment_ids=seg[0],
                                kv_segment_ids=seg[1])), np.asarray(mask[:, 0]))
  has_keys = np.asarray(mask[:, 0].any(-1))  # [b, q]
  assert has_keys.any() and not has_keys.all()  # the test covers both kinds of rows
  bound = attention_error_bounds(q, k, v, mask=mask[:, 0])['out']
  assert_within(np.asarray(got)[has_keys], np.asarray(want)[has_keys], bound[has_keys])
  np.testing.assert_array_equal(np.asarray(got)[~has_keys], 0.0)


def test_auto_is_xla_on_cpu():
  q, k, v, seg, _ = _inputs(6, 1, 16, 16, 2, 2, 16)
  got = flash_attention(q, k, v, causal=True, segment_ids=seg[0] * 0 + 1)
  want = flash_attention_reference(q, k, v, causal=True)
  mask = attention_mask(16, 16, causal=True)
  assert_within(got, want, attention_error_bounds(q, k, v, mask=mask)['out'])


@pytest.mark.parametrize('shapes, kwargs, message', [
    (((1, 8, 6, 16), (1, 8, 4, 16)), {}, 'not divisible'),
    (((1, 8, 4, 16), (1, 8, 2, 32)), {}, 'Head dim mismatch'),
    (((1, 8, 4, 16), (1, 8, 2, 16)), {'segment_ids': (jnp.zeros((1, 9)), jnp.zeros((1, 8)))},
     'segment ids'),
    (((1, 8, 4, 16), (1, 8, 2, 16)), {'block_q': 24}, 'power of 2'),
    (((1, 8, 4, 16), (1, 8, 2, 16)), {'implementation': 'triton'}, 'choose from'),
])
def test_bad_input_raises(shapes, kwargs, message):
  q_shape, kv_shape = shapes
  with pytest.raises(ValueError, match=message):
    flash_attention(jnp.zeros(q_shape), jnp.zeros(kv_shape), jnp.zeros(kv_shape), **kwargs)


def test_grouped_kv_heads_are_read_by_group_not_wrapped():
  """Query head h must read KV head h // group. jax's Pallas GPU `mha` indexes KV blocks by the
  query head, which for grouped input reads past the KV heads (its output on this input is off
  by ~4 in interpret mode, jax 0.10.2). The two plausible wrong mappings, h % kv_heads (tiling)
  and h itself, give different answers on this input, so matching the reference rules them out.
  """
  q, k, v, _, cotangent = _inputs(7, 1, 40, 40, 6, 3, 16)
  want = flash_attention_reference(q, k, v, causal=True)
  wrapped = flash_attention_reference(q, jnp.tile(k, (1, 1, 2, 1)), jnp.tile(v, (1, 1, 2, 1)),
                                      causal=True)
  assert np.abs(np.asarray(wrapped - want)).max() > 0.1  # the input tells the mappings apart
  out = _compare(q, k, v, cotangent, causal=True)
  assert_within(out, want, attention_error_bounds(q, k, v, mask=attention_mask(
      40, 40, causal=True))['out'])
