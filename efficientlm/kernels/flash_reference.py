"""Plain-jnp reference for flash attention: the whole [q, k] logit matrix, float32 softmax.

Independent of the Pallas kernels (no blocking, no online softmax); the tests compare kernel
values and gradients against it, and check it against `layers.attention.dot_product_attention`.

Masking semantics shared with the kernels:
- causal is aligned bottom-right (FlashAttention >= 2.1): query i sits at key position
  i + (k_len - q_len), so with q_len < k_len the queries are the last ones of the sequence
  (chunked prefill over a KV cache), and with q_len > k_len the first rows see no key.
- segment ids: a query attends to keys with an equal id. 0 (padding) is just another id, so
  padding attends to padding; the caller drops those rows.
- a row that sees no key at all outputs 0 (not the uniform average that an additive finite mask
  gives) and has zero gradients.
- relative-position bias (T5): query i sits at position i + (k_len - q_len) as for causal, key j
  at j; the bias of (i, j) is table[h, bucket(j - position(i))].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficientlm.layers.position import relative_position_bucket


def attention_mask(q_len: int,
                   k_len: int,
                   *,
                   causal: bool = False,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None,
                   window: int | None = None) -> jax.Array | None:
  """Bool [b|1, q, k], True where query i may read key j; None when nothing is masked.

  window (local attention): query at position p reads keys j with p - window < j, and, unless
  causal, j < p + window.
  """
  q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)  # bottom-right aligned positions
  k_pos = jnp.arange(k_len)[None, :]
  mask = None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = both(mask, k_pos <= q_pos)
  if window is not None:
    local = q_pos - k_pos < window
    if not causal:
      local = jnp.logical_and(local, k_pos - q_pos < window)
    mask = both(mask, local)
  if mask is not None:
    mask = mask[None]
  if q_segment_ids is not None:
    mask = both(mask, q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def relative_bias(table: jax.Array, q_len: int, k_len: int, *, num_buckets: int,
                  max_distance: int, bidirectional: bool) -> jax.Array:
  """Materialized float32 T5 bias [1, heads, q_len, k_len] from the table [heads, buckets]."""
  q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
  buckets = relative_position_bucket(jnp.arange(k_len)[None, :] - q_pos, bidirectional,
                                     num_buckets, max_distance)
  return jnp.take(table.astype(jnp.float32), buckets, axis=1)[None]


def flash_attention_reference(q: jax.Array,
                              k: jax.Array,
                              v: jax.Array,
                              *,
                              causal: bool = False,
                              q_segment_ids: jax.Array | None = None,
                              kv_segment_ids: jax.Array | None = None,
                              scale: float = 1.0,
                              window: int | None = None,
                              bias: jax.Array | None = None,
                              mask: jax.Array | None = None) -> jax.Array:
  """q [b, lq, heads, d]; k, v [b, lk, kv_heads, d]; returns [b, lq, heads, d] in q.dtype.

  bias: additive float [b|1, heads, lq, lk]; mask: extra bool [b|1, lq, lk] (True = read),
  combined with the causal / window / segment masks.
  """
  b, q_len, heads, depth = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  grouped_q = q.reshape(b, q_len, kv_heads, group, depth).astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', grouped_q, k.astype(jnp.float32)) * scale
  if bias is not None:  # query head h = kv_head * group + g, as in grouped_q
    logits = logits + bias.astype(jnp.float32).reshape(-1, kv_heads, group, q_len, k_len)
  structural = attention_mask(q_len, k_len, causal=causal, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, window=window)
  if structural is not None:
    mask = structural if mask is None else jnp.logical_and(structural, mask)
  if mask is not None:
    mask = mask[:, None, None]  # [b|1, 1, 1, q, k]
    logits = jnp.where(mask, logits, -jnp.inf)
  # Softmax is shift-invariant: the max only guards exp; a fully masked row has max -inf.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  weights = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', weights, v.astype(jnp.float32))
  return out.reshape(b, q_len, heads, depth).astype(q.dtype)
