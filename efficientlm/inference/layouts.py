"""Partitioned inference layouts (Pope et al. 2022) for one decoder layer, with shard_map.

The layouts, axis groups and the exact collectives of each are the contract in layout_spec.py;
this module implements it on an ('x', 'y', 'z') mesh with explicit collectives only (all_gather,
psum_scatter, psum, all_to_all). Entry points, each returning a function of global arrays (jit
it, or call it inside jit) whose inputs are placed as `LayerPlan` says:

  ffn_block(plan)                x -> x + mlp(norm(x))
  attention_block(plan, phase)   (w, x, cache_k, cache_v, rows, relpos) -> (x, cache_k, cache_v)
  decoder_layer(plan, phase)     the whole layer, serial or parallel as `plan.layout.block`

`rows` are per-sequence prompt lengths (phase 'prefill') or positions (phase 'decode'); relpos
is the stack's [H, buckets] T5 bias table (None with rotary). Weights are the flat dict of
`layer_weights` (float arrays or int8 QuantizedWeights): norms, query/key/value/out, wi*/wo,
placed by `place` (see layout_plan for the storage order, including the head-chunk permutation
that 2d with batch_z / batch_yz attention needs).

int8 weights: values travel as int8 in the weight-gathered all-gathers (bytes E*F*|Ab|/n);
their per-output-channel scales are stored replicated over Ab and sharded like the output
dimension, so int8 adds no collective. Quantized matmuls run in the activation dtype and scale
after the matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficientlm.inference import quantization
from efficientlm.inference.layout_attention import (PHASES, attention_core, attention_inputs,
                                                    attention_output)
from efficientlm.inference.layout_ffn import ffn_hidden, ffn_inputs, ffn_output
from efficientlm.inference.layout_ops import (fused_all_gather, fused_reduce_scatter,
                                              gathered_norm, reduce_scatter)
from efficientlm.inference.layout_plan import NORMS, LayerPlan
from efficientlm.inference.layout_spec import Layout
from efficientlm.models.config import TransformerConfig

__all__ = ['LayerPlan', 'plan_layer', 'layer_weights', 'place', 'ffn_block', 'attention_block',
           'decoder_layer', 'cache_shape']


def plan_layer(config: TransformerConfig, layout: Layout, mesh: jax.sharding.Mesh) -> LayerPlan:
  """Checks the layout against the model and mesh (ValueError naming what does not divide)."""
  return LayerPlan.create(config, layout, mesh)


# ---- weights ---------------------------------------------------------------------------------


def _permute_heads(w, perm: np.ndarray, axis: int):
  """Reorders head chunks along `axis` (columns of query, rows of out) by `perm`."""
  def one(x, ax):
    ax = ax % x.ndim
    shape = x.shape
    x = x.reshape(shape[:ax] + (len(perm), shape[ax] // len(perm)) + shape[ax + 1:])
    return jnp.take(x, jnp.asarray(perm), axis=ax).reshape(shape)
  if quantization.is_quantized(w):
    scale = one(w.scale, -1) if axis == -1 else w.scale  # out's scale is over E
    return quantization.QuantizedWeight(one(w.values, axis), scale)
  return one(w, axis)


def layer_weights(plan: LayerPlan, layer: dict) -> dict:
  """A flax DecoderLayer param dict (optionally with a leading layer axis on every leaf) -> the
  flat weight dict of the layout, query/out head chunks in the layout's storage order."""
  attn, mlp = layer['self_attention'], layer['mlp']
  w = {name: attn[name]['kernel'] for name in ('query', 'key', 'value', 'out')}
  w.update({name: mlp[name]['kernel'] for name in plan.wi_names + ('wo',)})
  for name in NORMS:
    if name in layer:
      w[name] = layer[name]['scale']
  perm = plan.head_permutation()
  if perm is not None:
    w['query'] = _permute_heads(w['query'], perm, axis=-1)
    w['out'] = _permute_heads(w['out'], perm, axis=-2)
  return w


def place(plan: LayerPlan, weights: dict, stacked: bool = False) -> dict:
  """Puts the flat weight dict on the mesh as the layout stores it (`stacked`: a leading layer
  axis, replicated)."""
  def sharding(spec):
    return NamedSharding(plan.mesh, P(None, *spec) if stacked else spec)
  specs = plan.weight_specs(weights)
  shardings = jax.tree.map(sharding, specs, is_leaf=lambda s: isinstance(s, P))
  return jax.device_put(weights, shardings)


def cache_shape(plan: LayerPlan, batch: int, length: int) -> tuple[int, int, int, int]:
  """Global KV cache shape per layer, [B, S, K, D]; its partitioning is `plan.cache_spec`."""
  plan.check_batch(batch)
  return (batch, length, plan.kv_heads, plan.config.head_dim)


# ---- per-chip bodies ------------------------------------------------------------------------


