"""PartitionedDecoder against the flax DecoderOnly model's full forward pass.

Prefill logits at the valid prompt positions, and the logits of decode steps fed the known next
tokens, must equal the flax logits of the whole sequence at those positions; prompts of
different lengths share a batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.inference import quantization
from efficientlm.inference.layout_spec import Layout
from efficientlm.inference.partitioned_decoder import PartitionedDecoder
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly

B, T, P, S, STEPS = 8, 10, 6, 10, 3
LENGTHS = np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32)
TOL = dict(rtol=2e-5, atol=2e-5)


def config(**kw) -> TransformerConfig:
  base = dict(vocab_size=64, emb_dim=16, num_heads=8, head_dim=4, mlp_dim=32,
              num_encoder_layers=0, num_decoder_layers=2, dtype='float32')
  return TransformerConfig(**{**base, **kw})


def model_and_params(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (B, T)), jnp.int32)
  model = DecoderOnly(cfg)

  @jax.jit  # one program (run eagerly, init compiles a program per operation)
  def init(tokens):
    params = nn.unbox(model.init(jax.random.key(0), tokens))['params']
    # Non-trivial norm scales (they start at one).
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v * (1.5 + jnp.sin(jnp.arange(v.size).reshape(v.shape)))
        if 'scale' in str(p[-1]) else v, params)

  return model, init(tokens), tokens


def check_against_flax(mesh, cfg, layout, int8=False):
  model, params, tokens = model_and_params(cfg)
  ref_params = params
  if int8:
    params = jax.jit(quantization.quantize_tree)(params)
    ref_params = jax.jit(quantization.dequantize_tree, static_argnums=1)(params, jnp.float32)
  expected = jax.jit(model.apply)({'params': ref_params}, tokens)  # [B, T, V]
  decoder = PartitionedDecoder(cfg, layout, mesh)
  placed = decoder.shard_params(params)
  cache = decoder.init_cache(B, S)
  lengths = jnp.asarray(LENGTHS)
  prompts = jnp.where(jnp.arange(P)[None] < lengths[:, None], tokens[:, :P], 0)
  logits, cache = decoder.prefill(placed, cache, prompts, lengths)
  assert logits.shape == (B, P, cfg.vocab_size)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(logits[b, :n], expected[b, :n], **TOL)
  rows = np.arange(B)
  for step in range(STEPS):
    positions = lengths + step
    logits, cache = decoder.decode_step(placed, cache, tokens[rows, positions], positions)
    np.testing.assert_allclose(logits, expected[rows, positions], **TOL)
  return decoder, placed


@pytest.mark.slow
def test_2d_batch_xyz_multiquery(mesh):
  check_against_flax(mesh, config(num_kv_heads=1), Layout('2d', 'batch_xyz'))


def test_wg_xyz_heads_rotary_scanned_tied(mesh):
  cfg = config(num_kv_heads=2, position_embedding='rotary', scan_layers=True,
               logits_via_embedding=True)
  check_against_flax(mesh, cfg, Layout('wg_xyz', 'heads'))


def test_1d_int8(mesh):
  decoder, placed = check_against_flax(mesh, config(), Layout('1d', 'heads'), int8=True)
  query = placed['layers']['query']
  assert quantization.is_quantized(query) and query.values.dtype == jnp.int8
  assert query.values.shape == (2, 16, 32)  # stacked layers, [E, H*D]
  assert query.values.sharding.spec == jax.sharding.PartitionSpec(None, None, ('x', 'y', 'z'))
  assert decoder.plan.cache_spec == jax.sharding.PartitionSpec(None, None, ('x', 'y', 'z'), None)


def test_2d_parallel_block_int8_scanned(mesh):
  cfg = config(num_kv_heads=2, parallel_block=True, scan_layers=True,
               mlp_activations=('silu', 'linear'))
  check_against_flax(mesh, cfg, Layout('2d', 'batch_yz', 'parallel'), int8=True)


def test_errors(mesh):
  with pytest.raises(ValueError, match='encoder-decoder'):
    PartitionedDecoder(config(num_encoder_layers=2), Layout('2d'), mesh)
  from efficientlm.layers.moe.config import MoeConfig
  with pytest.raises(ValueError, match='Mixture-of-Experts'):
    PartitionedDecoder(config(moe=MoeConfig(num_experts=2)), Layout('2d'), mesh)
  decoder = PartitionedDecoder(config(), Layout('2d', 'batch_xyz'), mesh)
  with pytest.raises(ValueError, match=r'batch \(B\) = 4 is not divisible by 8'):
    decoder.init_cache(4, S)
  cache = decoder.init_cache(B, 4)
  tokens = jnp.ones((B, 6), jnp.int32)
  with pytest.raises(ValueError, match='Prompt length 6 exceeds the KV cache length 4'):
    decoder.prefill({}, cache, tokens, jnp.full((B,), 6))
  with pytest.raises(ValueError, match=r'lengths \[8\]'):
    decoder.prefill({}, cache, tokens[:, :2], jnp.ones((3,)))
  with pytest.raises(ValueError, match='decode step has length 1'):
    decoder.layer_fn('decode', B, 2, S)
