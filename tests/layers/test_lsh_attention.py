"""Reformer LSH attention against dense attention, a numpy union-of-buckets reference, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers import lsh_attention as lsh
from efficientlm.layers.lsh_attention import LshConfig

# fp32 against float64 numpy / fp32 jnp over <= 32 keys with logits of size <= ~4: the softmax
# and weighted sums carry ~1e-6 relative rounding; 2e-5 leaves a margin and would still catch
# any wrong key set (one missing or extra key moves outputs by ~1e-2).
TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(seed, b=2, length=16, heads=2, depth=4, dv=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (b, length, heads, depth)),
          jax.random.normal(k2, (b, length, heads, dv)))


def dense_shared_qk(qk, v, causal, key_valid=None):
  """Full softmax attention, plain jnp: keys = qk / |qk|, self logit SELF_VALUE, masks explicit."""
  keys = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
  logits = jnp.einsum('bqhd,bkhd->bhqk', qk, keys)
  length = qk.shape[1]
  eye = jnp.eye(length, dtype=bool)
  logits = jnp.where(eye, -1e5, logits)
  allowed = jnp.ones((length, length), bool)
  if causal:
    allowed = jnp.tril(allowed)
  if key_valid is not None:
    allowed = allowed & key_valid[:, None, None, :]
  logits = jnp.where(allowed, logits, -1e10)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v)


def numpy_lsh(qk, v, rotations, chunk, *, causal, key_valid, across, dedup):
  """Independent reference in float64 loops over batch, head and round.

  Round r: bucket = argmax([xR; -xR]) (padding: n_buckets), rank by np.lexsort (bucket, position),
  key j is a candidate of query i iff its chunk is i's or the one before (and, unless `across`,
  the same bucket). dedup: softmax over the UNION of the rounds' candidates (each key once);
  otherwise trax's per-round softmax combined with weights softmax_r(logsumexp_r).
  Returns (out [b, L, h, dv], fraction of (i, j) pairs that are candidates).
  """
  qk, v, rot = (np.asarray(t, np.float64) for t in (qk, v, rotations))
  valid = np.asarray(key_valid, bool)
  b, length, heads, _ = qk.shape
  rounds, n_buckets = rot.shape[1], 2 * rot.shape[-1]
  out = np.zeros(v.shape)
  density = []
  for bi in range(b):
    for hi in range(heads):
      x = qk[bi, :, hi]
      scores = x @ (x / np.linalg.norm(x, axis=-1, keepdims=True)).T
      np.fill_diagonal(scores, -1e5)
      allowed = np.tril(np.ones((length, length), bool)) if causal else np.ones(
          (length, length), bool)
      allowed &= valid[bi][None, :]
      sets = []
      for r in range(rounds):
        proj = x.astype(np.float32) @ rot[hi, r].astype(np.float32)
        bucket = np.argmax(np.concatenate([proj, -proj], -1), -1)
        bucket[~valid[bi]] = n_buckets
        rank = np.empty(length, int)
        rank[np.lexsort((np.arange(length), bucket))] = np.arange(length)
        c = rank // chunk
        member = (c[None, :] == c[:, None]) | (c[None, :] == c[:, None] - 1)
        if not across:
          member &= bucket[None, :] == bucket[:, None]
        sets.append(member)
      union = np.any(sets, axis=0)
      density.append(union.mean())
      with np.errstate(invalid='ignore'):  # padding queries may see no key: NaN, not compared
        out[bi, :, hi] = _softmax_rounds(scores, allowed, sets, v[bi, :, hi], dedup)
  return out, float(np.mean(density))


def _softmax_rounds(scores, allowed, sets, v, dedup):
  if dedup:  # one softmax over the union of the rounds' candidates
    s = np.where(np.any(sets, axis=0) & allowed, scores, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v
  outs, lses = [], []
  for member in sets:  # a softmax per round, then weights softmax_r(logsumexp_r)
    s = np.where(member & allowed, scores, -np.inf)
    top = s.max(-1, keepdims=True)
    w = np.exp(s - top)
    lses.append(np.log(w.sum(-1)) + top[:, 0])
    outs.append((w / w.sum(-1, keepdims=True)) @ v)
  lses = np.stack(lses)
  a = np.exp(lses - lses.max(0))
  return np.einsum('rl,rld->ld', a / a.sum(0), np.stack(outs))


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('num_hashes', [1, 3])
def test_one_chunk_one_bucket_equals_dense_values_and_grads(causal, num_hashes):
  qk, v = _inputs(0)
  qk = qk.at[..., 0].set(jnp.abs(qk[..., 0]) + 0.1)  # every x has x_0 > 0 ...
  e0 = jnp.zeros((2, num_hashes, 4, 1)).at[:, :, 0].set(1.0)  # ... so with R = e_0: bucket 0
  config = LshConfig(num_hashes=num_hashes, chunk_length=16, num_buckets=2)
  assert np.all(lsh.hash_buckets(qk, e0) == 0)  # the premise: one bucket, one chunk
  cot = jax.random.normal(jax.random.key(9), v.shape)

  ours = lambda qk, v: lsh.lsh_attention_with_rotations(qk, v, e0, config, causal=causal)
  ref = lambda qk, v: dense_shared_qk(qk, v, causal)
  # jit: one compilation instead of op-by-op dispatch (the tests' time is compilation)
  value_and_grads = lambda fn: jax.jit(jax.value_and_grad(
      lambda qk, v: jnp.sum(fn(qk, v) * cot), (0, 1)))(qk, v)
  (value, grads), (value_ref, grads_ref) = value_and_grads(ours), value_and_grads(ref)
  np.testing.assert_allclose(jax.jit(ours)(qk, v), ref(qk, v), **TOL)
  np.testing.assert_allclose(value, value_ref, **TOL)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, **TOL)


def test_one_chunk_any_buckets_across_equals_dense():
  """With one chunk and trax's cross-bucket window, the buckets do not matter."""
  qk, v = _inputs(1)
  config = LshConfig(num_hashes=2, chunk_length=16, num_buckets=8, attend_across_buckets=True)
  got = jax.jit(lambda qk, v: lsh.lsh_attention(qk, v, jax.random.key(3), config,
                                                 causal=True))(qk, v)
  np.testing.assert_allclose(got, dense_shared_qk(qk, v, True), **TOL)


