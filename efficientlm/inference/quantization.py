"""int8 weight-only quantization: per-output-channel symmetric scales, dequantized per matmul.

As in Pope et al. 2022 (section 3.5) for low-latency decoding: the matmul weights are stored as
int8 with one float scale per output channel, which quarters the bytes read per decode step
relative to float32 (halves them relative to bf16). Quantized leaves are `QuantizedWeight`s and
stay in the parameter tree as they are: `DenseGeneral` takes one and multiplies through
`matmul`, so no float copy of the weight tree exists; so does the dropless MoE's blocked grouped
matmul, per block with its expert's kernel. Kernels read otherwise (the dropping MoE path's
einsums, the expert-parallel shard_map, the sparse FFN's gathered units, convolutions) go
through `as_float`: converted whole, one layer's at a time.

The scale is per output channel, so it commutes with the contraction:

  x @ (q * s) = (x @ q) * s          q int8 [in, out], s [1, out]

`matmul` computes the right side. On CPU it converts the int8 kernel to the compute dtype one
tile of at most `TILE_BYTES` (L2-sized) at a time inside a loop: blocks of whole columns
(x @ q[:, block], written straight to the output) where such a block is at least
`MIN_BLOCK_COLS` wide, else row tiles of the contraction accumulated in float32 (long
contractions, e.g. an MLP's `wo`). XLA:CPU cannot fuse the int8 -> float convert into its GEMM:
converted whole, every kernel becomes a float temporary, and XLA schedules all those converts
at the start of the program (prefill held a float copy of every weight). With tiles the
compiled program holds no float array of a kernel's shape and reads each weight once, as int8,
at any row count. On GPU and TPU the kernel is converted whole, inside the dot, where XLA
can fuse the convert into the matmul (not measured in this project: no accelerator was lent).

Which leaves: every matmul kernel (names ending in `kernel`, 2D or stacked/expert 3D, stored
[..., in, out]) except the MoE router, whose decisions are sensitive and whose kernel is tiny.
Embedding tables, norms and position biases stay in float. `dequantize_tree` remains for
references and quality checks (benchmarks/int8_quality.py).

Deviations: the product accumulates in float32 and the scale is applied in float32 before the
cast to the activation dtype (the reference dequantizes to that dtype first; in bfloat16 the
two round differently, in float32 they agree to rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

INT8_MAX = 127
# Backends whose compiler materializes the int8 -> float convert of a matmul operand.
TILED_BACKENDS = ('cpu',)
# A converted tile holds at most TILE_BYTES, to stay in a CPU core's L2 cache. Where a block of
# whole columns that size is at least MIN_BLOCK_COLS wide, tiles are such column blocks;
# otherwise (long contractions) row tiles at most TILE_COLS wide, so that a tile keeps enough
# rows for the accumulator's traffic ([rows, TILE_COLS] per tile) to stay small next to its own.
TILE_BYTES = 256 * 1024
MIN_BLOCK_COLS = 128
TILE_COLS = 2048


@flax.struct.dataclass
class QuantizedWeight:
  """values int8 [..., in, out]; scale float32 [..., 1, out]; w ~= values * scale."""

  values: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  def dequantize(self, dtype: Any = jnp.bfloat16) -> jax.Array:
    return self.values.astype(dtype) * self.scale.astype(dtype)


def quantize(kernel: jax.Array, contract_axis: int = -2) -> QuantizedWeight:
  """Symmetric int8 with one scale per slice along every axis but `contract_axis`."""
  kernel = jnp.asarray(kernel, jnp.float32)
  absmax = jnp.max(jnp.abs(kernel), axis=contract_axis, keepdims=True)
  # An all-zero channel gets scale 1 (its values are 0 anyway) rather than a division by zero.
  scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
  values = jnp.clip(jnp.round(kernel / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return QuantizedWeight(values=values, scale=scale)


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def is_matmul_kernel(path: str, leaf: Any) -> bool:
  return path.endswith('kernel') and getattr(leaf, 'ndim', 0) >= 2 and '/router/' not in path


def quantize_tree(params: Any,
                  select: Callable[[str, Any], bool] = is_matmul_kernel) -> Any:
  """The tree with every selected leaf replaced by a QuantizedWeight (jit it with shardings to
  quantize on the devices; the scale keeps the kernel's output sharding)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: quantize(x) if select(_path(p), x) else x, params)


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, QuantizedWeight)


