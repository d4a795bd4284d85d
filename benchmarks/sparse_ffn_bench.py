"""Decode cost of the Scaling Transformer's sparse FFN (layers/sparse_ffn.py) vs the dense FFN of
equal parameters (same d_model, mlp_dim, activations): per-token FLOPs and time per call.

For each block size N the sparse layer runs its decode gather path (controller, then the
mlp_dim / N selected units) on a decoding-shaped input [batch, 1, d_model]; the dense MlpBlock runs
on the same input with the same wi/wo. Reported per N:
- flops_dense, flops_sparse: per-token multiply-adds (closed forms, sparse_ffn.dense_flops and
  sparse_decode_flops: (n_wi + 1) d mlp vs r (d + mlp) + (n_wi + 1) d mlp / N);
- flops_ratio = flops_dense / flops_sparse;
- seconds_dense, seconds_sparse: median of `--repeats` jitted calls after a warm-up; the dense
  layer is re-timed beside each N, and speedup = seconds_dense / seconds_sparse (ratios within one
  process; absolute CPU times only describe this machine).

  python -m benchmarks.sparse_ffn_bench --d_model 1024 --mlp_dim 4096
writes benchmarks/results/sparse_ffn_decode_<platform>.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import pathlib
import statistics
import time

import jax

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.layers import sparse_ffn
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.sparse_ffn import SparseFfnConfig, SparseMlpBlock

DEFAULT_BLOCK_SIZES = (4, 8, 16, 32, 64)


def _timed(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def point(block_size: int, d_model: int, mlp_dim: int, batch: int, rank: int,
          activations: tuple[str, ...], repeats: int) -> dict:
  """One N: the sparse gather path against the dense layer with the same wi/wo."""
  config = SparseFfnConfig(block_size=block_size, controller_rank=rank)
  x = jax.random.normal(jax.random.key(0), (batch, 1, d_model))
  sparse = SparseMlpBlock(mlp_dim, config, activations, decode=True)
  params = partitioning.unbox(jax.jit(sparse.init)(jax.random.key(1), x)['params'])
  dense_params = {k: v for k, v in params.items() if not k.startswith('controller')}
  dense = MlpBlock(mlp_dim, activations)
  run_sparse = jax.jit(lambda p, x: sparse.apply({'params': p}, x))
  run_dense = jax.jit(lambda p, x: dense.apply({'params': p}, x))
  seconds_dense = _timed(run_dense, (dense_params, x), repeats)
  seconds_sparse = _timed(run_sparse, (params, x), repeats)
  n_wi = len(activations)
  flops_dense = sparse_ffn.dense_flops(d_model, mlp_dim, n_wi)
  flops_sparse = sparse_ffn.sparse_decode_flops(d_model, mlp_dim, n_wi, config)
  return {'block_size': block_size, 'flops_dense': flops_dense, 'flops_sparse': flops_sparse,
          'flops_ratio': flops_dense / flops_sparse, 'seconds_dense': seconds_dense,
          'seconds_sparse': seconds_sparse, 'speedup': seconds_dense / seconds_sparse,
          'num_params_dense': (n_wi + 1) * d_model * mlp_dim,
          'num_params_sparse': sparse.num_params(d_model)}


def run(block_sizes: Sequence[int], d_model: int, mlp_dim: int, batch: int, rank: int,
        activations: Sequence[str], repeats: int) -> dict:
  points = [point(n, d_model, mlp_dim, batch, rank, tuple(activations), repeats)
            for n in block_sizes]
  summary = {f'N={p["block_size"]}': {'speedup': round(p['speedup'], 2),
                                      'flops_ratio': round(p['flops_ratio'], 2)}
             for p in points}
  return {'points': points, 'summary': summary}


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--block_sizes', nargs='+', type=int, default=list(DEFAULT_BLOCK_SIZES))
  parser.add_argument('--d_model', type=int, default=1024)
  parser.add_argument('--mlp_dim', type=int, default=4096)
  parser.add_argument('--batch_size', type=int, default=1, help='tokens decoded per call')
  parser.add_argument('--controller_rank', type=int, default=64)
  parser.add_argument('--activations', nargs='+', default=['gelu'])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--name', default='sparse_ffn_decode',
                      help='results file: benchmarks/results/<name>_<platform>.json')
  args = parser.parse_args(argv)
  result = run(args.block_sizes, args.d_model, args.mlp_dim, args.batch_size,
               args.controller_rank, args.activations, args.repeats)
  path = environment.write(args.name, {k: v for k, v in vars(args).items() if k != 'name'},
                           result)
  print(json.dumps(result['summary'], indent=1))
  print(f'wrote {path}')
  return path


if __name__ == '__main__':
  main()