@pytest.mark.parametrize('across', [False, True])
@pytest.mark.parametrize('dedup', [True, False])
@pytest.mark.parametrize('causal', [False, True])
def test_matches_numpy_reference_with_padding(across, dedup, causal):
  qk, v = _inputs(2, length=32)
  key_valid = jnp.ones((2, 32), bool).at[1, 27:].set(False).at[0, 9].set(False)
  config = LshConfig(num_hashes=3, chunk_length=4, num_buckets=4, attend_across_buckets=across,
                     count_duplicates=dedup)
  rot = lsh.random_rotations(jax.random.key(5), 2, 4, 3, 4)
  got = jax.jit(lambda qk, v: lsh.lsh_attention_with_rotations(
      qk, v, rot, config, causal=causal, key_valid=key_valid))(qk, v)
  want, density = numpy_lsh(qk, v, rot, 4, causal=causal, key_valid=key_valid, across=across,
                            dedup=dedup)
  assert 0.1 < density < 0.9  # the bucketing is not trivial: many pairs in, many out
  valid = np.asarray(key_valid)  # padding queries' outputs are unspecified
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], **TOL)


def test_duplicate_correction_changes_the_result():
  """Without the log N correction keys found in several rounds weigh more: results differ."""
  qk, v = _inputs(3, length=32)
  rot = lsh.random_rotations(jax.random.key(0), 2, 4, 4, 4)
  a, b = (jax.jit(lambda qk, v, d=d: lsh.lsh_attention_with_rotations(
      qk, v, rot, LshConfig(num_hashes=4, chunk_length=4, num_buckets=4,
                            count_duplicates=d)))(qk, v) for d in (True, False))
  assert np.max(np.abs(a - b)) > 1e-2


