"""Feed-forward blocks: plain (wi, wo) or gated (wi_0, wi_1, ..., wo); with `ia3`, the hidden
activations (the gates' product, wo's input) are scaled by a learned vector (layers/ia3.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import ia3, initializers
from efficientlm.layers.dense import DenseGeneral

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'linear': lambda x: x,
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),  # T5.1.1 uses the tanh approximation
    'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Transformer MLP. One activation gives `wi`; several give gated `wi_0 * wi_1 * ...`.

  ('gelu', 'linear') is T5.1.1's gated GELU, ('silu', 'linear') SwiGLU, ('relu',) original T5.
  """

  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  kernel_init: Callable[..., jax.Array] = initializers.default_kernel_init
  intermediate_dropout_rate: float = 0.0
  ia3: bool = False  # (IA)3's l_ff: parameter `ia3_scale` [intermediate_dim]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if not self.activations:
      raise ValueError('MlpBlock needs at least one activation.')
    fns = [get_activation(a) for a in self.activations]
    hidden = None
    for i, fn in enumerate(fns):
      name = 'wi' if len(fns) == 1 else f'wi_{i}'
      h = fn(DenseGeneral(self.intermediate_dim, ('embed', 'mlp'), kernel_init=self.kernel_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x))
      hidden = h if hidden is None else hidden * h
    if self.ia3:
      scale = ia3.scale_vector(self, ia3.FF_SCALE, (self.intermediate_dim,), ('mlp',))
      hidden = hidden * scale.astype(hidden.dtype)
    hidden = partitioning.constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    out = DenseGeneral(x.shape[-1], ('mlp', 'embed'), kernel_init=self.kernel_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name='wo')(hidden)
    return partitioning.constrain(out, ('batch', 'length', 'embed'))
