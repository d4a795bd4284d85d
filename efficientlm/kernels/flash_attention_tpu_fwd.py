"""Flash attention forward, Mosaic (TPU) Pallas kernel (FlashAttention-2, Dao 2023).

Same semantics and arguments as the Triton `flash_forward` (causal aligned bottom-right,
window, segment ids, padded keys, rows without keys -> 0, T5 bias per block, block sparsity,
GQA by index arithmetic), laid out the TPU way:
- arrays are transposed to [b, heads, L, d] outside the kernel, so every block's last two
  dims are (rows, d): Mosaic wants them divisible by (8, 128) or equal to the array's dims,
  which a squeezed heads dim in the second-minor position would break.
- grid (b, heads, q_blocks, k_blocks), the key-block axis innermost and 'arbitrary': the
  online-softmax state (row max, row sum, accumulator) lives in VMEM scratch, set up at the
  first key block and normalized into the output at the last one.
- steps whose key block the causal / window / block-sparse mask hides entirely are skipped
  with pl.when, and the K/V index_maps send such steps to a block that is fetched anyway (the
  previous visible one, or the first visible one before it is reached): the pipeline issues
  no DMA when a block index repeats, so skipped blocks cost a grid step, not a copy.
- the bias table and the block mask are scalars in SMEM.

Per-row values (logsumexp, query segment ids) are lane-replicated [.., L, 128] column blocks:
(block_q, 128) is legal for any block_q that is a multiple of 8 and loads as a column that
broadcasts against the [block_q, block_k] logits with no in-kernel transpose; the [.., 1, L]
row form would need block_q % 128 == 0 and a sublane->lane transpose. The price is 128 floats
per row of HBM for the lse residual (as in jax's own TPU flash/splash kernels). Key segment
ids are rows, [b, 8, Lk] (sublane-replicated), since they broadcast along the key lanes.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from efficientlm.kernels.flash_attention_fwd import (Config, block_mask, block_scores,
                                                     k_block_range)

LANES, SUBLANES = 128, 8


def interpret_params(cfg: Config):
  """TPU interpret mode off a TPU (it runs the kernel on CPU, SMEM/VMEM/DMA simulated)."""
  return pltpu.InterpretParams() if cfg.interpret else False


def compiler_params(parallel: int, arbitrary: int):
  """Outer axes 'parallel' (megacore may split them), the reduction axes 'arbitrary'."""
  return pltpu.CompilerParams(
      dimension_semantics=('parallel',) * parallel + ('arbitrary',) * arbitrary)


def heads_major(x):
  """[b, L, heads, d] <-> [b, heads, L, d]."""
  return jnp.swapaxes(x, 1, 2)


def lane_column(x):
  """[..., L] -> [..., L, 128], each value repeated across the lanes (see module doc)."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def segment_layouts(q_seg, kv_seg):
  """q ids as lane-replicated columns [b, Lq, 128], kv ids as rows [b, 8, Lk]."""
  kv_rows = jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, kv_seg.shape[1]))
  return lane_column(q_seg), kv_rows


def clamp_block(j, lo, hi, num_blocks: int):
  """j clamped into the visible blocks [lo, hi) (into range when there are none)."""
  j = jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))
  return jnp.clip(j, 0, num_blocks - 1)


def fetch_table(visible):
  """Int32 [rows, cols] block-sparse schedule from bool visible [rows, cols].

  Entry (r, c) is c where block c is visible (the step computes), else n + (block to fetch):
  the last visible block before c, already in VMEM, or the first visible one after it, which
  the DMA can start early. index_map takes it mod n; a step is active iff the entry == c.
  """
  n = visible.shape[1]
  idx = jnp.arange(n, dtype=jnp.int32)[None, :]
  prev = lax.cummax(jnp.where(visible, idx, -1), axis=1)
  first = jnp.argmax(visible, axis=1).astype(jnp.int32)[:, None]
  return jnp.where(visible, idx, n + jnp.where(prev >= 0, prev, first)).astype(jnp.int32)


def visible_blocks(cfg: Config, sparse, num_q_blocks: int, num_k_blocks: int):
  """Bool [q_blocks, k_blocks]: on in the block mask and in the causal/window key range."""
  lo, hi = k_block_range(cfg, jnp.arange(num_q_blocks, dtype=jnp.int32) * cfg.block_q,
                         num_k_blocks)
  j = jnp.arange(num_k_blocks, dtype=jnp.int32)[None, :]
  in_range = (j >= jnp.reshape(lo, (-1, 1))) & (j < jnp.reshape(hi, (-1, 1)))
  return in_range & (sparse != 0)


def scheduled_step(row, step, num_blocks: int, sched_ref, block_range):
  """(block to fetch, whether the step computes) at `step` of grid row `row`: from the
  block-sparse schedule (`fetch_table`) when there is one, else `step` clamped into the visible
  range `block_range()` = [lo, hi)."""
  if sched_ref is not None:
    entry = sched_ref[row, step]
    return lax.rem(entry, num_blocks), entry == step
  lo, hi = block_range()
  return clamp_block(step, lo, hi, num_blocks), (step >= lo) & (step < hi)


