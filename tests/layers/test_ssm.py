"""Diagonal SSMs, H3 and GSS against their definitions: numpy float64 recurrences and direct
convolutions written from the equations (module docstrings of layers/ssm.py, h3.py, gss.py).

Tolerances: fp32 FFTs of length n <= 64 carry ~1e-6 relative error per output and the
Vandermonde powers ~1e-6 (exp of |dt a| <= ~20); outputs here are O(1)-O(10), so 1e-4 absolute
leaves a margin while any wrong tap, mode or state (errors O(0.1) and more) fails.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers import ssm
from efficientlm.layers.gss import Gss, GssConfig
from efficientlm.layers.h3 import H3, H3Config
from efficientlm.layers.ssm import SsmConfig

TOL = dict(atol=1e-4, rtol=1e-4)


def _u(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _init(module, x):
  # Jitted: run eagerly, init compiles each op of the forward pass as its own program.
  return jax.jit(lambda rng: partitioning.unbox(module.init(rng, x)))(jax.random.key(0))


def _direct_conv(u, k):
  """y_t = sum_{l<=t} k_l u_{t-l}: float64 loops."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  b, length, channels = u.shape
  y = np.zeros_like(u)
  for t in range(length):
    for l in range(min(t + 1, k.shape[1])):
      y[:, t] += k[:, l] * u[:, t - l]
  return y


@pytest.mark.parametrize('length,kernel_length', [(13, 13), (16, 5), (7, 1)])
def test_fft_convolution_equals_direct_causal_convolution(length, kernel_length):
  u, k = _u(0, (2, length, 3)), _u(1, (3, kernel_length))
  np.testing.assert_allclose(jax.jit(ssm.causal_fft_conv)(u, k), _direct_conv(u, k), **TOL)


def test_shift_convolution_equals_its_definition():
  u, taps = _u(0, (2, 9, 3)), _u(1, (3, 4))
  np.testing.assert_allclose(jax.jit(ssm.shift_conv)(u, taps), _direct_conv(u, taps), **TOL)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one program, not one per random op
