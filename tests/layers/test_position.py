"""T5 relative position buckets and bias, rotary embeddings: against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.position import (RelativePositionBias, apply_rotary,
                                         relative_position_bucket)

# relative position = key - query. Bidirectional, 32 buckets, max distance 128: 16 buckets per
# direction, 8 exact, then 8 + int(log(n / 8) / log(16) * 8) capped at 15; keys after the query
# add 16. E.g. n=12: log(1.5)/log(16) * 8 = 1.17 -> 9; n=127: 7.977 -> 15.
BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, -8: 8, -12: 9, -16: 10, -32: 12, -64: 14, -127: 15,
                 -128: 15, -1000: 15, 1: 17, 7: 23, 8: 24, 16: 26, 127: 31, 500: 31}
# Causal: 32 buckets for the past only, 16 exact, then 16 + int(log(n / 16) / log(8) * 16);
# future keys fall in bucket 0. E.g. n=32: 5.33 -> 21; n=64: 10.67 -> 26; n=127: 15.94 -> 31.
CAUSAL = {0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -64: 26, -127: 31, -128: 31, -4000: 31,
          1: 0, 100: 0}


@pytest.mark.parametrize('bidirectional,expected', [(True, BIDIRECTIONAL), (False, CAUSAL)])
def test_buckets_match_hand_computed(bidirectional, expected):
  rel = jnp.array(list(expected), jnp.int32)
  # Jitted here and below: one program, not one per op.
  bucket = jax.jit(relative_position_bucket,
                   static_argnames=('bidirectional', 'num_buckets', 'max_distance'))
  got = bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
  assert dict(zip(expected, np.asarray(got).tolist())) == expected


def test_bias_reads_table_at_bucket():
  heads, buckets = 3, 32
  table = np.arange(heads * buckets, dtype=np.float32).reshape(heads, buckets)
  module = RelativePositionBias(heads, buckets, 128)
  pos = jnp.arange(20)[None]
  bias = jax.jit(lambda p: module.apply(p, pos, pos, True))({'params': {'rel_embedding': table}})
  assert bias.shape == (1, heads, 20, 20)
  bias = np.asarray(bias)
  for (q, k) in [(0, 0), (1, 0), (0, 1), (8, 0), (0, 8), (12, 0), (16, 0), (19, 3), (0, 16)]:
    np.testing.assert_array_equal(bias[0, :, q, k], table[:, BIDIRECTIONAL[k - q]])


def test_rotary_pair_rotation_closed_form():
  # head_dim 2: one pair rotated by angle = position (inverse frequency 1).
  x = jnp.array([[[[0.3, -1.2]]]] * 4).reshape(1, 4, 1, 2)
  positions = jnp.array([[0, 1, 2, 7]])
  out = np.asarray(jax.jit(apply_rotary)(x, positions))
  for i, p in enumerate([0, 1, 2, 7]):
    a, b = 0.3, -1.2
    np.testing.assert_allclose(out[0, i, 0], [a * math.cos(p) - b * math.sin(p),
                                              b * math.cos(p) + a * math.sin(p)], rtol=1e-5,
                               atol=1e-6)


def test_rotary_scores_depend_only_on_offset():
  kq, kk = jax.random.split(jax.random.key(0))
  q = jax.random.normal(kq, (1, 6, 2, 16))
  k = jax.random.normal(kk, (1, 6, 2, 16))
  pos = jnp.arange(6)[None]

  @jax.jit
  def scores(shift):
    rq, rk = apply_rotary(q, pos + shift), apply_rotary(k, pos + shift)
    return jnp.einsum('bqhd,bkhd->bhqk', rq, rk)

  np.testing.assert_allclose(scores(0), scores(37), rtol=1e-4, atol=1e-4)
  # ... and rotation preserves norms.
  norms = jax.jit(lambda q: (jnp.linalg.norm(apply_rotary(q, pos), axis=-1),
                             jnp.linalg.norm(q, axis=-1)))
  np.testing.assert_allclose(*norms(q), rtol=1e-5)


def test_rotary_rejects_odd_head_dim():
  with pytest.raises(ValueError, match='even head_dim'):
    apply_rotary(jnp.ones((1, 2, 1, 3)), jnp.zeros((1, 2)))
