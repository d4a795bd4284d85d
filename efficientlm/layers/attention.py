"""Dot-product attention: multi-head, multi-query and grouped-query, self and cross.

Query heads are split into `num_kv_heads` groups of `num_heads // num_kv_heads` heads; query head
h reads KV head h // group_size. The grouped einsum keeps K and V at their own head count, so KV
heads are never repeated in memory (Shazeer 2019; Ainslie et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import ia3, initializers
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.position import apply_rotary

# Additive mask value, T5X's; large but finite so fully masked rows (padding) stay NaN-free.
MASK_VALUE = -1e10


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Which keys each query reads, in the two forms attention implementations take.

  `dense` bool [b|1, 1, q, k] is what the 'xla' implementation applies (exactly the models'
  masks). The structure is what the flash kernels take: `causal` (static) and `q_segment_ids`
  [b, q] / `kv_segment_ids` [b, k] with padding folded in (`padding_segment_ids`); on valid
  rows it allows exactly what `dense` does. `kv_lengths` [b] (decoding steps): the query reads
  cache slots 0..length-1, the form of the decode kernel.
  """

  dense: jax.Array | None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  causal: bool = False


jax.tree_util.register_dataclass(
    AttentionMask, data_fields=['dense', 'q_segment_ids', 'kv_segment_ids', 'kv_lengths'],
    meta_fields=['causal'])


