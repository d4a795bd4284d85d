"""Inference layouts (shard_map on a (2, 2, 2) mesh) against the unsharded flax layer.

Every layer is run as prefill (right-padded prompts of different lengths) then one decode step,
and compared with the flax DecoderLayer on the whole sequence: at the valid prompt positions
and at the decoded position. Each ffn layout and each attention layout appears at least once,
with MHA, MQA and GQA, rotary and relative bias, serial and parallel blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.inference import layouts, quantization
from efficientlm.inference.layout_spec import Layout
from efficientlm.layers import masks
from efficientlm.layers.position import RelativePositionBias, apply_rotary
from efficientlm.models.config import TransformerConfig
from efficientlm.models.transformer import DecoderLayer

B, T, P, S = 8, 7, 6, 8  # batch, reference length, prompt length, cache slots
LENGTHS = np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32)
TOL = dict(rtol=2e-5, atol=2e-5)


def config(**kw) -> TransformerConfig:
  base = dict(vocab_size=32, emb_dim=16, num_heads=8, head_dim=4, mlp_dim=32,
              num_encoder_layers=0, num_decoder_layers=1, dtype='float32')
  return TransformerConfig(**{**base, **kw})


def randomize_norms(params, seed=3):
  """Norm scales start at one; make them differ so their sharding is checked."""
  key = jax.random.key(seed)
  return jax.tree.map(lambda p: p * (1 + jax.random.uniform(key, p.shape)) if p.ndim == 1 else p,
                      params)


def _layer_inputs(cfg, table):
  """(causal mask, relative bias or None, positions) of the full reference sequence."""
  positions = jnp.arange(T)[None]
  mask = masks.make_decoder_mask(jnp.ones((B, T), jnp.int32))
  bias = None
  if table is not None:
    rel = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                               cfg.relative_attention_max_distance)
    bias = rel.apply({'params': {'rel_embedding': table}}, positions, positions, False)
  return mask, bias, positions


def flax_layer(cfg, params, table, x):
  """The flax DecoderLayer's output on the full sequence: the unsharded reference."""
  out, _ = DecoderLayer(cfg, cross_attention=False).apply({'params': params}, x,
                                                          *_layer_inputs(cfg, table))
  return out


