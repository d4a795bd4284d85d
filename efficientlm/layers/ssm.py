"""Diagonal state space models (S4D / DSS) and H3's shift SSM: kernels, causal convolution (one
FFT, or FlashConv-style blocks that pass state), recurrent steps. Used by layers/h3.py and
layers/gss.py.

Diagonal SSM. Per channel, M complex modes (state size N = 2M: modes come in conjugate pairs, so
one of each pair is stored and outputs take twice the real part). Continuous A = diag(a_m),
Re a_m < 0, B = 1, discretized by zero-order hold with step dt = exp(log_dt):

  A_bar = exp(dt a),   B_bar = (exp(dt a) - 1) / a                   (S4D, Gu et al. 2022, eq. 6)
  x_t = A_bar x_{t-1} + B_bar u_t,   y_t = 2 Re(sum_m C_m x_{t,m}) + D u_t,   x_{-1} = 0.

Unrolled, y = K * u + D u with the kernel (a Vandermonde product, float32)

  K_l = 2 Re(sum_m C_m B_bar_m A_bar_m^l),   l = 0 .. L-1.

We fold B_bar into C (c_m = C_m B_bar_m) and keep the state divided by B_bar:
x'_t = A_bar x'_{t-1} + u_t, y_t = 2 Re(c . x'_t) + D u_t; the same outputs, one product fewer
per step. DSS (Gupta et al. 2022, DSS-exp) is this kernel with C normalized differently; GSS
uses it, so one module serves both. Init S4D-Lin: a_m = -1/2 + i pi m, C ~ CN(0, 1),
log dt ~ U[log dt_min, log dt_max] per channel, D ~ N(0, 1).

Convolution ('fft'): u and K zero-padded to n >= 2L - 1 (a power of 2), so the circular product
of their real FFTs is the causal linear convolution; O(L log L).
'blocked' (the state passing of H3's FlashConv, Fu et al. 2023 sec. 4.2): blocks of T tokens,
each convolved by FFT with K[:T]; the state entering block j,

  s_j = A_bar^T s_{j-1} + sum_{t<T} A_bar^{T-1-t} u_{j-1,t},   s_0 = 0,

is passed by a scan over blocks and adds 2 Re(sum_m c_m A_bar_m^{t+1} s_{j,m}) to position t of
block j. Only T-long kernels exist: kernel memory O(T), not O(L). (FlashConv also fuses the FFT
into one SRAM kernel; here XLA runs the FFTs.)

Shift SSM (H3): A is the shift matrix and B = e_1, so the state is the last S inputs and
y_t = sum_{j<S} C_j u_{t-j} + D u_t: a learned causal convolution of S taps, computed directly.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers.dense import DenseGeneral

CONVOLUTIONS = ('fft', 'blocked')


@dataclasses.dataclass(frozen=True)
class SsmConfig:
  """The diagonal SSM of H3 and GSS layers."""

  state_size: int = 64  # N: N/2 complex modes per channel
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  convolution: str = 'fft'  # 'fft' (one FFT over the row) or 'blocked' (FlashConv's blocks)
  block_size: int = 256  # 'blocked': tokens per block

  def __post_init__(self):
    checks = [
        (self.state_size >= 2 and self.state_size % 2 == 0,
         f'state_size must be an even number >= 2 (modes come in conjugate pairs), got '
         f'{self.state_size}'),
        (0 < self.dt_min <= self.dt_max, f'need 0 < dt_min <= dt_max, got {self.dt_min}, '
         f'{self.dt_max}'),
        (self.convolution in CONVOLUTIONS,
         f'convolution {self.convolution!r} not in {CONVOLUTIONS}'),
        (self.block_size >= 1, f'block_size must be >= 1, got {self.block_size}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'SsmConfig: {message}.')

  @property
  def modes(self) -> int:
    return self.state_size // 2


# --- the math, on plain arrays -------------------------------------------------------------------
# u [batch, length, channels] float32; dta = dt * a and c (B_bar folded in) [channels, modes]
# complex64; states [batch, channels, modes] complex64.


def powers(dta: jax.Array, exponents: jax.Array) -> jax.Array:
  """A_bar ** e = exp(dta * e) [channels, modes, len(e)] (exact per power, no repeated products)."""
  return jnp.exp(dta[..., None] * exponents.astype(jnp.float32))


def kernel(dta: jax.Array, c: jax.Array, length: int) -> jax.Array:
  """K [channels, length] float32: K_l = 2 Re(sum_m c_m A_bar_m^l)."""
  return 2 * jnp.real(jnp.einsum('cm,cml->cl', c, powers(dta, jnp.arange(length))))


def fft_length(length: int, kernel_length: int) -> int:
  """A power of 2 >= length + kernel_length - 1: no circular wrap-around reaches the outputs."""
  return 1 << max(0, math.ceil(math.log2(length + kernel_length - 1)))


def causal_fft_conv(u: jax.Array, k: jax.Array) -> jax.Array:
  """y_t = sum_{l <= t} k_l u_{t-l}, per channel: u [b, L, C], k [C, Lk] -> [b, L, C]."""
  length = u.shape[1]
  n = fft_length(length, k.shape[-1])
  spectrum = jnp.fft.rfft(u, n=n, axis=1) * jnp.fft.rfft(k, n=n, axis=-1).T
  return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :length]


def blocked_conv(u: jax.Array, dta: jax.Array, c: jax.Array, block: int) -> jax.Array:
  """The same as causal_fft_conv(u, kernel(dta, c, L)), in blocks of `block` tokens that pass
  their state (module docstring). A ragged last block is zero-padded (causal: harmless)."""
  b, length, channels = u.shape
  blocks = -(-length // block)
  u = jnp.pad(u, ((0, 0), (0, blocks * block - length), (0, 0)))
  ub = u.reshape(b, blocks, block, channels)
  local = causal_fft_conv(ub.reshape(b * blocks, block, channels), kernel(dta, c, block))
  t = jnp.arange(block)
  # What each block adds to the state it hands on: sum_t A_bar^{T-1-t} u_t.
  handed = jnp.einsum('bntc,cmt->nbcm', ub.astype(jnp.complex64), powers(dta, block - 1 - t))
  carry_over = powers(dta, jnp.asarray([block]))[..., 0]  # A_bar^T

  def entering(state, handed_j):
    return carry_over * state + handed_j, state

  _, states = jax.lax.scan(entering, jnp.zeros(handed.shape[1:], jnp.complex64), handed)
  readout = c[..., None] * powers(dta, t + 1)  # c_m A_bar_m^{t+1}
  from_state = 2 * jnp.real(jnp.einsum('nbcm,cmt->bntc', states, readout))
  y = local.reshape(b, blocks, block, channels) + from_state
  return y.reshape(b, blocks * block, channels)[:, :length]


def right_align(u: jax.Array, lengths: jax.Array) -> jax.Array:
  """u [b, P, ...] with row i's first lengths[i] entries moved to the end, zeros before them."""
  padded = u.shape[1]
  source = jnp.arange(padded)[None] - (padded - lengths)[:, None]
  gathered = jnp.take_along_axis(
      u, jnp.clip(source, 0).reshape(source.shape + (1,) * (u.ndim - 2)), axis=1)
  return jnp.where((source >= 0).reshape(source.shape + (1,) * (u.ndim - 2)), gathered, 0)