def padding_segment_ids(valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Segment ids [b, len] that also encode padding: 0 where not `valid`, else segment id + 1.

  Equal ids <=> both padding, or both valid in the same segment: on valid rows exactly
  valid x valid AND same segment (padding rows read padding; their outputs are ignored).
  """
  ids = jnp.ones(valid.shape, jnp.int32) if segment_ids is None else segment_ids + 1
  return jnp.where(valid, ids, 0).astype(jnp.int32)


def segment_ids_from_block_mask(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(q_ids [b, q], kv_ids [b, k]) equal exactly where `mask` [b, 1, q, k] is True.

  Exact for masks that are disjoint unions of blocks Q_s x K_s, i.e. padding AND packing masks
  (cross-attention's): a key's id is the first query reading it, a query's id that of the first
  key it reads. Keys no query reads get -1 and queries that read no key -2, so those never
  match (such queries are padding or have an empty encoder input; see kernels.attention).
  """
  m = mask[:, 0]
  kv_ids = jnp.where(m.any(axis=1), jnp.argmax(m, axis=1), -1)
  first_key = jnp.argmax(m, axis=2)
  q_ids = jnp.where(m.any(axis=2), jnp.take_along_axis(kv_ids, first_key, axis=1), -2)
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


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

  `decode` selects the KV cache (collection 'cache': cached_key, cached_value [b, S, kv_heads,
  d], only the KV heads): 'init' creates it shaped like this call's keys (S = the input length);
  'prefill' writes this call's keys into slots [0, len) and attends among them; 'step' writes
  one token per sequence at slot q_positions[:, 0] and attends over the whole cache (the caller's
  mask hides unwritten slots). Cross-attention (`cross_attention`) stores the projected encoder
  output at 'init'/'prefill' and reads it back at 'step', where `inputs_kv` may be None.

  `attention_implementation` (see kernels.attention): with an AttentionMask, the kernels get its
  structure; a 'step' whose mask carries `kv_lengths` runs the decode kernel under 'pallas'.

  `ia3` (layers/ia3.py): keys and values are scaled by learned vectors `ia3_key_scale`,
  `ia3_value_scale` [kv_heads * head_dim] right after their projections (before rotary
  embeddings), so the KV cache holds the scaled ones.
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
  decode: str | None = None  # None (full sequences), 'init', 'prefill' or 'step'
  # kernels.attention's implementation: 'xla', 'pallas', 'cudnn' or 'auto'. The kernels need the
  # mask's structure: pass an AttentionMask (a plain dense mask reaches only 'xla'/'cudnn').
  attention_implementation: str = 'xla'
  cross_attention: bool = False
  # Evolving attention (layers.evolving_attention): the logits mix with the previous layer's;
  # __call__ then takes `evolving_state` and returns (output, the state for the next layer).
  # `causal` picks the convolution's causal footprint (decoder self-attention).
  evolving: Any = None  # EvolvingAttentionConfig | None (imported lazily: no import cycle)
  causal: bool = False
  # BigBird block-sparse self-attention (layers.bigbird) instead of dense, with its pattern for
  # layer `layer_index`; needs an AttentionMask (padding as segment ids) and, with the T5
  # relative bias, its table (RelativeBias).
  bigbird: Any = None  # BigBirdConfig | None
  layer_index: int = 0
  # Reformer LSH self-attention (layers.lsh_attention): queries double as keys (no 'key'
  # projection), hashed into buckets by random rotations: fresh ones per training step from
  # the 'lsh' rng stream, fixed per layer (from the config's seed) when deterministic. With
  # `decode` the cache also keeps each slot's bucket ids (lsh_attention, "Decoding").
  lsh: Any = None  # LshConfig | None
  # Scaling Transformer sparse Q/K/V projections (layers.sparse_qkv) for self-attention: a
  # shared multiplicative layer and a convolution per projection (parameters under
  # 'sparse_qkv' instead of query/key/value). None: the dense projections.
  sparse_qkv: Any = None  # SparseQkvConfig | None
  ia3: bool = False
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
               deterministic: bool = True,
               evolving_state: tuple[jax.Array, jax.Array] | None = None):
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

    ia3_scales = self._ia3_scales(kv_heads, kv_axes[0]) if self.ia3 else None

    def project(name, x, heads, axes, init):
      kernel_axis, head_axis = axes
      y = DenseGeneral((heads, self.head_dim), ('embed', kernel_axis), kernel_init=init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
      return partitioning.constrain(y, ('batch', 'length', head_axis, 'kv'))

    if self.sparse_qkv is not None:
      query, sparse_key, sparse_value = self._sparse_projections(inputs_q, mask, q_positions,
                                                                  kv_heads)
    else:
      query = project('query', inputs_q, self.num_heads, ('joined_kv', 'heads'), query_init)
    if self.rotary and (q_positions is None or kv_positions is None):
      raise ValueError('Rotary attention needs q_positions and kv_positions.')
    if self.rotary:
      query = apply_rotary(query, q_positions, self.rotary_max_wavelength)

    def project_kv():
      if self.sparse_qkv is not None:
        key, value = sparse_key, sparse_value
      else:
        key = project('key', inputs_kv, kv_heads, kv_axes, self.kernel_init)
        value = project('value', inputs_kv, kv_heads, kv_axes, self.kernel_init)
      if ia3_scales is not None:
        l_k, l_v = ia3_scales
        key, value = key * l_k.astype(key.dtype), value * l_v.astype(value.dtype)
      if self.rotary:
        key = apply_rotary(key, kv_positions, self.rotary_max_wavelength)
      return key, value

    if self.lsh is not None:  # shared query/key: only values to project
      key = None
      value = (sparse_value if self.sparse_qkv is not None else
               project('value', inputs_kv, kv_heads, kv_axes, self.kernel_init))
    elif self.decode is None:
      key, value = project_kv()
    else:
      key, value = self._cached_kv(project_kv, q_positions)
    if self.scale_logits:
      query = query * jnp.asarray(self.head_dim**-0.5, query.dtype)

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    if self.lsh is not None:
      out = self._lsh(query, value, mask, bias, deterministic, q_positions)
    elif self.bigbird is not None:
      out = self._bigbird(query, key, value, mask, bias)
    elif self.evolving is None:
      out = self._attend(query, key, value, mask, bias, dropout_rng)
    else:
      out, evolving_state = self._evolve(query, key, value, mask, bias, dropout_rng,
                                         evolving_state)
    out = partitioning.constrain(out, ('batch', 'length', 'heads', 'kv'))
    out = DenseGeneral(inputs_q.shape[-1], ('joined_kv', 'embed'), axis=(-2, -1),
                       kernel_init=self.kernel_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='out')(out)
    out = partitioning.constrain(out, ('batch', 'length', 'embed'))
    return out if self.evolving is None else (out, evolving_state)

  def _ia3_scales(self, kv_heads: int, axis: str) -> tuple[jax.Array, jax.Array]:
    """(l_k, l_v) shaped [kv_heads, head_dim] to scale keys and values [b, len, kv_heads, d]."""
    if self.lsh is not None or self.sparse_qkv is not None:
      raise ValueError('ia3 scales the outputs of the dense key and value projections; lsh and '
                       'sparse_qkv attention have none: set TransformerConfig.ia3 = False.')
    shape = (kv_heads * self.head_dim,)
    return tuple(ia3.scale_vector(self, name, shape, (axis,)).reshape(kv_heads, self.head_dim)
                 for name in (ia3.KEY_SCALE, ia3.VALUE_SCALE))

  def _sparse_projections(self, inputs, mask, positions, kv_heads):
    """(query, key or None for LSH, value) from layers.sparse_qkv; its convolution's decoding
    state sits in this layer's cache beside the KV cache."""
    from efficientlm.layers.sparse_qkv import SparseQkv  # pylint: disable=g-import-not-at-top
    if self.cross_attention:
      raise ValueError('sparse_qkv replaces self-attention projections; cross-attention keeps '
                       'the dense ones (build it with sparse_qkv=None).')
    return SparseQkv(self.sparse_qkv, self.num_heads, self.head_dim, kv_heads,
                     with_key=self.lsh is None, causal=self.causal, decode=self.decode,
                     query_scale=1.0 if self.scale_logits else self.head_dim**-0.5,
                     kernel_init=self.kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='sparse_qkv')(inputs, mask, positions)

  def _lsh(self, query, value, mask, bias, deterministic, q_positions):
    """LSH attention over the whole sequence (the stacks refuse packing and prefix-LM masks
    for lsh layers); padding from the mask's segment ids. With `decode`: `_lsh_cached`."""
    from efficientlm.layers import lsh_attention  # pylint: disable=g-import-not-at-top
    if bias is not None:
      raise ValueError("token_mixers 'lsh' take no relative position bias: set "
                       "TransformerConfig.position_embedding = 'rotary'.")
    if self.decode is not None:
      return self._lsh_cached(query, value, mask, q_positions)
    if not isinstance(mask, AttentionMask) or mask.kv_segment_ids is None:
      raise ValueError('lsh layers need the mask as an AttentionMask with segment ids.')
    rng = (lsh_attention.eval_rng(self.lsh, self.layer_index) if deterministic else
           self.make_rng('lsh'))
    return lsh_attention.lsh_attention(query, value, rng, self.lsh, causal=self.causal,
                                       key_valid=mask.kv_segment_ids > 0)

  def _lsh_cached(self, query, value, mask, q_positions):
    """LSH decoding (layers.lsh_attention, "Decoding"): the cache holds the shared qk vectors,
    the values and each slot's bucket ids; a query reads the earlier keys that share its bucket
    in some round. 'init' and 'prefill' apply that rule at every position of their input."""
    from efficientlm.layers import lsh_attention  # pylint: disable=g-import-not-at-top
    modes = ('init', 'prefill', 'step')
    if self.decode not in modes:
      raise ValueError(f'MultiHeadAttention.decode = {self.decode!r}; choose from {modes}.')
    if not self.causal:
      raise ValueError("token_mixers 'lsh' decode causal (decoder) self-attention only.")
    allowed = mask.dense if isinstance(mask, AttentionMask) else mask
    if allowed is None:
      raise ValueError('lsh decoding needs the dense causal mask [b, 1, q, k].')
    batch, length, heads, depth = query.shape
    if self.decode != 'init' and not self.has_variable('cache', 'cached_key'):
      raise ValueError(f'{self.name}: decode={self.decode!r} needs a KV cache; create it with '
                       "decode='init' (efficientlm.inference.kv_cache.init_cache) first.")
    slots = (length if self.decode == 'init' else
             self.get_variable('cache', 'cached_key').shape[1])
    rotations = lsh_attention.decode_rotations(self.lsh, self.layer_index, heads, depth, slots)
    buckets = lsh_attention.token_buckets(query, rotations)  # [b, len, heads, rounds]
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, (batch, slots, heads, depth),
                               query.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                 (batch, slots) + value.shape[2:], value.dtype)
    cached_buckets = self.variable('cache', 'cached_buckets', jnp.zeros,
                                   (batch, slots) + buckets.shape[2:], jnp.int32)
    if self.decode in ('init', 'prefill'):  # the input attends to itself (slot i = token i)
      if length > slots:
        raise ValueError(f'Prompt of {length} tokens does not fit the KV cache of {slots}; '
                         'create a longer cache.')
      if self.decode == 'prefill':
        for var, x in ((cached_key, query), (cached_value, value), (cached_buckets, buckets)):
          var.value = jax.lax.dynamic_update_slice(var.value, x.astype(var.value.dtype),
                                                   (0,) * x.ndim)
      index = jnp.arange(length, dtype=jnp.int32)[None]
      return lsh_attention.lsh_decode_attention(query, query, value, buckets, buckets, index,
                                                index, allowed, self.lsh)
    if length != 1 or q_positions is None:
      raise ValueError("decode='step' takes one token per sequence and its positions [b, 1].")
    write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
    for var, x in ((cached_key, query), (cached_value, value), (cached_buckets, buckets)):
      var.value = write(var.value, x.astype(var.value.dtype), q_positions[:, 0])
    return lsh_attention.lsh_decode_attention(
        query, cached_key.value, cached_value.value, buckets, cached_buckets.value, q_positions,
        jnp.arange(slots, dtype=jnp.int32)[None], allowed, self.lsh)

  def _bigbird(self, query, key, value, mask, bias):
    """BigBird over the whole sequence: padding from the mask's segment ids (the stacks refuse
    packed examples and prefix-LM masks for bigbird layers), the bias as its table."""
    from efficientlm.kernels.flash_attention import RelativeBias  # pylint: disable=g-import-not-at-top
    from efficientlm.layers import bigbird  # pylint: disable=g-import-not-at-top
    if self.decode is not None:
      raise ValueError("token_mixers 'bigbird' cannot decode with a KV cache (its pattern is "
                       'over whole sequences). Decode with a model whose layers are dense '
                       "attention, or score whole sequences.")
    if not isinstance(mask, AttentionMask) or mask.kv_segment_ids is None:
      raise ValueError('bigbird layers need the mask as an AttentionMask with segment ids.')
    if bias is not None and not isinstance(bias, RelativeBias):
      raise ValueError('bigbird layers take the relative bias as its table (RelativeBias); a '
                       'dense [q, k] bias comes only with explicit (packed) positions.')
    implementation = 'pallas' if self.attention_implementation == 'pallas' else 'xla'
    return bigbird.bigbird_attention(query, key, value, config=self.bigbird, causal=self.causal,
                                     layer_index=self.layer_index,
                                     kv_valid=mask.kv_segment_ids > 0, bias_table=bias,
                                     implementation=implementation)

  def _evolve(self, query, key, value, mask, bias, dropout_rng, state):
    """Dense attention whose logits evolve (layers.evolving_attention); `state` is (previous
    logits [b, heads, q, k] float32, has_previous 0/1), zeros and 0 in a stack's first layer."""
    from efficientlm.layers import evolving_attention  # pylint: disable=g-import-not-at-top
    if self.decode is not None:
      raise ValueError('evolving_attention cannot decode with a KV cache: each step would need '
                       "every layer's previous logit rows. Decode a model without "
                       'TransformerConfig.evolving_attention, or score whole sequences.')
    if isinstance(mask, AttentionMask):
      mask = mask.dense
    previous, has_previous = state
    evolve = evolving_attention.EvolvingLogits(self.evolving, self.num_heads, causal=self.causal,
                                               param_dtype=self.param_dtype, name='evolving')
    logits = evolving_attention.attention_logits(query, key, bias, self.float32_logits)
    to_softmax, passed_on = evolve(logits, previous, mask, has_previous=has_previous)
    out = evolving_attention.attend(to_softmax, value, mask, self.dropout_rate, dropout_rng)
    return out, (passed_on, jnp.ones_like(has_previous))

  def _attend(self, query, key, value, mask, bias, dropout_rng):
    """Attention through the kernel dispatcher; 'xla' gets the dense mask exactly as given."""
    # Imported here: the kernels import this module (dot_product_attention, MASK_VALUE).
    from efficientlm.kernels import attention as kernels, decode_attention  # noqa: I001
    impl = self.attention_implementation
    structured = isinstance(mask, AttentionMask)
    dense = mask.dense if structured else mask
    common = dict(bias=bias, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                  float32_logits=self.float32_logits)
    if impl == 'xla' or not structured:  # no structure: only a dense mask to apply
      return kernels.attention(query, key, value, implementation=impl, mask=dense, **common)
    if mask.kv_lengths is not None:  # a decoding step: one query over the cache's valid slots
      step_impl = kernels.select_implementation(impl, query, bias=bias,
                                                dropout=dropout_rng is not None)
      if step_impl == 'pallas':
        return decode_attention.decode_attention(query[:, 0], key, value, mask.kv_lengths,
                                                 implementation='pallas')[:, None]
      return kernels.attention(query, key, value, implementation=step_impl, mask=dense, **common)
    segment_ids = None
    if mask.q_segment_ids is not None:
      segment_ids = (mask.q_segment_ids, mask.kv_segment_ids)
    return kernels.attention(query, key, value, implementation=impl, causal=mask.causal,
                             segment_ids=segment_ids, **common)

  def _cached_kv(self, project_kv, q_positions):
    """(key, value) to attend to, reading and writing the KV cache as `decode` says."""
    modes = ('init', 'prefill', 'step')
    if self.decode not in modes:
      raise ValueError(f'MultiHeadAttention.decode = {self.decode!r}; choose from {modes}.')
    initialized = self.has_variable('cache', 'cached_key')
    if self.decode == 'init':
      key, value = project_kv()
      self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      return key, value
    if not initialized:
      raise ValueError(f'{self.name}: decode={self.decode!r} needs a KV cache; create it with '
                       "decode='init' (efficientlm.inference.kv_cache.init_cache) first.")
    cached_key = self.variable('cache', 'cached_key')
    cached_value = self.variable('cache', 'cached_value')
    if self.cross_attention:  # the encoder output does not change while decoding
      if self.decode == 'step':
        return cached_key.value, cached_value.value
      key, value = project_kv()
      cached_key.value, cached_value.value = key, value
      return key, value
    key, value = project_kv()
    cache_length = cached_key.value.shape[1]
    if self.decode == 'prefill':
      if key.shape[1] > cache_length:
        raise ValueError(f'Prompt of {key.shape[1]} tokens does not fit the KV cache of '
                         f'{cache_length}; create a longer cache.')
      start = (0,) * key.ndim
      cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
      return key, value
    if key.shape[1] != 1:
      raise ValueError(f"decode='step' takes one token per sequence, got {key.shape[1]}.")
    # One slot per sequence: its own position (prompts of different lengths decode together).
    write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
    slots = q_positions[:, 0]
    cached_key.value = write(cached_key.value, key.astype(cached_key.value.dtype), slots)
    cached_value.value = write(cached_value.value, value.astype(cached_value.value.dtype), slots)
    return cached_key.value, cached_value.value