def dequantize_tree(params: Any, dtype: Any = jnp.bfloat16) -> Any:
  """Floats again (QuantizedWeight leaves -> dtype); other leaves unchanged."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


def as_float(kernel: Any, dtype: Any) -> jax.Array:
  """A kernel read as `dtype`: a QuantizedWeight is dequantized (for layers that gather or
  convolve their kernel rather than multiply by it), a float array is cast."""
  return kernel.dequantize(dtype) if is_quantized(kernel) else jnp.asarray(kernel, dtype)


def _divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _column_blocks(x: jax.Array, values: jax.Array, scale: jax.Array, dtype: Any,
                   cols: int) -> jax.Array:
  """x [rows, in] @ (values * scale) in `dtype`, one block of `cols` whole columns converted at
  a time; each block's output is final (scaled and cast in the loop: no float32 copy after)."""
  rows, n_out = x.shape[0], values.shape[1]

  def body(j, out):
    q = jax.lax.dynamic_slice_in_dim(values, j * cols, cols, axis=1).astype(dtype)
    s = jax.lax.dynamic_slice_in_dim(scale, j * cols, cols, axis=1)
    y = jnp.matmul(x, q, preferred_element_type=jnp.float32) * s
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(dtype), j * cols, axis=1)

  return jax.lax.fori_loop(0, n_out // cols, body, jnp.zeros((rows, n_out), dtype))


def _row_tiles(x: jax.Array, values: jax.Array, dtype: Any) -> jax.Array:
  """x [rows, in] @ values [in, out] (int8) in float32, accumulating over tiles of the
  contraction (at most TILE_BYTES, at most TILE_COLS wide: a Python loop over column blocks)."""
  (rows, n_in), n_out = x.shape, values.shape[1]
  cols = min(n_out, TILE_COLS)
  tile_rows = _divisor_at_most(n_in, max(1, TILE_BYTES // (cols * jnp.dtype(dtype).itemsize)))
  tiles = n_in // tile_rows
  # Tile j holds the rows j, j + tiles, j + 2 * tiles ...: x and the kernel split alike by a
  # reshape each (no transpose), and every tile spans the contraction dim's shards.
  x3 = x.reshape(rows, tile_rows, tiles)
  blocks = []
  for start in range(0, n_out, cols):
    q3 = values[:, start:start + cols].reshape(tile_rows, tiles, -1)

    def body(j, acc, q3=q3):
      q = jax.lax.dynamic_index_in_dim(q3, j, axis=1, keepdims=False).astype(dtype)
      xj = jax.lax.dynamic_index_in_dim(x3, j, axis=2, keepdims=False)
      return acc + jnp.matmul(xj, q, preferred_element_type=jnp.float32)

    blocks.append(jax.lax.fori_loop(0, tiles, body,
                                    jnp.zeros((rows, q3.shape[-1]), jnp.float32)))
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def matmul(x: jax.Array, kernel: Any, dtype: Any) -> jax.Array:
  """x [rows, in] @ kernel [in, out] in `dtype`, for a float kernel or a QuantizedWeight (whose
  int8 values are converted inside the product, see the module docstring)."""
  if not is_quantized(kernel):
    return jnp.asarray(x, dtype) @ jnp.asarray(kernel, dtype)
  x = jnp.asarray(x, dtype)
  values = kernel.values
  n_in, n_out = values.shape
  scale = kernel.scale.reshape(1, n_out).astype(jnp.float32)
  itemsize = jnp.dtype(dtype).itemsize
  if jax.default_backend() not in TILED_BACKENDS or n_in * n_out * itemsize <= TILE_BYTES:
    acc = jnp.matmul(x, values.astype(dtype), preferred_element_type=jnp.float32)
  else:
    cols = _divisor_at_most(n_out, max(1, TILE_BYTES // (n_in * itemsize)))
    if cols >= MIN_BLOCK_COLS:
      return _column_blocks(x, values, scale, dtype, cols)
    acc = _row_tiles(x, values, dtype)
  return (acc * scale).astype(dtype)


def weight_bytes(params: Any) -> int:
  """Bytes the tree occupies (int8 values plus their scales for quantized leaves)."""
  leaves = jax.tree.leaves(params)
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)
