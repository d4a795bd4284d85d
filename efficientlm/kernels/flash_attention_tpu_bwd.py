"""Flash attention backward, Mosaic (TPU) Pallas kernels (FlashAttention-2, Dao 2023).

With P = exp(S - lse) rebuilt from the forward's logsumexp and D = rowsum(dO * O) (in XLA):
  dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale dS K,   dK = scale dS^T Q.
Two kernels, laid out as the forward (`flash_attention_tpu_fwd`: [b, heads, L, d] arrays,
lane-replicated per-row values, skipped steps that re-use the fetched block):
- dq: grid (b, heads, q_blocks, k_blocks), the key axis 'arbitrary', dQ in VMEM scratch. With
  a relative bias it also sums dS per bucket (the bias enters the logits unscaled, so
  d(table)[h, n] = sum of dS over bucket n) into [b, heads, q_blocks, 1, buckets] partials that
  XLA reduces.
- dk/dv: grid (b, kv_heads, k_blocks, group, q_blocks), the last two axes 'arbitrary': one
  KV block stays resident while the query heads of its group and their query blocks stream
  past, so dK/dV of the group are summed in VMEM scratch and written once per KV head.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from efficientlm.kernels.flash_attention_bwd import q_block_range
from efficientlm.kernels.flash_attention_fwd import (Config, block_buckets, block_scores,
                                                     matmul_nt)
from efficientlm.kernels.flash_attention_tpu_fwd import (LANES, compiler_params, fetch_table,
                                                         heads_major, interpret_params, k_step,
                                                         lane_column, option_args, scheduled_step,
                                                         split_refs, tile_mask, visible_blocks)


def _matmul(a, b, contract_a: int):
  """a @ b (contract_a=1) or a^T @ b (contract_a=0), float32 accumulation."""
  return lax.dot_general(a, b, (((contract_a,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _probs_and_dscores(cfg, refs, q, k, q_start, k_start, head, table_ref):
  """P and dS [block_q, block_k] (float32) of one block pair."""
  q_seg_ref, kv_seg_ref, v_ref, do_ref, lse_ref, delta_ref = refs
  s = block_scores(cfg, q, k, q_start, k_start, table_ref, head=head)
  p = jnp.exp(s - lse_ref[:, :1])  # rows that saw no key have lse = +inf, so p = 0
  mask = tile_mask(cfg, q_start, k_start, q_seg_ref, kv_seg_ref)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = matmul_nt(do_ref[...], v_ref[...])
  return p, p * (dp - delta_ref[:, :1])


def _bucket_sums(cfg: Config, buckets, ds, width: int):
  """Float32 [1, width]: lane n holds the sum of ds over the entries of bucket n."""
  ids = lax.broadcasted_iota(jnp.int32, (1, width), 1)

  def add_bucket(n, sums):
    hits = jnp.where(buckets == n, ds, 0.0)
    total = jnp.sum(jnp.sum(hits, axis=0, keepdims=True), axis=1, keepdims=True)  # [1, 1]
    return sums + jnp.where(ids == n, total, 0.0)

  return lax.fori_loop(0, cfg.bias_buckets, add_bucket, jnp.zeros((1, width), jnp.float32))


def _dq_kernel(*refs, cfg: Config, has_segments: bool, num_k_blocks: int):
  sched, inputs, q_seg_ref, kv_seg_ref, table_ref, rest = split_refs(refs, cfg, has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  if cfg.has_bias:
    dq_ref, dtable_ref, dq_scr, dtable_scr = rest
  else:
    (dq_ref, dq_scr), dtable_ref, dtable_scr = rest, None, None
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q_start, k_start = i * cfg.block_q, j * cfg.block_k
  _, active = k_step(cfg, i, j, num_k_blocks, sched)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if cfg.has_bias:
      dtable_scr[...] = jnp.zeros(dtable_scr.shape, jnp.float32)

  @pl.when(active)
  def _step():
    k = k_ref[...]
    _, ds = _probs_and_dscores(cfg, (q_seg_ref, kv_seg_ref, v_ref, do_ref, lse_ref, delta_ref),
                               q_ref[...], k, q_start, k_start, h, table_ref)
    dq_scr[...] += _matmul(ds.astype(k.dtype), k, 1)
    if cfg.has_bias:
      buckets = block_buckets(cfg, q_start, k_start, cfg.block_q, cfg.block_k)
      dtable_scr[...] += _bucket_sums(cfg, buckets, ds, dtable_scr.shape[1])

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)
    if cfg.has_bias:
      dtable_ref[...] = dtable_scr[...]


def _dkdv_kernel(*refs, cfg: Config, has_segments: bool, num_q_blocks: int, group: int):
  sched, inputs, q_seg_ref, kv_seg_ref, table_ref, rest = split_refs(refs, cfg, has_segments, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  kv_head, j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_start, k_start = i * cfg.block_q, j * cfg.block_k
  _, active = _q_step(cfg, j, i, num_q_blocks, sched)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(active)
  def _step():
    q, do = q_ref[...], do_ref[...]
    p, ds = _probs_and_dscores(cfg, (q_seg_ref, kv_seg_ref, v_ref, do_ref, lse_ref, delta_ref),
                               q, k_ref[...], q_start, k_start, kv_head * group + g, table_ref)
    dv_scr[...] += _matmul(p.astype(do.dtype), do, 0)
    dk_scr[...] += _matmul(ds.astype(q.dtype), q, 0)

  @pl.when((g == group - 1) & (i == num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _q_step(cfg: Config, j, i, num_q_blocks: int, sched_ref):
  """(query block to fetch, whether the step computes) at key block j, query step i."""
  return scheduled_step(j, i, num_q_blocks, sched_ref,
                        lambda: q_block_range(cfg, j * cfg.block_k, num_q_blocks))


def _dq(cfg, args, q_seg, kv_seg, table, sched, dims):
  batch, heads, group, nq, nk, depth = dims
  bq, bk = cfg.block_q, cfg.block_k
  prefetch = [sched] if sched is not None else []

  def kv_block(i, j, pre):
    return k_step(cfg, i, j, nk, pre[0] if pre else None)[0]

  q_spec = pl.BlockSpec((None, None, bq, depth), lambda b, h, i, j, *_: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, depth),
                         lambda b, h, i, j, *pre: (b, lax.div(h, group), kv_block(i, j, pre), 0))
  specs, extra = option_args(cfg, q_seg, kv_seg, table, lambda b, h, i, j, *_: (b, i, 0),
                             lambda b, h, i, j, *pre: (b, 0, kv_block(i, j, pre)))
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)]
  scratch = [pltpu.VMEM((bq, depth), jnp.float32)]
  if cfg.has_bias:  # buckets on the lanes, padded to whole vregs
    width = -(-cfg.bias_buckets // LANES) * LANES
    out_specs.append(pl.BlockSpec((None, None, None, 1, width),
                                  lambda b, h, i, j, *_: (b, h, i, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, nq, 1, width), jnp.float32))
    scratch.append(pltpu.VMEM((1, width), jnp.float32))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(batch, heads, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *specs],
      out_specs=out_specs, scratch_shapes=scratch)
  kernel = functools.partial(_dq_kernel, cfg=cfg, has_segments=q_seg is not None,
                             num_k_blocks=nk)
  dq, *partials = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=compiler_params(3, 1),
      interpret=interpret_params(cfg), name='flash_attention_dq_tpu')(*prefetch, *args, *extra)
  if not cfg.has_bias:
    return dq, None
  return dq, jnp.sum(partials[0], axis=(0, 2, 3))[:, :cfg.bias_buckets].astype(table.dtype)


def _dkdv(cfg, args, q_seg, kv_seg, table, sched, dims, kv_shape, kv_dtypes):
  batch, _, group, nq, nk, depth = dims
  kv_heads = kv_shape[1]
  bq, bk = cfg.block_q, cfg.block_k
  prefetch = [sched] if sched is not None else []

  def q_block(j, i, pre):
    return _q_step(cfg, j, i, nq, pre[0] if pre else None)[0]

  def q_map(b, h, j, g, i, *pre):
    return (b, h * group + g, q_block(j, i, pre), 0)

  q_spec = pl.BlockSpec((None, None, bq, depth), q_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, depth), lambda b, h, j, g, i, *_: (b, h, j, 0))
  specs, extra = option_args(cfg, q_seg, kv_seg, table,
                             lambda b, h, j, g, i, *pre: (b, q_block(j, i, pre), 0),
                             lambda b, h, j, g, i, *_: (b, 0, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, nk, group, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *specs],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((bk, depth), jnp.float32),
                      pltpu.VMEM((bk, depth), jnp.float32)])
  kernel = functools.partial(_dkdv_kernel, cfg=cfg, has_segments=q_seg is not None,
                             num_q_blocks=nq, group=group)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(kv_shape, dtype) for dtype in kv_dtypes],
      compiler_params=compiler_params(3, 2), interpret=interpret_params(cfg),
      name='flash_attention_dkdv_tpu')(*prefetch, *args, *extra)


def flash_backward_tpu(q, k, v, q_seg, kv_seg, table, sparse, out, lse, d_out, cfg: Config):
  """Padded inputs, the forward's out and lane-replicated lse, and d_out -> (dq, dk, dv, dtable).

  dtable is None without a relative bias.
  """
  batch, q_len, heads, depth = q.shape
  group = heads // k.shape[2]
  nq, nk = q_len // cfg.block_q, k.shape[1] // cfg.block_k
  # D = rowsum(dO * O) [b, heads, lq]: elementwise, left to XLA to fuse with the broadcast.
  delta = lane_column(jnp.einsum('bqhd,bqhd->bhq', d_out.astype(jnp.float32),
                                 out.astype(jnp.float32)))
  qt, kt, vt, dot = (heads_major(x) for x in (q, k, v, d_out))
  args = (qt, kt, vt, dot, lse, delta)
  sched_q = sched_k = None
  if cfg.block_sparse:  # the dq kernel walks rows of the block mask, dk/dv its columns
    visible = visible_blocks(cfg, sparse, nq, nk)
    sched_q, sched_k = fetch_table(visible), fetch_table(visible.T)
  dims = (batch, heads, group, nq, nk, depth)
  dq, dtable = _dq(cfg, args, q_seg, kv_seg, table, sched_q, dims)
  dk, dv = _dkdv(cfg, args, q_seg, kv_seg, table, sched_k, dims, kt.shape, (k.dtype, v.dtype))
  return heads_major(dq), heads_major(dk), heads_major(dv), dtable
