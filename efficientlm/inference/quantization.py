"""int8 weight-only quantization: per-output-channel symmetric scales, bf16 compute.

As in Pope et al. 2022 (section 3.5) for low-latency decoding: the matmul weights are stored as
int8 with one float scale per output channel, which halves the bytes read per decode step
relative to bf16; activations and the matmuls stay in bf16. Quantized leaves are
`QuantizedWeight`s; `dequantize_tree` turns a tree back into floats inside the jitted step, so
HBM holds int8 and XLA fuses the convert into its consumers where the backend can.

Which leaves: every matmul kernel (names ending in `kernel`, 2D or stacked/expert 3D, stored
[..., in, out]) except the MoE router, whose decisions are sensitive and whose kernel is tiny.
Embedding tables, norms and position biases stay in float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

INT8_MAX = 127


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


def weight_bytes(params: Any) -> int:
  """Bytes the tree occupies (int8 values plus their scales for quantized leaves)."""
  leaves = jax.tree.leaves(params)
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)
