"""The Scaling Transformer's sparse Q/K/V projections (Jaszczur et al. 2021, "Sparse is Enough in
Scaling Transformers", NeurIPS 2021, sec. 3.2): a multiplicative dense layer shared by Q, K and
V, then one small convolution per projection.

Multiplicative layer: x [d] -> Y [S, M] (S modules of M = d / S features),

  Y[s, m] = sum_i x_i D[i, s] E[i, m],        D [d, S], E [d, M]

(d S + d M weights instead of d^2; it can still represent any permutation of x).
Convolution: Y is a 2D "image" over (length, modules) with M channels; each of Q, K, V is a
convolution of it with a kernel [K_L, K_S, M, M_out] (M_out = that projection's width / S):

  Q[t, s, n] = sum_{h < K_L} sum_{w < K_S} sum_m Y[t + h - (K_L - 1), s + w - (K_S - 1) / 2, m]
                                               * C[h, w, m, n]

i.e. causal over the length (K_L - 1 previous tokens, zeros before the start) and centered over
the modules (zeros beyond the edges); S * M_out features per token, split into heads. The paper's
(and trax's MultiplicativeConvCausalAttention's) kernels: K_L = 3, K_S = 3 for Q and K, K_S = 1
for V. Self-attention only.

Encoders (causal=False) center the length taps too (K_L odd) and zero padding positions first,
so real tokens never read padding. Packed rows: a tap reads token t' from token t only if
positions[t'] - positions[t] == t' - t (the same example; positions restart in each one).

Decoding (collection 'cache'): `conv_state` [b, K_L - 1, S, M] holds each row's last K_L - 1
multiplicative outputs ('init': zeros; 'prefill': the last ones of each right-padded prompt,
lengths from the mask; 'step': the window state + the new token gives its outputs exactly as the
whole sequence would, and slides).

Deviations (trax sparsity.py as the reference of the paper's layer):
- D ~ N(0, 1) and E, C with unit-variance fan-in init (trax: N(0, 0.5) and Glorot), so Q/K/V
  start at unit scale as our dense projections; the query kernel takes T5's 1/sqrt(head_dim)
  (`query_scale`) like the dense query. No biases (T5 convention; trax's Conv has them).
- The attention's output projection stays dense ('out'), and M_out may differ from M (heads *
  head_dim need not equal d_model; grouped / multi-query K, V are narrower).
- trax's 'v_concat' options and shared-QK are not reproduced, except that Reformer's LSH layers
  (queries are keys) get only the query and value convolutions (`with_key=False`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import initializers, ssm


@dataclasses.dataclass(frozen=True)
class SparseQkvConfig:
  """Sparse Q/K/V projections of every self-attention layer (TransformerConfig.sparse_qkv)."""

  num_modules: int = 16  # S: modules of the multiplicative layer's output
  length_kernel: int = 3  # K_L: taps over the length (causal in decoders)
  module_kernel: int = 3  # K_S of the query and key convolutions, over the modules
  value_module_kernel: int = 1  # K_S of the value convolution

  def __post_init__(self):
    checks = [(self.num_modules >= 1, f'num_modules must be >= 1, got {self.num_modules}'),
              (self.length_kernel >= 1, f'length_kernel must be >= 1, got {self.length_kernel}')]
    for name in ('module_kernel', 'value_module_kernel'):
      value = getattr(self, name)
      checks.append((value >= 1 and value % 2 == 1,
                     f'{name} must be odd and >= 1 (centered over the modules), got {value}'))
    for ok, message in checks:
      if not ok:
        raise ValueError(f'SparseQkvConfig: {message}.')

  def check_width(self, what: str, width: int) -> None:
    if width % self.num_modules:
      raise ValueError(f'SparseQkvConfig: {what} {width} is not divisible by num_modules '
                       f'{self.num_modules}; pick num_modules dividing it.')


def multiplicative(x: jax.Array, d: jax.Array, e: jax.Array) -> jax.Array:
  """Y [..., S, M] = sum_i x_i D[i, s] E[i, m]: x [..., d], D [d, S], E [d, M]."""
  return jnp.einsum('...i,is,im->...sm', x, d, e)


def _shift(y: jax.Array, offset: int, axis: int) -> jax.Array:
  """out[..., t, ...] = y[..., t + offset, ...] along `axis`, zeros outside."""
  n = y.shape[axis]
  if abs(offset) >= n:
    return jnp.zeros_like(y)
  pad = [(0, 0)] * y.ndim
  pad[axis] = (max(-offset, 0), max(offset, 0))
  sliced = jax.lax.slice_in_dim(y, max(offset, 0), n + min(offset, 0), axis=axis)
  return jnp.pad(sliced, pad)


def module_conv(y: jax.Array, kernel: jax.Array, positions: jax.Array, causal: bool) -> jax.Array:
  """The convolution of Y [b, L, S, M] with kernel [K_L, K_S, M, N] -> [b, L, S, N] (module
  docstring); `positions` [b|1, L] keep taps inside one example."""
  taps_l, taps_s = kernel.shape[:2]
  first = -(taps_l - 1) if causal else -((taps_l - 1) // 2)
  out = None
  for h in range(taps_l):
    offset = first + h
    same = _shift(positions, offset, axis=1) - positions == offset  # [b|1, L]
    rows = _shift(y, offset, axis=1) * same[..., None, None].astype(y.dtype)
    # The K_S module neighbours side by side: one [M * K_S, N] matmul per length tap.
    half = (taps_s - 1) // 2
    window = jnp.concatenate([_shift(rows, w - half, axis=2) for w in range(taps_s)], axis=-1)
    term = window @ kernel[h].reshape(taps_s * kernel.shape[2], kernel.shape[3])
    out = term if out is None else out + term
  return out


class SparseQkv(nn.Module):
  """(query [b, L, heads, head_dim], key [b, L, kv_heads, head_dim] or None, value [same])."""

  config: SparseQkvConfig
  num_heads: int
  head_dim: int
  num_kv_heads: int
  with_key: bool = True
  causal: bool = True
  decode: str | None = None  # None, 'init', 'prefill', 'step' (the length convolution's state)
  query_scale: float = 1.0  # folded into the query kernel's init (T5's 1/sqrt(head_dim))
  kernel_init: Callable[..., jax.Array] = initializers.default_kernel_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask=None, positions: jax.Array | None = None):
    cfg = self.config
    s = cfg.num_modules
    d_model = x.shape[-1]
    cfg.check_width('d_model', d_model)
    cfg.check_width('num_heads * head_dim', self.num_heads * self.head_dim)
    cfg.check_width('num_kv_heads * head_dim', self.num_kv_heads * self.head_dim)
    if not self.causal and cfg.length_kernel % 2 == 0:
      raise ValueError(f'SparseQkvConfig.length_kernel {cfg.length_kernel}: a bidirectional '
                       '(encoder) convolution is centered, so it needs an odd length_kernel.')
    m = d_model // s

    def param(name, shape, axes, init=self.kernel_init):
      return jnp.asarray(self.param(name, nn.with_logical_partitioning(init, axes), shape,
                                    self.param_dtype), self.dtype)

    d = param('multiplicative_d', (d_model, s), ('embed', 'qkv_modules'),
              nn.initializers.normal(1.0))
    e = param('multiplicative_e', (d_model, m), ('embed', 'qkv_module_features'))
    y = multiplicative(jnp.asarray(x, self.dtype), d, e)
    batch, length = y.shape[:2]
    if positions is None:
      positions = jnp.arange(length, dtype=jnp.int32)[None]
    if not self.causal and mask is not None:
      y = y * _valid_keys(mask)[..., None, None].astype(y.dtype)
    if self.decode is not None:
      y, positions, keep = self._with_state(y, mask, positions)
    else:
      keep = slice(None)

    def conv(name, heads, module_kernel, scale=1.0):
      out = heads * self.head_dim // s
      init = self.kernel_init if scale == 1.0 else initializers.scaled(self.kernel_init, scale)
      kernel = param(name, (cfg.length_kernel, module_kernel, m, out),
                     ('qkv_length_taps', 'qkv_module_taps', 'qkv_module_features',
                      'qkv_module_out'), init)
      z = module_conv(y, kernel, positions, self.causal)[:, keep]
      z = z.reshape(z.shape[:2] + (heads, self.head_dim))
      return partitioning.constrain(z, ('batch', 'length', 'heads', 'kv'))

    query = conv('query', self.num_heads, cfg.module_kernel, self.query_scale)
    key = conv('key', self.num_kv_heads, cfg.module_kernel) if self.with_key else None
    value = conv('value', self.num_kv_heads, cfg.value_module_kernel)
    return query, key, value

  def _with_state(self, y, mask, positions):
    """(Y to convolve, its positions, the slice of outputs to keep) for decode mode `decode`,
    reading and writing the cache's `conv_state` (the last K_L - 1 rows of Y)."""
    if not self.causal:
      raise ValueError('SparseQkv decodes causal (decoder self-attention) layers only.')
    past = self.config.length_kernel - 1
    batch, length = y.shape[:2]
    state = ssm.cache_variable(self, 'conv_state', (batch, past) + y.shape[2:], self.decode)
    if self.decode == 'init' or past == 0:
      return y, positions, slice(None)
    if self.decode == 'prefill':
      aligned = ssm.right_align(y, ssm.prompt_lengths(mask))[:, max(length - past, 0):]
      state.value = jnp.pad(aligned, ((0, 0), (past - aligned.shape[1], 0), (0, 0), (0, 0))
                            ).astype(jnp.float32)
      return y, positions, slice(None)
    if length != 1:
      raise ValueError(f"SparseQkv: decode='step' takes one token per row, got {length}.")
    window = jnp.concatenate([state.value.astype(y.dtype), y], axis=1)  # [b, K_L, S, M]
    state.value = window[:, 1:].astype(jnp.float32)
    # The window's rows are consecutive tokens of one sequence (zeros before its start).
    window_positions = jnp.arange(past + 1, dtype=jnp.int32)[None]
    return window, window_positions, slice(past, None)


def _valid_keys(mask) -> jax.Array:
  """[b, L] bool: positions some query may read (not padding), from the self-attention mask."""
  ids = getattr(mask, 'kv_segment_ids', None)
  if ids is not None:
    return ids > 0
  dense = getattr(mask, 'dense', mask)
  return jnp.any(dense[:, 0], axis=-2)
