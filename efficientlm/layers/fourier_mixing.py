"""Fourier token mixing for bidirectional (encoder) layers: FNet and efficient variants.

FNet: Lee-Thorp, Ainslie, Eckstein & Ontanon 2021, "FNet: Mixing Tokens with Fourier
Transforms", section 3. GFNet: Rao, Zhao, Zhu, Lu & Zhou 2021, "Global Filter Networks for
Image Classification", section 3. For x [L, d] (one example; the batch is mapped over), with
the DFT X_k = sum_t x_t exp(-2 pi i k t / N) and RFFT its first N//2+1 bins:

  'fnet'           y = Re(F_L x F_d)                    the real part of the 2-D DFT over
                                                        (length, hidden): FNet's
                                                        Re(F_seq(F_hidden(x))). No parameters.
  'fnet_seq'       y = Re(F_L x)                        the sequence DFT only. Computed as
                                                        RFFT_L (bins 0..L//2), the rest from
                                                        Re(X_{L-k}) = Re(X_k) (x is real): half
                                                        the FFT work, no hidden FFT.
  'low_pass'       y = IRFFT_L(M . RFFT_L(x)),          M_k = [k < K], K = keep_frequencies.
                                                        Over the full spectrum this keeps bin k
                                                        iff min(k, L-k) < K; K >= L//2+1 is the
                                                        identity. No parameters.
  'global_filter'  y = IRFFT_n(W . RFFT_n(pad_n(x)))[:L] n = max_length, x zero-padded to n.
                                                        W [F, d] complex, learned; F = n//2+1, or
                                                        F = K < n//2+1 with bins >= F zeroed (a
                                                        learned low-pass, fewer parameters).
                                                        IRFFT uses only Re(W) at the DC (and, n
                                                        even, Nyquist) bin, since x is real.

Equivalently 'global_filter' is a depthwise circular convolution over n positions with the
kernel IFFT_n of W's hermitian extension (GFNet makes the same observation).

Deviations:
- Padding (valid False) is zeroed before mixing, so no output depends on a padding token's
  embedding (outputs AT padding positions are not zeroed: ignore them). FNet mixes padding
  embeddings like any other token.
- GFNet filters a 2-D image grid (rfft2); we filter the 1-D sequence per channel, zero-padded
  to max_length so one filter serves every length <= max_length (positions still wrap around
  modulo n: the convolution is circular). Truncation (keep_frequencies) is ours.
- GFNet initializes the filter as N(0, 0.02) (real and imaginary parts); we use
  W = 1 + 0j + N(0, 0.02) on both parts, so each layer starts near the identity and a deep
  residual stack trains from the start.
- Everything is computed in float32 whatever the input dtype; the output is cast to `dtype`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.errors import ConfigError

VARIANTS = ('fnet', 'fnet_seq', 'low_pass', 'global_filter')

# Std of the filter's noise around 1 + 0j (GFNet's init std).
FILTER_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class FourierConfig:
  """One Fourier mixer. See the module docstring for the variants' equations.

  keep_frequencies: number of lowest rfft bins kept; required by 'low_pass', optional
    truncation of 'global_filter', unused (must be None) otherwise.
  max_length: the length n that the 'global_filter' filter is defined over (> 0 there, 0
    otherwise); sequences are zero-padded to it.
  """

  variant: str = 'fnet'
  keep_frequencies: int | None = None
  max_length: int = 0

  def __post_init__(self):
    def fail(message):
      raise ConfigError(f'FourierConfig: {message}.')

    if self.variant not in VARIANTS:
      fail(f'unknown variant {self.variant!r}; use one of {VARIANTS}')
    keep = self.keep_frequencies
    if self.variant == 'low_pass' and keep is None:
      fail("variant 'low_pass' needs keep_frequencies (the number of lowest frequencies kept)")
    if self.variant in ('fnet', 'fnet_seq') and keep is not None:
      fail(f'keep_frequencies={keep} is unused by variant {self.variant!r}; leave it None')
    if keep is not None and keep < 1:
      fail(f'keep_frequencies={keep} must be >= 1')
    if self.variant == 'global_filter':
      if self.max_length <= 0:
        fail(f"variant 'global_filter' needs max_length > 0 (got {self.max_length}), the "
             'longest sequence its filter is defined for')
      if keep is not None and keep > self.max_length // 2 + 1:
        fail(f'keep_frequencies={keep} exceeds max_length//2+1 = {self.max_length // 2 + 1}, '
             'the number of rfft frequencies; lower it or leave it None for all of them')
    elif self.max_length != 0:
      fail(f'max_length={self.max_length} is unused by variant {self.variant!r}; leave it 0')

  @property
  def num_frequencies(self) -> int:
    """F, the filter's frequency count ('global_filter' only)."""
    full = self.max_length // 2 + 1
    return full if self.keep_frequencies is None else self.keep_frequencies

  def num_params(self, emb_dim: int) -> int:
    """Parameters of one mixer layer: F * emb_dim * 2 for 'global_filter', else 0."""
    if self.variant != 'global_filter':
      return 0
    return self.num_frequencies * emb_dim * 2


