"""MoE layer vs a dense MLP with the same active parameters per token, forward + backward.

Top-1 routing: each token runs one expert of width F, so the dense baseline is one MLP of width
F (`MlpBlock`, whose DenseGeneral flattens leading dims into one 2D matmul, same dtype). Reported
per point: step time of the MoE layer divided by the dense layer's, the two measured in turns
(dense, MoE, dense, MoE, ...) in one process so that load from other processes hits both; the
median of wall times, their minimum (the least disturbed repeat) and the median of process CPU
time (all threads), which a shared machine disturbs least. Also the compiled program's memory
from XLA's memory analysis relative to dense: in all (arguments + outputs + scratch, so
including the E-fold expert weights and their gradients) and scratch only (activations and
dispatch buffers, where the dispatch paths differ). Dropping dispatch is measured at each
capacity factor; dropless has none.

`balanced` is a lower bound for any dispatch: E experts each given exactly tokens / E rows,
already in place, as batched matmuls (no router, no sort, no padding). What it costs over dense
is the E-fold expert weights: reading them and writing their gradients.

  python -m benchmarks.moe_bench                       # the full grid
  python -m benchmarks.moe_bench --experts 8 --tokens 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.layers.mlp import MlpBlock, get_activation
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import EXPERT_INIT, MoeLayer


class BalancedExperts(nn.Module):
  """E gated MLPs, expert e applied to tokens [e T / E, (e + 1) T / E): the ideal dispatch."""

  num_experts: int
  intermediate_dim: int
  activations: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    del deterministic
    shape, e = x.shape, self.num_experts
    x = x.reshape(e, -1, shape[-1])
    hidden = None
    for i, act in enumerate(self.activations):
      w = self.param(f'wi_{i}', EXPERT_INIT, (e, shape[-1], self.intermediate_dim))
      h = get_activation(act)(jnp.einsum('etd,edf->etf', x, w.astype(self.dtype)))
      hidden = h if hidden is None else hidden * h
    wo = self.param('wo', EXPERT_INIT, (e, self.intermediate_dim, shape[-1]))
    return jnp.einsum('etf,efd->etd', hidden, wo.astype(self.dtype)).reshape(shape)


def _compile(layer, x, moe: bool):
  variables = layer.init({'params': jax.random.key(0)}, x, False)
  params = partitioning.unbox(variables['params'])

  def loss(p, x):
    kwargs = dict(mutable=['moe']) if moe else {}
    out = layer.apply({'params': p}, x, False, rngs={'jitter': jax.random.key(1)}, **kwargs)
    return jnp.sum(jnp.square((out[0] if moe else out).astype(jnp.float32)))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  stats = compiled.memory_analysis()
  memory = scratch = None
  if stats is not None:
    memory = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
              stats.temp_size_in_bytes)
    scratch = stats.temp_size_in_bytes
  def run():
    jax.block_until_ready(compiled(params, x))

  run()  # warm up
  return run, memory, scratch


def _time(run):
  wall, cpu = time.perf_counter(), time.process_time()
  run()
  return time.perf_counter() - wall, time.process_time() - cpu


def measure_pair(dense_run, moe_run, repeats: int) -> dict:
  """Wall and CPU seconds of each, measured in turns."""
  dense, moe = [], []
  for _ in range(repeats):
    dense.append(_time(dense_run))
    moe.append(_time(moe_run))
  def median(v, i):
    return statistics.median(t[i] for t in v)

  return {'moe_seconds': median(moe, 0), 'dense_seconds': median(dense, 0),
          'time_ratio': median(moe, 0) / median(dense, 0),
          'time_ratio_min': min(t[0] for t in moe) / min(t[0] for t in dense),
          'cpu_time_ratio': median(moe, 1) / median(dense, 1)}


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
  parser.add_argument('--no_balanced', action='store_true', help='skip the balanced bound')
  parser.add_argument('--name', default='moe_layer', help='results/<name>_<platform>.json')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  activations = ('gelu', 'linear')
  load = [os.getloadavg()[0]]
  results = []
  for tokens in args.tokens:
    x = jax.random.normal(jax.random.key(2), (tokens // 512, 512, args.d_model), dtype)
    dense_run, dense_memory, dense_scratch = _compile(
        MlpBlock(args.mlp_dim, activations, dtype=dtype), x, False)
    points = [('dropless', None)] + [('dropping', cf) for cf in args.capacity_factors]
    if not args.no_balanced:
      points.append(('balanced', None))
    for experts, (dispatch, factor) in itertools.product(args.experts, points):
      if dispatch == 'balanced':
        layer, moe = BalancedExperts(experts, args.mlp_dim, activations, dtype), False
      else:
        cfg = MoeConfig(experts, layout='all', dispatch=dispatch, num_selected_experts=1,
                        train_capacity_factor=factor or 1.0, max_group_size=args.group_size,
                        grouped_matmul=args.grouped_matmul)
        layer, moe = MoeLayer(cfg, args.mlp_dim, activations, dtype=dtype), True
      moe_run, memory, scratch = _compile(layer, x, moe)
      times = measure_pair(dense_run, moe_run, args.repeats)
      del moe_run
      row = {'tokens': tokens, 'experts': experts, 'dispatch': dispatch,
             'capacity_factor': factor,
             **{k: round(v, 4 if k.endswith('seconds') else 3) for k, v in times.items()},
             'moe_memory_bytes': memory, 'dense_memory_bytes': dense_memory,
             'memory_ratio': _ratio(memory, dense_memory),
             'moe_scratch_bytes': scratch, 'dense_scratch_bytes': dense_scratch,
             'scratch_ratio': _ratio(scratch, dense_scratch),
             'load_average_1min': round(os.getloadavg()[0], 2)}
      print(row, flush=True)
      results.append(row)
      load.append(os.getloadavg()[0])
  config = dict(vars(args), activations=activations, routing='tokens_choose top-1',
                dense_baseline='MlpBlock(mlp_dim): the same active parameters per token',
                timing='dense and MoE in turns; time_ratio = median wall, time_ratio_min = '
                       'min wall, cpu_time_ratio = median process CPU time',
                load_average_1min={'min': round(min(load), 2), 'max': round(max(load), 2)},
                malloc_env={k: v for k, v in os.environ.items() if k.startswith('MALLOC_')})
  path = environment.write(args.name, config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
