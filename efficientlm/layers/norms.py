"""T5-style RMS layer normalization."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale: no mean subtraction, no bias, variance in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)
