"""Flash attention backward Pallas kernels (FlashAttention-2 style, two kernels).

With P = exp(S - lse) rebuilt from the saved logsumexp and D = rowsum(dO * O):
  dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale dS K,   dK = scale dS^T Q.
- dk/dv kernel: one program per (batch, KV head, key block); it loops over the query heads of
  its group and over query blocks, so dK/dV of grouped heads are summed in the kernel and
  written once, at the KV head count.
- dq kernel: one program per (batch, query head, query block), looping over key blocks.
Both accumulate in float32 and skip blocks that the causal/window mask hides entirely, or that
the block-sparse mask turns off.
- relative bias: the logit bias is its own input, so d(table)[h, n] is the sum of dS over the
  entries of bucket n. The dq kernel (one query head per program) sums it per query block and
  writes [b, heads, q_blocks, buckets] partials that XLA reduces.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from efficientlm.kernels.flash_attention_fwd import (Config, block_buckets, block_mask,
                                                     block_scores, k_block_range, matmul_nt,
                                                     option_specs, triton_params,
                                                     unpack_options,
                                                     when_block_active)


def _matmul_tn(a, b):
  """a[m, n]^T @ b[m, d] in float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs_and_dscores(cfg, q, k, v, do, lse, delta, mask, s):
  """P and dS [block_q, block_k] of one block pair, float32, from its logits s."""
  p = jnp.exp(s - lse[:, None])  # rows that saw no key have lse = +inf, so p = 0
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = matmul_nt(do, v)
  return p, p * (dp - delta[:, None])


def q_block_range(cfg: Config, k_start, num_q_blocks: int):
  """[lo, hi) of query blocks that can see the key block starting at k_start."""
  lo, hi = 0, num_q_blocks
  k_last = k_start + cfg.block_k - 1
  if cfg.causal:  # query at position p sees key j iff j <= p, p = row + offset
    lo = jnp.clip(lax.div(jnp.maximum(k_start - cfg.offset, 0), cfg.block_q), 0, num_q_blocks)
  if cfg.window is not None:  # p - window < j  =>  row <= j + window - 1 - offset
    last_row = k_last + cfg.window - 1 - cfg.offset
    hi = jnp.clip(lax.div(jnp.maximum(last_row, -1) + cfg.block_q, cfg.block_q), 0, num_q_blocks)
    if not cfg.causal:  # j - p < window  =>  row >= j - window + 1 - offset
      first_row = k_start - cfg.window + 1 - cfg.offset
      lo = jnp.clip(lax.div(jnp.maximum(first_row, 0), cfg.block_q), 0, num_q_blocks)
  return lo, hi


