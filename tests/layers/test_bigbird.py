"""BigBird block-sparse attention: the pattern against its definition (Zaheer et al. 2020, Sec. 2),
both implementations against dense masked softmax attention in plain jnp, causality, memory."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.kernels.flash_attention import RelativeBias
from efficientlm.layers.bigbird import (BigBirdConfig, bigbird_attention, bigbird_dense_mask,
                                        bigbird_layout)
from efficientlm.layers.position import RelativePositionBias, relative_position_bucket
from tests.error_bounds import assert_within, attention_error_bounds

BUCKETS, MAX_DISTANCE = 16, 40  # small enough that exact, log and clipped buckets all occur


def _token_mask(block_mask, length, block, causal):
  """[kv_heads, L, L] from the block masks, built here (not by bigbird_dense_mask)."""
  ones = np.ones((block, block), bool)
  mask = np.stack([np.kron(m, ones) for m in block_mask])
  return mask & np.tril(np.ones((length, length), bool)) if causal else mask


@functools.partial(jax.jit, static_argnums=(1, 2))
def _module_bias(table, length, bidirectional):
  """[1, heads, L, L] from the model's own T5 bias layer."""
  pos = jnp.arange(length)
  module = RelativePositionBias(table.shape[0], BUCKETS, MAX_DISTANCE)
  return module.apply({'params': {'rel_embedding': table}}, pos, pos, bidirectional)


