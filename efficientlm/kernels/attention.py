"""Attention's one public entry: picks an implementation by backend and option.

Implementations:
- 'xla': `layers.attention.dot_product_attention`, dense mask and bias; applies anything.
- 'pallas': the flash kernels (`kernels.flash_attention`: Triton on GPU, Mosaic on TPU,
  interpret mode elsewhere). They take the mask's *structure* (causal, segment ids), never a
  dense [q, k] array; the bias only as a T5 `RelativeBias` table (rebuilt per block); no
  attention dropout.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`: GPU, float16/bfloat16,
  head_dim a multiple of 8 up to 128; mask and bias applied densely; no dropout.
- 'auto': the fastest correct one for the backend: on GPU 'pallas' where it applies, else 'xla';
  on CPU and TPU 'xla' (the Mosaic kernel has passed TPU interpret mode and Mosaic lowering but
  has never run on a TPU, so it is not the default there).
An explicit choice that cannot apply the inputs raises a ValueError saying why; nothing falls back
silently except 'auto'.

Masking: the effective mask is the AND of `causal`, `segment_ids` and the dense `mask` (each
optional). Causal is aligned bottom-right and segment ids match by equality, as documented in
`flash_reference`. Padding is expressed as segment ids (see `layers.attention.padding_segment_ids`).

Rows that read no key at all differ by implementation: 'xla' gives them the uniform average of
the values (its additive mask is finite), 'pallas' gives 0. Such rows are padding, whose
outputs the loss ignores; compare implementations on valid rows only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficientlm.kernels import flash_reference
from efficientlm.kernels.flash_attention import RelativeBias, flash_attention
from efficientlm.layers import attention as attention_layer

IMPLEMENTATIONS = ('xla', 'pallas', 'cudnn', 'auto')
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def _pallas_unsupported(mask, bias, dropout: bool) -> str | None:
  """Why the flash kernels cannot apply these inputs (None: they can)."""
  if bias is not None and not isinstance(bias, RelativeBias):
    return ('a dense additive attention bias (e.g. T5 relative position bias from explicit '
            'per-example positions, or at a decoding step) is not yet supported by the pallas '
            'kernel, which takes only a RelativeBias table with positions 0..len-1')
  if mask is not None:
    return ('a dense attention mask (e.g. prefix-LM bidirectional prefixes) is not supported by '
            'the pallas kernel, which takes only causal and segment_ids')
  if dropout:
    return 'attention dropout is not supported by the pallas kernel'
  return None


def _cudnn_unsupported(query, dropout: bool, backend: str) -> str | None:
  if backend != 'gpu':
    return f'cuDNN attention needs a GPU; the JAX backend is {backend!r}'
  if query.dtype not in _CUDNN_DTYPES:
    return f'cuDNN attention takes float16 or bfloat16; the query is {query.dtype}'
  depth = query.shape[-1]
  if depth % 8 or depth > 128:
    return f'cuDNN attention needs head_dim a multiple of 8 up to 128; it is {depth}'
  if dropout:
    return 'attention dropout is not supported through jax.nn.dot_product_attention'
  return None


def select_implementation(implementation: str,
                          query: jax.Array,
                          *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | RelativeBias | None = None,
                          dropout: bool = False) -> str:
  """The concrete implementation ('xla', 'pallas' or 'cudnn') for these inputs.

  Raises ValueError where an explicit 'pallas' or 'cudnn' cannot apply them; 'auto' never
  raises. `dropout`: attention dropout is active (training with dropout_rate > 0).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation={implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')
  backend = jax.default_backend()
  pallas_reason = _pallas_unsupported(mask, bias, dropout)
  if implementation == 'auto':
    return 'pallas' if backend == 'gpu' and pallas_reason is None else 'xla'
  reason = {'pallas': pallas_reason,
            'cudnn': _cudnn_unsupported(query, dropout, backend)}.get(implementation)
  if reason is not None:
    raise ValueError(f"attention implementation={implementation!r}: {reason}. Use 'xla', or "
                     "'auto' to pick the fastest implementation that applies.")
  return implementation


def _split_segment_ids(segment_ids):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    return tuple(segment_ids)
  return segment_ids, segment_ids


def _dense_mask(q_len, k_len, causal, q_seg, kv_seg, mask):
  """The structure as a bool [b|1, 1, q, k] mask, ANDed with `mask`; None if nothing masks."""
  structure = flash_reference.attention_mask(q_len, k_len, causal=causal, q_segment_ids=q_seg,
                             kv_segment_ids=kv_seg)
  if structure is None:
    return mask
  structure = structure[:, None]
  return structure if mask is None else jnp.logical_and(structure, mask)


def attention(query: jax.Array,
              key: jax.Array,
              value: jax.Array,
              *,
              implementation: str = 'xla',
              causal: bool = False,
              segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
              mask: jax.Array | None = None,
              bias: jax.Array | RelativeBias | None = None,
              scale: float | None = None,
              dropout_rate: float = 0.0,
              dropout_rng: jax.Array | None = None,
              float32_logits: bool = True) -> jax.Array:
  """Softmax(scale q k^T + bias, masked) v with grouped KV heads; returns [b, q, heads, d].

  query [b, q, heads, d]; key, value [b, k, kv_heads, d] (heads divisible by kv_heads).
  causal: query i reads keys up to i + (k - q) (bottom-right aligned).
  segment_ids: (q_ids [b, q], kv_ids [b, k]), or one [b, len] array for self-attention; a query
    reads keys with an equal id. Padding is an id of its own (see the module docstring).
  mask: dense bool [b|1, 1|heads, q, k] for what the structure cannot say; only 'xla' and
    'cudnn' apply it. Passed alone it reaches 'xla' exactly as given.
  bias: additive [b|1, heads|1, q, k] (not 'pallas'), or a `RelativeBias` [heads, buckets] table
    with query i at position i + k - q and key j at j (materialized for 'xla' and 'cudnn').
  scale: logits multiplier; None means 1 (callers fold 1/sqrt(d) into the query, as T5 does).
  dropout_rate, dropout_rng: attention-weight dropout, active when both are set ('xla' only).
  float32_logits: 'xla' computes q.k in float32 (the kernels always accumulate in float32).
  """
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  impl = select_implementation(implementation, query, mask=mask, bias=bias, dropout=dropout)
  q_seg, kv_seg = _split_segment_ids(segment_ids)
  if impl == 'pallas':
    return flash_attention(query, key, value, causal=causal,
                           segment_ids=None if q_seg is None else (q_seg, kv_seg), scale=scale,
                           implementation='pallas', relative_bias=bias)
  q_len, k_len = query.shape[1], key.shape[1]
  dense = _dense_mask(q_len, k_len, causal, q_seg, kv_seg, mask)
  if isinstance(bias, RelativeBias):
    bias = flash_reference.relative_bias(bias.table, q_len, k_len, num_buckets=bias.num_buckets,
                                         max_distance=bias.max_distance,
                                         bidirectional=bias.bidirectional)
  if impl == 'cudnn':
    bias = None if bias is None else bias.astype(query.dtype)  # cuDNN wants one dtype
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=dense,
                                        scale=1.0 if scale is None else float(scale),
                                        implementation='cudnn')
  if scale is not None:
    query = query * jnp.asarray(scale, query.dtype)
  return attention_layer.dot_product_attention(query, key, value, mask=dense, bias=bias,
                                               dropout_rate=dropout_rate,
                                               dropout_rng=dropout_rng,
                                               float32_logits=float32_logits)
