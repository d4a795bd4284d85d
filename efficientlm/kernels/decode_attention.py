"""Decode attention (flash-decoding): one new query token per sequence against a KV cache.

q [batch, heads, d] attends to k_cache, v_cache [batch, slots, kv_heads, d] (the layout of
efficientlm.inference.kv_cache), where sequence b holds `lengths[b]` valid slots 0..length-1.

The Pallas kernel runs a grid of (batch, kv_heads, splits). One program takes all query heads
of one KV group together ([group, d] against [block_k, d] cache blocks), so multi-query and
grouped-query models read each cache block once for the whole group. The cache length is cut
into `num_splits` chunks so that a small batch still fills the machine; each chunk loops only
over the blocks below its sequence's length and writes a partial (unnormalized output, running
max, running sum). A jnp log-sum-exp merge combines the chunks.

Backends: the kernel is written for the GPU (Triton) lowering and runs in interpret mode on CPU,
which is how the tests check it. It has no TPU (Mosaic) variant: there 'auto' picks XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from efficientlm.kernels.reference import decode_attention_reference
from efficientlm.layers.attention import MASK_VALUE

IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
_DTYPES = (jnp.float32, jnp.bfloat16)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     *, scale: float | None = None, implementation: str = 'auto',
                     block_k: int = 128, num_splits: int = 8) -> jax.Array:
  """Attention of one query token per sequence over its valid cache slots.

  q [batch, heads, d]; k_cache, v_cache [batch, slots, kv_heads, d] with heads divisible by
  kv_heads; lengths [batch] integers. `scale` multiplies the logits (None: no scaling, for
  callers that fold 1/sqrt(d) into the query as T5 does). `implementation`: 'xla' (the jnp
  reference), 'pallas' (the kernel; interpret mode on CPU), 'auto' (pallas on GPU, else xla).
  `block_k` slots are read per loop step; `num_splits` chunks of the cache run in parallel.
  A sequence of length 0 gets zeros. Returns [batch, heads, d] in q's dtype.
  """
  _check_inputs(q, k_cache, v_cache, lengths)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r}; choose from {IMPLEMENTATIONS}.')
  backend = jax.default_backend()
  if implementation == 'auto':
    implementation = 'pallas' if backend == 'gpu' else 'xla'
  if implementation == 'xla':
    return decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale)
  if backend == 'tpu':
    raise ValueError("The Pallas decode attention kernel targets GPU (Triton); it has no TPU "
                     "(Mosaic) variant. Use implementation='xla' or 'auto' on TPU.")
  if block_k < 1 or num_splits < 1:
    raise ValueError(f'block_k={block_k} and num_splits={num_splits} must be positive.')
  for name, x in (('q', q), ('k_cache', k_cache), ('v_cache', v_cache)):
    if x.dtype not in _DTYPES:
      raise ValueError(f'The Pallas kernel takes float32 or bfloat16; {name} is {x.dtype}.')
  min_rows = 1
  if backend == 'gpu':
    # Triton wants power-of-two blocks and dots of at least 16 rows.
    d = q.shape[-1]
    if d & (d - 1) or block_k & (block_k - 1) or block_k < 16:
      raise ValueError(f'On GPU head_dim ({d}) and block_k ({block_k}) must be powers of two, '
                       'block_k >= 16.')
    min_rows = 16
  return _decode_pallas(q, k_cache, v_cache, lengths, scale=scale, block_k=block_k,
                        num_splits=num_splits, min_rows=min_rows, interpret=backend == 'cpu')


def _check_inputs(q, k_cache, v_cache, lengths):
  if q.ndim != 3 or k_cache.ndim != 4:
    raise ValueError(f'Expected q [batch, heads, head_dim] and caches [batch, slots, kv_heads, '
                     f'head_dim]; got q {q.shape}, k_cache {k_cache.shape}.')
  if k_cache.shape != v_cache.shape:
    raise ValueError(f'k_cache {k_cache.shape} and v_cache {v_cache.shape} differ in shape.')
  b, heads, d = q.shape
  _, slots, kv_heads, cache_d = k_cache.shape
  if k_cache.shape[0] != b:
    raise ValueError(f'q has batch {b} but the caches have batch {k_cache.shape[0]}.')
  if cache_d != d:
    raise ValueError(f'q head_dim {d} does not match the cache head_dim {cache_d}.')
  if slots < 1 or kv_heads < 1:
    raise ValueError(f'Empty cache: k_cache {k_cache.shape}.')
  if heads % kv_heads:
    raise ValueError(f'{heads} query heads are not divisible by {kv_heads} KV heads.')
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f'lengths must be integers shaped [batch] = ({b},); got {lengths.dtype} '
                     f'{lengths.shape}.')
  for name, x in (('q', q), ('k_cache', k_cache), ('v_cache', v_cache)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name} must be floating point, got {x.dtype}.')


def _split_sizes(slots: int, block_k: int, num_splits: int) -> tuple[int, int]:
  """(splits, split_len): split_len a multiple of block_k, no split wholly past the cache."""
  blocks = pl.cdiv(slots, block_k)
  split_len = pl.cdiv(blocks, min(num_splits, blocks)) * block_k
  return pl.cdiv(slots, split_len), split_len


def _split_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, block_k,
                  split_len):
  """One (sequence, KV head, split): partial attention of the group's heads over the split."""
  length = lengths_ref[0]
  start = pl.program_id(2) * split_len
  # Only blocks holding a slot below `length` are read; a split past the end reads nothing.
  num_blocks = jnp.clip((length - start + block_k - 1) // block_k, 0, split_len // block_k)
  q = q_ref[...]
  rows, d = q.shape

  def body(i, carry):
    m, l, acc = carry
    slots = pl.ds(i * block_k, block_k)
    k, v = k_ref[slots, :], v_ref[slots, :]
    logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [rows, block_k]
    if scale is not None:
      logits = logits * scale
    first = start + i * block_k
    valid = first + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < length
    logits = jnp.where(valid, logits, MASK_VALUE)
    # Slots past the cache end (block padding) may hold NaN, and 0 * NaN is NaN: zero them.
    valid_rows = first + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length
    v = jnp.where(valid_rows, v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))  # finite: the block has a valid slot
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    l_new = alpha * l + jnp.sum(p, axis=1)
    # Weights in v's dtype, as the XLA attention does; accumulation stays float32.
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, acc * alpha[:, None] + pv

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


