"""Compile time: unrolled layers vs nn.scan (--mode scan), and the persistent compilation
cache's cold vs warm start of `make train` (--mode cache).

scan: lower+compile seconds of a train step (forward + backward) and their ratio by depth,
measured in one process. The claim: with scan_layers, compile time stays flat as depth grows.

cache: `make train`'s job (runs/recall_tiny.gin) as subprocesses, each in a fresh MODEL_DIR,
stopped (SIGTERM: save and stop) once it logs its first step. Cold: an empty cache directory
(--compilation_cache_dir, efficientlm/compile_cache.py); warm: a second run on the same cache.
Reports seconds from launch to the first step's log line and the trainer's own "initializing"
and "compiling the train step" phases, cold and warm alternating, and the medians' ratio.

  python -m benchmarks.compile_bench [--depths 4 16 48 100] [--width 256]
  python -m benchmarks.compile_bench --mode cache [--pairs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.model import DecoderOnlyModel


def compile_seconds(cfg: TransformerConfig, batch) -> float:
  model = DecoderOnlyModel(DecoderOnly(cfg))
  abstract = jax.eval_shape(
      lambda b: partitioning.unbox(model.init(jax.random.key(0), b))['params'], batch)
  step = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b)[0]))
  start = time.perf_counter()
  step.lower(abstract, batch).compile()
  return time.perf_counter() - start


ROOT = pathlib.Path(__file__).parent.parent
PHASE = re.compile(r'^(initializing [\d.]+M parameters|compiling the train step): ([\d.]+) s$')


def first_step(cache_dir: pathlib.Path, model_dir: pathlib.Path) -> dict:
  """One `make train` run until its first step: seconds to it, and the trainer's phases."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  command = [sys.executable, '-u', '-m', 'efficientlm.main', '--gin_file=runs/recall_tiny.gin',
             f"--gin.MODEL_DIR='{model_dir}'", '--gin.LOG_EVERY=1',
             f'--compilation_cache_dir={cache_dir}']
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  row, lines = {}, []
  for line in proc.stdout:
    lines.append(line)
    match = PHASE.match(line.strip())
    if match:
      row['initialize_s' if match[1].startswith('init') else 'compile_train_step_s'] = float(
          match[2])
    if line.startswith('step 1:'):
      row['first_step_s'] = round(time.perf_counter() - start, 2)
      proc.send_signal(signal.SIGTERM)
      break
  proc.stdout.close()
  proc.wait(timeout=300)
  if 'first_step_s' not in row:
    raise RuntimeError('no first step logged:\n' + ''.join(lines[-20:]))
  return row


def cache_mode(pairs: int):
  """Cold and warm starts, alternating (each pair with a fresh cache), medians and ratio."""
  load = os.getloadavg()[0]
  runs = []
  with tempfile.TemporaryDirectory(prefix='compile_cache_bench_') as tmp:
    for i in range(pairs):
      cache = pathlib.Path(tmp) / f'cache_{i}'
      for state in ('cold', 'warm'):
        model_dir = pathlib.Path(tmp) / f'run_{i}_{state}'
        row = {'pair': i, 'cache': state, **first_step(cache, model_dir)}
        row['cache_files'] = sum(1 for _ in cache.iterdir())
        print(row, flush=True)
        runs.append(row)
  summary = {}
  for key in ('first_step_s', 'initialize_s', 'compile_train_step_s'):
    cold, warm = ([r[key] for r in runs if r['cache'] == state] for state in ('cold', 'warm'))
    summary[key] = {'cold_median': float(np.median(cold)), 'warm_median': float(np.median(warm)),
                    'cold_over_warm': round(float(np.median(cold) / np.median(warm)), 2)}
  print(summary, flush=True)
  config = {'job': 'python -m efficientlm.main --gin_file=runs/recall_tiny.gin (make train), '
                   'stopped at its first step', 'pairs': pairs,
            'load_average_at_start': round(load, 2),
            'note': ('2-core CPU shared with other jobs: absolute seconds are inflated and noisy; '
                     'the cold/warm ratio is the result. Both runs include the data pipeline '
                     '(TensorFlow start-up), which the cache does not touch.')}
  path = environment.write('compile_cache', config, {'runs': runs, 'summary': summary})
  print(f'wrote {path}')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', choices=('scan', 'cache'), default='scan')
  parser.add_argument('--depths', type=int, nargs='+', default=[4, 16, 48, 100])
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--pairs', type=int, default=2, help='cache mode: cold/warm pairs')
  args = parser.parse_args()
  if args.mode == 'cache':
    return cache_mode(args.pairs)
  base = TransformerConfig(vocab_size=1024, emb_dim=args.width, num_heads=4, num_kv_heads=1,
                           head_dim=args.width // 4, mlp_dim=4 * args.width,
                           num_encoder_layers=0, position_embedding='rotary',
                           scale_attention_logits=True, dtype='bfloat16', remat_policy='full')
  batch = {name: jax.ShapeDtypeStruct((8, 128), jnp.int32)
           for name in ('decoder_input_tokens', 'decoder_target_tokens')}
  results = []
  for depth in args.depths:
    row = {'layers': depth}
    for mode, scan in (('unrolled', False), ('scanned', True)):
      cfg = dataclasses.replace(base, num_decoder_layers=depth, scan_layers=scan)
      row[f'{mode}_compile_s'] = round(compile_seconds(cfg, batch), 3)
    row['unrolled_over_scanned'] = round(row['unrolled_compile_s'] / row['scanned_compile_s'], 2)
    print(row, flush=True)
    results.append(row)
  config = dataclasses.asdict(base) | {'batch': [8, 128], 'depths': args.depths}
  for varied in ('num_decoder_layers', 'scan_layers'):
    del config[varied]
  path = environment.write('compile_scan', config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
