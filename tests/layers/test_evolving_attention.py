"""Evolving attention against plain attention, a numpy loop reference of (E1)/(E2), causality and
padding invariances through two stacked layers, and config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers import masks
from efficientlm.layers.attention import dot_product_attention
from efficientlm.layers.evolving_attention import (EvolvingAttentionConfig, EvolvingLogits,
                                                   evolving_dot_product_attention)

# fp32 against float64 numpy over logits of size ~1-10 and a 3x3x2-tap convolution: rounding is
# ~1e-6 relative; 1e-5 leaves margin without hiding a wrong tap or weight (those move outputs by
# >1e-2 here).
TOL = dict(rtol=1e-5, atol=1e-5)


def np_evolve(logits, previous, mask, kernel, bias, alpha, beta, causal, activation='relu',
              convolve=True):
  """(E1)/(E2) by loops in float64: masked entries zeroed, taps outside the map read 0."""
  logits = np.asarray(logits, np.float64)
  b, h, lq, lk = logits.shape
  valid = np.broadcast_to(np.asarray(mask, bool), logits.shape)
  cur = np.where(valid, logits, 0.0)
  mixed = cur if previous is None else (
      alpha * np.where(valid, np.asarray(previous, np.float64), 0.0) + (1 - alpha) * cur)
  if not convolve:
    return mixed
  kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
  size = kernel.shape[0]
  offset = size - 1 if causal else size // 2  # input row = output row + tap row - offset
  conv = np.zeros_like(mixed)
  for n in range(b):
    for o in range(h):
      for i in range(lq):
        for j in range(lk):
          total = bias[o]
          for r in range(size):
            for c in range(size):
              ii, jj = i + r - offset, j + c - offset
              if 0 <= ii < lq and 0 <= jj < lk:
                total += kernel[r, c, :, o] @ mixed[n, :, ii, jj]
          conv[n, o, i, j] = total
  if activation == 'relu':
    conv = np.maximum(conv, 0.0)
  return np.where(valid, beta * conv + (1 - beta) * mixed, 0.0)


def np_attend(logits, value, mask):
  """softmax(logits masked with -1e10) V, query head h reading KV head h // group."""
  value = np.asarray(value, np.float64)
  valid = np.broadcast_to(np.asarray(mask, bool), logits.shape)
  s = np.where(valid, logits, -1e10)
  w = np.exp(s - s.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  group = logits.shape[1] // value.shape[2]
  v = np.repeat(value, group, axis=2)  # [b, k, heads, d]
  return np.einsum('bhqk,bkhd->bqhd', w, v)


def np_logits(q, k, bias):
  group = q.shape[2] // k.shape[2]
  k = np.repeat(np.asarray(k, np.float64), group, axis=2)
  return np.einsum('bqhd,bkhd->bhqk', np.asarray(q, np.float64), k) + np.asarray(bias)


def qkv(seed, b=2, length=6, heads=4, kv_heads=2, d=4):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, length, heads, d))
  k = jax.random.normal(keys[1], (b, length, kv_heads, d))
  v = jax.random.normal(keys[2], (b, length, kv_heads, d))
  bias = jax.random.normal(keys[3], (1, heads, length, length))
  previous = 3.0 * jax.random.normal(keys[4], (b, heads, length, length))
  return q, k, v, bias, previous


# Masks built by one program each, not op by op.
_decoder_mask = jax.jit(masks.make_decoder_mask)
_attention_mask = jax.jit(masks.make_attention_mask)


def padded_mask(b, length, causal, pad=2, prefix=0):
  """Example 1 has its last `pad` positions padded; causal adds the triangle, except among the
  first `prefix` positions (prefix LM)."""
  tokens = np.ones((b, length), np.int32)
  tokens[1, length - pad:] = 0
  if causal:
    in_prefix = jnp.asarray(np.arange(length) < prefix, jnp.int32)[None].repeat(b, 0)
    return _decoder_mask(jnp.asarray(tokens), causal_attention=in_prefix)
  valid = jnp.asarray(tokens > 0)
  return _attention_mask(valid, valid)


class Layer(nn.Module):
  """evolving_dot_product_attention under an EvolvingLogits named 'evolve'."""

  config: EvolvingAttentionConfig
  heads: int
  causal: bool

  @nn.compact
  def __call__(self, q, k, v, mask, bias, previous):
    evolve = EvolvingLogits(self.config, self.heads, causal=self.causal, name='evolve')
    return evolving_dot_product_attention(q, k, v, evolve, previous, mask, bias)


