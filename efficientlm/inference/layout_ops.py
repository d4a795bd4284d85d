"""Per-chip building blocks of the layout bodies (called inside shard_map).

Every collective of a layer goes through the few helpers here, one call per collective of the
contract (layout_spec): an empty axis group means no collective at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficientlm.inference import quantization
from efficientlm.inference.layout_plan import Axes, LayerPlan


def linear_index(axes: Axes) -> jax.Array:
  """This chip's index over `axes`, the first axis major (0 for no axes)."""
  index = jnp.zeros((), jnp.int32)
  for a in axes:
    index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return index


def all_gather(x: jax.Array, axes: Axes, axis: int) -> jax.Array:
  return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def reduce_scatter(x: jax.Array, axes: Axes, axis: int) -> jax.Array:
  return jax.lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True) if axes else x


def gather_weight(w, axes: Axes, axis: int):
  """Weight-gathered layouts: the stored shard -> the F_Aout (or heads) chunk. int8 weights
  travel as int8; their scales are stored replicated over Ab, so they need no collective."""
  if quantization.is_quantized(w):
    return quantization.QuantizedWeight(all_gather(w.values, axes, axis), w.scale)
  return all_gather(w, axes, axis)


def matmul(x: jax.Array, w, dtype) -> jax.Array:
  """x [..., in] @ w [in, out] in `dtype`; int8 weights are scaled per output after the matmul
  (the scale commutes with the partial sums over Ain)."""
  if quantization.is_quantized(w):
    return (x @ w.values.astype(dtype)) * w.scale[0].astype(dtype)
  return x @ jnp.asarray(w, dtype)


def gathered_norm(plan: LayerPlan, x: jax.Array, scale: jax.Array) -> jax.Array:
  """Residual b L E_(Ain,Aout) -> all-gather over Aout -> RMSNorm on b L E_Ain, whose sum of
  squares is all-reduced over Ain in float32 (steps 2 and 3)."""
  cfg = plan.config
  x = all_gather(x, plan.aout, axis=2)
  x32 = x.astype(jnp.float32)
  sum_sq = jnp.sum(jnp.square(x32), axis=-1)
  if plan.ain:
    sum_sq = jax.lax.psum(sum_sq, plan.ain)
  y = x32 * jax.lax.rsqrt(sum_sq[..., None] / cfg.emb_dim + cfg.layer_norm_epsilon)
  return y.astype(cfg.activation_dtype) * scale.astype(cfg.activation_dtype)


def split_for_scatter(plan: LayerPlan, y: jax.Array) -> jax.Array:
  """[b, L, c] partial over Ain -> [b, L, |Ain|, c / |Ain|], one slice per destination chip."""
  b, length, c = y.shape
  n = plan.size(plan.ain)
  return y.reshape(b, length, n, c // n)


def fused_reduce_scatter(plan: LayerPlan, parts: list[jax.Array]) -> list[jax.Array]:
  """ONE reduce-scatter over Ain of several [b, L, |Ain|, c_i] partial sums -> [b, L, c_i]."""
  widths = [p.shape[-1] for p in parts]
  y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
  y = reduce_scatter(y, plan.ain, axis=2)[:, :, 0]
  return _split(y, widths)


def fused_all_gather(plan: LayerPlan, parts: list[jax.Array]) -> list[jax.Array]:
  """ONE all-gather over Ain of several [b, L, c_i] -> [b, L, |Ain| c_i] (the chunk of chip i
  of Ain at i)."""
  if not plan.ain:
    return parts
  widths = [p.shape[-1] for p in parts]
  y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
  y = jax.lax.all_gather(y, plan.ain, axis=2, tiled=False)  # [b, L, |Ain|, sum c_i]
  return [p.reshape(*p.shape[:2], -1) for p in _split(y, widths)]


def _split(y: jax.Array, widths: list[int]) -> list[jax.Array]:
  out, start = [], 0
  for w in widths:
    out.append(y[..., start:start + w])
    start += w
  return out