def _qkv(outs: list[jax.Array], kv):
  """q, k, v from the reduce-scatter outputs (sharded KV) or q and the all-reduced (k, v)."""
  return outs if kv is None else [outs[0], *kv]


def _attention_residual(plan, phase, w, x, cache_k, cache_v, rows, relpos):
  h = gathered_norm(plan, x, w['pre_self_attention_layer_norm'])
  parts, kv = attention_inputs(plan, w, h)
  q, k, v = _qkv(fused_reduce_scatter(plan, parts), kv)
  out, cache_k, cache_v = attention_core(plan, phase, q, k, v, cache_k, cache_v, rows, relpos)
  (out,) = fused_all_gather(plan, [out])
  y = reduce_scatter(attention_output(plan, w, out), plan.aout, axis=2)
  return x + y, cache_k, cache_v


def _ffn_residual(plan, w, x):
  h = gathered_norm(plan, x, w['pre_mlp_layer_norm'])
  outs = fused_reduce_scatter(plan, ffn_inputs(plan, w, h))
  (hidden,) = fused_all_gather(plan, [ffn_hidden(plan, outs)])
  return x + reduce_scatter(ffn_output(plan, w, hidden), plan.aout, axis=2)


def _serial_layer(plan, phase, w, x, cache_k, cache_v, rows, relpos):
  x, cache_k, cache_v = _attention_residual(plan, phase, w, x, cache_k, cache_v, rows, relpos)
  return _ffn_residual(plan, w, x), cache_k, cache_v


def _parallel_layer(plan, phase, w, x, cache_k, cache_v, rows, relpos):
  """PaLM's block: one norm, one reduce-scatter of W_in outputs and q (k, v), one all-gather
  of the hidden and the attention output, one reduce-scatter of the summed outputs."""
  h = gathered_norm(plan, x, w['pre_self_attention_layer_norm'])
  ffn_parts = ffn_inputs(plan, w, h)
  attn_parts, kv = attention_inputs(plan, w, h)
  outs = fused_reduce_scatter(plan, ffn_parts + attn_parts)
  hidden = ffn_hidden(plan, outs[:len(ffn_parts)])
  q, k, v = _qkv(outs[len(ffn_parts):], kv)
  out, cache_k, cache_v = attention_core(plan, phase, q, k, v, cache_k, cache_v, rows, relpos)
  hidden, out = fused_all_gather(plan, [hidden, out])
  y = ffn_output(plan, w, hidden) + attention_output(plan, w, out)
  return x + reduce_scatter(y, plan.aout, axis=2), cache_k, cache_v


# ---- shard_map wrappers ---------------------------------------------------------------------


def _check_phase(phase: str):
  if phase not in PHASES:
    raise ValueError(f'phase {phase!r}; choose from {PHASES}.')


def _with_cache(plan: LayerPlan, phase: str, body) -> Callable:
  _check_phase(phase)

  def apply(w, x, cache_k, cache_v, rows, relpos=None):
    plan.check_batch(x.shape[0])
    cache = plan.cache_spec
    in_specs = (plan.weight_specs(w), plan.residual_spec, cache, cache, plan.rows_spec)
    args = (w, x, cache_k, cache_v, rows)
    if relpos is not None:
      in_specs, args = in_specs + (P(),), args + (relpos,)

    def per_chip(w, x, cache_k, cache_v, rows, relpos=None):
      return body(plan, phase, w, x, cache_k, cache_v, rows, relpos)

    # check_vma off: replicated outputs (a KV cache replicated over Ah) are equal by
    # construction, after explicit collectives the checker cannot follow.
    return jax.shard_map(per_chip, mesh=plan.mesh, in_specs=in_specs,
                         out_specs=(plan.residual_spec, cache, cache), check_vma=False)(*args)
  return apply


def ffn_block(plan: LayerPlan) -> Callable[[dict, jax.Array], jax.Array]:
  """(w, x [B, L, E]) -> x + mlp(norm(x)); w needs pre_mlp_layer_norm, wi*, wo."""
  def apply(w, x):
    plan.check_batch(x.shape[0])
    return jax.shard_map(lambda w, x: _ffn_residual(plan, w, x), mesh=plan.mesh,
                         in_specs=(plan.weight_specs(w), plan.residual_spec),
                         out_specs=plan.residual_spec, check_vma=False)(w, x)
  return apply


def attention_block(plan: LayerPlan, phase: str) -> Callable:
  """(w, x, cache_k, cache_v, rows, relpos=None) -> (x + attention(norm(x)), cache_k, cache_v)."""
  return _with_cache(plan, phase, _attention_residual)


def decoder_layer(plan: LayerPlan, phase: str) -> Callable:
  """(w, x, cache_k, cache_v, rows, relpos=None) -> (layer(x), cache_k, cache_v)."""
  body = _parallel_layer if plan.layout.block == 'parallel' else _serial_layer
  return _with_cache(plan, phase, body)