# Jitted (op by op, compiling each op costs more), the layer static: calls with an equal layer
# and the same shapes share one compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _init(layer, key, *args):
  return nn.unbox(layer.init(key, *args))['params']


@functools.partial(jax.jit, static_argnums=0)
def _apply(layer, params, *args):
  return layer.apply({'params': params}, *args)


def run(config, heads, causal, q, k, v, mask, bias, previous, params=None):
  """evolving_dot_product_attention under an EvolvingLogits; returns (out, passed_on, params)."""
  layer = Layer(config, heads, causal)
  if params is None:
    params = _init(layer, jax.random.key(9), q, k, v, mask, bias, previous)
  out, passed_on = _apply(layer, params, q, k, v, mask, bias, previous)
  return out, passed_on, params


@pytest.mark.parametrize('causal', [False, True])
def test_identity_mixing_equals_plain_attention(causal):
  """alpha = beta = 0 makes (E1)/(E2) the identity whatever the (random) kernel; so does the
  first layer (no previous map) with the default alpha, beta."""
  q, k, v, bias, previous = qkv(0)
  mask = padded_mask(2, 6, causal)
  plain = jax.jit(dot_product_attention)(q, k, v, mask=mask, bias=bias)
  out, passed_on, _ = run(EvolvingAttentionConfig(alpha=0.0, beta=0.0), 4, causal, q, k, v,
                          mask, bias, previous)
  np.testing.assert_allclose(out, plain, **TOL)
  out_first, passed_first, _ = run(EvolvingAttentionConfig(), 4, causal, q, k, v, mask, bias,
                                   None)
  np.testing.assert_allclose(out_first, plain, **TOL)
  # Passed on: the raw logits where allowed, 0 where masked.
  expected = np.where(np.broadcast_to(mask, passed_on.shape), np_logits(q, k, bias), 0.0)
  np.testing.assert_allclose(passed_on, expected, **TOL)
  np.testing.assert_allclose(passed_first, expected, **TOL)


def test_zero_convolution_with_beta_one_attends_uniformly():
  """beta = 1 with a zero kernel and bias: A = CNN(A_in) = 0 at allowed entries, so each query
  averages the values it may read (an independent closed form)."""
  q, k, v, bias, previous = qkv(1, kv_heads=4)
  mask = padded_mask(2, 6, causal=True)
  config = EvolvingAttentionConfig(alpha=0.5, beta=1.0)
  _, _, params = run(config, 4, True, q, k, v, mask, bias, previous)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _, _ = run(config, 4, True, q, k, v, mask, bias, previous, zeros)
  allowed = np.asarray(mask[:, 0], np.float64)  # [b, q, k]
  rows = allowed.sum(-1) > 0  # padding queries read nothing; their outputs are ignored
  weights = allowed[rows] / allowed[rows].sum(-1, keepdims=True)
  expected = np.einsum('nk,nkhd->nhd', weights,
                       np.broadcast_to(np.asarray(v)[:, None], (2, 6) + v.shape[1:])[rows])
  np.testing.assert_allclose(np.asarray(out)[rows], expected, **TOL)


@pytest.mark.parametrize('causal, prefix', [(False, 0), (True, 0), (True, 3)])
@pytest.mark.parametrize('activation', ['relu', 'linear'])
def test_matches_numpy_loops(causal, prefix, activation):
  """A hand-set 3x3 kernel mixing 2 heads, with a bias, alpha = 0.3, beta = 0.6, padding (and a
  prefix-LM mask); the previous map holds huge values at masked entries, which must not leak."""
  heads = 2
  q, k, v, bias, previous = qkv(2, heads=heads, kv_heads=1)
  mask = padded_mask(2, 6, causal, prefix=prefix)
  previous = jnp.where(mask, previous, 1e6)
  config = EvolvingAttentionConfig(alpha=0.3, beta=0.6, activation=activation)
  rng = np.random.default_rng(0)
  params = {'evolve': {'kernel': jnp.asarray(rng.normal(size=(3, 3, heads, heads)), jnp.float32),
                       'bias': jnp.asarray([0.5, -0.25], jnp.float32)}}
  out, passed_on, _ = run(config, heads, causal, q, k, v, mask, bias, previous, params)
  expected = np_evolve(np_logits(q, k, bias), previous, mask, params['evolve']['kernel'],
                       params['evolve']['bias'], 0.3, 0.6, causal, activation)
  np.testing.assert_allclose(passed_on, expected, **TOL)
  np.testing.assert_allclose(out, np_attend(expected, v, mask), **TOL)


