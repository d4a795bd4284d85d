"""Grouped matmul for dropless MoE: rows sorted by expert times that expert's weight.

out[r] = x[r] @ w[g(r)] where rows [start_g, start_g + group_sizes[g]) belong to group g (the
semantics of jax.lax.ragged_dot; rows past sum(group_sizes) give 0). Gradients:
dx[r] = dy[r] @ w[g(r)]^T and dw[g] = sum over rows r of g of x[r]^T dy[r].

Two implementations:

  'ragged_dot'  jax.lax.ragged_dot. TPU compiles it to a grouped-matmul kernel. CPU XLA, and GPU
                XLA for the weight gradient, expand it into a dense masked dot over all groups:
                G times the FLOPs and a [G, M, K] temporary.
  'blocked'     MegaBlocks/megablox-style tiling in plain JAX (Gale et al. 2022, "MegaBlocks:
                Efficient Sparse Training with Mixture-of-Experts"): each group's rows are cut
                into blocks of `block_size` rows, and one loop step multiplies one block by its
                group's weight. The loop runs only the blocks that exist (a while loop whose trip
                count is sum_g ceil(group_sizes[g] / block), not the static worst case
                M / block + G), so work is sum_g ceil(n_g / block) * block * K * N and memory
                O(M * N). The backward pass is one more loop of the same kind computing both
                gradients (a custom VJP), so no per-step weight copies are saved for it.

Deviations from MegaBlocks: no block-sparse kernel (XLA has none on CPU); a group's last block
is not masked in the forward pass and in dx but overwritten by the later blocks that own those
rows, and the block size is one per call, chosen from the mean group size (block_size_for).

'auto' picks ragged_dot on TPU or when the expert axis is sharded (GSPMD partitions ragged_dot
over experts, not a loop), blocked otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.inference import quantization
from efficientlm.layers.moe.config import GROUPED_MATMULS


def block_size_for(rows: int, groups: int) -> int:
  """A power of two near half the mean group size, within [32, 256]: smaller blocks waste less
  work on each group's last partial block, larger ones pay the per-step loop cost (a weight
  read, and in the backward pass a read-modify-write of dw[g]) less often. Measured on the
  2-core CPU with benchmarks/moe_bench.py: 32 rows beat 64 at 32 tokens per expert, 64-128
  beat 32 at 128 per expert, 256 is as good as 512-1024 at 2048 per expert."""
  target = rows / groups / 2
  size = 32
  while size < 256 and size * 2 <= target:
    size *= 2
  return size


def _plan(group_sizes: jax.Array, rows: int, block: int):
  """Blocks in row order: each block's group, first row and its group's end row, as arrays of
  static length M / block + G, and the number of real blocks (the loops' trip count)."""
  num_groups = group_sizes.shape[0]
  max_blocks = -(-rows // block) + num_groups
  ends = jnp.cumsum(group_sizes)
  blocks_per_group = -(-group_sizes // block)
  block_ends = jnp.cumsum(blocks_per_group)
  index = jnp.arange(max_blocks)
  group = jnp.minimum(jnp.searchsorted(block_ends, index, side='right'), num_groups - 1)
  within = index - (block_ends[group] - blocks_per_group[group])
  first = ends[group] - group_sizes[group] + within * block
  return group, first, ends[group], block_ends[-1]


def _block_product(xb, w, g):
  """xb @ w[g]; for an int8 QuantizedWeight through quantization.matmul, which converts the
  expert's kernel tile by tile (no float copy of it) and scales after the product."""
  if quantization.is_quantized(w):
    one = quantization.QuantizedWeight(values=w.values[g], scale=w.scale[g])
    return quantization.matmul(xb, one, xb.dtype)
  return jnp.dot(xb, w[g], preferred_element_type=jnp.float32)


def _gmm(x, w, group_sizes, block):
  """Forward loop: out[block rows] = x[block rows] @ w[group].

  A group's last block also writes rows past the group's end; those rows belong to later groups
  (whose blocks come later in the loop and overwrite them) or lie past sum(group_sizes) (zeroed
  at the end), so no step needs a mask.
  """
  rows = x.shape[0]
  group, first, _, count = _plan(group_sizes, rows, block)
  x_pad = jnp.pad(x, ((0, block), (0, 0)))  # so no block window is shifted by clamping
  dtype = x.dtype if quantization.is_quantized(w) else jnp.promote_types(x.dtype, w.dtype)
  out = jnp.zeros((rows + block, w.shape[-1]), dtype)

  def step(i, out):
    s = first[i]
    xb = jax.lax.dynamic_slice_in_dim(x_pad, s, block)
    yb = _block_product(xb, w, group[i]).astype(out.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, yb, s, 0)

  out = jax.lax.fori_loop(0, count, step, out)
  return jnp.where((jnp.arange(rows) < jnp.sum(group_sizes))[:, None], out[:rows], 0)


def _gmm_backward(x, w, dy, group_sizes, block):
  """One loop for both gradients: dx[block rows] = dy[block rows] @ w[g]^T (unmasked, as in
  the forward loop) and dw[g] += x[rows of g]^T dy[rows of g] (x masked to the group's rows)."""
  rows = x.shape[0]
  group, first, end, count = _plan(group_sizes, rows, block)
  x_pad = jnp.pad(x, ((0, block), (0, 0)))
  dy_pad = jnp.pad(dy, ((0, block), (0, 0)))
  dx = jnp.zeros((rows + block, x.shape[1]), x.dtype)
  dw = jnp.zeros(w.shape, jnp.float32)
  contract_n = (((1,), (1,)), ((), ()))  # dy [B, N] . w[g] [K, N] -> [B, K], no transpose op
  contract_rows = (((0,), (0,)), ((), ()))  # x [B, K] . dy [B, N] -> [K, N]

  def step(i, carry):
    dx, dw = carry
    g, s = group[i], first[i]
    dyb = jax.lax.dynamic_slice_in_dim(dy_pad, s, block)
    dxb = jax.lax.dot_general(dyb, w[g], contract_n, preferred_element_type=jnp.float32)
    in_group = (s + jnp.arange(block) < end[i])[:, None]
    xb = jnp.where(in_group, jax.lax.dynamic_slice_in_dim(x_pad, s, block), 0)
    dwb = jax.lax.dot_general(xb, dyb, contract_rows, preferred_element_type=jnp.float32)
    return (jax.lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), s, 0),
            jax.lax.dynamic_update_index_in_dim(dw, dw[g] + dwb, g, 0))

  dx, dw = jax.lax.fori_loop(0, count, step, (dx, dw))
  dx = jnp.where((jnp.arange(rows) < jnp.sum(group_sizes))[:, None], dx[:rows], 0)
  return dx, dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                           block: int) -> jax.Array:
  """x [M, K], w [G, K, N], group_sizes [G] int32 -> [M, N]."""
  return _gmm(x, w, group_sizes, block)