def test_causal_later_tokens_get_no_weight():
  """Several chunks and rounds. With v one-hot per position, out[i, h, j] is query i's weight
  on key j: zero for every j > i (and rows sum to 1). out[<= t] has zero gradient w.r.t.
  qk[> t] and is unchanged when v[> t] changes (values do not enter the hashing)."""
  qk, _ = _inputs(4, length=32)
  config = LshConfig(num_hashes=3, chunk_length=4)
  rng, t = jax.random.key(1), 13
  attend = jax.jit(lambda qk, v: lsh.lsh_attention(qk, v, rng, config, causal=True))
  one_hot = jnp.broadcast_to(jnp.eye(32)[None, :, None, :], (2, 32, 2, 32))
  weights = np.asarray(attend(qk, one_hot)).transpose(0, 2, 1, 3)  # [b, h, query, key]
  assert np.all(np.triu(weights, 1) == 0)
  np.testing.assert_allclose(weights.sum(-1), 1, **TOL)
  lower = np.tril(np.ones((32, 32), bool), -1)
  assert 0.05 < np.mean(weights[..., lower] > 0) < 0.95  # LSH-sparse, not dense, not empty

  v = jax.random.normal(jax.random.key(7), (2, 32, 2, 3))
  grad_qk = jax.jit(jax.grad(lambda qk: jnp.sum(attend(qk, v)[:, :t + 1] ** 2)))(qk)
  assert np.all(np.asarray(grad_qk)[:, t + 1:] == 0)
  assert np.any(np.asarray(grad_qk)[:, :t + 1] != 0)  # the gradient is not trivially zero
  v2 = v.at[:, t + 1:].set(100.0)
  np.testing.assert_array_equal(attend(qk, v)[:, :t + 1], attend(qk, v2)[:, :t + 1])


def test_causal_one_chunk_prefix_invariant_to_future_tokens():
  """With one chunk, changing qk AND v after t leaves outputs at <= t unchanged (as dense)."""
  qk, v = _inputs(5)
  config = LshConfig(num_hashes=2, chunk_length=16, attend_across_buckets=True)
  t = 6
  qk2 = qk.at[:, t + 1:].set(jax.random.normal(jax.random.key(8), qk[:, t + 1:].shape))
  v2 = v.at[:, t + 1:].set(-3.0)
  attend = jax.jit(lambda qk, v: lsh.lsh_attention(qk, v, jax.random.key(0), config,
                                                    causal=True))
  np.testing.assert_allclose(attend(qk, v)[:, :t + 1], attend(qk2, v2)[:, :t + 1], **TOL)


def test_more_rounds_never_lower_recall_of_planted_copy():
  """Query i = 60 has an exact copy at j = 2 (64 tokens, 4 buckets, chunks of 8: ~16 tokens per
  bucket). The copy is always in i's bucket but precedes it in sorted order, often by more than
  the one chunk that i reads back. v is one-hot at j, so out_i is i's attention weight on j: 0
  exactly if j is no candidate, and >= 1/64 if it is (j has i's largest logit; with the
  duplicate correction the combination is a softmax over the union of the rounds' candidates).

  Asserted over the seeds 0..15: per seed, recall (weight > 1e-3) is non-decreasing in
  num_hashes 1..4 (rounds are nested, so the candidate union only grows), hence so is the
  fraction of seeds that recall j; and that fraction is < 1 at one round and strictly higher at
  four, so the test distinguishes rounds (it measured 0.25, 0.56, 0.56, 0.81).
  """
  i, j, length = 60, 2, 64
  base = jax.random.normal(jax.random.key(11), (1, length, 1, 8))
  qk = base.at[:, j].set(base[:, i])
  v = jnp.zeros((1, length, 1, 1)).at[:, j].set(1.0)
  recall = np.zeros((16, 4), bool)
  for r in range(1, 5):
    config = LshConfig(num_hashes=r, chunk_length=8, num_buckets=4)
    weight_on_j = jax.jit(jax.vmap(
        lambda seed, config=config: lsh.lsh_attention(qk, v, jax.random.key(seed), config)[
            0, i, 0, 0]))
    weights = np.asarray(weight_on_j(jnp.arange(16)))
    assert np.all((weights == 0) | (weights >= 1 / length - 1e-6)), weights
    recall[:, r - 1] = weights > 1e-3
  assert np.all(np.diff(recall.astype(int), axis=1) >= 0), recall
  fraction = recall.mean(0)
  assert fraction[0] < 1 and fraction[-1] > fraction[0], fraction


