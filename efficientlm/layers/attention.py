"""Dot-product attention: multi-head, multi-query and grouped-query, self and cross.

Query heads are split into `num_kv_heads` groups of `num_heads // num_kv_heads` heads; query head
h reads KV head h // group_size. The grouped einsum keeps K and V at their own head count, so KV
heads are never repeated in memory (Shazeer 2019; Ainslie et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import initializers
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.position import apply_rotary

# Additive mask value, T5X's; large but finite so fully masked rows (padding) stay NaN-free.
MASK_VALUE = -1e10


def dot_product_attention(query: jax.Array,
                          key: jax.Array,
                          value: jax.Array,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None,
                          float32_logits: bool = True) -> jax.Array:
  """Reference (XLA) attention with grouped KV heads.

  query [b, q, heads, d]; key, value [b, k, kv_heads, d]; mask bool [b|1, 1|heads, q, k];
  bias [b|1, heads|1, q, k]. No 1/sqrt(d) scaling here: callers scale the query (T5 folds it
  into the query initialization). Returns [b, q, heads, d].
  """
  b, q_len, heads, depth = query.shape
  kv_heads = key.shape[2]
  if key.shape != value.shape or key.shape[0] != b or key.shape[3] != depth:
    raise ValueError(f'Incompatible attention shapes: query {query.shape}, key {key.shape}, '
                     f'value {value.shape}.')
  if heads % kv_heads:
    raise ValueError(f'{heads} query heads are not divisible by {kv_heads} KV heads.')
  group = heads // kv_heads
  grouped_q = query.reshape(b, q_len, kv_heads, group, depth)
  if float32_logits:
    grouped_q, key = grouped_q.astype(jnp.float32), key.astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', grouped_q, key)

  def grouped(x):  # [b|1, heads|1, q, k] -> [b|1, kv_heads|1, group|1, q, k]
    if x.shape[1] == 1:
      return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, group, *x.shape[2:])

  if bias is not None:
    logits = logits + grouped(bias).astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(grouped(mask), logits, jnp.asarray(MASK_VALUE, logits.dtype))
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0).astype(value.dtype)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', weights, value)
  return out.reshape(b, q_len, heads, depth)


class MultiHeadAttention(nn.Module):
  """Attention with T5X parameter names: query, key, value, out (2D kernels).

  `num_kv_heads` None means multi-head; 1 is multi-query; anything dividing `num_heads` is
  grouped-query. With `rotary`, query and key are rotated by their positions.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  dropout_rate: float = 0.0
  # True: scale logits by 1/sqrt(head_dim) at run time. False (T5): the scale is folded into the
  # query initialization instead.
  scale_logits: bool = False
  rotary: bool = False
  rotary_max_wavelength: float = 10_000.0
  float32_logits: bool = True
  kernel_init: Callable[..., jax.Array] = initializers.attention_kernel_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               inputs_q: jax.Array,
               inputs_kv: jax.Array,
               mask: jax.Array | None = None,
               bias: jax.Array | None = None,
               q_positions: jax.Array | None = None,
               kv_positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f'num_heads {self.num_heads} must be divisible by num_kv_heads {kv_heads}.')
    # K/V projections of grouped/multi-query attention get their own logical names: rules
    # usually keep them replicated while query heads are split.
    kv_axes = (('joined_kv', 'heads') if kv_heads == self.num_heads else
               ('joined_kv_heads', 'kv_heads'))
    query_init = self.kernel_init
    if not self.scale_logits:
      query_init = initializers.scaled(self.kernel_init, self.head_dim**-0.5)

    def project(name, x, heads, axes, init):
      kernel_axis, head_axis = axes
      y = DenseGeneral((heads, self.head_dim), ('embed', kernel_axis), kernel_init=init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
      return partitioning.constrain(y, ('batch', 'length', head_axis, 'kv'))

    query = project('query', inputs_q, self.num_heads, ('joined_kv', 'heads'), query_init)
    key = project('key', inputs_kv, kv_heads, kv_axes, self.kernel_init)
    value = project('value', inputs_kv, kv_heads, kv_axes, self.kernel_init)

    if self.rotary:
      if q_positions is None or kv_positions is None:
        raise ValueError('Rotary attention needs q_positions and kv_positions.')
      query = apply_rotary(query, q_positions, self.rotary_max_wavelength)
      key = apply_rotary(key, kv_positions, self.rotary_max_wavelength)
    if self.scale_logits:
      query = query * jnp.asarray(self.head_dim**-0.5, query.dtype)

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    out = dot_product_attention(query, key, value, mask=mask, bias=bias,
                                dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                                float32_logits=self.float32_logits)
    out = partitioning.constrain(out, ('batch', 'length', 'heads', 'kv'))
    out = DenseGeneral(inputs_q.shape[-1], ('joined_kv', 'embed'), axis=(-2, -1),
                       kernel_init=self.kernel_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='out')(out)
    return partitioning.constrain(out, ('batch', 'length', 'embed'))
