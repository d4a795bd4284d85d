"""Pure-jnp references for the Pallas kernels; tests compare the kernels against these."""

from __future__ import annotations

import jax
import jax.numpy as jnp


# --- decode attention ------------------------------------------------------------------------

def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               lengths: jax.Array, *, scale: float | None = None) -> jax.Array:
  """One query token per sequence against a KV cache, in plain jnp.

  q [batch, heads, d]; k_cache, v_cache [batch, slots, kv_heads, d]; lengths [batch] (slots
  0..length-1 are valid). Query head h reads KV head h // (heads // kv_heads); KV heads are not
  repeated. Softmax in float32 over the valid slots only; a sequence of length 0 gets zeros.
  Returns [batch, heads, d] in q's dtype.
  """
  b, heads, d = q.shape
  kv_heads = k_cache.shape[2]
  group = heads // kv_heads
  qf = q.astype(jnp.float32).reshape(b, kv_heads, group, d)
  if scale is not None:
    qf = qf * scale
  logits = jnp.einsum('bhgd,bshd->bhgs', qf, k_cache.astype(jnp.float32))
  valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # [b, slots]
  logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
  # Rows with no valid slot: -inf max would give NaN; shift by 0 there and let the sum be 0.
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)
  total = jnp.sum(p, axis=-1, keepdims=True)
  weights = p / jnp.where(total == 0, 1.0, total)
  out = jnp.einsum('bhgs,bshd->bhgd', weights, v_cache.astype(jnp.float32))
  return out.reshape(b, heads, d).astype(q.dtype)
