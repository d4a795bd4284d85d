"""Flash attention forward Pallas kernel (Dao et al. 2022) and the block mask it shares.

One program per (batch, query head, query block): it keeps the query block resident, streams
key/value blocks of its KV head (h // group, so grouped KV heads are never repeated) and keeps an
online softmax in float32. It writes the output and the per-row logsumexp for the backward.
Arrays arrive padded to whole blocks; `Config.q_len` / `k_len` are the true lengths.

Options shared with the backward kernels: a T5 relative-position bias rebuilt per block from the
query head's [buckets] table row (never an [L, L] array), and a block-sparse mask
[num_q_blocks, num_k_blocks] whose False blocks are skipped (neither loaded nor computed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from efficientlm.layers.position import relative_position_bucket


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel settings (hashable: used as a custom_vjp nondiff argument)."""
  scale: float
  causal: bool
  window: int | None
  q_len: int  # true lengths, before padding to whole blocks
  k_len: int
  block_q: int
  block_k: int
  interpret: bool  # True off the target device: Pallas interpret mode
  target: str = 'triton'  # 'triton' (GPU kernels here) or 'mosaic' (`flash_attention_tpu_*`)
  # T5 relative-position bias (bias_buckets = 0: none); the table is a kernel input.
  bias_buckets: int = 0
  bias_max_distance: int = 128
  bias_bidirectional: bool = True
  block_sparse: bool = False  # a [num_q_blocks, num_k_blocks] int32 mask is a kernel input

  @property
  def has_bias(self) -> bool:
    return self.bias_buckets > 0

  @property
  def offset(self) -> int:
    """Key position of query 0 under bottom-right causal alignment."""
    return self.k_len - self.q_len


def block_mask(cfg: Config, q_start, k_start, q_seg, kv_seg, block_q: int, block_k: int):
  """Bool [block_q, block_k] of allowed (query, key) pairs; None when nothing is masked."""
  rows = q_start + cfg.offset + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  conds = []
  if cfg.k_len % cfg.block_k:  # padded keys
    conds.append(cols < cfg.k_len)
  if cfg.causal:
    conds.append(cols <= rows)
  if cfg.window is not None:
    conds.append(rows - cols < cfg.window)
    if not cfg.causal:
      conds.append(cols - rows < cfg.window)
  if q_seg is not None:
    conds.append(q_seg[:, None] == kv_seg[None, :])
  if not conds:
    return None
  return functools.reduce(jnp.logical_and, conds)


def block_buckets(cfg: Config, q_start, k_start, block_q: int, block_k: int):
  """Int32 [block_q, block_k] T5 buckets of key_pos - query_pos (positions as in the mask)."""
  rows = q_start + cfg.offset + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return relative_position_bucket(cols - rows, cfg.bias_bidirectional, cfg.bias_buckets,
                                  cfg.bias_max_distance)


def block_scores(cfg: Config, q, k, q_start, k_start, table_ref, head=None):
  """Float32 logits [block_q, block_k]: scale q k^T plus the relative bias if any.

  table_ref is the query head's table row [buckets], or rows [group, buckets] with head set.

  The bias is looked up with one select per bucket (scalar loads of the head's table row)
  rather than a vector gather, which the Triton lowering lacks: ~buckets selects per entry.
  """
  s = matmul_nt(q, k) * cfg.scale
  if table_ref is None:
    return s
  buckets = block_buckets(cfg, q_start, k_start, *s.shape)

  def add_bucket(n, bias):
    value = table_ref[n] if head is None else table_ref[head, n]
    return jnp.where(buckets == n, value.astype(jnp.float32), bias)

  return s + lax.fori_loop(0, cfg.bias_buckets, add_bucket, jnp.zeros_like(s))


def unpack_options(refs, cfg: Config, has_segments: bool):
  """Split a kernel's trailing refs into (q_seg, kv_seg, table, sparse, outputs...) refs."""
  refs = list(refs)
  q_seg_ref, kv_seg_ref = (refs.pop(0), refs.pop(0)) if has_segments else (None, None)
  table_ref = refs.pop(0) if cfg.has_bias else None
  sparse_ref = refs.pop(0) if cfg.block_sparse else None
  return (q_seg_ref, kv_seg_ref, table_ref, sparse_ref, *refs)


def when_block_active(sparse_ref, i, j, fn, carry):
  """fn(carry) if block (i, j) is on in the block-sparse mask (or there is none), else carry."""
  if sparse_ref is None:
    return fn(carry)
  return lax.cond(sparse_ref[i, j] != 0, fn, lambda c: c, carry)