def _dense_attention(q, k, v, mask, bias=None):
  """Plain softmax attention over the full [L, L] logits; mask bool [b, heads, L, L]; rows that
  see no key give 0. KV heads are repeated to the query heads."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
  p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  s = jnp.sum(p, -1, keepdims=True)
  return jnp.einsum('bhqk,bkhd->bqhd', p / jnp.where(s == 0, 1.0, s), v)


def _inputs(seed, batch, length, heads, kv_heads, depth):
  """q, k, v, the bias table and an output cotangent (numpy: no eager JAX ops to compile)."""
  rng = np.random.default_rng(seed)
  shapes = [(batch, length, heads, depth), (batch, length, kv_heads, depth),
            (batch, length, kv_heads, depth), (heads, BUCKETS), (batch, length, heads, depth)]
  return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def _padding(batch, length):
  """Sequence 0 right-padded; sequence 1 left-padded (its first causal rows see no key); the
  last sequence all padding (no row sees a key, also bidirectional)."""
  valid = np.ones((batch, length), bool)
  valid[0, length - 13:] = False
  valid[1, :20] = False
  valid[-1] = False
  return valid


def _bounds(q, k, v, ct, token_mask, kv_valid, bias, buckets):
  """attention_error_bounds per KV head (its mask differs by head), joined along the heads."""
  kv_heads = k.shape[2]
  group = q.shape[2] // kv_heads
  parts = []
  for h in range(kv_heads):
    hs = slice(h * group, (h + 1) * group)
    mask = token_mask[h][None] & kv_valid[:, None, :]
    parts.append(attention_error_bounds(
        q[:, :, hs], k[:, :, h:h + 1], v[:, :, h:h + 1], ct[:, :, hs], mask=mask,
        bias=None if bias is None else bias[:, hs], bias_buckets=buckets,
        num_buckets=None if buckets is None else BUCKETS))
  axes = {'out': 2, 'dq': 2, 'dk': 2, 'dv': 2, 'dtable': 0}
  return {name: np.concatenate([p[name] for p in parts], axis) for name, axis in axes.items()
          if name in parts[0]}


def _check_against_dense(config, causal, kv_heads, padded, biased, implementation, length,
                         heads=4, depth=8, batch=3, layer=0):
  q, k, v, table, ct = _inputs(layer + 7 * kv_heads, batch, length, heads, kv_heads, depth)
  kv_valid = _padding(batch, length) if padded else np.ones((batch, length), bool)
  layout = bigbird_layout(length, config, causal=causal, layer_index=layer, num_kv_heads=kv_heads)
  token_mask = _token_mask(layout.block_mask, length, config.block_size, causal)
  dense_mask = (np.repeat(token_mask, heads // kv_heads, axis=0)[None] &
                kv_valid[:, None, None, :])
  args = (q, k, v, table) if biased else (q, k, v)

  def sparse(q, k, v, table=None):
    rb = None if table is None else RelativeBias(table, BUCKETS, MAX_DISTANCE, not causal)
    return bigbird_attention(q, k, v, config=config, causal=causal, layer_index=layer,
                             kv_valid=jnp.asarray(kv_valid) if padded else None, bias_table=rb,
                             implementation=implementation)

  def dense(q, k, v, table=None):
    bias = None if table is None else _module_bias(table, length, not causal)
    return _dense_attention(q, k, v, dense_mask, bias)

  def grads(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=tuple(range(len(args)))))(
        *args)

  got = (jax.jit(sparse)(*args), *grads(sparse))
  want = (jax.jit(dense)(*args), *grads(dense))
  bias = _module_bias(table, length, not causal) if biased else None
  buckets = None
  if biased:
    pos = np.arange(length)
    buckets = np.asarray(jax.jit(relative_position_bucket, static_argnums=(1, 2, 3))(
        pos[None] - pos[:, None], not causal, BUCKETS, MAX_DISTANCE))
  bounds = _bounds(q, k, v, ct, token_mask, kv_valid, bias, buckets)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv', 'dtable'), got, want):
    assert np.isfinite(np.asarray(g)).all(), name
    assert_within(g, w, bounds[name], name)
  return got[0], dense_mask


# nb = 8 blocks of 8: two global blocks, a 3-block window and 2 random blocks per query block.
CONFIG = BigBirdConfig(block_size=8, num_window_blocks=1, num_global_blocks=2,
                       num_random_blocks=2, seed=5)


@pytest.mark.parametrize('causal, kv_heads, padded, biased', [
    (False, 4, False, False), (True, 4, False, False),  # multi-head
    (False, 2, True, True), (True, 1, True, True)])  # grouped / multi-query, padding, T5 bias
def test_xla_matches_dense_attention(causal, kv_heads, padded, biased):
  out, dense_mask = _check_against_dense(CONFIG, causal, kv_heads, padded, biased, 'xla', 64,
                                         layer=3)
  if padded:  # rows that see no key exist (the left-padded sequence) and output exactly 0
    empty = ~np.asarray(dense_mask).any(-1)  # [b, heads, L]
    assert empty.any()
    np.testing.assert_array_equal(np.asarray(out).transpose(0, 2, 1, 3)[empty], 0.0)


# Interpret-mode kernels compile slowly, one instance per KV head: GQA with 2 KV heads (two
# kernel calls) bidirectionally, multi-query causally.
@pytest.mark.parametrize('causal, kv_heads', [(False, 2), (True, 1)])
def test_pallas_matches_dense_attention(causal, kv_heads):
  # The kernels need power-of-2 blocks >= 16: 5 blocks of 16.
  config = BigBirdConfig(block_size=16, num_window_blocks=1, num_global_blocks=1,
                         num_random_blocks=1, seed=2)
  _check_against_dense(config, causal, kv_heads, True, True, 'pallas', 80, heads=4, depth=16)


def test_block_pattern_follows_the_definition():
  config = BigBirdConfig(block_size=4, num_window_blocks=1, num_global_blocks=2,
                         num_random_blocks=2, seed=1)
  nb, g, w, r = 12, 2, 1, 2
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  window, glob = np.abs(i - j) <= w, (i < g) | (j < g)
  for causal in (False, True):
    layout = bigbird_layout(4 * nb, config, causal=causal, layer_index=0, num_kv_heads=3)
    for mask in layout.block_mask:
      fixed = (window | glob) & ((j <= i) if causal else True)
      assert (mask >= fixed).all()  # window and global blocks are read
      random = mask & ~fixed
      if causal:
        assert not (mask & (j > i)).any()  # nothing from the future
        np.testing.assert_array_equal(mask[:g], np.tril(np.ones((g, nb), bool)))
        room = (~fixed & (j <= i)).sum(1)  # past blocks outside window and globals
        np.testing.assert_array_equal(random.sum(1)[g:], np.minimum(r, room[g:]))
      else:
        assert mask[:g].all()  # global query blocks read everything
        np.testing.assert_array_equal(random.sum(1)[g:], r)
    # The gather lists hold exactly the mask's rows (the rows not computed densely).
    rows = np.zeros_like(layout.block_mask[:, layout.dense_rows:])
    for h, row, s in zip(*np.nonzero(layout.valid)):
      rows[h, row, layout.indices[h, row, s]] = True
    np.testing.assert_array_equal(rows, layout.block_mask[:, layout.dense_rows:])
    assert layout.dense_rows == (0 if causal else g)
    np.testing.assert_array_equal(
        bigbird_dense_mask(4 * nb, config, causal=causal, layer_index=0, num_kv_heads=3),
        _token_mask(layout.block_mask, 4 * nb, 4, causal))


def test_random_blocks_reproducible_and_differ_by_layer_head_seed():
  config = BigBirdConfig(block_size=4, num_window_blocks=1, num_global_blocks=1,
                         num_random_blocks=2, seed=0)

  def masks(cfg, layer):
    # Called on a fresh config object: the lru cache cannot be what makes them equal.
    return bigbird_layout(64, BigBirdConfig(**vars(cfg)), causal=False, layer_index=layer,
                          num_kv_heads=2).block_mask.copy()

  first = masks(config, 0)
  bigbird_layout.cache_clear()
  np.testing.assert_array_equal(first, masks(config, 0))
  assert (first[0] != first[1]).any()  # KV heads differ
  assert (first != masks(config, 1)).any()  # layers differ
  assert (first != masks(BigBirdConfig(**{**vars(config), 'seed': 1}), 0)).any()


def test_causal_outputs_ignore_later_tokens():
  q, k, v, table, _ = _inputs(0, 1, 64, 4, 2, 8)
  rb = RelativeBias(jnp.asarray(table), BUCKETS, MAX_DISTANCE, False)
  fn = jax.jit(lambda q, k, v: bigbird_attention(q, k, v, config=CONFIG, causal=True,
                                                 layer_index=1, bias_table=rb))
  t = 37  # inside a block: the diagonal block's token-level mask matters
  later = np.arange(64)[None, :, None, None] > t

  def moved(x, seed):
    return np.where(later, x + 5 * np.random.default_rng(seed).standard_normal(x.shape), x)

  base = fn(q, k, v)
  other = fn(moved(q, 1), moved(k, 2), moved(v, 3))
  # Masked keys contribute exact zeros (exp(-inf) = 0 and the max runs over visible keys only),
  # so the outputs up to t are bitwise equal; after t they do change.
  np.testing.assert_array_equal(np.asarray(other[:, :t + 1]), np.asarray(base[:, :t + 1]))
  assert not np.allclose(other[:, t + 1:], base[:, t + 1:])


def _largest_array(hlo: str) -> int:
  return max(int(np.prod([int(d) for d in dims.split(',')]))
             for dims in re.findall(r'\[(\d+(?:,\d+)*)\]', hlo))


def test_compiled_xla_path_has_no_length_squared_buffer():
  # At L = 8192 an [L, L] float32 buffer is L * L * 4 = 256 MiB (a bool one 64 MiB). The gather
  # path's biggest tensors are the per-head logits and their kin, [L, V * block] with V = 5
  # visible blocks of 16 (1 global + 3 window + 1 random): one float32 such "unit" is
  # L * 80 * 4 = 2.5 MiB. Training keeps a dozen at most (logits, probabilities, masks, bias and
  # buckets, gathered K/V and their gradients; measured 10.3 bidirectional, 7.1 causal, with the
  # suite's XLA flags), so we assert temp <= 12 units = 30 MiB < L * L * 4 / 8, and that no array
  # of the optimized HLO has even L * L / 16 elements. Both scale linearly with L.
  length, config = 8192, BigBirdConfig(block_size=16, num_window_blocks=1, num_global_blocks=1,
                                       num_random_blocks=1)
  x = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
  valid = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  table = jax.ShapeDtypeStruct((1, BUCKETS), jnp.float32)
  slots = bigbird_layout(length, config, causal=False, layer_index=0,
                         num_kv_heads=1).indices.shape[-1]
  assert slots == 5
  unit = length * slots * config.block_size * 4
  for causal in (False, True):
    def loss(q, k, v, kv_valid, tab):
      rb = RelativeBias(tab, BUCKETS, MAX_DISTANCE, not causal)
      return jnp.sum(bigbird_attention(q, k, v, config=config, causal=causal, layer_index=0,
                                       kv_valid=kv_valid, bias_table=rb))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).lower(x, x, x, valid,
                                                                    table).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 12 * unit < length * length * 4 / 8, (causal, temp / unit)
    assert _largest_array(compiled.as_text()) < length * length / 16


def test_config_errors_name_the_field_and_the_fix():
  with pytest.raises(ValueError, match='block_size must be >= 1'):
    BigBirdConfig(block_size=0)
  with pytest.raises(ValueError, match='num_random_blocks must be >= 0'):
    BigBirdConfig(num_random_blocks=-1)
  with pytest.raises(ValueError, match=r'block_size=64 does not divide .* 100: pad .* 128'):
    BigBirdConfig().validate(100, causal=False)
  # Bidirectional needs g + 2w + 1 + r = 1 + 3 + 3 = 7 blocks; causal g + w + 1 + r = 6.
  with pytest.raises(ValueError, match=r'6 blocks .* needs at least 7 .* fewer num_window'):
    BigBirdConfig().validate(6 * 64, causal=False)
  assert BigBirdConfig().validate(6 * 64, causal=True) == 6
  q = jnp.zeros((1, 96, 2, 8))
  config = BigBirdConfig(block_size=8, num_random_blocks=1)
  with pytest.raises(ValueError, match=r"block_size=8: implementation='pallas' .* power of 2"):
    bigbird_attention(q, q, q, config=config, causal=True, layer_index=0,
                      implementation='pallas')
  with pytest.raises(ValueError, match=r'kv_valid must be bool \[batch, length\]'):
    bigbird_attention(q, q, q, config=config, causal=True, layer_index=0,
                      kv_valid=jnp.ones((1, 95), bool))
  with pytest.raises(ValueError, match='heads=2, num_buckets=32'):
    bigbird_attention(q, q, q, config=config, causal=True, layer_index=0,
                      bias_table=RelativeBias(jnp.zeros((3, 32))))
  with pytest.raises(ValueError, match='not divisible by 3 KV heads'):
    bigbird_attention(q, jnp.zeros((1, 96, 3, 8)), jnp.zeros((1, 96, 3, 8)), config=config,
                      causal=True, layer_index=0)
