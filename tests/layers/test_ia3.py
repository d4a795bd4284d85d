"""(IA)3 vectors (layers/ia3.py): at ones the model is its base exactly; random vectors give the
paper's equations computed by hand in numpy; merged kernels give the unmerged logits and greedy
decodes; the vectors shard like their kernels; layers without keys refuse the option."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.checkpoints.source import flatten, unflatten
from efficientlm.inference.decoding import DecodeOptions, generate
from efficientlm.layers import ia3
from efficientlm.layers.attention import MultiHeadAttention
from efficientlm.layers.h3 import H3Config
from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import Experts
from efficientlm.models.config import TransformerConfig
from tests import helpers

VOCAB = helpers.TINY_T5.vocab_size
# An encoder-decoder whose encoder layer is MoE (dropping dispatch) and decoder layer dense; a
# decoder-only model (grouped-query, rotary) whose scanned layers alternate dense and dropless MoE.
CASES = {
    't5_moe': (helpers.t5_model, dict(
        num_encoder_layers=1, num_decoder_layers=1,
        moe=MoeConfig(4, layout='explicit', encoder_layers=(0,)))),
    'decoder_moe_scanned': (helpers.decoder_model, dict(
        moe=MoeConfig(4, layout='every', period=2, dispatch='dropless', num_selected_experts=2),
        scan_layers=True)),
}


@functools.lru_cache(maxsize=None)
def _case(name):
  """(ia3 model, plain model, batch, base params, jitted ia3 logits, jitted plain logits)."""
  make, overrides = CASES[name]
  with_ia3, plain = make(ia3=True, **overrides), make(**overrides)
  batch = (helpers.seq2seq_batch(0, 2, 7, 6, VOCAB) if 't5' in name else
           helpers.lm_batch(0, 2, 7, VOCAB))
  rng = np.random.default_rng(0)  # random values of the base's shapes: nothing to compile
  base = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                      jax.eval_shape(lambda: helpers.init_params(plain, batch)))
  return (with_ia3, plain, batch, base, jax.jit(with_ia3.logits), jax.jit(plain.logits))


def _init(module, *args):  # jitted: op by op, compiling each op costs more than the whole init
  return jax.jit(lambda: partitioning.unbox(module.init(jax.random.key(0), *args)['params']))()


def _vectors(base, fill):
  """The (IA)3 vectors of the plain tree `base`, each filled by fill(key, shape)."""
  shapes = flatten(ia3.vector_shapes(base))
  return unflatten({name: fill(jax.random.key(i), s.shape)
                    for i, (name, s) in enumerate(sorted(shapes.items()))})


def _random(key, shape):
  return jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)


def _with(vectors, base):
  tree = flatten(base)
  tree.update(flatten(vectors))
  return unflatten(tree)


@pytest.mark.parametrize('name', CASES)
def test_vectors_at_ones_are_the_base_model_exactly(name):
  with_ia3, _, batch, base, ia3_logits, plain_logits = _case(name)
  params = _with(_vectors(base, lambda _, s: jnp.ones(s)), base)
  # The model's own tree has every vector where vector_shapes says.
  own = jax.eval_shape(lambda: helpers.init_params(with_ia3, batch))
  assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, params)
  np.testing.assert_array_equal(ia3_logits(params, batch), plain_logits(base, batch))


@pytest.mark.parametrize('name', CASES)
def test_merged_kernels_give_the_unmerged_logits(name):
  _, _, batch, base, ia3_logits, plain_logits = _case(name)
  params = _with(_vectors(base, _random), base)
  merged = ia3.merge(params)
  assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, base)
  unmerged = ia3_logits(params, batch)
  np.testing.assert_allclose(plain_logits(merged, batch), unmerged, rtol=2e-5, atol=2e-5)
  # The vectors matter: the base model's logits are far from these.
  assert np.abs(plain_logits(base, batch) - unmerged).max() > 1e-2


def test_merged_and_unmerged_greedy_decodes_are_equal():
  """Decoding reads keys and values back from the KV caches (self- and cross-attention), which
  hold them scaled."""
  with_ia3, plain, _, base, _, _ = _case('t5_moe')
  params = _with(_vectors(base, _random), base)
  prompts = jnp.asarray(helpers.tokens(np.random.default_rng(3), (2, 5), VOCAB))
  options = DecodeOptions(max_decode_length=4, eos_id=-1)  # never stops early
  unmerged = generate(with_ia3, params, prompts, options)
  merged = generate(plain, ia3.merge(params), prompts, options)
  np.testing.assert_array_equal(merged.tokens, unmerged.tokens)
  np.testing.assert_allclose(merged.scores, unmerged.scores, rtol=1e-4)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_attention_with_random_vectors_matches_numpy_attention():
  """softmax(Q (l_k ⊙ K)^T) (l_v ⊙ V) by hand, grouped-query (4 heads, 2 KV heads)."""
  heads, kv_heads, depth, d = 4, 2, 3, 8
  layer = MultiHeadAttention(heads, depth, num_kv_heads=kv_heads, ia3=True)
  rng = np.random.default_rng(0)
  xq, xkv = rng.normal(size=(2, 5, d)), rng.normal(size=(2, 6, d))
  params = _init(layer, xq, xkv)
  params[ia3.KEY_SCALE] = jnp.asarray(rng.uniform(0.5, 1.5, kv_heads * depth), jnp.float32)
  params[ia3.VALUE_SCALE] = jnp.asarray(rng.uniform(0.5, 1.5, kv_heads * depth), jnp.float32)
  out = jax.jit(lambda p: layer.apply({'params': p}, xq, xkv))(params)
  p = jax.tree.map(np.asarray, params)
  q = (xq @ p['query']['kernel']).reshape(2, 5, heads, depth)
  k = (xkv @ p['key']['kernel'] * p[ia3.KEY_SCALE]).reshape(2, 6, kv_heads, depth)
  v = (xkv @ p['value']['kernel'] * p[ia3.VALUE_SCALE]).reshape(2, 6, kv_heads, depth)
  k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(2, 5, -1) @ p['out']['kernel']
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_gated_mlp_with_a_random_vector_matches_numpy():
  """(l_ff ⊙ gelu(x W_0) ⊙ x W_1) W_o: the vector scales the gates' product."""
  block = MlpBlock(16, ('gelu', 'linear'), ia3=True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 8))
  params = _init(block, x)
  np.testing.assert_array_equal(params[ia3.FF_SCALE], np.ones(16))  # (IA)3's initialization
  params[ia3.FF_SCALE] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  p = jax.tree.map(np.asarray, params)
  hidden = _gelu(x @ p['wi_0']['kernel']) * (x @ p['wi_1']['kernel']) * p[ia3.FF_SCALE]
  out = jax.jit(lambda p: block.apply({'params': p}, x))(params)
  np.testing.assert_allclose(out, hidden @ p['wo']['kernel'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dropless', [False, True])
def test_each_expert_scales_by_its_own_vector(dropless):
  """Experts: expert e computes (l_ff[e] ⊙ gelu(x W_0[e]) ⊙ x W_1[e]) W_o[e], on dispatched
  slots [E, G, C, d] or on rows sorted by expert (the dropless path)."""
  e, f, d = 3, 8, 4
  experts = Experts(e, f, ('gelu', 'linear'), ia3=True)
  rng = np.random.default_rng(2)
  sizes = np.array([2, 0, 3])
  x = rng.normal(size=(5, d)) if dropless else rng.normal(size=(e, 2, 2, d))
  call = (lambda p, x: experts.apply({'params': p}, x, group_sizes=jnp.asarray(sizes))
          if dropless else experts.apply({'params': p}, x))
  params = _init(experts, jnp.zeros((e, 1, 1, d)))
  params[ia3.FF_SCALE] = jnp.asarray(rng.uniform(0.5, 1.5, (e, f)), jnp.float32)
  p = jax.tree.map(np.asarray, params)
  rows = np.repeat(np.arange(e), sizes) if dropless else None

  def expert(i, h):
    hidden = _gelu(h @ p['wi_0']['kernel'][i]) * (h @ p['wi_1']['kernel'][i])
    return (hidden * p[ia3.FF_SCALE][i]) @ p['wo']['kernel'][i]

  expected = (np.stack([expert(r, x[n]) for n, r in enumerate(rows)]) if dropless else
              np.stack([expert(i, x[i]) for i in range(e)]))
  np.testing.assert_allclose(jax.jit(call)(params, x), expected, rtol=1e-5, atol=1e-6)


def test_vectors_shard_like_the_kernel_axes_they_scale_and_stay_float32():
  model = helpers.t5_model(ia3=True, moe=MoeConfig(4, layout='all'), param_dtype='bfloat16')
  batch = model.dummy_batch(8, {'inputs': 4, 'targets': 4})
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  abstract, _ = partitioner.abstract_params(model.param_initializer(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}), jax.random.key(0))
  flat = {k: v.sharding.spec for k, v in flatten(abstract).items()}
  layer = 'encoder/layers_0/'
  assert tuple(flat[layer + 'attention/ia3_key_scale']) == (
      tuple(flat[layer + 'attention/key/kernel'])[-1],)
  assert tuple(flat[layer + 'attention/ia3_value_scale']) == ('model',)
  assert tuple(flat[layer + 'mlp/expert/ia3_scale']) == tuple(
      flat[layer + 'mlp/expert/wo/kernel'])[:2]
  dtypes = {ia3.is_vector(k): v.dtype for k, v in flatten(abstract).items()}
  assert dtypes == {True: np.dtype('float32'), False: np.dtype('bfloat16')}


@pytest.mark.parametrize('overrides,named', [
    (dict(token_mixers=('lsh',), lsh=LshConfig(), position_embedding='rotary',
          num_encoder_layers=0), "token_mixers \\['lsh'\\]"),
    (dict(token_mixers=('attention', 'h3'), h3=H3Config(), num_encoder_layers=0), 'h3'),
])
def test_layers_without_key_projections_refuse_ia3(overrides, named):
  with pytest.raises(ValueError, match=f'ia3 scales .*{named}.*set ia3 = False'):
    dataclasses.replace(TransformerConfig(ia3=True), **overrides)