@functools.partial(jax.jit, static_argnames=('scale', 'block_k', 'num_splits', 'min_rows',
                                             'interpret'))
def _decode_pallas(q, k_cache, v_cache, lengths, *, scale, block_k, num_splits, min_rows,
                   interpret):
  b, heads, d = q.shape
  slots, kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = heads // kv_heads
  # Query rows per program: the group, padded with zero queries where the backend needs more.
  rows = max(min_rows, pl.next_power_of_2(group)) if min_rows > 1 else group
  gq = q.reshape(b, kv_heads, group, d)
  if rows > group:
    gq = jnp.pad(gq, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  splits, split_len = _split_sizes(slots, block_k, num_splits)
  kernel = functools.partial(_split_kernel, scale=scale, block_k=block_k, split_len=split_len)
  partial_shape = (b, kv_heads, splits, rows)
  # The last split's block may run past `slots`: Pallas pads it, the kernel masks it.
  cache_spec = pl.BlockSpec((None, split_len, None, d), lambda i, h, s: (i, s, h, 0))
  out, m, l = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, splits),
      in_specs=[
          pl.BlockSpec((1,), lambda i, h, s: (i,)),
          pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
          cache_spec,
          cache_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, d), lambda i, h, s: (i, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((*partial_shape, d), jnp.float32),
          jax.ShapeDtypeStruct(partial_shape, jnp.float32),
          jax.ShapeDtypeStruct(partial_shape, jnp.float32),
      ],
      interpret=interpret,
      # Without these, jax >= 0.7 lowers pallas_call to Mosaic GPU, which this kernel is not
      # written for; 4 warps fit the [rows <= 16, block_k] tiles.
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      name='decode_attention',
  )(lengths.astype(jnp.int32), gq, k_cache, v_cache)
  out = _combine_splits(out, m, l)[:, :, :group]
  return out.reshape(b, heads, d).astype(q.dtype)


def _combine_splits(out, m, l):
  """Log-sum-exp merge over the split axis (2) of partial outputs [b, h, splits, rows, d]."""
  m_max = jnp.max(m, axis=2, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)  # length 0: every split is empty
  w = jnp.exp(m - m_max)  # empty splits (m = -inf) weigh 0
  total = jnp.sum(w * l, axis=2)
  acc = jnp.sum(w[..., None] * out, axis=2)
  return acc / jnp.where(total == 0, 1.0, total)[..., None]