@pytest.mark.parametrize('causal', [False, True])
def test_identity_kernel_one_head(causal):
  """One head, kernel = 1 at the self tap (centre, or last row/column when causal), beta = 1:
  A = relu(0.5 * A_prev + 0.5 * A) at allowed entries."""
  q, k, v, bias, previous = qkv(3, heads=1, kv_heads=1)
  mask = padded_mask(2, 6, causal)
  tap = 2 if causal else 1
  params = {'evolve': {'kernel': jnp.zeros((3, 3, 1, 1)).at[tap, tap].set(1.0),
                       'bias': jnp.zeros((1,))}}
  out, passed_on, _ = run(EvolvingAttentionConfig(alpha=0.5, beta=1.0), 1, causal, q, k, v,
                          mask, bias, previous, params)
  allowed = np.broadcast_to(mask, passed_on.shape)
  a = np.maximum(0.5 * np.asarray(previous) + 0.5 * np_logits(q, k, bias), 0.0)
  np.testing.assert_allclose(passed_on, np.where(allowed, a, 0.0), **TOL)
  np.testing.assert_allclose(out, np_attend(np.where(allowed, a, 0.0), v, mask), **TOL)


class TwoLayers(nn.Module):
  """Two self-attention layers chained by their logits (a residual stream in between)."""

  config: EvolvingAttentionConfig
  causal: bool
  heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, x, mask):
    previous = None
    for i in range(2):
      project = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=f'{name}{i}')(x)
      q, k, v = project('q') * self.head_dim**-0.5, project('k'), project('v')
      evolve = EvolvingLogits(self.config, self.heads, causal=self.causal, name=f'evolve{i}')
      out, previous = evolving_dot_product_attention(q, k, v, evolve, previous, mask)
      x = x + nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name=f'out{i}')(out)
    return x


def init_two_layers(model, x, mask):
  params = _init(model, jax.random.key(4), x, mask)
  # Bias the convolutions so every tap matters, padding/border reads included.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.3 if 'bias' in jax.tree_util.keystr(path) else p, params)


# t >= 1: position 0 reads one key, so its output is v_0 whatever its logits (no leak shows).
@pytest.mark.parametrize('t', [1, 4])
def test_causal_two_layers_never_read_later_tokens(t):
  length = 8
  x = jax.random.normal(jax.random.key(5), (2, length, 8))
  later = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(6), (2, length - t - 1, 8)))
  mask = _decoder_mask(jnp.ones((2, length), jnp.int32))
  config = EvolvingAttentionConfig(alpha=0.5, beta=0.7, convolve_first_layer=True)
  model = TwoLayers(config, causal=True)
  params = init_two_layers(model, x, mask)
  y, y_later = (_apply(model, params, inp, mask) for inp in (x, later))
  # Zero weights and zeroed masked entries make the early outputs bit-identical in practice;
  # 1e-6 only allows for a reordered reduction.
  np.testing.assert_allclose(y[:, :t + 1], y_later[:, :t + 1], rtol=0, atol=1e-6)
  assert np.abs(y[:, t + 1:] - y_later[:, t + 1:]).max() > 1e-3  # the change did reach later
  # Control: 'same' padding under the same causal mask reads row q+1, so the test above can fail.
  leaky = TwoLayers(config, causal=False)
  y, y_later = (_apply(leaky, params, inp, mask) for inp in (x, later))
  assert np.abs(y[:, :t + 1] - y_later[:, :t + 1]).max() > 1e-3


