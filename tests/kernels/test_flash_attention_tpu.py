"""Mosaic (TPU) flash attention kernels, checked without a TPU.

1. TPU interpret mode (CPU): values and gradients (dq, dk, dv, d table) of
   flash_attention(implementation='pallas', target='mosaic') against the XLA path on float32
   copies of the inputs. The options (causal, segment ids, MHA/GQA/MQA, window, block
   sparsity, relative bias, dtype, q_len vs k_len) are covered pairwise by a few cases, not by
   the full cross product: interpret mode runs every grid step on the host and is slow.
2. Cross-lowering to Mosaic for 'tpu' (forward and jax.grad) at real tile sizes, which applies
   the Pallas TPU block-shape rules and op lowering rules (not Mosaic's own compiler passes,
   which need libtpu: those, and speed, are only checked on a TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels.block_sparse import (bigbird_block_mask, expand_block_mask,
                                              num_blocks)
from efficientlm.kernels.flash_attention import RelativeBias, flash_attention
from efficientlm.kernels.flash_attention_fwd import Config
from efficientlm.kernels.flash_attention_tpu_fwd import fetch_table, flash_forward_tpu, k_step
from efficientlm.kernels.flash_reference import attention_mask, relative_bias
from efficientlm.layers.position import relative_position_bucket
from tests.error_bounds import assert_within, attention_error_bounds



def _inputs(seed, q_len, k_len, heads, kv_heads, depth, dtype=jnp.float32, buckets=32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (1, q_len, heads, depth)).astype(dtype)
  k = jax.random.normal(ks[1], (1, k_len, kv_heads, depth)).astype(dtype)
  v = jax.random.normal(ks[2], (1, k_len, kv_heads, depth)).astype(dtype)
  table = jax.random.normal(ks[3], (heads, buckets))
  # Sorted ids, like packed sequences, with the last segment id 0 (padding) on the right.
  q_seg = jnp.sort(jax.random.randint(ks[4], (1, q_len), 0, 3), axis=1)[:, ::-1]
  kv_seg = jnp.sort(jax.random.randint(ks[5], (1, k_len), 0, 3), axis=1)[:, ::-1]
  cotangent = jax.random.normal(ks[6], q.shape)
  return (q, k, v, table), (q_seg, kv_seg), cotangent


def _attention(implementation, bias=None, **kwargs):
  """fn(q, k, v, table) through the entry; bias: None or (num_buckets, max_distance, bidir)."""
  def fn(q, k, v, table):
    rb = None if bias is None else RelativeBias(table, *bias)
    return flash_attention(q, k, v, implementation=implementation, target='mosaic',
                           relative_bias=rb, **kwargs)
  return fn


def _value_and_grads(fn, args, cotangent):
  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return (jax.jit(fn)(*args), *jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args))


def _bounds(args, cotangent, *, causal=False, window=None, scale=None, segment_ids=None,
                bias=None, block_mask=None, block_q=None, block_k=None):
  """The rounding-error bounds (`error_bounds`) of these inputs and options."""
  q, k, v, table = args
  q_len, k_len = q.shape[1], k.shape[1]
  q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
  mask = attention_mask(q_len, k_len, causal=causal, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg, window=window)
  if block_mask is not None:
    sparse = expand_block_mask(block_mask, q_len, k_len, block_q, block_k)[None]
    mask = sparse if mask is None else jnp.logical_and(mask, sparse)
  extra = {}
  if bias is not None:
    num_buckets, max_distance, bidirectional = bias
    q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
    extra = dict(
        bias=relative_bias(table, q_len, k_len, num_buckets=num_buckets,
                           max_distance=max_distance, bidirectional=bidirectional),
        bias_buckets=relative_position_bucket(jnp.arange(k_len)[None, :] - q_pos, bidirectional,
                                              num_buckets, max_distance),
        num_buckets=num_buckets)
  return attention_error_bounds(q, k, v, cotangent, scale=1.0 if scale is None else scale,
                                mask=mask, bfloat16=q.dtype == jnp.bfloat16, **extra)


def _compare(args, cotangent, **kwargs):
  """Kernel vs XLA path (float32 copies of the inputs): out, dq, dk, dv, dtable, within the
  rounding-error bound (with the kernel's bfloat16 roundings for bfloat16 inputs: the kernels
  round P and dS to bfloat16 before their matmuls, as FlashAttention does)."""
  got = _value_and_grads(_attention('pallas', **kwargs), args, cotangent)
  f32_args = tuple(a.astype(jnp.float32) for a in args)
  want = _value_and_grads(_attention('xla', **kwargs), f32_args, cotangent)
  bounds = _bounds(args, cotangent, **kwargs)
  assert got[0].shape == args[0].shape and got[0].dtype == args[0].dtype
  for name, g, w, a in zip(('out', 'dq', 'dk', 'dv', 'dtable'), got, want, (args[0], *args)):
    assert g.shape == a.shape and g.dtype == a.dtype, name
    g = np.asarray(g.astype(jnp.float32))
    assert np.isfinite(g).all(), name
    if name != 'dtable' or kwargs.get('bias') is not None:
      assert_within(g, w, bounds[name], name)
    else:  # no bias: the table does not enter, its gradient is 0
      np.testing.assert_array_equal(g, 0.0)
      np.testing.assert_array_equal(np.asarray(w), 0.0)
  return got


# Each case combines several options; together they cover every option with each other one.
# Lengths are no multiples of the blocks (block_q 64, block_k 128), q_len != k_len both ways.
CASES = {
    # name: (q_len, k_len, heads, kv_heads, kwargs)
    'mha_causal_segments': (200, 300, 2, 2, dict(causal=True, segments=True)),
    'gqa_window_segments': (300, 200, 4, 2, dict(window=70, segments=True, scale=0.3)),
    'gqa_causal_window_bias': (250, 250, 4, 2, dict(causal=True, window=90,
                                                    bias=(32, 128, True))),
    'mqa_sparse_segments_bias': (260, 260, 4, 1, dict(sparse=True, segments=True,
                                                      bias=(16, 40, True))),
    'mha_causal_sparse_window': (256, 256, 2, 2, dict(causal=True, sparse=True, window=150)),
}


def _kwargs(opts, seg, q_len, k_len, block_q=64, block_k=128):
  opts = dict(opts)
  kwargs = dict(block_q=block_q, block_k=block_k, causal=opts.pop('causal', False),
                window=opts.pop('window', None), scale=opts.pop('scale', 0.25),
                bias=opts.pop('bias', None))
  if opts.pop('segments', False):
    kwargs['segment_ids'] = seg
  if opts.pop('sparse', False):
    kwargs['block_mask'] = bigbird_block_mask(num_blocks(q_len, block_q),
                                              num_blocks(k_len, block_k), window_blocks=0,
                                              num_global=1, num_random=1, seed=2)
  assert not opts, opts
  return kwargs


@pytest.mark.parametrize('name', sorted(CASES))
def test_float32_matches_xla(name):
  q_len, k_len, heads, kv_heads, opts = CASES[name]
  buckets = opts['bias'][0] if 'bias' in opts else 32
  args, seg, ct = _inputs(0, q_len, k_len, heads, kv_heads, 16, buckets=buckets)
  _compare(args, ct, **_kwargs(opts, seg, q_len, k_len))


@pytest.mark.parametrize('heads, kv_heads, opts', [
    (4, 2, dict(causal=True, segments=True, window=100, bias=(32, 128, False))),
    (4, 1, dict(sparse=True, segments=True, scale=32**-0.5)),
])
def test_bfloat16_matches_xla(heads, kv_heads, opts):
  args, seg, ct = _inputs(1, 190, 230, heads, kv_heads, 32, dtype=jnp.bfloat16)
  _compare(args, ct, **_kwargs(opts, seg, 190, 230))


def test_rows_without_keys_and_causal_bias_mqa():
  # Causal with q_len > k_len (bottom-right aligned): the first 170 queries see no key; they
  # output 0 with zero gradients. One-directional (causal) relative bias, MQA. Scale d**-0.5:
  # unscaled, these logits reach +-30, the softmax is nearly one-hot (a leaked key would hardly
  # show) and the rounding error, which grows with the logits, is 4x larger.
  args, _, ct = _inputs(2, 300, 130, 4, 1, 16)
  out, dq, *_ = _compare(args, ct, causal=True, block_q=64, block_k=128, bias=(32, 128, False),
                         scale=0.25)
  np.testing.assert_array_equal(np.asarray(out[:, :170]), 0.0)
  np.testing.assert_array_equal(np.asarray(dq[:, :170]), 0.0)
  assert np.abs(np.asarray(out[:, 170:])).min() > 0


def test_default_blocks_single_key_block_and_head_dim_padding():
  # Default tiles (128, 128) clipped to the lengths: k_len 50 is one 64-wide key block (legal
  # for Mosaic as it spans the whole padded array); head_dim 24 is padded to 32.
  args, seg, ct = _inputs(3, 70, 50, 4, 2, 24)
  _compare(args, ct, segment_ids=seg, scale=0.3, bias=(32, 128, True))


@pytest.mark.slow
def test_block_sparse_skips_blocks():
  # Query block 1 reads nothing (outputs 0); key block 1 is read by nobody and holds NaN, which
  # a kernel that masked instead of skipping would spread via 0 * NaN.
  (q, k, v, table), _, ct = _inputs(4, 256, 256, 2, 2, 16)
  block_mask = np.ones((4, 2), bool)
  block_mask[1] = False
  block_mask[:, 1] = False
  fn = _attention('pallas', block_q=64, block_k=128, block_mask=block_mask)
  out, *_ = _compare((q, k, v, table), ct, block_q=64, block_k=128, block_mask=block_mask)
  np.testing.assert_array_equal(np.asarray(out[:, 64:128]), 0.0)
  poisoned = v.at[:, 128:].set(jnp.nan)
  # The same program on the same values read: bitwise equal.
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(q, k, poisoned, table)), np.asarray(out))
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, table) * ct), argnums=(0, 1)))(
      q, k, poisoned)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_skipped_steps_fetch_an_already_fetched_block():
  # Causal/window: a hidden step's K/V index is clamped into the visible key blocks, so the
  # block index repeats and the pipeline issues no new DMA.
  cfg = Config(scale=1.0, causal=True, window=100, q_len=512, k_len=512, block_q=128,
               block_k=128, interpret=True, target='mosaic')
  steps = [[k_step(cfg, i, j, 4, None) for j in range(4)] for i in range(4)]
  np.testing.assert_array_equal([[int(b) for b, _ in row] for row in steps],
                                [[0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 3]])
  np.testing.assert_array_equal([[bool(a) for _, a in row] for row in steps],
                                np.eye(4, dtype=bool) | np.eye(4, k=-1, dtype=bool))
  # Block-sparse: before the first visible block fetch it, then keep the last visible one.
  visible = np.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]], bool)
  table = np.asarray(fetch_table(jnp.asarray(visible)))
  np.testing.assert_array_equal(table % 5, [[1, 1, 1, 3, 3], [0] * 5, [0, 0, 0, 0, 4]])
  np.testing.assert_array_equal(table == np.arange(5), visible)


def test_mosaic_rejects_narrow_key_blocks():
  q = jnp.zeros((1, 300, 2, 16))
  with pytest.raises(ValueError, match='multiple of 128'):
    flash_attention(q, q, q, implementation='pallas', target='mosaic', block_k=64)


# Cross-lowering: the entry with interpret=False, lowered for 'tpu' on this CPU.
LOWERING = {
    'f32_mha_causal_segments': (jnp.float32, 4, 4, 128, 128, dict(causal=True, segments=True)),
    'bf16_gqa_window_bias': (jnp.bfloat16, 4, 2, 128, 256, dict(window=200, bias=(32, 128, True))),
    'bf16_mqa_causal_sparse_segments_bias': (
        jnp.bfloat16, 4, 1, 256, 128, dict(causal=True, sparse=True, segments=True,
                                           bias=(32, 128, False))),
    'f32_gqa_everything': (jnp.float32, 4, 2, 256, 256, dict(
        causal=True, window=300, sparse=True, segments=True, bias=(32, 128, True))),
}


def _lower_for_tpu(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',)).as_text()


@pytest.mark.parametrize('name', sorted(LOWERING))
def test_lowers_to_mosaic(name):
  dtype, heads, kv_heads, block_q, block_k, opts = LOWERING[name]
  length, depth = 512, 128
  (q, k, v, table), seg, _ = _inputs(5, length, length, heads, kv_heads, depth, dtype)
  fn = _attention('pallas', interpret=False,  # the compiled Mosaic pallas_call
                  **_kwargs(opts, seg, length, length, block_q, block_k))
  text = _lower_for_tpu(fn, q, k, v, table)
  assert text.count('tpu_custom_call') == 1, 'forward: one Mosaic kernel'

  def loss(q, k, v, table):
    return jnp.sum(fn(q, k, v, table).astype(jnp.float32))

  text = _lower_for_tpu(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, table)
  assert text.count('tpu_custom_call') == 3, 'forward, dq and dk/dv kernels'


def test_lowering_enforces_mosaic_block_rules():
  # The check is real: 64-wide key blocks (which the entry rejects) make the [8, 64] block of
  # the key segment-id rows illegal, and lowering says so.
  cfg = Config(scale=1.0, causal=True, window=None, q_len=512, k_len=512, block_q=128,
               block_k=64, interpret=False, target='mosaic')
  q, seg = jnp.zeros((1, 512, 2, 128)), jnp.zeros((1, 512), jnp.int32)
  with pytest.raises(ValueError, match='divisible by 8 and 128'):
    _lower_for_tpu(lambda q, s: flash_forward_tpu(q, q, q, s, s, None, None, cfg), q, seg)
