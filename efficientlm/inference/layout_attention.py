"""Self-attention block of a layout with its KV cache, per chip (inside shard_map).

Two phases. prefill: L prompt tokens per sequence (right-padded, per-row `lengths`) write cache
slots [0, L) and attend causally within the prompt, padding keys masked (slot < length).
decode: one token per sequence at per-row `positions` (slot = position) writes its slot and
attends to the slots <= position. Keys are cached already rotated (rotary), so a decode step
rotates only the new token. Masking and the float32 softmax are layers/attention.py's.

Stages, as in layout_ffn: `attention_inputs` (q, k, v projections: q and sharded k, v as partial
sums for the fused reduce-scatter over Ain; replicated k, v all-reduced here in ONE all-reduce),
`attention_core` (the batch_* all-to-all, rotary, cache, attention), `attention_output` (the
out projection, partial over Aout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficientlm.inference.layout_ops import (gather_weight, linear_index, matmul,
                                              split_for_scatter)
from efficientlm.inference.layout_plan import LayerPlan
from efficientlm.layers.attention import dot_product_attention
from efficientlm.layers.position import apply_rotary, relative_position_bucket

PHASES = ('prefill', 'decode')


def attention_inputs(plan: LayerPlan, w: dict,
                     h: jax.Array) -> tuple[list[jax.Array], tuple[jax.Array, jax.Array] | None]:
  """h [b, L, E/|Ain|] -> (parts for the reduce-scatter: q [, k, v]; replicated (k, v) or None).

  Replicated k, v come back complete, [b, L, K, D] on every chip."""
  dtype, d = plan.config.activation_dtype, plan.config.head_dim
  proj = lambda name: matmul(h, gather_weight(w[name], plan.ab, axis=1), dtype)
  if plan.sharded_kv:
    return [split_for_scatter(plan, proj(n)) for n in ('query', 'key', 'value')], None
  parts = [split_for_scatter(plan, proj('query'))]
  kv = jnp.concatenate([matmul(h, w['key'], dtype), matmul(h, w['value'], dtype)], axis=-1)
  if plan.ain:  # partial over Ain: one all-reduce of k and v together
    kv = jax.lax.psum(kv, plan.ain)
  b, length = h.shape[:2]
  k, v = jnp.split(kv.reshape(b, length, 2 * plan.kv_heads, d), 2, axis=2)
  return parts, (k, v)


def _heads(x: jax.Array, head_dim: int) -> jax.Array:
  return x.reshape(*x.shape[:2], -1, head_dim)


def attention_core(plan: LayerPlan, phase: str, q: jax.Array, k: jax.Array, v: jax.Array,
                   cache_k: jax.Array, cache_v: jax.Array, rows: jax.Array,
                   relpos: jax.Array | None):
  """q [b, L, H/|Ah| * D]; k, v [b, L, K/|Ah| * D] (sharded) or [b, L, K, D] (replicated);
  cache [b', S, K', D]; rows: this chip's lengths (prefill) or positions (decode) [b'].

  Returns (out [b, L, H/|Ah| * D], cache_k, cache_v).
  """
  cfg = plan.config
  d, a = cfg.head_dim, plan.attn_batch
  q, k, v = _heads(q, d), _heads(k, d), _heads(v, d)
  if a:  # batch_*: split the batch over A, gather the heads of A (replicated KV: slice rows)
    q = jax.lax.all_to_all(q, a, split_axis=0, concat_axis=2, tiled=True)
    rows_here = q.shape[0]
    start = linear_index(a) * rows_here
    k = jax.lax.dynamic_slice_in_dim(k, start, rows_here, axis=0)
    v = jax.lax.dynamic_slice_in_dim(v, start, rows_here, axis=0)
  b, length = q.shape[:2]
  slots = cache_k.shape[1]
  if phase == 'prefill':
    if length > slots:
      raise ValueError(f'Prompt length {length} exceeds the KV cache length {slots}.')
    q_pos = jnp.arange(length, dtype=jnp.int32)[None]  # [1, L]
  else:
    q_pos = rows[:, None]  # [b, 1]
  if cfg.position_embedding == 'rotary':
    q = apply_rotary(q, jnp.broadcast_to(q_pos, (b, length)), cfg.rotary_max_wavelength)
    k = apply_rotary(k, jnp.broadcast_to(q_pos, (b, length)), cfg.rotary_max_wavelength)
  if cfg.scale_attention_logits:
    q = q * jnp.asarray(d**-0.5, q.dtype)
  k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
  if phase == 'prefill':
    cache_k = jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v, (0, 0, 0, 0))
    k_pos = jnp.arange(length, dtype=jnp.int32)
    mask = ((k_pos[None, None, None, :] <= q_pos[:, None, :, None]) &
            (k_pos[None, None, None, :] < rows[:, None, None, None]))
  else:
    # Out-of-range positions (>= S) are dropped by the scatter: the caller bounds them.
    cache_k = cache_k.at[jnp.arange(b), rows].set(k[:, 0])
    cache_v = cache_v.at[jnp.arange(b), rows].set(v[:, 0])
    k, v = cache_k, cache_v
    k_pos = jnp.arange(slots, dtype=jnp.int32)
    mask = k_pos[None, None, None, :] <= rows[:, None, None, None]
  first = linear_index(plan.head_order[:len(plan.head_order) - len(a)]) * q.shape[2]
  k, v = _kv_for_heads(plan, k, v, first, q.shape[2])
  bias = None
  if relpos is not None:
    bias = _relative_bias(plan, relpos, first, q.shape[2], q_pos, k_pos)
  out = dot_product_attention(q, k, v, mask=mask, bias=bias,
                              float32_logits=cfg.float32_attention_logits)
  if a:
    out = jax.lax.all_to_all(out, a, split_axis=2, concat_axis=0, tiled=True)
  return out.reshape(*out.shape[:2], -1), cache_k, cache_v


def _kv_for_heads(plan: LayerPlan, k, v, first, num):
  """The KV heads that query heads [first, first + num) read (h -> h // group)."""
  if plan.sharded_kv:  # the local chunk already matches the local query heads
    return k, v
  group = plan.config.num_heads // plan.kv_heads
  if num % group == 0 or group % num == 0:  # a contiguous slice of KV heads
    count = max(num // group, 1)
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, first // group, count, axis=2)
  else:  # rare shapes: one KV head per query head
    index = (first + jnp.arange(num)) // group
    take = lambda x: jnp.take(x, index, axis=2)
  return take(k), take(v)


def _relative_bias(plan: LayerPlan, table, first, num, q_pos, k_pos):
  """T5 bias of query heads [first, first + num): [b|1, num, q, k] (the table is replicated)."""
  cfg = plan.config
  table = jax.lax.dynamic_slice_in_dim(table.astype(cfg.activation_dtype), first, num, axis=0)
  buckets = relative_position_bucket(k_pos[None, None, :] - q_pos[:, :, None], False,
                                     cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance)
  return jnp.moveaxis(jnp.take(table, buckets, axis=1), 0, 1)


def attention_output(plan: LayerPlan, w: dict, out: jax.Array) -> jax.Array:
  """Attention output [b, L, H/|Aout| * D] -> out projection, partial over Aout [b, L, E/|Ain|]."""
  return matmul(out, gather_weight(w['out'], plan.ab, axis=0), plan.config.activation_dtype)
