"""Flash attention (Dao et al. 2022): one entry, XLA reference or Pallas kernels, custom VJP.

Layout as in `layers.attention`: q [b, q_len, heads, d], k/v [b, k_len, kv_heads, d]; query head
h reads KV head h // (heads // kv_heads), so grouped/multi-query KV heads are never repeated
(also not in dk/dv, which the backward kernel sums over each group). Masking semantics (causal
aligned bottom-right, segment ids, rows that see no key output 0) are documented in
`flash_reference`.

Options: a T5 relative-position bias (`RelativeBias`) that the kernels rebuild per block from
the [heads, buckets] table, with its gradient; a block-sparse mask (`block_sparse`, e.g.
BigBird) whose False blocks the kernels skip.

Kernels: `target='triton'` (GPU; `flash_attention_fwd` / `_bwd`) and `target='mosaic'` (TPU;
`flash_attention_tpu_fwd` / `_bwd`). Off their device they run in Pallas interpret mode (TPU
interpret mode for mosaic); the tests also lower both for their real platform on CPU.

Not implemented (do not pass them through other arguments): attention dropout; per-example
position offsets for the relative bias; an unmasked fast path for blocks wholly inside the mask;
autotuned tiles and Triton warps/stages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from efficientlm.kernels.flash_attention_bwd import flash_backward
from efficientlm.kernels.flash_attention_fwd import Config, flash_forward
from efficientlm.kernels.flash_attention_tpu_bwd import flash_backward_tpu
from efficientlm.kernels.flash_attention_tpu_fwd import flash_forward_tpu
from efficientlm.kernels import block_sparse
from efficientlm.kernels import flash_reference
from efficientlm.kernels.flash_reference import flash_attention_reference

IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
TARGETS = ('triton', 'mosaic')  # the GPU and the TPU kernels
# Default tiles: 64x64 suits Triton's shared memory; Mosaic wants the key block (the lanes of
# the logits tile) a multiple of 128, and larger tiles amortize its per-grid-step overhead.
DEFAULT_BLOCKS = {'triton': (64, 64), 'mosaic': (128, 128)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=['table'],
                   meta_fields=['num_buckets', 'max_distance', 'bidirectional'])
@dataclasses.dataclass(frozen=True)
class RelativeBias:
  """T5 relative-position bias (`layers.position.RelativePositionBias`) for flash_attention.

  table: [heads, buckets] (differentiable); bias[h, i, j] = table[h, bucket(j - (i + k_len -
  q_len))]: query i sits at key position i + k_len - q_len (the causal alignment), key j at j.
  A pytree whose only leaf is the table, so it passes through jit and grad.
  """
  table: jax.Array
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True


def _kernels(cfg: Config):
  """(forward, backward) kernel launchers of cfg.target; both take the same padded arrays."""
  if cfg.target == 'mosaic':
    return flash_forward_tpu, flash_backward_tpu
  return flash_forward, flash_backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_seg, kv_seg, table, sparse, cfg: Config):
  return _kernels(cfg)[0](q, k, v, q_seg, kv_seg, table, sparse, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, table, sparse, cfg):
  out, lse = _kernels(cfg)[0](q, k, v, q_seg, kv_seg, table, sparse, cfg)
  return out, (q, k, v, q_seg, kv_seg, table, sparse, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, q_seg, kv_seg, table, sparse, out, lse = residuals
  dq, dk, dv, dtable = _kernels(cfg)[1](q, k, v, q_seg, kv_seg, table, sparse, out, lse, d_out,
                                        cfg)
  return dq, dk, dv, None, None, dtable, None  # segment ids and block masks are integers


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _check_bias(rb, heads: int):
  if not isinstance(rb, RelativeBias):
    raise TypeError(f'relative_bias must be a RelativeBias, got {type(rb).__name__}.')
  if rb.table.ndim != 2 or rb.table.shape != (heads, rb.num_buckets):
    raise ValueError(f'relative_bias.table must be [heads={heads}, num_buckets='
                     f'{rb.num_buckets}], got {rb.table.shape}.')
  half = rb.num_buckets // 2 if rb.bidirectional else rb.num_buckets
  if half < 2 or rb.max_distance <= half // 2:  # the log branch needs max_distance > max_exact
    raise ValueError(f'relative_bias: num_buckets={rb.num_buckets}, max_distance='
                     f'{rb.max_distance} leave no room for T5 bucketing; use e.g. 32 and 128.')


def _check(q, k, v, q_seg, kv_seg, block_q, block_k, window, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'flash_attention implementation={implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'flash_attention takes q [b, q_len, heads, d] and k, v [b, k_len, '
                     f'kv_heads, d]; got q {q.shape}, k {k.shape}, v {v.shape}.')
  if k.shape != v.shape or k.shape[0] != q.shape[0]:
    raise ValueError(f'k {k.shape} and v {v.shape} must have the same shape, with the batch of '
                     f'q {q.shape}.')
  if k.shape[3] != q.shape[3]:
    raise ValueError(f'Head dim mismatch: q has {q.shape[3]}, k/v have {k.shape[3]}.')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'{q.shape[2]} query heads are not divisible by {k.shape[2]} KV heads.')
  if q_seg is not None:
    want = ((q.shape[0], q.shape[1]), (k.shape[0], k.shape[1]))
    if (q_seg.shape, kv_seg.shape) != want:
      raise ValueError(f'segment ids must be q_segment_ids {want[0]} and kv_segment_ids '
                       f'{want[1]}; got {q_seg.shape} and {kv_seg.shape}.')
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    if block < 16 or block & (block - 1):  # Triton wants power-of-2 tiles of at least 16
      raise ValueError(f'{name}={block} must be a power of 2 >= 16.')
  if window is not None and window < 1:
    raise ValueError(f'window={window} must be a positive number of positions (or None).')


def flash_attention(q: jax.Array,
                    k: jax.Array,
                    v: jax.Array,
                    *,
                    causal: bool = False,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    scale: float | None = None,
                    window: int | None = None,
                    implementation: str = 'auto',
                    block_q: int | None = None,
                    block_k: int | None = None,
                    target: str | None = None,
                    interpret: bool | None = None,
                    relative_bias: RelativeBias | None = None,
                    block_mask: jax.Array | None = None) -> jax.Array:
  """Softmax(scale q k^T + bias + mask) v; returns [b, q_len, heads, d] in q.dtype.

  segment_ids: (q_segment_ids [b, q_len], kv_segment_ids [b, k_len]), or one [b, len] array
    for self-attention; queries read keys of the same id.
  scale: None means 1: the codebase convention is that callers scale q (T5 folds 1/sqrt(d)
    into the query initialization); pass d**-0.5 for the usual scaling.
  window: local attention; query at position p reads keys j with p - window < j (and, unless
    causal, j < p + window).
  implementation: 'xla' (the jnp reference), 'pallas' (the kernels; interpret mode off GPU),
    'auto' (pallas on GPU, xla elsewhere).
  block_q, block_k: tile sizes, powers of 2 >= 16 (None: `DEFAULT_BLOCKS` of the target);
    clipped to the (padded) lengths. Mosaic needs block_k >= 128 unless one block covers k.
  target: which Pallas kernels 'pallas' runs: 'triton' (GPU) or 'mosaic' (TPU); None picks
    mosaic on TPU and triton elsewhere. Off its device a kernel runs in interpret mode (TPU
    interpret mode for mosaic), which is how the CPU tests check both.
  interpret: None runs the kernels compiled on their device and interpreted elsewhere; False
    forces the compiled form, e.g. to lower for another platform with
    `jax.jit(f).trace(...).lower(lowering_platforms=('cuda',))` on a CPU machine.
  relative_bias: T5 bias added to the (scaled) logits, computed per block in the kernels; the
    table gets a gradient. See `RelativeBias` for the positions.
  block_mask: bool [ceil(q_len / block_q), ceil(k_len / block_k)], built with the block_q and
    block_k passed here: False blocks are skipped (see `block_sparse`).
  """
  if segment_ids is None:
    q_seg = kv_seg = None
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  backend = jax.default_backend()
  if target is None:
    target = 'mosaic' if backend == 'tpu' else 'triton'
  if target not in TARGETS:
    raise ValueError(f'flash_attention target={target!r}; choose from {TARGETS}.')
  block_q = DEFAULT_BLOCKS[target][0] if block_q is None else block_q
  block_k = DEFAULT_BLOCKS[target][1] if block_k is None else block_k
  _check(q, k, v, q_seg, kv_seg, block_q, block_k, window, implementation)
  if relative_bias is not None:
    _check_bias(relative_bias, q.shape[2])
  if block_mask is not None:
    block_sparse.check_block_mask(block_mask, q.shape[1], k.shape[1], block_q, block_k)
  scale = 1.0 if scale is None else float(scale)
  if implementation == 'auto':
    implementation = 'pallas' if backend == 'gpu' else 'xla'
  _, q_len, _, depth = q.shape
  k_len = k.shape[1]
  rb = relative_bias
  if implementation == 'xla':
    bias = None if rb is None else flash_reference.relative_bias(
        rb.table, q_len, k_len, num_buckets=rb.num_buckets, max_distance=rb.max_distance,
        bidirectional=rb.bidirectional)
    mask = None if block_mask is None else block_sparse.expand_block_mask(
        block_mask, q_len, k_len, block_q, block_k)[None]
    return flash_attention_reference(q, k, v, causal=causal, q_segment_ids=q_seg,
                                     kv_segment_ids=kv_seg, scale=scale, window=window,
                                     bias=bias, mask=mask)

  # Clipping keeps the block mask valid: a clipped size covers its length in one block.
  block_q = min(block_q, _next_power_of_2(max(q_len, 16)))
  block_k = min(block_k, _next_power_of_2(max(k_len, 16)))
  if target == 'mosaic' and block_k % 128 and block_k < k_len:
    raise ValueError(f'block_k={block_k}: the Mosaic kernel tiles the logits with the key block '
                     f'on the 128 lanes; use a multiple of 128 (or one block >= k_len={k_len}).')
  if interpret is None:
    interpret = backend != ('tpu' if target == 'mosaic' else 'gpu')
  cfg = Config(scale=scale, causal=causal, window=window, q_len=q_len, k_len=k_len,
               block_q=block_q, block_k=block_k, interpret=interpret, target=target,
               bias_buckets=0 if rb is None else rb.num_buckets,
               bias_max_distance=128 if rb is None else rb.max_distance,
               bias_bidirectional=True if rb is None else rb.bidirectional,
               block_sparse=block_mask is not None)
  # Pad lengths to whole blocks (padded keys are masked in the kernel, padded query rows are
  # dropped) and head_dim to a power of 2 (zeros change neither q.k nor the kept columns).
  q_pad, k_pad = -(-q_len // block_q) * block_q, -(-k_len // block_k) * block_k
  d_pad = max(_next_power_of_2(depth), 16)
  qp = _pad_axis(_pad_axis(q, 1, q_pad), 3, d_pad)
  kp = _pad_axis(_pad_axis(k, 1, k_pad), 3, d_pad)
  vp = _pad_axis(_pad_axis(v, 1, k_pad), 3, d_pad)
  if q_seg is not None:
    q_seg = _pad_axis(q_seg.astype(jnp.int32), 1, q_pad)
    kv_seg = _pad_axis(kv_seg.astype(jnp.int32), 1, k_pad)
  table = None if rb is None else rb.table
  sparse = None if block_mask is None else jnp.asarray(block_mask).astype(jnp.int32)
  out = _flash(qp, kp, vp, q_seg, kv_seg, table, sparse, cfg)
  return out[:, :q_len, :, :depth]
