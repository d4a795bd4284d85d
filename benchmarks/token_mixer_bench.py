"""Time and memory of one token-mixer layer against dense attention over sequence length, and
the per-token decode time against the context length.

Whole-model steps (benchmarks/architectures_bench.py) at small widths are dominated by the
position-wise layers, whose cost is linear in the length for every architecture; the mixer alone
shows how each mixer's own cost grows. Per mixer and length: forward + backward of the layer
(`models.transformer.token_mixer`, as the models build it; gradients of the summed outputs with
respect to parameters and inputs), jitted, batch `--batch_size`, on one device:
- seconds: median of `--repeats` runs after a warm-up run;
- temp_bytes: XLA's memory analysis of the compiled program (temporaries: activations, kernels,
  attention scores);
- exponent: the least-squares slope of log(seconds) over log(length) from `--fit_from` on
  (FFT mixers: ~1 plus the log factor; dense attention: -> 2 once the L^2 terms dominate).
Decoding: one jitted `decode='step'` call at context 512 and 8192 (attention: a KV cache of that
many slots, causal mask; H3/GSS/S4D: the recurrent state, whose size does not depend on the
context); reported as the ratio 8192 / 512.

  python -m benchmarks.token_mixer_bench --max_attention_length 8192   # 1k .. 16k, every mixer
  python -m benchmarks.token_mixer_bench --lengths 256 512 --repeats 2 --quick

Writes benchmarks/results/token_mixers_<platform>.json (--name to change the prefix). A point that fails (out of memory)
records its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.layers.fourier_mixing import FourierConfig
from efficientlm.layers.gss import GssConfig
from efficientlm.layers.h3 import H3Config
from efficientlm.layers.ssm import SsmConfig
from efficientlm.models.config import TransformerConfig
from efficientlm.models.transformer import token_mixer

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
DECODE_CONTEXTS = (512, 8192)
_SSM = SsmConfig(state_size=64)

# name: (token mixer, TransformerConfig overrides (a function of the length), causal)
MIXERS = {
    'attention': ('attention', lambda n: {}, True),
    'h3': ('h3', lambda n: dict(h3=H3Config(_SSM, shift_size=4)), True),
    'h3_blocked': ('h3', lambda n: dict(h3=H3Config(
        dataclasses.replace(_SSM, convolution='blocked', block_size=512), shift_size=4)), True),
    'gss': ('gss', lambda n: dict(gss=GssConfig(_SSM)), True),
    's4d': ('s4d', lambda n: dict(s4d=_SSM), True),
    'fnet': ('fnet', lambda n: dict(fourier=FourierConfig('fnet')), False),
    'fnet_seq': ('fnet', lambda n: dict(fourier=FourierConfig('fnet_seq')), False),
    'low_pass': ('fnet', lambda n: dict(fourier=FourierConfig('low_pass', keep_frequencies=64)),
                 False),
    'global_filter': ('fnet', lambda n: dict(fourier=FourierConfig('global_filter',
                                                                   max_length=n)), False),
}
RECURRENT = ('h3', 'gss', 's4d')


def config(name: str, length: int, emb_dim: int) -> TransformerConfig:
  mixer, overrides, _ = MIXERS[name]
  # The mixer is built from the config directly; the stack layout only has to be valid.
  stacks = (dict(num_encoder_layers=1, encoder_token_mixers=(mixer,)) if mixer == 'fnet' else
            dict(num_encoder_layers=0, token_mixers=(mixer,)))
  return TransformerConfig(emb_dim=emb_dim, num_heads=4, head_dim=emb_dim // 4, dtype='float32',
                           position_embedding='rotary', num_kv_heads=None,
                           **stacks, **overrides(length))


def _inputs(batch, length, emb_dim, causal):
  x = jax.random.normal(jax.random.key(0), (batch, length, emb_dim))
  positions = jnp.arange(length)[None]
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if causal else None
  return x, mask, positions


def _timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def train_point(name: str, length: int, batch: int, emb_dim: int, repeats: int) -> dict:
  """Forward + backward of one mixer layer at `length`."""
  mixer, _, causal = MIXERS[name]
  module = token_mixer(config(name, length, emb_dim), mixer, 'mixer', causal)
  x, mask, positions = _inputs(batch, length, emb_dim, causal)
  params = partitioning.unbox(module.init(jax.random.key(1), x, x, mask, None, positions,
                                          positions))

  def loss(p, x):
    return jnp.sum(module.apply(p, x, x, mask, None, positions, positions))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  analysis = compiled.memory_analysis()
  return dict(mixer=name, length=length, seconds=_timed(compiled, (params, x), repeats),
              temp_bytes=getattr(analysis, 'temp_size_in_bytes', None))


def decode_point(name: str, context: int, batch: int, emb_dim: int, repeats: int) -> dict:
  """One decode='step' call after `context` tokens (attention: a cache of that many slots)."""
  mixer, _, _ = MIXERS[name]
  cfg = config(name, context, emb_dim)
  x, _, positions = _inputs(batch, context if mixer == 'attention' else 1, emb_dim, False)
  init = token_mixer(cfg, mixer, 'mixer', True, decode='init')
  variables = partitioning.unbox(init.init(jax.random.key(1), x, x, None, None, positions,
                                           positions))
  stepper = token_mixer(cfg, mixer, 'mixer', True, decode='step')
  token = x[:, :1]
  position = jnp.full((batch, 1), context - 1, jnp.int32)
  mask = (jnp.arange(context)[None, None, None, :] <= position[:, None, :, None])

  @jax.jit
  def step(variables, token):
    return stepper.apply(variables, token, token, mask, None, position, position,
                         mutable=['cache'])

  return dict(mixer=name, context=context, seconds=_timed(step, (variables, token), repeats))


def exponent(points: Sequence[dict], fit_from: int) -> float | None:
  """Least-squares slope of log(seconds) against log(length), lengths >= fit_from."""
  fit = [(math.log(p['length']), math.log(p['seconds'])) for p in points
         if p.get('seconds') and p['length'] >= fit_from]
  if len(fit) < 2:
    return None
  return float(np.polyfit(*zip(*fit), 1)[0])


def _guarded(fn, *args) -> dict:
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except  (out of memory: record, go on)
    return {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'}


def run(names: Sequence[str], lengths: Sequence[int], batch: int, emb_dim: int, repeats: int,
        fit_from: int, contexts: Sequence[int] = DECODE_CONTEXTS,
        max_attention_length: int | None = None, log=print) -> dict:
  train, decode, summary = [], [], {}
  for name in names:
    points = []
    for length in lengths:
      if name == 'attention' and max_attention_length and length > max_attention_length:
        # Out of memory is a kill, not an exception, on CPU: skip what cannot fit.
        points.append({'mixer': name, 'length': length, 'error': 'skipped: longer than '
                       f'--max_attention_length {max_attention_length}'})
        continue
      point = {'mixer': name, 'length': length,
               **_guarded(train_point, name, length, batch, emb_dim, repeats)}
      log(f'{name} L={length}: ' + (f"{point['seconds']:.4f} s" if 'seconds' in point else
                                    point['error']))
      points.append(point)
    train += points
    summary[name] = {'exponent': exponent(points, fit_from)}
    if name in RECURRENT or name == 'attention':
      steps = [{'mixer': name, 'context': c,
                **_guarded(decode_point, name, c, batch, emb_dim, repeats)}
               for c in contexts]
      decode += steps
      if all('seconds' in s for s in steps):
        summary[name]['decode_ratio'] = steps[-1]['seconds'] / steps[0]['seconds']
      log(f'{name} decode: {steps}')
  base = {p['length']: p.get('seconds') for p in train if p['mixer'] == 'attention'}
  for p in train:
    if base.get(p['length']) and p.get('seconds'):
      p['time_ratio'] = p['seconds'] / base[p['length']]
  return dict(train=train, decode=decode, summary=summary)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mixers', nargs='+', default=list(MIXERS), choices=list(MIXERS))
  parser.add_argument('--lengths', nargs='+', type=int, default=list(DEFAULT_LENGTHS))
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--emb_dim', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--fit_from', type=int, default=1024)
  parser.add_argument('--max_attention_length', type=int, default=None,
                      help='skip dense attention above this length (its [L, L] scores and their '
                      'gradient: 16k tokens need more than 24 GiB)')
  parser.add_argument('--name', default='token_mixers',
                      help='results file: benchmarks/results/<name>_<platform>.json')
  args = parser.parse_args(argv)
  result = run(args.mixers, args.lengths, args.batch_size, args.emb_dim, args.repeats,
               args.fit_from, max_attention_length=args.max_attention_length)
  path = environment.write(args.name, {k: v for k, v in vars(args).items() if k != 'name'},
                           result)
  print(json.dumps(result['summary'], indent=1))
  print(f'wrote {path}')
  return path


if __name__ == '__main__':
  main()