def _bucket_sums(cfg: Config, buckets, ds):
  """Float32 [buckets]: the sum of ds over the entries of each bucket."""
  ids = lax.broadcasted_iota(jnp.int32, (cfg.bias_buckets,), 0)

  def add_bucket(n, sums):
    return sums + jnp.where(ids == n, jnp.sum(jnp.where(buckets == n, ds, 0.0)), 0.0)

  return lax.fori_loop(0, cfg.bias_buckets, add_bucket, jnp.zeros((cfg.bias_buckets,),
                                                                   jnp.float32))


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config,
                 has_segments: bool):
  q_seg_ref, kv_seg_ref, table_ref, sparse_ref, dk_ref, dv_ref = unpack_options(
      refs, cfg, has_segments)
  block_q, block_k = cfg.block_q, cfg.block_k
  kj = pl.program_id(2)  # read here: interpret mode cannot lower program_id inside loops
  k_start = kj * block_k
  k, v = k_ref[...], v_ref[...]
  kv_seg = kv_seg_ref[...] if has_segments else None
  group, num_q_blocks = q_ref.shape[1], q_ref.shape[0] // block_q
  lo, hi = q_block_range(cfg, k_start, num_q_blocks)

  def head_body(g, carry):
    def q_block(i, carry):
      dk, dv = carry
      q_start = i * block_q
      rows = pl.ds(q_start, block_q)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      q_seg = q_seg_ref[rows] if has_segments else None
      mask = block_mask(cfg, q_start, k_start, q_seg, kv_seg, block_q, block_k)
      s = block_scores(cfg, q, k, q_start, k_start, table_ref, head=g)
      p, ds = _probs_and_dscores(cfg, q, k, v, do, lse_ref[g, rows], delta_ref[g, rows], mask,
                                 s)
      dv = dv + _matmul_tn(p.astype(do.dtype), do)
      dk = dk + _matmul_tn(ds.astype(q.dtype), q)
      return dk, dv

    def q_body(i, carry):
      return when_block_active(sparse_ref, i, kj, functools.partial(q_block, i),
                               carry)

    return lax.fori_loop(lo, hi, q_body, carry)

  zeros = jnp.zeros((block_k, k_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: Config,
               has_segments: bool):
  q_seg_ref, kv_seg_ref, table_ref, sparse_ref, dq_ref, *dtable_ref = unpack_options(
      refs, cfg, has_segments)
  block_q, block_k = cfg.block_q, cfg.block_k
  qi = pl.program_id(2)  # read here: interpret mode cannot lower program_id inside loops
  q_start = qi * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = q_seg_ref[...] if has_segments else None

  def block(j, carry):
    dq, dtable = carry
    k_start = j * block_k
    cols = pl.ds(k_start, block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    kv_seg = kv_seg_ref[cols] if has_segments else None
    mask = block_mask(cfg, q_start, k_start, q_seg, kv_seg, block_q, block_k)
    s = block_scores(cfg, q, k, q_start, k_start, table_ref)
    _, ds = _probs_and_dscores(cfg, q, k, v, do, lse, delta, mask, s)
    if cfg.has_bias:  # the bias enters the logits unscaled: its cotangent is dS itself
      dtable = dtable + _bucket_sums(cfg, block_buckets(cfg, q_start, k_start, *ds.shape), ds)
    return dq + _matmul_nn(ds.astype(k.dtype), k), dtable

  def body(j, carry):
    return when_block_active(sparse_ref, qi, j, functools.partial(block, j), carry)

  lo, hi = k_block_range(cfg, q_start, k_ref.shape[0] // block_k)
  init = (jnp.zeros(q_ref.shape, jnp.float32), jnp.zeros((max(cfg.bias_buckets, 1),),
                                                         jnp.float32))
  dq, dtable = lax.fori_loop(lo, hi, body, init)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  if cfg.has_bias:
    dtable_ref[0][...] = dtable


def flash_backward(q, k, v, q_seg, kv_seg, table, sparse, out, lse, d_out, cfg: Config):
  """Padded inputs and the forward's (out, lse) plus d_out -> (dq, dk, dv, dtable | None)."""
  batch, q_len, heads, depth = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  has_segments = q_seg is not None
  # D = rowsum(dO * O) [b, heads, lq]: elementwise, left to XLA to fuse.
  delta = jnp.einsum('bqhd,bqhd->bhq', d_out.astype(jnp.float32), out.astype(jnp.float32))
  seg_args = [q_seg, kv_seg] if has_segments else []

  # dk, dv: grid over (batch, KV head, key block); all query heads of the group, whole length.
  q_group = pl.BlockSpec((None, q_len, group, depth), lambda b, h, j: (b, 0, h, 0))
  row_group = pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0))
  k_block = pl.BlockSpec((None, cfg.block_k, None, depth), lambda b, h, j: (b, j, h, 0))
  in_specs = [q_group, k_block, k_block, q_group, row_group, row_group]
  if has_segments:
    in_specs += [pl.BlockSpec((None, q_len), lambda b, h, j: (b, 0)),
                 pl.BlockSpec((None, cfg.block_k), lambda b, h, j: (b, j))]
  # The table rows of the KV head's group of query heads.
  specs, option_args = option_specs(cfg, table, sparse, lambda b, h, j: h, table_rows=group)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, has_segments=has_segments),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(batch, kv_heads, k_len // cfg.block_k), in_specs=in_specs + specs,
      out_specs=[k_block, k_block], interpret=cfg.interpret, compiler_params=triton_params(cfg),
      name='flash_attention_dkdv')(q, k, v, d_out, lse, delta, *seg_args, *option_args)

  # dq: grid over (batch, query head, query block), like the forward.
  q_block = pl.BlockSpec((None, cfg.block_q, None, depth), lambda b, h, i: (b, i, h, 0))
  row_block = pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))
  kv_all = pl.BlockSpec((None, k_len, None, depth), lambda b, h, i: (b, 0, h // group, 0))
  in_specs = [q_block, kv_all, kv_all, q_block, row_block, row_block]
  if has_segments:
    in_specs += [pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
                 pl.BlockSpec((None, k_len), lambda b, h, i: (b, 0))]
  specs, option_args = option_specs(cfg, table, sparse, lambda b, h, i: h)
  num_q_blocks = q_len // cfg.block_q
  out_shape, out_specs = [jax.ShapeDtypeStruct(q.shape, q.dtype)], [q_block]
  if cfg.has_bias:  # per-(batch, head, query block) partial sums of d(table)
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_q_blocks, cfg.bias_buckets),
                                          jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, None, cfg.bias_buckets),
                                  lambda b, h, i: (b, h, i, 0)))
  dq, *dtable = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments),
      out_shape=out_shape, grid=(batch, heads, num_q_blocks), in_specs=in_specs + specs,
      out_specs=out_specs, interpret=cfg.interpret, compiler_params=triton_params(cfg),
      name='flash_attention_dq')(q, k, v, d_out, lse, delta, *seg_args, *option_args)
  dtable = jnp.sum(dtable[0], axis=(0, 2)).astype(table.dtype) if cfg.has_bias else None
  return dq, dk, dv, dtable