def k_step(cfg: Config, i, j, num_k_blocks: int, sched_ref):
  """(key block to fetch, whether the step computes) at query block i, key step j."""
  return scheduled_step(i, j, num_k_blocks, sched_ref,
                        lambda: k_block_range(cfg, i * cfg.block_q, num_k_blocks))


def tile_mask(cfg: Config, q_start, k_start, q_seg_ref, kv_seg_ref):
  """Bool [block_q, block_k] of allowed pairs (None: all), segment ids from their layouts."""
  mask = block_mask(cfg, q_start, k_start, None, None, cfg.block_q, cfg.block_k)
  if q_seg_ref is not None:
    same = q_seg_ref[:, :1] == kv_seg_ref[:1, :]
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def split_refs(refs, cfg: Config, has_segments: bool, num_inputs: int):
  """(sched, inputs, q_seg, kv_seg, table, rest) from a kernel's refs in launch order."""
  refs = list(refs)
  sched = refs.pop(0) if cfg.block_sparse else None
  inputs = [refs.pop(0) for _ in range(num_inputs)]
  q_seg, kv_seg = (refs.pop(0), refs.pop(0)) if has_segments else (None, None)
  table = refs.pop(0) if cfg.has_bias else None
  return sched, inputs, q_seg, kv_seg, table, refs


def option_args(cfg: Config, q_seg, kv_seg, table, q_seg_map, kv_seg_map):
  """BlockSpecs and args of the segment ids (in their layouts) and the SMEM bias table."""
  specs, args = [], []
  if q_seg is not None:
    specs += [pl.BlockSpec((None, cfg.block_q, LANES), q_seg_map),
              pl.BlockSpec((None, SUBLANES, cfg.block_k), kv_seg_map)]
    args += list(segment_layouts(q_seg, kv_seg))
  if cfg.has_bias:  # SMEM holds 32-bit scalars: the table goes in as float32
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(table.astype(jnp.float32))
  return specs, args


def _forward_kernel(*refs, cfg: Config, has_segments: bool, num_k_blocks: int):
  sched, (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, table_ref, rest = split_refs(
      refs, cfg, has_segments, 3)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q_start, k_start = i * cfg.block_q, j * cfg.block_k
  _, active = k_step(cfg, i, j, num_k_blocks, sched)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(active)
  def _step():
    v = v_ref[...]
    s = block_scores(cfg, q_ref[...], k_ref[...], q_start, k_start, table_ref, head=h)
    mask = tile_mask(cfg, q_start, k_start, q_seg_ref, kv_seg_ref)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_prev, l_prev = m_scr[:, :1], l_scr[:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing seen yet has max -inf; shift by 0 instead so exp gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * alpha + pv
    m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    m, l = m_scr[:, :1], l_scr[:, :1]
    empty = l == 0.0  # rows that see no key: output 0, lse +inf (so exp(s - lse) = 0 in bwd)
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(jnp.where(empty, jnp.inf, m + jnp.log(l_safe)),
                                    lse_ref.shape)


def flash_forward_tpu(q, k, v, q_seg, kv_seg, table, sparse, cfg: Config):
  """Padded q [b, lq, heads, d], k/v [b, lk, kv_heads, d] -> (out, lse [b, heads, lq, 128]).

  table: [heads, buckets] relative-bias table or None; sparse: int32 block mask or None.
  lse is lane-replicated float32, the residual `flash_backward_tpu` reads.
  """
  batch, q_len, heads, depth = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = q_len // bq, k_len // bk
  has_segments = q_seg is not None
  prefetch = [fetch_table(visible_blocks(cfg, sparse, nq, nk))] if cfg.block_sparse else []

  def kv_block(i, j, pre):
    return k_step(cfg, i, j, nk, pre[0] if pre else None)[0]

  q_spec = pl.BlockSpec((None, None, bq, depth), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, depth),
                         lambda b, h, i, j, *pre: (b, lax.div(h, group), kv_block(i, j, pre), 0))
  specs, extra = option_args(cfg, q_seg, kv_seg, table,
                             lambda b, h, i, j, *_: (b, i, 0),
                             lambda b, h, i, j, *pre: (b, 0, kv_block(i, j, pre)))
  lse_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(batch, heads, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, *specs], out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),  # running row max
                      pltpu.VMEM((bq, LANES), jnp.float32),  # running row sum
                      pltpu.VMEM((bq, depth), jnp.float32)])  # unnormalized output
  kernel = functools.partial(_forward_kernel, cfg=cfg, has_segments=has_segments,
                             num_k_blocks=nk)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((batch, heads, q_len, depth), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, LANES), jnp.float32)],
      compiler_params=compiler_params(3, 1), interpret=interpret_params(cfg),
      name='flash_attention_fwd_tpu')(*prefetch, heads_major(q), heads_major(k),
                                      heads_major(v), *extra)
  return heads_major(out), lse