def reference(cfg):
  """(flax layer params, relpos table or None, x_full [B, T, E], reference output)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, T, cfg.emb_dim)), jnp.float32)
  table = None
  if cfg.position_embedding == 'relative':
    table = 3 * jax.random.normal(jax.random.key(1), (cfg.num_heads, 32))
  layer = DecoderLayer(cfg, cross_attention=False)

  @jax.jit  # one program (run eagerly, init and apply compile a program per operation)
  def build(x, table):
    params = randomize_norms(nn.unbox(layer.init(jax.random.key(0), x,
                                                 *_layer_inputs(cfg, table)))['params'])
    return params, flax_layer(cfg, params, table, x)

  params, out = build(x, table)
  return params, table, x, out


def reference_keys(cfg, params, x):
  """The cached keys: rotary(norm(x) @ W_k), [B, T, K, D]."""
  scale = params['pre_self_attention_layer_norm']['scale']
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.layer_norm_epsilon) * scale
  k = (h @ params['self_attention']['key']['kernel']).reshape(B, T, -1, cfg.head_dim)
  if cfg.position_embedding == 'rotary':
    k = apply_rotary(k, jnp.broadcast_to(jnp.arange(T)[None], (B, T)))
  return k


def run_layer(mesh, cfg, layout, params, table, x, block_fn=layouts.decoder_layer):
  plan = layouts.plan_layer(cfg, layout, mesh)
  w = layouts.place(plan, layouts.layer_weights(plan, params))
  cache = jnp.zeros(layouts.cache_shape(plan, B, S))
  pre = jax.jit(block_fn(plan, 'prefill'))
  dec = jax.jit(block_fn(plan, 'decode'))
  lengths = jnp.asarray(LENGTHS)
  y, ck, cv = pre(w, x[:, :P], cache, cache, lengths, table)
  prefill_keys = ck
  step_x = x[jnp.arange(B), lengths][:, None]
  y_step, ck, cv = dec(w, step_x, ck, cv, lengths, table)
  return y, prefill_keys, y_step[:, 0], ck


def check_layer(y, y_step, out):
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(y[b, :n], out[b, :n], **TOL)
  np.testing.assert_allclose(y_step, out[np.arange(B), LENGTHS], **TOL)


CASES = [  # (ffn, attention, block, num_kv_heads, position, extra config)
    ('2d', 'heads', 'serial', None, 'relative', {}),  # sharded KV
    ('2d', 'batch_z', 'serial', 1, 'rotary', dict(scale_attention_logits=True)),  # permuted
    ('2d', 'batch_yz', 'serial', 2, 'relative', {}),
    ('1d', 'batch_xyz', 'serial', 2, 'rotary', {}),
    ('wg_x', 'batch_yz', 'serial', None, 'relative', dict(mlp_activations=('relu',))),
    ('wg_xy', 'batch_z', 'serial', 1, 'relative', dict(mlp_activations=('silu', 'linear'))),
    ('wg_xyz', 'heads', 'serial', 2, 'rotary', {}),
    ('2d', 'heads', 'parallel', 2, 'relative', {}),
    ('wg_x', 'heads', 'parallel', None, 'rotary', {}),
]


@pytest.mark.parametrize('ffn,attention,block,kv,position,extra', CASES,
                         ids=[f'{c[0]}-{c[1]}-{c[2]}-kv{c[3]}-{c[4]}' for c in CASES])
def test_layer_matches_flax(mesh, ffn, attention, block, kv, position, extra):
  cfg = config(num_kv_heads=kv, position_embedding=position,
               parallel_block=block == 'parallel', **extra)
  params, table, x, out = reference(cfg)
  y, prefill_keys, y_step, keys = run_layer(mesh, cfg, Layout(ffn, attention, block), params,
                                            table, x)
  check_layer(y, y_step, out)
  # The cache holds the (rotated) keys of the valid prompt slots and of the decoded slot.
  ref_keys = reference_keys(cfg, params, x)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(prefill_keys[b, :n], ref_keys[b, :n], **TOL)
    np.testing.assert_allclose(keys[b, :n + 1], ref_keys[b, :n + 1], **TOL)


def test_attention_block_alone(mesh):
  cfg = config(num_kv_heads=2)
  params, table, x, _ = reference(cfg)
  y, _, y_step, _ = run_layer(mesh, cfg, Layout('2d', 'batch_xyz'), params, table, x,
                              block_fn=layouts.attention_block)
  # Reference: the flax layer without its MLP (zero W_out makes the feed-forward residual 0).
  no_mlp = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if 'wo' in str(p) else v, params)
  check_layer(y, y_step, flax_layer(cfg, no_mlp, table, x))


def mlp_reference(cfg, params, x, norm_scale):
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.layer_norm_epsilon) * norm_scale
  acts = {'gelu': lambda v: jax.nn.gelu(v, approximate=True), 'linear': lambda v: v,
          'relu': jax.nn.relu}
  names = ['wi'] if len(cfg.mlp_activations) == 1 else ['wi_0', 'wi_1']
  hidden = 1.0
  for name, act in zip(names, cfg.mlp_activations):
    hidden = hidden * acts[act](h @ params[name]['kernel'])
  return x + hidden @ params['wo']['kernel']


@pytest.mark.parametrize('ffn,int8', [('1d', False), ('2d', False), ('wg_x', False),
                                      ('wg_xy', True), ('wg_xyz', False)])
def test_ffn_block(mesh, ffn, int8):
  cfg = config(mlp_activations=('relu',) if ffn == '1d' else ('gelu', 'linear'))
  params, _, x, _ = reference(cfg)
  mlp = params['mlp']
  if int8:  # compare with the dequantized weights
    mlp = quantization.quantize_tree(mlp)
    ref_mlp = quantization.dequantize_tree(mlp, jnp.float32)
  else:
    ref_mlp = mlp
  layer = dict(params, mlp=mlp)
  plan = layouts.plan_layer(cfg, Layout(ffn), mesh)
  w = layouts.layer_weights(plan, layer)
  w = layouts.place(plan, {k: v for k, v in w.items()
                           if k == 'pre_mlp_layer_norm' or k in plan.wi_names + ('wo',)})
  y = jax.jit(layouts.ffn_block(plan))(w, x)
  expected = mlp_reference(cfg, ref_mlp, x, params['pre_mlp_layer_norm']['scale'])
  np.testing.assert_allclose(y, expected, **TOL)


def test_int8_layer_matches_dequantized(mesh):
  cfg = config(num_kv_heads=2)
  params, table, x, _ = reference(cfg)
  quantized = quantization.quantize_tree(params)
  ref_params = quantization.dequantize_tree(quantized, jnp.float32)
  y, _, y_step, _ = run_layer(mesh, cfg, Layout('wg_x', 'batch_z'), quantized, table, x)
  check_layer(y, y_step, flax_layer(cfg, ref_params, table, x))


@pytest.mark.parametrize('kw,layout,match', [
    (dict(num_heads=6), Layout('2d'), r'2d/heads/serial.*num_heads \(H\) = 6.*\(\'y\', \'z\', '
     r'\'x\'\)'),
    (dict(mlp_dim=20), Layout('1d'), r'd_ff \(F\) = 20 .*8'),
    (dict(emb_dim=12), Layout('2d'), r'd_model \(E, residual stream\) = 12'),
    (dict(num_kv_heads=1), Layout('wg_xyz'), r'num_kv_heads \* head_dim.* = 4'),
    (dict(parallel_block=True), Layout('2d'), r'serial block but the model has parallel'),
    (dict(), Layout('2d', block='parallel'), r'parallel block but the model is serial'),
    (dict(num_encoder_layers=2), Layout('2d'), r'encoder-decoder'),
])
def test_bad_layouts_raise(mesh, kw, layout, match):
  with pytest.raises(ValueError, match=match):
    layouts.plan_layer(config(**kw), layout, mesh)


def test_bad_batch_and_mesh_raise(mesh):
  plan = layouts.plan_layer(config(), Layout('2d', 'batch_xyz'), mesh)
  with pytest.raises(ValueError, match=r'batch \(B\) = 4 is not divisible by 8.*\(\'x\', \'y\', '
                     r'\'z\'\)'):
    layouts.cache_shape(plan, 4, S)
  with pytest.raises(ValueError, match='attention batch axes'):
    Layout('wg_xyz', 'batch_z')
  other = partitioning.create_mesh((2, 4), ('data', 'model'))
  with pytest.raises(ValueError, match=r"mesh with axes \('x', 'y', 'z'\)"):
    layouts.plan_layer(config(), Layout('2d'), other)


def test_moe_rejected(mesh):
  from efficientlm.layers.moe.config import MoeConfig
  with pytest.raises(ValueError, match='Mixture-of-Experts'):
    layouts.plan_layer(config(moe=MoeConfig(num_experts=2)), Layout('2d'), mesh)