def k_block_range(cfg: Config, q_start, num_k_blocks: int):
  """[lo, hi) of key blocks that a query block starting at q_start can see."""
  lo, hi = 0, num_k_blocks
  last_pos = q_start + cfg.block_q - 1 + cfg.offset  # position of the block's last query
  if cfg.causal:
    hi = jnp.clip(lax.div(last_pos + cfg.block_k, cfg.block_k), 0, num_k_blocks)
  if cfg.window is not None:
    first_key = q_start + cfg.offset - cfg.window + 1
    lo = jnp.clip(lax.div(jnp.maximum(first_key, 0), cfg.block_k), 0, num_k_blocks)
    if not cfg.causal:
      hi = jnp.clip(lax.div(jnp.maximum(last_pos + cfg.window - 1, -1) + cfg.block_k,
                            cfg.block_k), 0, num_k_blocks)
  return lo, hi


def triton_params(cfg: Config):
  """Triton launch settings. jax >= 0.7 lowers pallas_call to Mosaic GPU unless these are given.

  4 warps suit 64x64 tiles (FlashAttention-2's forward default on A100/H100); the 128-wide
  tiles of longer sequences want 8.
  """
  warps = 8 if cfg.block_q * cfg.block_k >= 128 * 128 else 4
  return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def matmul_nt(a, b):
  """a [m, d] @ b[n, d]^T in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg: Config, has_segments: bool):
  q_seg_ref, kv_seg_ref, table_ref, sparse_ref, o_ref, lse_ref = unpack_options(
      refs, cfg, has_segments)
  block_q, block_k = cfg.block_q, cfg.block_k
  qi = pl.program_id(2)  # read here: interpret mode cannot lower program_id inside loops
  q_start = qi * block_q
  q = q_ref[...]
  q_seg = q_seg_ref[...] if has_segments else None
  num_k_blocks = k_ref.shape[0] // block_k

  def block(j, carry):
    acc, m, l = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = block_scores(cfg, q, k, q_start, k_start, table_ref)
    kv_seg = kv_seg_ref[pl.ds(k_start, block_k)] if has_segments else None
    mask = block_mask(cfg, q_start, k_start, q_seg, kv_seg, block_q, block_k)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row with nothing seen yet has max -inf; shift by 0 instead so exp gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l

  def body(j, carry):
    return when_block_active(sparse_ref, qi, j, functools.partial(block, j), carry)

  acc = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  lo, hi = k_block_range(cfg, q_start, num_k_blocks)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))
  empty = l == 0.0  # rows that see no key: output 0, lse +inf (so exp(s - lse) = 0 in bwd)
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe))


def option_specs(cfg: Config, table, sparse, head_of, table_rows=None):
  """BlockSpecs and args of the bias table rows and the block-sparse mask (whole, it is tiny).

  A program reads table_rows rows (None: one, squeezed) from block head_of(*grid indices).
  """
  specs, args = [], []
  if cfg.has_bias:
    specs.append(pl.BlockSpec((table_rows, table.shape[1]), lambda *idx: (head_of(*idx), 0)))
    args.append(table)
  if cfg.block_sparse:
    specs.append(pl.BlockSpec(sparse.shape, lambda *idx: (0, 0)))
    args.append(sparse)
  return specs, args


def flash_forward(q, k, v, q_seg, kv_seg, table, sparse, cfg: Config):
  """Padded q [b, lq, heads, d], k/v [b, lk, kv_heads, d] -> (out, lse [b, heads, lq] f32).

  table: [heads, buckets] relative-bias table or None; sparse: int32 block mask or None.
  """
  batch, q_len, heads, depth = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  has_segments = q_seg is not None
  grid = (batch, heads, q_len // cfg.block_q)
  q_spec = pl.BlockSpec((None, cfg.block_q, None, depth), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, k_len, None, depth), lambda b, h, i: (b, 0, h // group, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
                 pl.BlockSpec((None, k_len), lambda b, h, i: (b, 0))]
    args += [q_seg, kv_seg]
  specs, extra = option_specs(cfg, table, sparse, lambda b, h, i: h)
  in_specs, args = in_specs + specs, args + extra
  out_specs = [q_spec, pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)]
  kernel = functools.partial(_forward_kernel, cfg=cfg, has_segments=has_segments)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_specs, interpret=cfg.interpret,
                        compiler_params=triton_params(cfg), name='flash_attention_fwd')(*args)