def _check_length(config: FourierConfig, length: int):
  if config.variant == 'global_filter' and length > config.max_length:
    raise ConfigError(f'FourierConfig: sequence length {length} exceeds max_length='
                      f'{config.max_length} of the global filter; raise max_length.')


def flops(config: FourierConfig, length: int, emb: int) -> float:
  """Approximate real FLOPs of one forward mixer call, per example.

  A complex FFT of size N costs 5 N log2 N, a real FFT (rfft or irfft) 2.5 N log2 N; a
  complex product 6. With L = length, d = emb, n = max_length, F = the filter's frequencies:
    fnet           L * 5 d log2 d + d * 5 L log2 L    (= 5 L d log2(L d))
    fnet_seq       d * 2.5 L log2 L
    low_pass       2 * d * 2.5 L log2 L               (the mask is a slice: free)
    global_filter  2 * d * 2.5 n log2 n + 6 F d
  Zeroing padding and taking real parts are selects/copies, not counted.
  """
  _check_length(config, length)

  def fft(n, real=False):
    return (2.5 if real else 5.0) * n * math.log2(n)

  if config.variant == 'fnet':
    return length * fft(emb) + emb * fft(length)
  if config.variant == 'fnet_seq':
    return emb * fft(length, real=True)
  if config.variant == 'low_pass':
    return 2 * emb * fft(length, real=True)
  return 2 * emb * fft(config.max_length, real=True) + 6 * config.num_frequencies * emb


def _filter_init(key, shape, dtype):
  """W = 1 + 0j plus N(0, FILTER_INIT_STD) noise on both parts, stored [..., (re, im)]."""
  identity = jnp.zeros(shape, jnp.float32).at[..., 0].set(1.0)
  noise = FILTER_INIT_STD * jax.random.normal(key, shape, jnp.float32)
  return jnp.asarray(identity + noise, dtype)


class FourierMixer(nn.Module):
  """Mixes tokens along the length axis with a Fourier transform (`config.variant`)."""

  config: FourierConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x [batch, length, emb]; valid bool [batch, length] or None (True = real token).

    Returns [batch, length, emb] in self.dtype.
    """
    config = self.config
    length = x.shape[1]
    _check_length(config, length)
    x = jnp.asarray(x, jnp.float32)
    if valid is not None:
      # A select, not a multiply: the output is bit-identical whatever padding holds (even NaN).
      x = jnp.where(valid[..., None], x, 0.0)

    if config.variant == 'fnet':
      y = jnp.real(jnp.fft.fftn(x, axes=(1, 2)))
    elif config.variant == 'fnet_seq':
      half = jnp.real(jnp.fft.rfft(x, axis=1))  # bins 0..L//2
      # Bins L//2+1..L-1 mirror bins L-L//2-1..1: Re(X_{L-k}) = Re(X_k) for real x.
      y = jnp.concatenate([half, half[:, 1:length - length // 2][:, ::-1]], axis=1)
    elif config.variant == 'low_pass':
      # irfft zero-fills the dropped bins, so slicing is the mask M.
      y = jnp.fft.irfft(jnp.fft.rfft(x, axis=1)[:, :config.keep_frequencies], n=length, axis=1)
    else:
      n, num_freq = config.max_length, config.num_frequencies
      w = self.param(
          'filter',
          nn.with_logical_partitioning(_filter_init, ('fourier_frequencies', 'embed', 'complex')),
          (num_freq, x.shape[-1], 2), self.param_dtype)
      w = jnp.asarray(w, jnp.float32)
      spectrum = jnp.fft.rfft(x, n=n, axis=1)[:, :num_freq]  # rfft zero-pads x to n
      filtered = spectrum * jax.lax.complex(w[..., 0], w[..., 1])
      # irfft zero-fills bins >= num_freq: the truncated filter is zero there.
      y = jnp.fft.irfft(filtered, n=n, axis=1)[:, :length]
    return jnp.asarray(y, self.dtype)
