"""Projections and embeddings with logical axis names."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.inference import quantization
from efficientlm.layers import initializers

Initializer = Callable[..., jax.Array]


def _canonical(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
  """A linear map over the trailing `axis` dims of the input onto `features`.

  The kernel is stored flattened as [prod(input dims), prod(features)], as T5X/flaxformer store
  it, so T5X checkpoints map 1:1 (e.g. the query kernel is [d_model, heads * head_dim]). It is
  reshaped for the contraction. `kernel_axes` are the logical names of the two stored dims.
  The stored kernel may be an int8 `QuantizedWeight` (inference.quantization): it stays int8
  and is dequantized inside the matmul.
  """

  features: int | Sequence[int]
  kernel_axes: tuple[str, str]
  axis: int | Sequence[int] = -1
  kernel_init: Initializer = initializers.default_kernel_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = _canonical(self.axis, inputs.ndim)
    if axis != tuple(range(inputs.ndim - len(axis), inputs.ndim)):
      raise ValueError(f'DenseGeneral contracts trailing dims only; got axis {self.axis}.')
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (math.prod(in_shape), math.prod(features)), self.param_dtype)
    # One 2D matmul over all leading dims: XLA:CPU runs the kernel gradient of a contraction
    # over several batch dims ([B, L, d] x [B, L, f]) about 2x slower than the same 2D GEMM.
    lead = inputs.shape[:inputs.ndim - len(axis)]
    out = quantization.matmul(inputs.reshape(math.prod(lead), math.prod(in_shape)), kernel,
                              self.dtype)
    return out.reshape(lead + features)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = initializers.embedding_init
  # A one-hot matmul instead of a gather: faster on TPU when the vocab is sharded.
  one_hot: bool = False

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer token ids, got {ids.dtype}.')
    table = jnp.asarray(self.embedding, self.dtype)
    if self.one_hot:
      return jax.nn.one_hot(ids, self.num_embeddings, dtype=self.dtype) @ table
    return jnp.take(table, ids, axis=0)

  def attend(self, query: jax.Array) -> jax.Array:
    """Logits against the table: query [..., embed] -> [..., vocab]."""
    return jnp.einsum('...d,vd->...v', jnp.asarray(query, self.dtype),
                      jnp.asarray(self.embedding, self.dtype))