def _params(seed, channels, modes):
  """Random S4D parameters in the module's layout (plain arrays)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return dict(log_dt=jax.random.uniform(keys[0], (channels,), minval=-4.0, maxval=-1.0),
              log_neg_a_real=jax.random.normal(keys[1], (channels, modes)) * 0.5 - 0.7,
              a_imag=jax.random.normal(keys[2], (channels, modes)) * 3,
              c=jax.random.normal(keys[3], (channels, modes, 2)),
              d=jnp.linspace(-1.0, 1.0, channels))


def _numpy_ssm(u, p, repeat=1):
  """The recurrence of the ZOH-discretized SSM, float64 complex, channel by channel."""
  u = np.asarray(u, np.float64)
  dt = np.exp(np.asarray(p['log_dt'], np.float64))[:, None]
  a = -np.exp(np.asarray(p['log_neg_a_real'], np.float64)) + 1j * np.asarray(p['a_imag'])
  c = np.asarray(p['c'], np.float64) @ np.array([1, 1j])
  a_bar, b_bar = np.exp(dt * a), (np.exp(dt * a) - 1) / a
  d = np.asarray(p['d'], np.float64)
  y = np.zeros_like(u)
  x = np.zeros((u.shape[0], u.shape[2], a.shape[1]), complex)
  for t in range(u.shape[1]):
    for ch in range(u.shape[2]):
      s = ch // repeat
      x[:, ch] = a_bar[s] * x[:, ch] + b_bar[s] * u[:, t, ch, None]
      y[:, t, ch] = 2 * np.real(x[:, ch] @ c[s]) + d[s] * u[:, t, ch]
  return y


def _ssm_module(config, channels, repeat=1, seed=0):
  module = ssm.DiagonalSsm(config, channels, repeat=repeat)
  params = {'params': _params(seed, channels, config.modes)}
  return module, params


@pytest.mark.parametrize('convolution,block', [('fft', 1), ('blocked', 4), ('blocked', 5),
                                               ('blocked', 32)])
def test_parallel_ssm_equals_the_recurrence(convolution, block):
  """FFT and state-passing blocks (dividing the length or not, one block) against the float64
  recurrence; two channels share each SSM (repeat)."""
  config = SsmConfig(state_size=6, convolution=convolution, block_size=block)
  module, params = _ssm_module(config, 3, repeat=2)
  u = _u(2, (2, 20, 6))
  y = jax.jit(module.apply)(params, u)
  np.testing.assert_allclose(y, _numpy_ssm(u, params['params'], repeat=2), **TOL)


@functools.cache  # the same for every block size: computed (and compiled) once
def _discretized_and_one_shot_fft():
  config = SsmConfig(state_size=8)
  module, params = _ssm_module(config, 4)
  dta, c, _ = jax.jit(functools.partial(module.apply, method='discretized'))(params)
  u = _u(8, (2, 24, 4))
  one_shot = jax.jit(lambda u, dta, c: ssm.causal_fft_conv(u, ssm.kernel(dta, c, 24)))
  return u, dta, c, one_shot(u, dta, c)


@pytest.mark.parametrize('block', [1, 3, 8, 64])
def test_state_passing_blocks_equal_the_one_shot_fft(block):
  u, dta, c, one_shot = _discretized_and_one_shot_fft()
  np.testing.assert_allclose(jax.jit(ssm.blocked_conv, static_argnums=3)(u, dta, c, block),
                             one_shot, **TOL)


def test_recurrent_steps_and_state_after_a_prefix_equal_the_parallel_outputs():
  config = SsmConfig(state_size=8)
  module, params = _ssm_module(config, 3)
  u = _u(3, (2, 12, 3))
  parallel = jax.jit(module.apply)(params, u)
  lengths = jnp.array([5, 9])
  state = jax.jit(functools.partial(module.apply, method='state_after'))(params, u, lengths)
  step = jax.jit(functools.partial(module.apply, method='step'))
  # Rows and positions picked in numpy: eager jax indexing compiles a program per op.
  u, parallel, rows = np.asarray(u), np.asarray(parallel), np.arange(2)
  for i in range(3):  # each row continues from its own length
    t = np.asarray(lengths) + i
    y, state = step(params, state, u[rows, t])
    np.testing.assert_allclose(y, parallel[rows, t], **TOL)


# --- H3 -----------------------------------------------------------------------------------------


def _numpy_h3(x, p, head_dim):
  """Algorithm 1 of the H3 paper in float64 loops, from the module's parameters."""
  x = np.asarray(x, np.float64)
  w = {n: np.asarray(p[n]['kernel'], np.float64) for n in ('query', 'key', 'value', 'out')}
  q, k, v = x @ w['query'], x @ w['key'], x @ w['value']
  taps, shift_d = np.asarray(p['shift_taps'], np.float64), np.asarray(p['shift_d'], np.float64)
  b, length, width = k.shape
  k_shift = np.zeros_like(k)
  for t in range(length):
    for j in range(min(t + 1, taps.shape[1])):
      k_shift[:, t] += taps[:, j] * k[:, t - j]
  k_shift += shift_d * k
  heads = width // head_dim
  kv = np.einsum('blhi,blhj->blhij', k_shift.reshape(b, length, heads, head_dim),
                 v.reshape(b, length, heads, head_dim)).reshape(b, length, -1)
  y = _numpy_ssm(kv, p['ssm'], repeat=head_dim * head_dim)
  out = np.einsum('blhi,blhij->blhj', q.reshape(b, length, heads, head_dim),
                  y.reshape(b, length, heads, head_dim, head_dim)).reshape(b, length, width)
  return out @ w['out']


def _h3(head_dim=2, convolution='fft', decode=None):
  config = H3Config(SsmConfig(state_size=4, convolution=convolution, block_size=3),
                    head_dim=head_dim, shift_size=3)
  return H3(config, inner_dim=4, decode=decode)  # inputs of width 4 or 5: any works


@pytest.mark.parametrize('head_dim,convolution', [(1, 'fft'), (2, 'fft'), (2, 'blocked')])
def test_h3_equals_algorithm_1(head_dim, convolution):
  module = _h3(head_dim, convolution)
  x = _u(4, (2, 7, 5))
  params = _init(module, x)
  np.testing.assert_allclose(jax.jit(module.apply)(params, x),
                             _numpy_h3(x, params['params'], head_dim), **TOL)


def _decode_matches_parallel(make, x, lengths):
  """init -> prefill(right-padded prompts of `lengths`) -> steps, against the parallel
  outputs at the same positions."""
  batch, length = x.shape[:2]

  @jax.jit  # everything before the steps as one program, not one per op
  def prefill(x, lengths):
    params = partitioning.unbox(make(None).init(jax.random.key(0), x))
    parallel = make(None).apply(params, x)
    valid = jnp.arange(length)[None] < lengths[:, None]
    ids = jnp.where(valid, 1, 0)
    mask = ssm_mask(ids)
    cache = make('init').apply(params, x, mutable=['cache'])[1]['cache']
    prompt = jnp.where(valid[..., None], x, 0.0)
    _, state = make('prefill').apply({**params, 'cache': cache}, prompt, mask=mask,
                                     mutable=['cache'])
    return params, parallel, state

  params, parallel, state = prefill(x, lengths)
  step = jax.jit(lambda c, xt: make('step').apply({**params, 'cache': c}, xt, mutable=['cache']))
  cache = state['cache']
  # Rows and positions picked in numpy: eager jax indexing compiles a program per op.
  x, parallel, lengths = np.asarray(x), np.asarray(parallel), np.asarray(lengths)
  rows = np.arange(batch)
  for i in range(length - int(lengths.max())):
    t = lengths + i
    out, state = step(cache, x[rows, t][:, None])
    cache = state['cache']
    np.testing.assert_allclose(np.asarray(out)[:, 0], parallel[rows, t], **TOL)