def _fwd(x, w, group_sizes, block):
  return _gmm(x, w, group_sizes, block), (x, w, group_sizes)


def _bwd(block, residuals, dy):
  x, w, group_sizes = residuals
  dx, dw = _gmm_backward(x, w, dy, group_sizes, block)
  return dx, dw, None


blocked_grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   implementation: str = 'auto', block_size: int | None = None) -> jax.Array:
  """x [M, K] with rows sorted by group, w [G, K, N], group_sizes [G] -> [M, N].

  w may be an int8 quantization.QuantizedWeight (inference: no gradient): the blocked loop then
  multiplies each block by its expert's int8 kernel tile by tile; ragged_dot gets the kernel
  converted whole (where XLA can fuse the convert into its kernel)."""
  if implementation not in GROUPED_MATMULS:
    raise ValueError(f'grouped matmul implementation {implementation!r} not in '
                     f'{GROUPED_MATMULS}')
  if implementation == 'auto':
    on_tpu = jax.default_backend() == 'tpu'
    implementation = ('ragged_dot' if on_tpu or partitioning.activation_axis_size('expert') > 1
                      else 'blocked')
  if implementation == 'ragged_dot':
    return jax.lax.ragged_dot(x, quantization.as_float(w, x.dtype), group_sizes)
  block = block_size or block_size_for(x.shape[0], w.shape[0])
  if quantization.is_quantized(w):
    return _gmm(x, w, group_sizes.astype(jnp.int32), block)
  return blocked_grouped_matmul(x, w, group_sizes.astype(jnp.int32), block)
