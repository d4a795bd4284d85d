"""A whole decoder-only model run with one inference Layout on an ('x', 'y', 'z') mesh.

    decoder = PartitionedDecoder(config, Layout('2d', 'batch_xyz'), mesh)
    params = decoder.shard_params(flax_params)        # DecoderOnly's `params`, float or int8
    cache = decoder.init_cache(batch, max_length)
    logits, cache = decoder.prefill(params, cache, tokens, lengths)       # [B, P, V]
    logits, cache = decoder.decode_step(params, cache, next_tokens, positions)  # [B, V]

The layers run the layout's shard_map code (layouts.py) under one lax.scan over stacked layer
weights; the embedding lookup, final norm and logits are plain jit (GSPMD). Prompts are
right-padded: row b of a prefill is valid up to lengths[b], and its next token decodes at
position lengths[b] (slot = position); positions must stay below the cache length. Float
weights are stored in `param_dtype` (bfloat16 there gives bf16 weights and weight gathers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficientlm.inference import layouts, quantization
from efficientlm.inference.layout_plan import NORMS, spec_entry
from efficientlm.inference.layout_spec import Layout
from efficientlm.models.config import TransformerConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerFn:
  """One compiled-able layer for HLO checks and timing: `fn(*args)` with args placed as the
  layout stores them ((weights, x, cache_k, cache_v, rows[, relpos]), abstract here)."""

  fn: Callable
  args: tuple

  def compile(self):
    return self.fn.lower(*self.args).compile()

  def example_args(self, seed: int = 0) -> tuple:
    """Concrete placed arrays of the right shapes (random floats, zero ints) for timing."""
    leaves, tree = jax.tree.flatten(self.args)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def make(key, a):
      if jnp.issubdtype(a.dtype, jnp.floating):
        x = jax.random.normal(key, a.shape, a.dtype)
      else:
        x = jnp.zeros(a.shape, a.dtype)
      return jax.device_put(x, a.sharding)
    return jax.tree.unflatten(tree, [make(k, a) for k, a in zip(keys, leaves)])


class PartitionedDecoder:
  """DecoderOnly inference with the layers partitioned by `layout` (see module doc)."""

  def __init__(self, config: TransformerConfig, layout: Layout, mesh: jax.sharding.Mesh):
    if config.num_encoder_layers:
      raise ValueError('PartitionedDecoder runs decoder-only models; this config has '
                       f'{config.num_encoder_layers} encoder layers (encoder-decoder). Set '
                       'num_encoder_layers=0.')
    if config.moe is not None:
      raise ValueError('PartitionedDecoder does not support Mixture-of-Experts layers '
                       '(config.moe is set); the inference layouts are for dense models.')
    self.config, self.layout, self.mesh = config, layout, mesh
    self.plan = layouts.plan_layer(config, layout, mesh)
    self._prefill = jax.jit(self._prefill_impl, donate_argnums=1)
    self._decode = jax.jit(self._decode_impl, donate_argnums=1)

  # ---- parameters ----------------------------------------------------------------------

  def _named(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def _vocab_axes(self):
    axes = tuple(self.mesh.axis_names)
    return axes if self.config.vocab_size % self.mesh.devices.size == 0 else None

  def _convert(self, params: Params) -> Params:
    cfg, plan = self.config, self.plan
    params = nn.meta.unbox(params)
    params = params.get('params', params)
    dec = params['decoder']
    if 'layers' in dec:  # scanned: every leaf already has the leading layer axis
      layers = layouts.layer_weights(plan, dec['layers'])
    else:
      per_layer = [layouts.layer_weights(plan, dec[f'layers_{i}'])
                   for i in range(cfg.num_decoder_layers)]
      layers = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    count = jax.tree.leaves(layers)[0].shape[0]
    if count != cfg.num_decoder_layers:
      raise ValueError(f'params hold {count} decoder layers, the config '
                       f'{cfg.num_decoder_layers}.')
    out = {'embedding': params['token_embedder']['embedding'],
           'decoder_norm': dec['decoder_norm']['scale'], 'layers': layers}
    if cfg.position_embedding == 'relative':
      out['relpos'] = dec['relpos_bias']['rel_embedding']
    if not cfg.logits_via_embedding:
      out['logits'] = dec['logits_dense']['kernel']
    # Float weights are kept in param_dtype (set it to bfloat16 for bf16 weights: exact, since
    # the model casts them to the activation dtype at every use), whatever the checkpoint holds.
    cast = lambda x: x if quantization.is_quantized(x) else x.astype(cfg.weight_dtype)
    return jax.tree.map(cast, out, is_leaf=quantization.is_quantized)

  def param_shardings(self, params: Params) -> Params:
    """NamedShardings of a converted tree (as returned by shard_params)."""
    plan = self.plan
    layer_specs = plan.weight_specs(params['layers'])
    specs = {
        'embedding': P(None, spec_entry(plan.ain + plan.aout)),
        'decoder_norm': P(),
        'layers': jax.tree.map(lambda s: P(None, *s), layer_specs,
                               is_leaf=lambda s: isinstance(s, P)),
    }
    if 'relpos' in params:
      specs['relpos'] = P()
    if 'logits' in params:
      vocab = P(None, self._vocab_axes())
      specs['logits'] = (quantization.QuantizedWeight(vocab, vocab)
                         if quantization.is_quantized(params['logits']) else vocab)
    return jax.tree.map(self._named, specs, is_leaf=lambda s: isinstance(s, P))

  def shard_params(self, params: Params) -> Params:
    """DecoderOnly params (scanned or not, float or quantize_tree'd) -> placed layout tree."""
    abstract = jax.eval_shape(self._convert, params)
    return jax.jit(self._convert, out_shardings=self.param_shardings(abstract))(params)

  # ---- cache ---------------------------------------------------------------------------

  def cache_sharding(self) -> NamedSharding:
    return self._named(P(None, *self.plan.cache_spec))

  def init_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
    """Zeros {'key', 'value'}: [layers, B, S, K, D] placed as the layout keeps them."""
    shape = (self.config.num_decoder_layers,) + layouts.cache_shape(self.plan, batch, max_length)
    zeros = jax.jit(lambda: jnp.zeros(shape, self.config.activation_dtype),
                    out_shardings=self.cache_sharding())
    return {'key': zeros(), 'value': zeros()}

  # ---- forward ---------------------------------------------------------------------------

  def _embed(self, params, tokens):
    x = jnp.take(params['embedding'].astype(self.config.activation_dtype), tokens, axis=0)
    return jax.lax.with_sharding_constraint(x, self._named(self.plan.residual_spec))

  def _layers(self, params, cache, x, rows, phase):
    layer = layouts.decoder_layer(self.plan, phase)
    relpos = params.get('relpos')

    def step(x, xs):
      w, cache_k, cache_v = xs
      x, cache_k, cache_v = layer(w, x, cache_k, cache_v, rows, relpos)
      return x, (cache_k, cache_v)
    x, (keys, values) = jax.lax.scan(step, x, (params['layers'], cache['key'], cache['value']))
    return x, {'key': keys, 'value': values}

  def _logits(self, params, x):
    cfg = self.config
    dtype = cfg.activation_dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) +
                              cfg.layer_norm_epsilon)
    x = x32.astype(dtype) * params['decoder_norm'].astype(dtype)
    if cfg.logits_via_embedding:
      logits = jnp.einsum('...d,vd->...v', x, params['embedding'].astype(dtype))
      if cfg.scale_tied_logits:
        logits = logits * jnp.asarray(cfg.emb_dim**-0.5, logits.dtype)
      return logits
    kernel = params['logits']
    if quantization.is_quantized(kernel):
      return (x @ kernel.values.astype(dtype)) * kernel.scale[0].astype(dtype)
    return x @ kernel.astype(dtype)

  def _prefill_impl(self, params, cache, tokens, lengths):
    x, cache = self._layers(params, cache, self._embed(params, tokens), lengths, 'prefill')
    return self._logits(params, x), cache

  def _decode_impl(self, params, cache, tokens, positions):
    x = self._embed(params, tokens[:, None])
    x, cache = self._layers(params, cache, x, positions, 'decode')
    return self._logits(params, x)[:, 0], cache

  def _check(self, cache, tokens, rows, ndim: int, rows_name: str):
    tokens = jnp.asarray(tokens)
    batch, slots = cache['key'].shape[1:3]
    if tokens.ndim != ndim or tokens.shape[0] != batch or jnp.shape(rows) != (batch,):
      raise ValueError(f'Expected tokens of rank {ndim} and {rows_name} [{batch}] for the '
                       f'cache of batch {batch}; got tokens {tokens.shape}, {rows_name} '
                       f'{jnp.shape(rows)}.')
    if ndim == 2 and tokens.shape[1] > slots:
      raise ValueError(f'Prompt length {tokens.shape[1]} exceeds the KV cache length {slots}; '
                       'init_cache with a larger max_length.')
    return tokens.astype(jnp.int32), jnp.asarray(rows, jnp.int32)

  def prefill(self, params, cache, tokens, lengths):
    """tokens [B, P] right-padded, lengths [B] -> (logits [B, P, V], cache). Donates cache."""
    tokens, lengths = self._check(cache, tokens, lengths, 2, 'lengths')
    return self._prefill(params, cache, tokens, lengths)

  def decode_step(self, params, cache, tokens, positions):
    """tokens [B] at positions [B] (< cache length) -> (logits [B, V], cache). Donates cache."""
    tokens, positions = self._check(cache, tokens, positions, 1, 'positions')
    return self._decode(params, cache, tokens, positions)

  # ---- one layer, for HLO checks and timing ---------------------------------------------

  def layer_fn(self, phase: str, batch: int, length: int, cache_length: int,
               quantized: bool = False) -> LayerFn:
    """One layer of this layout: jitted fn and abstract placed args. `length` is tokens per
    sequence (the prompt for prefill; 1 for decode)."""
    cfg, plan = self.config, self.plan
    if phase == 'decode' and length != 1:
      raise ValueError(f'A decode step has length 1, got {length}.')
    if phase == 'prefill' and length > cache_length:
      raise ValueError(f'Prompt length {length} exceeds the KV cache length {cache_length}.')
    e, f, hd = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    kd = plan.kv_heads * cfg.head_dim
    shapes = {'query': (e, hd), 'key': (e, kd), 'value': (e, kd), 'out': (hd, e), 'wo': (f, e)}
    shapes.update({name: (e, f) for name in plan.wi_names})
    names = NORMS if plan.layout.block == 'serial' else NORMS[:1]
    shapes.update({name: (e,) for name in names})

    def struct(shape, dtype, spec):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=self._named(spec))

    weights = {}
    for name, shape in shapes.items():
      kernel, scale = plan.weight_spec(name)
      if quantized and len(shape) == 2:
        weights[name] = quantization.QuantizedWeight(
            struct(shape, jnp.int8, kernel), struct((1, shape[1]), jnp.float32, scale))
      else:
        weights[name] = struct(shape, cfg.weight_dtype, kernel)
    dtype = cfg.activation_dtype
    cache = struct(layouts.cache_shape(plan, batch, cache_length), dtype, plan.cache_spec)
    args = (weights, struct((batch, length, e), dtype, plan.residual_spec), cache, cache,
            struct((batch,), jnp.int32, plan.rows_spec))
    if cfg.position_embedding == 'relative':
      args += (struct((cfg.num_heads, cfg.relative_attention_num_buckets), cfg.weight_dtype,
                      P()),)
    return LayerFn(jax.jit(layouts.decoder_layer(plan, phase)), args)
