"""Fourier mixers against hand-built float64 DFT matrices and a numpy circular convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers import fourier_mixing as fm
from efficientlm.layers.fourier_mixing import FourierConfig, FourierMixer

# Outputs are sums of up to L*d = 72 unit-normal terms (|y| ~ 10); an fp32 FFT's rounding is
# ~ eps * log2(N) * |y| ~ 1e-5, so 1e-4 has margin, while a wrong bin or sign moves y by O(1).
TOL = dict(rtol=1e-4, atol=1e-4)


def dft(n):
  """F_n[j, k] = exp(-2 pi i j k / n), built by hand in complex128."""
  j = np.arange(n)
  return np.exp(-2j * np.pi * np.outer(j, j) / n)


def _x(seed, length, emb=6, batch=2):
  return jax.random.normal(jax.random.key(seed), (batch, length, emb))


def _apply(config, x, params=None, valid=None, **kwargs):
  mixer = FourierMixer(config, **kwargs)
  if params is None:
    params = mixer.init(jax.random.key(0), x)
  return mixer.apply(params, x, valid)


def _filter_params(w):
  return {'params': {'filter': jnp.asarray(w, jnp.float32)}}


def test_fnet_is_real_part_of_2d_dft():
  x = _x(1, 12, emb=6)
  ref = np.real(np.einsum('lk,bkd,de->ble', dft(12), np.float64(x), dft(6)))
  np.testing.assert_allclose(_apply(FourierConfig('fnet'), x), ref, **TOL)


@pytest.mark.parametrize('length', [1, 8, 9])
def test_fnet_seq_is_real_part_of_sequence_dft(length):
  x = _x(2, length)
  ref = np.real(np.einsum('lk,bkd->bld', dft(length), np.float64(x)))
  np.testing.assert_allclose(_apply(FourierConfig('fnet_seq'), x), ref, **TOL)


@pytest.mark.parametrize('length', [10, 11])
@pytest.mark.parametrize('keep', [1, 3, 5, 6, 40])
def test_low_pass_is_symmetric_spectral_mask(length, keep):
  x = np.float64(_x(3, length))
  f = dft(length)
  f_inv = np.conj(f) / length
  k = np.arange(length)
  mask = np.minimum(k, length - k) < keep
  ref = np.einsum('lk,k,km,bmd->bld', f_inv, mask, f, x)
  # Why the symmetric mask is what irfft(rfft(x)[:keep]) means: it keeps the spectrum
  # hermitian, so its inverse is real; a one-sided mask (k < keep only) would not be.
  np.testing.assert_allclose(np.imag(ref), 0, atol=1e-12)
  if 1 < keep < length // 2 + 1:
    one_sided = np.einsum('lk,k,km,bmd->bld', f_inv, k < keep, f, x)
    assert np.abs(np.imag(one_sided)).max() > 1e-2
  y = _apply(FourierConfig('low_pass', keep_frequencies=keep), jnp.float32(x))
  np.testing.assert_allclose(y, np.real(ref), **TOL)
  if keep >= length // 2 + 1:
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def _circular_filter_reference(x, w, n):
  """real(ifft_n(W_full * fft_n(pad_n(x))))[:L] in complex128, W_full hermitian."""
  length = x.shape[1]
  wc = w[..., 0] + 1j * w[..., 1]
  wc = np.concatenate([wc, np.zeros((n // 2 + 1 - len(wc), wc.shape[1]))])  # truncation
  # irfft reads only the real part of the DC bin (and of the Nyquist bin for even n): a real
  # signal's spectrum is real there, and a hermitian W must equal its own conjugate there.
  wc[0] = wc[0].real
  if n % 2 == 0:
    wc[n // 2] = wc[n // 2].real
  w_full = np.concatenate([wc, np.conj(wc[1:(n + 1) // 2][::-1])])  # W_{n-k} = conj(W_k)
  assert w_full.shape[0] == n
  xp = np.pad(np.float64(x), ((0, 0), (0, n - length), (0, 0)))
  y = np.fft.ifft(w_full[None] * np.fft.fft(xp, axis=1), axis=1)
  np.testing.assert_allclose(np.imag(y), 0, atol=1e-12)  # the extension is hermitian
  return np.real(y)[:, :length]


@pytest.mark.parametrize('n', [15, 16])
@pytest.mark.parametrize('length', [11, 15])
def test_global_filter_is_circular_convolution(n, length):
  x = _x(4, length)
  config = FourierConfig('global_filter', max_length=n)
  f = n // 2 + 1
  identity = np.zeros((f, 6, 2))
  identity[..., 0] = 1
  np.testing.assert_allclose(_apply(config, x, _filter_params(identity)), x, rtol=1e-5,
                             atol=1e-5)
  # Fresh init is identity plus N(0, 0.02) noise: close to x, not equal to it.
  fresh = _apply(config, x)
  assert 0 < np.abs(fresh - x).max() < 0.5

  w = np.asarray(jax.random.normal(jax.random.key(5), (f, 6, 2)))
  np.testing.assert_allclose(_apply(config, x, _filter_params(w)),
                             _circular_filter_reference(x, w, n), **TOL)

  truncated = FourierConfig('global_filter', max_length=n, keep_frequencies=3)
  zeroed = np.where(np.arange(f)[:, None, None] < 3, w, 0.0)
  y_trunc = _apply(truncated, x, _filter_params(w[:3]))
  np.testing.assert_allclose(y_trunc, _apply(config, x, _filter_params(zeroed)), **TOL)
  np.testing.assert_allclose(y_trunc, _circular_filter_reference(x, w[:3], n), **TOL)


CONFIGS = [FourierConfig('fnet'), FourierConfig('fnet_seq'),
           FourierConfig('low_pass', keep_frequencies=3),
           FourierConfig('global_filter', max_length=16),
           FourierConfig('global_filter', max_length=16, keep_frequencies=4)]


@pytest.mark.parametrize('config', CONFIGS, ids=str)
def test_padding_values_do_not_matter(config):
  x = _x(6, 10)
  valid = jnp.arange(10)[None, :] < jnp.array([[7], [10]])
  valid = valid.at[0, 2].set(False)
  junk = 100 * jax.random.normal(jax.random.key(7), x.shape)
  x2 = jnp.where(valid[..., None], x, junk).at[0, 8, 1].set(jnp.nan)
  params = FourierMixer(config).init(jax.random.key(0), x)
  y1 = _apply(config, x, params, valid)
  y2 = _apply(config, x2, params, valid)
  np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(y1, _apply(config, x, params))  # the mask is applied at all


@pytest.mark.parametrize('kwargs,word', [
    (dict(variant='fourier'), 'global_filter'),  # lists VARIANTS
    (dict(variant='low_pass'), 'keep_frequencies'),
    (dict(variant='global_filter'), 'max_length'),
    (dict(variant='global_filter', max_length=-4), 'max_length'),
    (dict(variant='low_pass', keep_frequencies=0), '>= 1'),
    (dict(variant='global_filter', max_length=8, keep_frequencies=0), '>= 1'),
    (dict(variant='fnet', keep_frequencies=4), 'unused'),
    (dict(variant='fnet_seq', keep_frequencies=4), 'unused'),
    (dict(variant='fnet', max_length=8), 'unused'),
    (dict(variant='low_pass', keep_frequencies=2, max_length=8), 'unused'),
    (dict(variant='global_filter', max_length=8, keep_frequencies=6), 'max_length//2+1'),
])
def test_config_errors(kwargs, word):
  with pytest.raises(ValueError, match='^FourierConfig: ') as info:
    FourierConfig(**kwargs)
  assert word in str(info.value)


def test_too_long_sequence_names_max_length():
  config = FourierConfig('global_filter', max_length=8)
  with pytest.raises(ValueError, match='max_length'):
    FourierMixer(config).init(jax.random.key(0), _x(0, 9))
  with pytest.raises(ValueError, match='max_length'):
    fm.flops(config, 9, 4)


@pytest.mark.parametrize('config', CONFIGS, ids=str)
def test_num_params_matches_init(config):
  variables = FourierMixer(config).init(jax.random.key(0), _x(0, 10, emb=6))
  count = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(variables)))
  assert config.num_params(6) == count
  if count:
    assert variables['params']['filter'].names == ('fourier_frequencies', 'embed', 'complex')


def test_flops_closed_forms():
  assert fm.flops(FourierConfig('fnet'), 4, 8) == pytest.approx(5 * 32 * 5)  # 5 N log2 N, N=Ld
  assert fm.flops(FourierConfig('fnet_seq'), 8, 2) == pytest.approx(2 * 2.5 * 8 * 3)
  assert fm.flops(FourierConfig('low_pass', keep_frequencies=2), 8, 2) == pytest.approx(240)
  config = FourierConfig('global_filter', max_length=8, keep_frequencies=3)
  assert fm.flops(config, 5, 2) == pytest.approx(2 * 2 * 2.5 * 8 * 3 + 6 * 3 * 2)


@pytest.mark.parametrize('config', CONFIGS, ids=str)
def test_bfloat16_output_jit_and_grad(config):
  x = _x(8, 10)
  mixer = FourierMixer(config, dtype=jnp.bfloat16)
  params = mixer.init(jax.random.key(0), x)
  y = jax.jit(mixer.apply)(params, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y), _apply(config, x, params), rtol=0.05, atol=0.05)

  target = jax.random.normal(jax.random.key(9), x.shape)

  def loss(params, x):
    return jnp.sum(FourierMixer(config).apply(params, x) * target)

  grad_params, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert np.all(np.isfinite(grad_x)) and np.abs(grad_x).max() > 0
  for leaf in jax.tree.leaves(nn.unbox(grad_params)):
    assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0