@pytest.mark.parametrize('causal', [False, True])
def test_padding_is_invisible_through_two_layers(causal):
  """Right padding (any content) changes no valid output: equal to running the unpadded prefix,
  since zeroed padding entries look like the convolution's zero border."""
  length, valid_len = 8, 5
  x = jax.random.normal(jax.random.key(7), (1, length, 8))
  tokens = jnp.asarray([[1] * valid_len + [0] * (length - valid_len)])
  mask = _decoder_mask(tokens) if causal else _attention_mask(tokens > 0, tokens > 0)
  model = TwoLayers(EvolvingAttentionConfig(alpha=0.4, beta=0.8, convolve_first_layer=True),
                    causal=causal)
  params = init_two_layers(model, x, mask)
  y = _apply(model, params, x, mask)
  noisy = x.at[:, valid_len:].mul(1e3)
  y_noisy = _apply(model, params, noisy, mask)
  short = jnp.ones((1, valid_len), jnp.int32)
  short_mask = _decoder_mask(short) if causal else _attention_mask(short > 0, short > 0)
  y_short = _apply(model, params, x[:, :valid_len], short_mask)
  np.testing.assert_allclose(y[:, :valid_len], y_noisy[:, :valid_len], rtol=0, atol=1e-6)
  np.testing.assert_allclose(y[:, :valid_len], y_short, **TOL)


def test_parameters_and_gradients():
  """Every layer has the same tree (kernel [K, K, heads, heads], bias [heads]); gradients are
  finite with fully masked padding rows."""
  x = jax.random.normal(jax.random.key(8), (2, 6, 8))
  mask = padded_mask(2, 6, causal=True)
  model = TwoLayers(EvolvingAttentionConfig(kernel_size=5), causal=True)
  variables = jax.jit(model.init)(jax.random.key(0), x, mask)
  params = nn.unbox(variables)['params']
  shapes = lambda i: jax.tree.map(jnp.shape, params[f'evolve{i}'])
  assert shapes(0) == shapes(1) == {'kernel': (5, 5, 2, 2), 'bias': (2,)}
  assert variables['params']['evolve0']['kernel'].names == ('conv_query', 'conv_key', 'conv_heads_in', 'conv_heads_out')
  loss = lambda p, x: model.apply({'params': p}, x, mask).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[0]['evolve1']['kernel']).sum()) > 0  # the convolution is trained


@pytest.mark.parametrize('kwargs, field', [
    (dict(alpha=-0.1), 'alpha'), (dict(alpha=1.5), 'alpha'), (dict(beta=2.0), 'beta'),
    (dict(kernel_size=0), 'kernel_size'), (dict(kernel_size=4), 'kernel_size'),
    (dict(activation='gelu'), 'activation')])
def test_config_errors(kwargs, field):
  with pytest.raises(ValueError, match=field):
    EvolvingAttentionConfig(**kwargs)


def test_shape_errors():
  q, k, v, bias, previous = qkv(0)
  evolve = EvolvingLogits(EvolvingAttentionConfig(), 4, causal=True)
  with pytest.raises(ValueError, match='previous'):
    evolve.init(jax.random.key(0), jnp.zeros((2, 4, 6, 6)), jnp.zeros((2, 4, 6, 5)))
  with pytest.raises(ValueError, match='q_len == k_len'):
    evolve.init(jax.random.key(0), jnp.zeros((2, 4, 1, 6)))
  with pytest.raises(ValueError, match='4 heads'):
    evolve.init(jax.random.key(0), jnp.zeros((2, 3, 6, 6)))


@pytest.mark.parametrize('causal', [False, True])
def test_has_previous_selects_first_layer_or_later_in_one_program(causal):
  """Scanned stacks pass zeros and has_previous = 0 to their first layer: that must equal
  previous=None exactly, and has_previous = 1 must equal passing the logits."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 3, 6, 6)), jnp.float32)
  previous = jnp.asarray(rng.normal(size=(2, 3, 6, 6)), jnp.float32)
  module = EvolvingLogits(EvolvingAttentionConfig(alpha=0.4, beta=0.7), num_heads=3, causal=causal)
  params = jax.jit(module.init)(jax.random.key(0), logits, previous)
  for convolve_first in (False, True):
    module = EvolvingLogits(EvolvingAttentionConfig(alpha=0.4, beta=0.7,
                                                    convolve_first_layer=convolve_first),
                            num_heads=3, causal=causal)
    first = jax.jit(lambda p: module.apply(p, logits, None))(params)
    traced_first = jax.jit(lambda p, h: module.apply(p, logits, jnp.zeros_like(logits),
                                                     has_previous=h))(params, 0.0)
    later = jax.jit(lambda p: module.apply(p, logits, previous))(params)
    traced_later = jax.jit(lambda p, h: module.apply(p, logits, previous, has_previous=h))(
        params, 1.0)
    for got, want in ((traced_first, first), (traced_later, later)):
      np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
