"""Position information: T5 relative position buckets/bias, and rotary embeddings."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.layers import initializers


def relative_position_bucket(relative_position: jax.Array,
                             bidirectional: bool = True,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """T5's bucketing of `relative_position = key_pos - query_pos` (Raffel et al. 2020).

  Half the buckets (all of them if causal) hold exact small distances; the rest grow
  logarithmically up to `max_distance`, beyond which everything shares the last bucket. When
  bidirectional, the upper half of the buckets is for keys after the query.
  """
  relative_position = jnp.asarray(relative_position)
  n = -relative_position
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 log over a float64 constant, as in T5/HF, so bucket edges land where theirs do. The
  # max() keeps log() finite where the small branch is taken anyway.
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
      math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """One [heads, buckets] table per stack; returns an additive bias [batch|1, heads, q, k]."""

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array,
               bidirectional: bool) -> jax.Array:
    """Positions are [batch, len] (or [len], shared by the batch)."""
    table = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(initializers.relpos_init, ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), self.param_dtype)
    q_positions, k_positions = jnp.atleast_2d(q_positions), jnp.atleast_2d(k_positions)
    buckets = relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                       bidirectional, self.num_buckets, self.max_distance)
    # Gather per head: [heads, buckets][:, b, q, k] -> [b, heads, q, k].
    bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)
    return jnp.moveaxis(bias, 0, 1)


def apply_rotary(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), half-split layout.

  x: [batch, len, heads, head_dim] with even head_dim; positions: [batch, len]. Dimension i of
  the first half and i of the second half form a pair rotated by positions / wavelength**(2i/D).
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f'Rotary embeddings need an even head_dim, got {head_dim}.')
  half = head_dim // 2
  inv_freq = max_wavelength**(-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.asarray(positions, jnp.float32)[..., None, None] * inv_freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(jnp.asarray(x, jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
