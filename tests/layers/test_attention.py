"""Attention: grouped/multi-query vs multi-head with copied KV heads, a numpy reference, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.layers.attention import MultiHeadAttention, dot_product_attention
from tests import helpers


def numpy_attention(q, k, v, mask=None, bias=None):
  """Loop-over-heads reference: query head h reads KV head h // (heads // kv_heads)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, lq, heads, d = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for h in range(heads):
      s = q[i, :, h] @ k[i, :, h // group].T
      if bias is not None:
        s = s + np.asarray(bias)[min(i, bias.shape[0] - 1), h]
      if mask is not None:
        s = np.where(np.asarray(mask)[i, 0], s, -1e10)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[i, :, h] = (w / w.sum(-1, keepdims=True)) @ v[i, :, h // group]
  return out


@pytest.mark.parametrize('kv_heads', [8, 4, 2, 1])
def test_dot_product_attention_matches_numpy(kv_heads):
  keys = jax.random.split(jax.random.key(kv_heads), 4)
  q = jax.random.normal(keys[0], (2, 5, 8, 4))
  k = jax.random.normal(keys[1], (2, 7, kv_heads, 4))
  v = jax.random.normal(keys[2], (2, 7, kv_heads, 4))
  bias = jax.random.normal(keys[3], (1, 8, 5, 7))
  mask = jnp.ones((2, 1, 5, 7), bool).at[1, :, :, 4:].set(False)
  got = jax.jit(dot_product_attention)(q, k, v, mask=mask, bias=bias)
  np.testing.assert_allclose(got, numpy_attention(q, k, v, mask, bias), rtol=1e-5, atol=1e-5)


def _init(module, seed, *args):
  """Unboxed params; jitted, as run eagerly init compiles each op as its own program."""
  init = lambda rng: jax.tree.map(lambda b: b.value, module.init(rng, *args)['params'],
                                  is_leaf=lambda b: hasattr(b, 'names'))
  return jax.jit(init)(jax.random.key(seed))


def _apply(module, params, *args):
  return jax.jit(lambda p: module.apply({'params': p}, *args))(params)


def _expand_kv_kernel(kernel, kv_heads, heads, head_dim):
  """[d, kv_heads * hd] -> [d, heads * hd], each KV head copied to the query heads it serves."""
  d = kernel.shape[0]
  per_head = kernel.reshape(d, kv_heads, head_dim)
  return jnp.repeat(per_head, heads // kv_heads, axis=1).reshape(d, heads * head_dim)


@pytest.mark.parametrize('kv_heads', [1, 2, 4])
@pytest.mark.parametrize('rotary', [False, True])
def test_grouped_and_multi_query_equal_multi_head_with_copied_kv(kv_heads, rotary):
  heads, head_dim, d = 8, 4, 16
  x = jax.random.normal(jax.random.key(0), (2, 6, d))
  kv_in = jax.random.normal(jax.random.key(1), (2, 9, d)) if not rotary else x
  pos_q = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  pos_k = jnp.broadcast_to(jnp.arange(kv_in.shape[1]), kv_in.shape[:2])
  mask = jnp.ones((2, 1, x.shape[1], kv_in.shape[1]), bool).at[0, :, :, -2:].set(False)
  bias = jax.random.normal(jax.random.key(2), (1, heads, x.shape[1], kv_in.shape[1]))
  gqa = MultiHeadAttention(heads, head_dim, num_kv_heads=kv_heads, rotary=rotary)
  mha = MultiHeadAttention(heads, head_dim, num_kv_heads=None, rotary=rotary)
  args = (x, kv_in, mask, bias, pos_q, pos_k)

  @jax.jit  # one program, not one per op
  def both():
    params = jax.tree.map(lambda b: b.value, gqa.init(jax.random.key(3), *args)['params'],
                          is_leaf=lambda b: hasattr(b, 'names'))
    mha_params = dict(params)
    for name in ('key', 'value'):
      mha_params[name] = {'kernel': _expand_kv_kernel(params[name]['kernel'], kv_heads, heads,
                                                      head_dim)}
    return gqa.apply({'params': params}, *args), mha.apply({'params': mha_params}, *args)

  np.testing.assert_allclose(*both(), rtol=1e-5, atol=1e-5)


def _repeated_kv_shapes(attention_fn):
  b, lq, lk, heads, kv_heads, d = 2, 5, 7, 8, 2, 4
  q = jnp.ones((b, lq, heads, d))
  k = v = jnp.ones((b, lk, kv_heads, d))
  grads = jax.grad(lambda q, k, v: attention_fn(q, k, v).sum(), argnums=(0, 1, 2))
  # A repeated K or V has the key length and the full query-head count.
  return [s for s in helpers.intermediate_shapes(grads, q, k, v) if lk in s and heads in s and d in s]


def test_kv_heads_are_never_repeated_in_memory():
  assert not _repeated_kv_shapes(dot_product_attention)
  # The check does see a repetition when there is one.
  def repeating(q, k, v):
    group = q.shape[2] // k.shape[2]
    return dot_product_attention(q, jnp.repeat(k, group, 2), jnp.repeat(v, group, 2))
  assert _repeated_kv_shapes(repeating)


def test_rejects_heads_not_divisible_by_kv_heads():
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match='divisible'):
    MultiHeadAttention(6, 4, num_kv_heads=4).init(jax.random.key(0), x, x)


def test_runtime_scaling_equals_folded_query_scaling():
  """scale_logits=True with query kernel W equals scale_logits=False with W / sqrt(d)."""
  x = jax.random.normal(jax.random.key(0), (1, 4, 8))
  module = MultiHeadAttention(2, 4, scale_logits=True)
  params = _init(module, 1, x, x)
  folded = dict(params, query={'kernel': params['query']['kernel'] * 4**-0.5})
  np.testing.assert_allclose(_apply(module, params, x, x),
                             _apply(MultiHeadAttention(2, 4), folded, x, x),
                             rtol=1e-5, atol=1e-6)