def test_sort_order_matches_lexsort_and_round_trips_exactly():
  buckets = jax.random.randint(jax.random.key(0), (2, 3, 2, 40), 0, 5)
  perm, inverse = lsh.sort_order(buckets)
  b = np.asarray(buckets).reshape(-1, 40)
  for row, p in zip(b, np.asarray(perm).reshape(-1, 40)):
    np.testing.assert_array_equal(p, np.lexsort((np.arange(40), row)))
  x = jax.random.normal(jax.random.key(1), buckets.shape)
  there = jnp.take_along_axis(x, perm, -1)
  np.testing.assert_array_equal(jnp.take_along_axis(there, inverse, -1), x)


def test_padding_keys_get_no_weight():
  qk, v = _inputs(6, length=32)
  key_valid = jnp.ones((2, 32), bool).at[0, 20:].set(False).at[1, 5].set(False)
  # across buckets: else a valid query never shares a bucket with padding (its own bucket)
  config = LshConfig(num_hashes=3, chunk_length=8, num_buckets=4, attend_across_buckets=True)
  attend = jax.jit(lambda qk, v: lsh.lsh_attention(qk, v, jax.random.key(2), config,
                                                    key_valid=key_valid))
  pad = ~np.asarray(key_valid)
  one_hot_pad = jnp.where(key_valid[:, :, None, None], 0.0, 1.0) * jnp.ones_like(v)
  assert np.all(np.asarray(attend(qk, one_hot_pad))[~pad] == 0)  # weight on padding is 0
  qk2 = jnp.where(key_valid[:, :, None, None], qk, 7.0)  # garbage in padded slots
  v2 = jnp.where(key_valid[:, :, None, None], v, -9.0)
  np.testing.assert_allclose(np.asarray(attend(qk, v))[~pad], np.asarray(attend(qk2, v2))[~pad],
                             **TOL)


def test_rounds_are_nested_and_rng_decides_rotations():
  r3 = lsh.random_rotations(jax.random.key(4), 2, 4, 3, 8)
  np.testing.assert_array_equal(r3[:, :2], lsh.random_rotations(jax.random.key(4), 2, 4, 2, 8))
  assert r3.shape == (2, 3, 4, 4)
  assert not np.allclose(r3, lsh.random_rotations(jax.random.key(5), 2, 4, 3, 8))
  config = LshConfig(num_hashes=2, chunk_length=4, seed=3)
  np.testing.assert_array_equal(
      jax.random.key_data(lsh.eval_rng(config, 1)),
      jax.random.key_data(jax.random.fold_in(jax.random.key(3), 1)))


def test_derived_number_of_buckets():
  assert LshConfig(chunk_length=8).buckets_for(64) == 16  # paper: 2 L / m
  assert LshConfig(chunk_length=8, num_buckets=4).buckets_for(64) == 4


@pytest.mark.parametrize('kwargs, length, field', [
    (dict(chunk_length=6), 16, 'chunk_length'),
    (dict(chunk_length=32), 16, 'chunk_length'),
])
def test_validate_errors(kwargs, length, field):
  with pytest.raises(ValueError, match=field):
    LshConfig(**kwargs).validate(length, causal=True)


@pytest.mark.parametrize('kwargs, field', [
    (dict(num_buckets=3), 'num_buckets'),
    (dict(num_buckets=0), 'num_buckets'),
    (dict(num_hashes=0), 'num_hashes'),
    (dict(chunk_length=0), 'chunk_length'),
])
def test_config_errors(kwargs, field):
  with pytest.raises(ValueError, match=field):
    LshConfig(**kwargs)


def test_shape_errors():
  qk, v = _inputs(0)
  config = LshConfig(num_hashes=2, chunk_length=8)
  with pytest.raises(ValueError, match='rotations'):
    lsh.lsh_attention_with_rotations(qk, v, jnp.zeros((2, 1, 4, 2)), config)
  with pytest.raises(ValueError, match='grouped KV'):
    lsh.lsh_attention(qk, v[:, :, :1], jax.random.key(0), config)
