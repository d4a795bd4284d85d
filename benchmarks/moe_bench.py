"""MoE layer vs a dense MLP with the same active parameters per token, forward + backward.

Top-1 routing: each token runs one expert of width F, so the dense baseline is one MLP of width
F. Reported per point: median step time of the MoE layer divided by the dense layer's (same
process, same tokens), and the compiled program's memory from XLA's memory analysis relative to
dense: in all (arguments + outputs + scratch, so including the E-fold expert weights and their
gradients) and scratch only (activations and dispatch buffers, where the dispatch paths differ).
Dropping dispatch is measured at each capacity factor; dropless has none.

  python -m benchmarks.moe_bench                       # the full grid
  python -m benchmarks.moe_bench --experts 8 --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import MoeLayer


def _step(layer, x, moe: bool):
  variables = layer.init({'params': jax.random.key(0)}, x, False)
  params = partitioning.unbox(variables['params'])

  def loss(p, x):
    kwargs = dict(mutable=['moe']) if moe else {}
    out = layer.apply({'params': p}, x, False, rngs={'jitter': jax.random.key(1)}, **kwargs)
    return jnp.sum(jnp.square((out[0] if moe else out).astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def measure(layer, x, moe: bool, repeats: int) -> dict:
  step, params = _step(layer, x, moe)
  compiled = step.lower(params, x).compile()
  stats = compiled.memory_analysis()
  memory = scratch = None
  if stats is not None:
    memory = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
              stats.temp_size_in_bytes)
    scratch = stats.temp_size_in_bytes
  jax.block_until_ready(compiled(params, x))  # warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - start)
  return {'seconds': statistics.median(times), 'memory_bytes': memory, 'scratch_bytes': scratch}


def _ratio(a, b):
  return round(a / b, 3) if a and b else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 32, 128])
  parser.add_argument('--tokens', type=int, nargs='+', default=[4096, 16384, 65536])
  parser.add_argument('--capacity_factors', type=float, nargs='+', default=[1.0, 1.25, 2.0])
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--mlp_dim', type=int, default=1024)
  parser.add_argument('--group_size', type=int, default=1024)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--grouped_matmul', default='auto')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  activations = ('gelu', 'linear')
  results = []
  for tokens in args.tokens:
    x = jax.random.normal(jax.random.key(2), (tokens // 512, 512, args.d_model), dtype)
    dense = measure(MlpBlock(args.mlp_dim, activations, dtype=dtype), x, False, args.repeats)
    print(f'tokens {tokens}: dense {dense["seconds"]:.3f}s', flush=True)
    points = [('dropless', None)] + [('dropping', cf) for cf in args.capacity_factors]
    for experts, (dispatch, factor) in itertools.product(args.experts, points):
      cfg = MoeConfig(experts, layout='all', dispatch=dispatch, num_selected_experts=1,
                      train_capacity_factor=factor or 1.0, max_group_size=args.group_size,
                      grouped_matmul=args.grouped_matmul)
      moe = measure(MoeLayer(cfg, args.mlp_dim, activations, dtype=dtype), x, True, args.repeats)
      row = {'tokens': tokens, 'experts': experts, 'dispatch': dispatch,
             'capacity_factor': factor, 'moe_seconds': round(moe['seconds'], 4),
             'dense_seconds': round(dense['seconds'], 4),
             'time_ratio': round(moe['seconds'] / dense['seconds'], 3),
             'moe_memory_bytes': moe['memory_bytes'], 'dense_memory_bytes': dense['memory_bytes'],
             'memory_ratio': _ratio(moe['memory_bytes'], dense['memory_bytes']),
             'moe_scratch_bytes': moe['scratch_bytes'],
             'dense_scratch_bytes': dense['scratch_bytes'],
             'scratch_ratio': _ratio(moe['scratch_bytes'], dense['scratch_bytes'])}
      print(row, flush=True)
      results.append(row)
  config = dict(vars(args), activations=activations, routing='tokens_choose top-1',
                dense_baseline='MlpBlock(mlp_dim): the same active parameters per token')
  path = environment.write('moe_layer', config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