def ssm_mask(ids):
  from efficientlm.layers.attention import AttentionMask  # pylint: disable=g-import-not-at-top
  return AttentionMask(None, ids, ids, causal=True)


def test_h3_recurrent_decoding_equals_the_parallel_outputs():
  x = _u(5, (3, 9, 5))
  _decode_matches_parallel(lambda decode: _h3(2, decode=decode), x, jnp.array([1, 4, 6]))


def _numpy_gss(x, p):
  x = np.asarray(x, np.float64)
  w = {n: np.asarray(p[n]['kernel'], np.float64) for n in ('gate', 'ssm_in', 'ssm_out', 'out')}
  gelu = lambda z: np.asarray(jax.jit(jax.nn.gelu)(jnp.asarray(z)), np.float64)
  v, u = gelu(x @ w['gate']), gelu(x @ w['ssm_in'])
  y = _numpy_ssm(u, p['ssm'])
  return ((y @ w['ssm_out']) * v) @ w['out']


def _gss(decode=None):
  return Gss(GssConfig(SsmConfig(state_size=4), expansion=2, ssm_reduction=2), decode=decode)


def test_gss_equals_its_definition_and_decodes_recurrently():
  x = _u(6, (2, 8, 4))
  params = _init(_gss(), x)
  np.testing.assert_allclose(jax.jit(_gss().apply)(params, x), _numpy_gss(x, params['params']),
                             **TOL)
  _decode_matches_parallel(_gss, x, jnp.array([3, 5]))


@pytest.mark.parametrize('make', [lambda: _h3(2), _gss], ids=['h3', 'gss'])
def test_no_output_depends_on_a_later_input(make):
  """Up to FFT rounding: every output of an FFT convolution is a sum over the whole padded
  row, so later inputs reach earlier outputs with weights ~eps (fp32 1.2e-7) times the
  kernel's scale; a causality bug would give weights of the kernel's own size."""
  module = make()
  x = _u(7, (1, 10, 4))
  params = _init(module, x)
  t = 6
  outputs_before_t = lambda z: module.apply(params, z)[0, :t].sum()
  jacobian = np.abs(np.asarray(jax.jit(jax.jacfwd(outputs_before_t))(x)))
  assert jacobian[0, t:].max() < 1e-6 * jacobian[0, :t].max()


def test_bad_configs_name_the_fix():
  with pytest.raises(ValueError, match='even'):
    SsmConfig(state_size=3)
  with pytest.raises(ValueError, match='convolution'):
    SsmConfig(convolution='slow')
  with pytest.raises(ValueError, match='ssm_reduction'):
    GssConfig(ssm_reduction=3).widths(16)
  module = _h3(head_dim=3)
  with pytest.raises(ValueError, match='head_dim'):
    module.init(jax.random.key(0), _u(0, (1, 4, 5)))


def test_parameter_counts_match_the_closed_forms():
  """The README table's counts: H3 4dD + D(S + 1) + heads(2 + 2N), GSS 2dF + dH + HF + H(2 + 2N)."""
  from efficientlm.layers import gss, h3  # pylint: disable=g-import-not-at-top
  x = _u(0, (1, 4, 8))

  def count(module):
    shapes = jax.eval_shape(lambda: partitioning.unbox(module.init(jax.random.key(0), x)))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))

  h3_config = H3Config(SsmConfig(state_size=6), head_dim=2, shift_size=3)
  assert count(H3(h3_config, inner_dim=4)) == 4 * 8 * 4 + 4 * 4 + 2 * (2 + 12) == (
      h3.parameter_count(h3_config, 8, 4))
  gss_config = GssConfig(SsmConfig(state_size=6), expansion=2, ssm_reduction=4)
  assert count(Gss(gss_config)) == 2 * 8 * 16 + 8 * 2 + 2 * 16 + 2 * (2 + 12) == (
      gss.parameter_count(gss_config, 8))
