"""Decode step of int8 weights (inference.quantization) against float weights, same model.

A decoder-only model (default 4 layers, d_model 512, 8 heads x 64, gated-GELU MLP 2048, untied
logits, vocab 8192) takes one kv_cache.step per sequence at batch 1, 4 and 8 with a cache of
`--slots` slots. Variants of one model and one set of weights:

  float32        float32 weights and compute
  int8           quantize_tree'd weights, float32 compute, dequantized inside each matmul
  int8_tree      the previous path: dequantize_tree of all weights inside the step (reference)
  bfloat16       bfloat16 weights (all leaves) and compute
  int8_bf16      int8 matmul weights (other leaves bfloat16), bfloat16 compute

For each: `memory` = arguments + scratch (temp) bytes from the compiled step's
memory_analysis() (compile time, deterministic), and the median step time over `--repeats`
rounds that call every variant once in turn (so load on a shared machine hits all alike).
Reported as ratios to float32 (bfloat16 for int8_bf16) measured in the same process. Also one
prefill of `--prefill_length` tokens at batch 4, float32 against int8 (results['prefill']).

  python -m benchmarks.int8_decode_bench [--batches 1 4 8] [--repeats 200]
writes benchmarks/results/int8_decode_<platform>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm.inference import kv_cache, quantization
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.model import DecoderOnlyModel

BASELINE = {'int8': 'float32', 'int8_tree': 'float32', 'int8_bf16': 'bfloat16'}


def model_config(args) -> TransformerConfig:
  return TransformerConfig(
      vocab_size=args.vocab, emb_dim=args.d_model, num_heads=args.d_model // 64, head_dim=64,
      mlp_dim=4 * args.d_model, num_encoder_layers=0, num_decoder_layers=args.layers,
      mlp_activations=('gelu', 'linear'), logits_via_embedding=False, dtype='float32')


def variants(cfg: TransformerConfig, params) -> dict:
  """name -> (model, params, uses dequantize_tree)."""
  f32 = DecoderOnlyModel(DecoderOnly(cfg))
  bf16 = DecoderOnlyModel(DecoderOnly(dataclasses.replace(cfg, dtype='bfloat16')))
  quantized = jax.jit(quantization.quantize_tree)(params)
  to_bf16 = lambda x: x if quantization.is_quantized(x) else x.astype(jnp.bfloat16)  # noqa: E731
  return {
      'float32': (f32, params, False),
      'int8': (f32, quantized, False),
      'int8_tree': (f32, quantized, True),
      'bfloat16': (bf16, jax.tree.map(to_bf16, params), False),
      'int8_bf16': (bf16, jax.tree.map(to_bf16, quantized, is_leaf=quantization.is_quantized),
                    False),
  }


def compiled_step(model, params, cache, tree: bool):
  dtype = model.module.config.activation_dtype

  def step(p, c, tokens, positions):
    if tree:
      p = quantization.dequantize_tree(p, dtype)
    return kv_cache.step(model, p, c, tokens, positions)

  batch = jax.tree.leaves(cache)[0].shape[0]
  tokens = jnp.full((batch,), 3, jnp.int32)
  positions = jnp.full((batch,), 5, jnp.int32)
  compiled = jax.jit(step).lower(params, cache, tokens, positions).compile()
  return compiled, (params, cache, tokens, positions)


def _memory(compiled) -> dict:
  """Arguments (weights, KV cache) and scratch of a compiled call, from XLA's memory analysis."""
  mem = compiled.memory_analysis()
  return {'argument_bytes': mem.argument_size_in_bytes, 'temp_bytes': mem.temp_size_in_bytes,
          'memory_bytes': mem.argument_size_in_bytes + mem.temp_size_in_bytes}


def _round_robin_medians(calls: dict, repeats: int) -> dict:
  """{name: median seconds} of compiled(*args) per name, after one warm-up call each, timed in
  turns so that every variant sees the same machine load."""
  for compiled, args in calls.values():
    jax.block_until_ready(compiled(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (compiled, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def point(cfg, all_variants, batch: int, slots: int, repeats: int) -> dict:
  steps, out = {}, {}
  for name, (model, params, tree) in all_variants.items():
    cache = kv_cache.init_cache(model, params, batch, slots)
    compiled, args = compiled_step(model, params, cache, tree)
    out[name] = {'weight_bytes': quantization.weight_bytes(params), **_memory(compiled)}
    steps[name] = (compiled, args)
  for name, seconds in _round_robin_medians(steps, repeats).items():
    out[name]['seconds'] = seconds
  for name, base in BASELINE.items():
    out[name]['memory_ratio'] = out[name]['memory_bytes'] / out[base]['memory_bytes']
    out[name]['time_ratio'] = out[name]['seconds'] / out[base]['seconds']
  return out


def prefill_point(all_variants, batch: int, length: int, slots: int, repeats: int) -> dict:
  """float32 against int8 for one prefill of `length` tokens per sequence."""
  out, calls = {}, {}
  for name in ('float32', 'int8'):
    model, params, _ = all_variants[name]
    cache = kv_cache.init_cache(model, params, batch, slots)
    args = (params, cache, jnp.ones((batch, length), jnp.int32), jnp.full((batch,), length))
    compiled = jax.jit(lambda *a, m=model: kv_cache.prefill(m, *a)).lower(*args).compile()
    out[name] = _memory(compiled)
    calls[name] = (compiled, args)
  for name, seconds in _round_robin_medians(calls, repeats).items():
    out[name]['seconds'] = seconds
  out['int8']['memory_ratio'] = out['int8']['memory_bytes'] / out['float32']['memory_bytes']
  out['int8']['time_ratio'] = out['int8']['seconds'] / out['float32']['seconds']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--vocab', type=int, default=8192)
  parser.add_argument('--slots', type=int, default=128)
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 4, 8])
  parser.add_argument('--repeats', type=int, default=200)
  parser.add_argument('--prefill_length', type=int, default=64, help='batch 4; 0 skips it')
  parser.add_argument('--note', default='', help='recorded in the JSON (e.g. a shared machine)')
  args = parser.parse_args()
  cfg = model_config(args)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(DecoderOnly(cfg).init)(jax.random.key(0), tokens)['params'])
  all_variants = variants(cfg, params)
  results = {}
  for batch in args.batches:
    results[str(batch)] = point(cfg, all_variants, batch, args.slots, args.repeats)
    print(f'batch {batch}: ' + ', '.join(
        f"{n} time x{r['time_ratio']:.2f} memory x{r['memory_ratio']:.2f}"
        for n, r in results[str(batch)].items() if 'time_ratio' in r), flush=True)
  if args.prefill_length:
    results['prefill'] = prefill_point(all_variants, 4, args.prefill_length, args.slots,
                                       max(args.repeats // 10, 5))
    r = results['prefill']['int8']
    print(f"prefill: int8 time x{r['time_ratio']:.2f} memory x{r['memory_ratio']:.2f}")
  config = {k: getattr(args, k) for k in ('layers', 'd_model', 'vocab', 'slots', 'batches',
                                          'repeats', 'prefill_length', 'note')}
  config.update(heads=cfg.num_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
                mlp_activations=list(cfg.mlp_activations),
                tile_bytes=quantization.TILE_BYTES, min_block_cols=quantization.MIN_BLOCK_COLS,
                tile_cols=quantization.TILE_COLS)
  print(environment.write('int8_decode', config, results))


if __name__ == '__main__':
  main()
