"""The Scaling Transformer's sparse feed-forward layer (Jaszczur et al. 2021, "Sparse is Enough in
Scaling Transformers", NeurIPS 2021, sec. 3.1), a drop-in for layers/mlp.MlpBlock.

The d_ff hidden units are split into d_ff / N blocks of N consecutive units (unit u is in block
u // N); per token exactly one unit of each block is active. A low-rank controller picks it:

  logits = (x D1) D2,                 D1 [d_model, r], D2 [r, d_ff], reshaped [d_ff / N, N]
  h      = act_0(x W_0) * act_1(x W_1) * ...   (MlpBlock's hidden layer: wi, or gated wi_0, wi_1..)
  y      = (h * mask) W_o,            mask [d_ff] one-hot within every block of N.

Training (deterministic=False): Gumbel-softmax with a straight-through one-hot (Jang et al. 2017;
Bengio et al. 2013), g ~ Gumbel(0, 1) i.i.d. per logit from the 'dropout' rng stream:

  forward   mask = one_hot(argmax(logits + g))          (exactly 0/1, one unit per block)
  backward  d mask / d logits = d softmax((logits + g) / tau) / d logits

(computed as hard + (soft - stop_gradient(soft)), which is exactly `hard` in the forward pass).
Inference (deterministic=True): mask = one_hot(argmax(logits)), no rng. The controller runs in
float32.

Decoding (`decode=True`, the models' decode='step'): only the selected unit of each block is
computed, gathering column k of every W_i and row k of W_o for each selected unit k, so a token
costs r (d_model + d_ff) + (n_wi + 1) d_model d_ff / N multiply-adds instead of
(n_wi + 1) d_model d_ff (`flops`). Same values as the masked path (the unselected units are
multiplied by zero there).

`SparseFfnConfig.all_units` bypasses the controller (a mask of ones): the dense MlpBlock, with its
parameter tree. Parameters: MlpBlock's (wi or wi_0, wi_1 ..., wo; same shapes, logical axes and
initializers: a dense checkpoint loads) plus controller_d1 [d_model, r] and
controller_d2 [r, d_ff] (unit-variance fan-in init).

Deviations from the paper / trax (google/trax trax/layers/research/sparsity.py, SparseFF):
- trax's controller adds a bias to the logits and multiplies the logits' Gumbel noise by a
  "temperature" (a sampling temperature); we follow the paper's plain low-rank product and the
  standard Gumbel-softmax (noise unscaled, tau only in the backward softmax).
- trax sometimes trains with the soft mask instead of the one-hot (quant_prob) and scales W_o by
  sqrt(N) at init; we always train with the straight-through one-hot and keep MlpBlock's init.
- The mask multiplies the hidden layer after the activations and gates (trax masks before its
  ReLU, the same forward values for ReLU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.inference import quantization
from efficientlm.layers import initializers
from efficientlm.layers.mlp import get_activation


@dataclasses.dataclass(frozen=True)
class SparseFfnConfig:
  """The sparse feed-forward layer of every dense FFN layer (TransformerConfig.sparse_ffn)."""

  block_size: int = 32  # N: hidden units per block, one of them active per token
  controller_rank: int = 64  # r: the controller's low-rank bottleneck
  temperature: float = 1.0  # tau of the Gumbel-softmax's backward softmax
  all_units: bool = False  # bypass the controller: every unit active (the dense FFN)

  def __post_init__(self):
    checks = [
        (self.block_size >= 1, f'block_size must be >= 1, got {self.block_size}'),
        (self.controller_rank >= 1, f'controller_rank must be >= 1, got {self.controller_rank}'),
        (self.temperature > 0, f'temperature must be > 0, got {self.temperature}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'SparseFfnConfig: {message}.')

  def check_mlp_dim(self, mlp_dim: int) -> None:
    if mlp_dim % self.block_size:
      raise ValueError(f'SparseFfnConfig: mlp_dim {mlp_dim} is not divisible by block_size '
                       f'{self.block_size}; set mlp_dim to a multiple of block_size or pick a '
                       'block_size that divides mlp_dim.')


def straight_through_mask(logits: jax.Array, temperature: float,
                          rng: jax.Array | None = None) -> jax.Array:
  """One-hot over the last axis of float32 `logits` [..., N]: argmax(logits + Gumbel noise)
  (rng given) or argmax(logits) (rng None), with the gradient of softmax((logits + g) / tau)."""
  logits = logits.astype(jnp.float32)
  if rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  soft = jax.nn.softmax(logits / temperature, axis=-1)
  return hard + (soft - jax.lax.stop_gradient(soft))  # exactly `hard` forward


def dense_flops(d_model: int, mlp_dim: int, num_wi: int) -> int:
  """Multiply-adds per token of the dense FFN: num_wi input projections and wo."""
  return (num_wi + 1) * d_model * mlp_dim


def sparse_decode_flops(d_model: int, mlp_dim: int, num_wi: int, config: SparseFfnConfig) -> int:
  """Multiply-adds per token of the gather path: the controller, then mlp_dim / N units."""
  if config.all_units:
    return dense_flops(d_model, mlp_dim, num_wi)
  controller = config.controller_rank * (d_model + mlp_dim)
  return controller + (num_wi + 1) * d_model * (mlp_dim // config.block_size)


class _Kernel(nn.Module):
  """A [in, out] kernel named like DenseGeneral's (`<name>/kernel`), returned unapplied: the
  gather path reads a few of its columns or rows."""

  shape: tuple[int, int]
  axes: tuple[str, str]
  init: Callable[..., jax.Array]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', nn.with_logical_partitioning(self.init, self.axes), self.shape,
                      self.param_dtype)


class SparseMlpBlock(nn.Module):
  """MlpBlock with a controller that keeps one hidden unit per block of `config.block_size`.

  Called as MlpBlock, `(x, deterministic=True)`; `decode=True` computes only the selected units
  (decoding steps). Training draws the controller's Gumbel noise from the 'dropout' stream.
  """

  intermediate_dim: int
  config: SparseFfnConfig = SparseFfnConfig()
  activations: Sequence[str] = ('gelu', 'linear')
  kernel_init: Callable[..., jax.Array] = initializers.default_kernel_init
  intermediate_dropout_rate: float = 0.0
  decode: bool = False  # the gather path (one token's few units), deterministic
  # Sow each token's selected unit per block [..., d_ff / N] as intermediates/selected (for
  # analysis and tests; off in the models: reversible branches may hold only parameters).
  sow_selection: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg, width = self.config, self.intermediate_dim
    if not self.activations:
      raise ValueError('SparseMlpBlock needs at least one activation.')
    cfg.check_mlp_dim(width)
    d_model = x.shape[-1]
    fns = [get_activation(a) for a in self.activations]
    names = ['wi'] if len(fns) == 1 else [f'wi_{i}' for i in range(len(fns))]
    # as_float: int8 kernels (QuantizedWeight, inference.quantization) are dequantized here.
    wis = [quantization.as_float(_Kernel((d_model, width), ('embed', 'mlp'), self.kernel_init,
                                         self.param_dtype, name=n)(), self.dtype) for n in names]
    wo = quantization.as_float(_Kernel((width, d_model), ('mlp', 'embed'), self.kernel_init,
                                       self.param_dtype, name='wo')(), self.dtype)
    lead = x.shape[:-1]
    flat = jnp.asarray(x, self.dtype).reshape(math.prod(lead), d_model)
    if cfg.all_units:
      mask = None
    else:
      logits = self._controller(flat)
      if self.decode:
        return self._gather(flat, jnp.argmax(logits, axis=-1), wis, wo, fns).reshape(x.shape)
      rng = None if deterministic else self.make_rng('dropout')
      block_mask = straight_through_mask(logits, cfg.temperature, rng)
      if self.sow_selection:
        self.sow('intermediates', 'selected', jnp.argmax(block_mask, axis=-1).reshape(
            lead + (width // cfg.block_size,)))
      mask = block_mask.reshape(flat.shape[0], width)
    hidden = None
    for fn, w in zip(fns, wis):
      h = fn(flat @ w)
      hidden = h if hidden is None else hidden * h
    if mask is not None:
      hidden = hidden * mask.astype(self.dtype)
    hidden = partitioning.constrain(hidden.reshape(lead + (width,)), ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    out = (hidden.reshape(flat.shape[0], width) @ wo).reshape(x.shape)
    return partitioning.constrain(out, ('batch', 'length', 'embed'))

  def _controller(self, flat: jax.Array) -> jax.Array:
    """Logits [tokens, d_ff / N, N] float32 = (x D1) D2."""
    cfg, width = self.config, self.intermediate_dim
    init = initializers.default_kernel_init
    d1 = self.param('controller_d1', nn.with_logical_partitioning(init, ('embed',
                                                                         'controller_rank')),
                    (flat.shape[-1], cfg.controller_rank), self.param_dtype)
    d2 = self.param('controller_d2', nn.with_logical_partitioning(init, ('controller_rank', 'mlp')),
                    (cfg.controller_rank, width), self.param_dtype)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    logits = (f32(flat) @ f32(d1)) @ f32(d2)
    return logits.reshape(flat.shape[0], width // cfg.block_size, cfg.block_size)

  def _gather(self, flat, choice, wis, wo, fns):
    """flat [T, d], choice [T, blocks] -> [T, d] from the selected units only."""
    blocks = self.intermediate_dim // self.config.block_size
    units = jnp.arange(blocks) * self.config.block_size + choice  # [T, blocks]
    hidden = None
    for fn, w in zip(fns, wis):
      columns = jnp.take(w, units, axis=1)  # [d, T, blocks]
      h = fn(jnp.einsum('td,dtk->tk', flat, columns))
      hidden = h if hidden is None else hidden * h
    rows = jnp.take(wo, units, axis=0)  # [T, blocks, d]
    return jnp.einsum('tk,tkd->td', hidden, rows)

  def flops(self, d_model: int) -> dict[str, int]:
    """Per-token multiply-adds: {'dense': the dense FFN, 'sparse_decode': the gather path}."""
    n = len(self.activations)
    return {'dense': dense_flops(d_model, self.intermediate_dim, n),
            'sparse_decode': sparse_decode_flops(d_model, self.intermediate_dim, n, self.config)}

  def num_params(self, d_model: int) -> int:
    """Weights: MlpBlock's, plus the controller's unless all_units."""
    dense = (len(self.activations) + 1) * d_model * self.intermediate_dim
    if self.config.all_units:
      return dense
    return dense + self.config.controller_rank * (d_model + self.intermediate_dim)