def state_after(u: jax.Array, dta: jax.Array, lengths: jax.Array) -> jax.Array:
  """The state x' after each row's first lengths[i] inputs [b, C, M]: sum_{t<len} A_bar^{len-1-t}
  u_t, as one contraction over the right-aligned rows (zeros in front change no state)."""
  padded = u.shape[1]
  aligned = right_align(u, lengths).astype(jnp.complex64)
  return jnp.einsum('btc,cmt->bcm', aligned, powers(dta, padded - 1 - jnp.arange(padded)))


def step(state: jax.Array, u: jax.Array, dta: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token: u [b, C] -> (2 Re(c . x'), x') with x' = A_bar x + u (D u is the caller's)."""
  state = jnp.exp(dta) * state + u[..., None].astype(jnp.complex64)
  return 2 * jnp.real(jnp.einsum('cm,bcm->bc', c, state)), state


def shift_conv(u: jax.Array, taps: jax.Array) -> jax.Array:
  """y_t = sum_{j<S} taps[c, j] u_{t-j}: u [b, L, C], taps [C, S], a depthwise causal conv.

  As S shifted products (S is a few taps): on CPU, XLA's grouped convolution and its gradient
  ran ~7x slower than these adds at [32, 64, 128] x 4 taps."""
  length = u.shape[1]
  y = taps[:, 0] * u
  for j in range(1, min(taps.shape[1], length)):
    y = y + taps[:, j] * jnp.pad(u[:, :length - j], ((0, 0), (j, 0), (0, 0)))
  return y


# --- decoding state in the 'cache' collection -----------------------------------------------------


def as_pair(z: jax.Array) -> jax.Array:
  """complex64 [...] -> float32 [..., 2] (the cache holds real arrays)."""
  return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


def as_complex(pair: jax.Array) -> jax.Array:
  return jax.lax.complex(pair[..., 0], pair[..., 1])


def cache_variable(module: nn.Module, name: str, shape: tuple[int, ...], decode: str):
  """The module's decoding state `name` (float32 zeros at decode='init'); a clear error if a
  prefill or step finds no cache."""
  if decode not in ('init', 'prefill', 'step'):
    raise ValueError(f'{module.name}: decode = {decode!r}; choose from None, init, prefill, step.')
  if decode != 'init' and not module.has_variable('cache', name):
    raise ValueError(f"{module.name}: decode={decode!r} needs a recurrent state; create it with "
                     "decode='init' (efficientlm.inference.kv_cache.init_cache) first.")
  return module.variable('cache', name, jnp.zeros, shape, jnp.float32)


class DiagonalSsm(nn.Module):
  """`channels` independent diagonal SSMs; each serves `repeat` consecutive input channels
  (H3's heads: one SSM per head for its d_h x d_h outer-product entries)."""

  config: SsmConfig
  channels: int
  repeat: int = 1
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg, n, m = self.config, self.channels, self.config.modes

    def log_dt_init(key, shape, dtype):
      lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
      return jax.random.uniform(key, shape, dtype, lo, hi)

    def part(fn, axes):
      return nn.with_logical_partitioning(fn, axes)

    self.log_dt = self.param('log_dt', part(log_dt_init, ('ssm_channels',)), (n,),
                             self.param_dtype)
    # S4D-Lin: a_m = -1/2 + i pi m (real part stored as log(-Re a), so it stays negative).
    self.log_neg_a_real = self.param(
        'log_neg_a_real', part(lambda k, s, d: jnp.full(s, math.log(0.5), d),
                               ('ssm_channels', 'ssm_modes')), (n, m), self.param_dtype)
    self.a_imag = self.param(
        'a_imag', part(lambda k, s, d: jnp.broadcast_to(math.pi * jnp.arange(s[1], dtype=d), s),
                       ('ssm_channels', 'ssm_modes')), (n, m), self.param_dtype)
    # CN(0, 1): real and imaginary parts N(0, 1/2).
    self.c = self.param('c', part(nn.initializers.normal(math.sqrt(0.5)),
                                  ('ssm_channels', 'ssm_modes', 'complex')), (n, m, 2),
                        self.param_dtype)
    self.d = self.param('d', part(nn.initializers.normal(1.0), ('ssm_channels',)), (n,),
                        self.param_dtype)

  def discretized(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dt a, c = C B_bar) [channels * repeat, modes] complex64 and D [channels * repeat]."""
    f32 = lambda p: jnp.asarray(p, jnp.float32)
    a = jax.lax.complex(-jnp.exp(f32(self.log_neg_a_real)), f32(self.a_imag))
    dta = jnp.exp(f32(self.log_dt))[:, None] * a
    c = as_complex(f32(self.c)) * (jnp.exp(dta) - 1) / a
    d = f32(self.d)
    if self.repeat > 1:
      dta, c, d = (jnp.repeat(x, self.repeat, axis=0) for x in (dta, c, d))
    return dta, c, d

  def __call__(self, u: jax.Array) -> jax.Array:
    """u [b, L, channels * repeat] -> y [b, L, same] float32 (the whole sequence in parallel)."""
    dta, c, d = self.discretized()
    u = u.astype(jnp.float32)
    if self.config.convolution == 'blocked':
      y = blocked_conv(u, dta, c, self.config.block_size)
    else:
      y = causal_fft_conv(u, kernel(dta, c, u.shape[1]))
    return y + d * u

  def state_after(self, u: jax.Array, lengths: jax.Array) -> jax.Array:
    """The state (float32 pairs [b, channels * repeat, modes, 2]) after lengths[i] inputs."""
    dta, _, _ = self.discretized()
    return as_pair(state_after(u.astype(jnp.float32), dta, lengths))

  def step(self, state: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u [b, channels * repeat], state pairs -> (y [b, ...] float32, next state pairs)."""
    dta, c, d = self.discretized()
    u = u.astype(jnp.float32)
    y, state = step(as_complex(state), u, dta, c)
    return y + d * u, as_pair(state)


def prompt_lengths(mask) -> jax.Array:
  """Real tokens per row [b] of a right-padded prefill, from the stack's self-attention mask:
  an AttentionMask's padding segment ids (0: padding), or a dense [b, 1, q, k] mask (a real
  query reads at least itself)."""
  ids = getattr(mask, 'q_segment_ids', None)
  if ids is not None:
    return jnp.sum(ids > 0, axis=1).astype(jnp.int32)
  dense = getattr(mask, 'dense', mask)
  if dense is None:
    raise ValueError('A recurrent prefill needs the decoder mask to find each prompt\'s length.')
  return jnp.sum(jnp.any(dense[:, 0], axis=-1), axis=-1).astype(jnp.int32)


def apply_recurrent(module: nn.Module, diagonal: 'DiagonalSsm', u: jax.Array, mask,
                    decode: str | None) -> jax.Array:
  """`diagonal` on u [b, L, C] in every decoding mode of a token mixer `module`, its state in
  `module`'s cache as 'ssm_state': None (whole sequences), 'init' (a zero state), 'prefill'
  (whole right-padded prompts; the state after each one's last real token, lengths from the
  stack's `mask`), 'step' (L = 1: one recurrence step from the state). Returns y float32."""
  if decode is None:
    return diagonal(u)
  batch, length, channels = u.shape
  state = cache_variable(module, 'ssm_state', (batch, channels, diagonal.config.modes, 2),
                         decode)
  if decode == 'step':
    if length != 1:
      raise ValueError(f"{module.name}: decode='step' takes one token per row, got {length}.")
    y, state.value = diagonal.step(state.value, u[:, 0])
    return y[:, None]
  y = diagonal(u)
  if decode == 'prefill':
    state.value = diagonal.state_after(u, prompt_lengths(mask))
  return y


class S4dMixer(nn.Module):
  """A plain diagonal SSM token mixer, y = W_o gelu(SSM(x W_v)) (S4D, Gu et al. 2022, with the
  usual GELU and output projection): the baseline without H3's shift SSM and multiplicative
  interactions (its synthetic-language ablation). Called and decoded like layers.h3.H3.
  """

  config: SsmConfig
  inner_dim: int
  decode: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, q_positions=None,
               kv_positions=None, deterministic=True):
    del inputs_kv, bias, q_positions, kv_positions, deterministic
    width, cfg = self.inner_dim, self.config
    u = DenseGeneral(width, ('embed', 'joined_kv'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='value')(inputs_q)
    diagonal = DiagonalSsm(cfg, width, param_dtype=self.param_dtype, name='ssm')
    y = apply_recurrent(self, diagonal, u, mask, self.decode)
    out = DenseGeneral(inputs_q.shape[-1], ('joined_kv', 'embed'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='out')(
                           jax.nn.gelu(y).astype(self.dtype))
    return partitioning.constrain(out, ('batch', 'length', 'embed'))
