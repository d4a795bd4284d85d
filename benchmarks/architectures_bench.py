"""Train-step time and memory of each architecture (benchmarks/architectures.py) against dense
XLA attention, over sequence length.

Per length and architecture: one full train step of the whole model (forward, backward, AdamW
update; `training.steps.make_train_step`, jitted with donation as the trainer does) on random
tokens, batch `--batch_size`, on one device. Measured:
- seconds: median of `--repeats` runs after a warm-up run, under `jax.block_until_ready`;
- memory_bytes: XLA's memory analysis of the compiled step, arguments + outputs - aliased
  (donated) + temporaries: parameters, optimizer state, batch and activations; temp_bytes: the
  temporaries alone (activations, attention scores), where token mixers differ;
- device_peak_bytes (GPU/TPU, `--device_peak`): the device's measured high-water mark
  (`memory_stats()['peak_bytes_in_use']`) after the point's steps, in its own process (below)
  so that the mark is that point's alone.
Ratios divide by the dense row at the same length, measured the same way (time) or by the same
analysis (memory). Rows have matched parameter counts (architectures.resolve); the
counts are in the JSON. A failing point (out of memory, unsupported option) records its error.

One process per point (the default; --in_process for one process): a point that runs out of
host memory is a process kill on CPU, recorded as that point's error instead of ending the run,
and each point's device peak is its own. A step whose compiled memory analysis exceeds
--max_memory_gib (default on CPU: 85% of the machine's RAM) is not run (its error says so, its
memory numbers are kept). Rows with a length condition (a block size or LSH chunk that must
divide the length, Perceiver AR's latents <= length) are skipped where it fails, with the
reason; bind long-length sizes for them, e.g.

  python -m benchmarks.architectures_bench --architectures block_window block_recurrent \
      perceiver_ar --lengths 1024 4096 16384 --gin_bindings 'BLOCK_SIZE = 512' \
      --gin_bindings 'NUM_LATENTS = 1024' --name architectures_long

  python -m benchmarks.architectures_bench                          # 512 .. 16k, every row
  python -m benchmarks.architectures_bench --lengths 1024 4096 --architectures dense mqa
  python -m benchmarks.architectures_bench --gin_bindings 'TransformerConfig.emb_dim = 512'
  python -m benchmarks.architectures_bench --quick                  # CPU smoke test (in process)

Writes benchmarks/results/architectures_<platform>.json and a log-log plot (time and memory vs
length, one line per architecture) beside it, .png. Times on CPU say little about accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import architectures, environment
from efficientlm import partitioning
from efficientlm.training import optimizers, trainer
from efficientlm.training.steps import make_train_step

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (32, 64)
# Small enough that the logits do not swamp the token mixers at short lengths.
BENCH_BINDINGS = ('VOCAB_SIZE = 512',)
QUICK_BINDINGS = ('TransformerConfig.num_decoder_layers = 1', 'TransformerConfig.mlp_dim = 128',
                  'TransformerConfig.emb_dim = 64', 'TransformerConfig.head_dim = 16')
_POINT_PREFIX = 'ARCHITECTURES_BENCH_POINT '


# --- one train step -------------------------------------------------------------------------

def single_device_partitioner() -> partitioning.Partitioner:
  return partitioning.Partitioner((1,), ('data',), 'data_parallel', devices=jax.devices()[:1])


def compile_train_step(model, optimizer: optimizers.Optimizer, batch_size: int, length: int,
                       partitioner: partitioning.Partitioner):
  """(compiled step(state, batch) -> (state, metrics), abstract state, params init fn), as the
  trainer builds them for a decoder-only batch [batch_size, length]."""
  spec = {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
          for k in ('decoder_input_tokens', 'decoder_target_tokens')}
  abstract, shardings, init_params = trainer.abstract_state(model, optimizer, partitioner, spec)
  batch_shardings = {k: partitioner.batch_sharding(2) for k in spec}
  with partitioner.context():
    step = jax.jit(make_train_step(model, optimizer), in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(abstract, {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in spec.items()}).compile()
  return compiled, abstract, init_params


def memory(compiled) -> dict:
  """XLA's memory analysis of a compiled step (None where the backend gives none)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats is None:
    return {'memory_bytes': None, 'temp_bytes': None, 'argument_bytes': None}
  return {'memory_bytes': int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                              - stats.alias_size_in_bytes + stats.temp_size_in_bytes),
          'temp_bytes': int(stats.temp_size_in_bytes),
          'argument_bytes': int(stats.argument_size_in_bytes)}


def device_peak_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get('peak_bytes_in_use')


def length_problem(model, length: int) -> str | None:
  """Why `model` cannot take rows of `length` tokens (a block, chunk or latent count that does
  not fit), or None. The models raise these too, but only after tracing; this names the binding."""
  cfg = model.module.config
  mixers = set(cfg.token_mixers or ())
  sizes = []
  if mixers & {'block_window', 'block_recurrent'} and cfg.block_recurrent is not None:
    sizes.append(('BLOCK_SIZE', cfg.block_recurrent.block_size))
  if 'lsh' in mixers and cfg.lsh is not None:
    sizes.append(('LSH_CHUNK', cfg.lsh.chunk_length))
  for name, size in sizes:
    if length % size:
      return f'{name} = {size} does not divide the length {length}'
  perceiver = getattr(model.module, 'perceiver', None)
  if perceiver is not None and perceiver.num_latents > length:
    return f'NUM_LATENTS = {perceiver.num_latents} > the length {length}'
  return None


class MemoryLimit(RuntimeError):
  """The compiled step would need more memory than the limit: not run."""


def measure(model, batch_size: int, length: int, repeats: int,
            max_memory_bytes: int | None = None) -> dict:
  """Time and memory of one train step of `model` (fresh parameters, random tokens)."""
  partitioner = single_device_partitioner()
  optimizer = optimizers.adamw(optimizers.constant_schedule(1e-3))
  compiled, abstract, init_params = compile_train_step(model, optimizer, batch_size, length,
                                                       partitioner)
  analysis = memory(compiled)
  if max_memory_bytes and (analysis['memory_bytes'] or 0) > max_memory_bytes:
    raise MemoryLimit(f'not run: the step needs {analysis["memory_bytes"] / 2**30:.1f} GiB > '
                      f'--max_memory_gib {max_memory_bytes / 2**30:.1f}', analysis)
  params, _, _ = partitioner.sharded_init(init_params, jax.random.key(0))
  with partitioner.context():
    opt_state = jax.jit(optimizer.tx.init, out_shardings=jax.tree.map(
        lambda x: x.sharding, abstract.opt_state))(params)
  state = type(abstract)(step=jax.device_put(jnp.zeros((), jnp.int32), abstract.step.sharding),
                         params=params, opt_state=opt_state)
  vocab = model.module.config.vocab_size
  tokens = np.random.default_rng(0).integers(2, vocab, (batch_size, length + 1), np.int32)
  batch = partitioner.shard_batch({'decoder_input_tokens': tokens[:, :-1],
                                   'decoder_target_tokens': tokens[:, 1:]})
  state, _ = compiled(state, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return {'seconds': statistics.median(times), **analysis}


# --- ratios -----------------------------------------------------------------------------------

def _ratio(a, b):
  return round(a / b, 4) if a is not None and b else None


def add_ratios(points: Sequence[dict], baseline: str) -> list[dict]:
  """Each point with `<quantity>_ratio` = its value / the baseline row's at the same length."""
  base = {p['length']: p for p in points if p['architecture'] == baseline}
  out = []
  for p in points:
    ref = base.get(p['length'], {})
    out.append(dict(p, **{f'{q}_ratio': _ratio(p.get(q), ref.get(q)) for q in
                          ('seconds', 'memory_bytes', 'temp_bytes', 'device_peak_bytes')}))
  return out


# --- the run ----------------------------------------------------------------------------------

def _error(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:400] if lines else ""}'


def measure_point(row: architectures.Resolved, length: int, batch_size: int, repeats: int,
                  max_memory_bytes: int | None = None, device_peak: bool = False) -> dict:
  """One point's numbers, or its error (in this process)."""
  point = {}
  try:
    model = architectures.build_model(row.gin_files, row.bindings)
    problem = length_problem(model, length)
    if problem:
      return {'error': f'skipped: {problem}'}
    point.update(measure(model, batch_size, length, repeats, max_memory_bytes))
  except MemoryLimit as e:
    point.update(e.args[1], error=e.args[0])
  except Exception as e:  # pylint: disable=broad-except
    point['error'] = _error(e)
  if device_peak and 'error' not in point:
    point['device_peak_bytes'] = device_peak_bytes()
  return point


def _point_in_subprocess(argv: Sequence[str], name: str, length: int) -> dict:
  """One point measured in a fresh process (`argv` re-creates the run's settings): its own
  device high-water mark, and an out-of-memory kill costs only this point."""
  command = [sys.executable, '-m', 'benchmarks.architectures_bench', *argv,
             '--point', f'{name}:{length}']
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parent.parent),
       *filter(None, [os.environ.get('PYTHONPATH')])]))
  done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  for line in done.stdout.splitlines():
    if line.startswith(_POINT_PREFIX):
      return json.loads(line[len(_POINT_PREFIX):])
  if done.returncode < 0:
    signame = signal.Signals(-done.returncode).name
    why = ' (out of memory?)' if done.returncode == -signal.SIGKILL else ''
    return {'error': f'process killed by {signame}{why}'}
  tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
  return {'error': f'process exited {done.returncode}: {tail[:400]}'}


def run(archs: Sequence[architectures.Architecture], lengths: Sequence[int], batch_size: int,
        repeats: int, base: str, bindings: Sequence[str], device_peak: bool = False,
        argv: Sequence[str] = (), in_process: bool = True,
        max_memory_bytes: int | None = None) -> tuple[list[dict], list[architectures.Resolved]]:
  """(points with ratios, resolved rows). Without `in_process`, each point runs in a subprocess
  started with `argv` (this run's command-line flags)."""
  rows = architectures.resolve(archs, base, bindings)
  points = []
  for length in lengths:
    for row in rows:
      point = {'architecture': row.arch.name, 'length': length, 'batch_size': batch_size,
               'num_params': row.num_params}
      if in_process:
        point.update(measure_point(row, length, batch_size, repeats, max_memory_bytes,
                                   device_peak))
      else:
        point.update(_point_in_subprocess(argv, row.arch.name, length))
      print(json.dumps(point), flush=True)
      points.append(point)
  return add_ratios(points, rows[0].arch.name), rows


def plot(points: Sequence[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  quantities = [('seconds', 'train step (s)'), ('memory_bytes', 'compiled step memory (bytes)')]
  if any(p.get('device_peak_bytes') for p in points):
    quantities.append(('device_peak_bytes', 'measured device peak (bytes)'))
  fig, axes = plt.subplots(1, len(quantities), figsize=(5 * len(quantities), 4))
  for ax, (key, label) in zip(np.atleast_1d(axes), quantities):
    for name in dict.fromkeys(p['architecture'] for p in points):
      xy = [(p['length'], p[key]) for p in points if p['architecture'] == name and p.get(key)]
      if xy:
        ax.plot(*zip(*xy), marker='o', label=name)
    ax.set(xscale='log', yscale='log', xlabel='sequence length', ylabel=label)
    lengths = sorted({p['length'] for p in points})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--architectures', nargs='+', default=None,
                      help='rows of benchmarks/architectures.py (default: all; dense always)')
  parser.add_argument('--lengths', type=int, nargs='+', default=None)
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--base', default=architectures.DEFAULT_BASE, help='base model gin')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='applied to every row, e.g. "TransformerConfig.emb_dim = 512"')
  parser.add_argument('--dtype', default=None,
                      help='ACTIVATION_DTYPE (default: float32 on CPU, bfloat16 elsewhere)')
  parser.add_argument('--device_peak', choices=('auto', 'on', 'off'), default='auto',
                      help='measure device peak bytes per point in subprocesses (auto: not CPU)')
  parser.add_argument('--quick', action='store_true',
                      help=f'CPU smoke test: lengths {QUICK_LENGTHS}, a 1-layer d=64 model')
  parser.add_argument('--name', default='architectures', help='results/<name>_<platform>.json')
  parser.add_argument('--in_process', action='store_true',
                      help='every point in this process (default: one process per point)')
  parser.add_argument('--max_memory_gib', type=float, default=None,
                      help='do not run steps whose compiled memory exceeds this (default on CPU: '
                      '85%% of RAM; elsewhere none)')
  parser.add_argument('--point', default=None, help=argparse.SUPPRESS)  # NAME:LENGTH (internal)
  return parser


def main(argv: Sequence[str] | None = None) -> pathlib.Path | None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  platform = jax.devices()[0].platform
  dtype = args.dtype or ('float32' if platform == 'cpu' else 'bfloat16')
  bindings = [*BENCH_BINDINGS, *(QUICK_BINDINGS if args.quick else ()), f"ACTIVATION_DTYPE = "
              f"'{dtype}'", *args.gin_bindings]
  lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
  repeats = 2 if args.quick else args.repeats
  device_peak = args.device_peak == 'on' or (args.device_peak == 'auto' and platform != 'cpu')
  max_memory_gib = args.max_memory_gib
  if max_memory_gib is None and platform == 'cpu':
    max_memory_gib = 0.85 * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  max_memory_bytes = int(max_memory_gib * 2**30) if max_memory_gib else None
  if args.point:  # one point, in its own process
    name, length = args.point.split(':')
    (row,) = [r for r in architectures.resolve(architectures.select([name]), args.base, bindings)
              if r.arch.name == name]
    point = measure_point(row, int(length), args.batch_size, repeats, max_memory_bytes,
                          device_peak)
    print(_POINT_PREFIX + json.dumps(point), flush=True)
    return None
  in_process = args.in_process or args.quick
  points, rows = run(architectures.select(args.architectures), lengths, args.batch_size,
                     repeats, args.base, bindings, device_peak, argv, in_process,
                     max_memory_bytes)
  config = {'base': args.base, 'bindings': bindings, 'lengths': list(lengths),
            'batch_size': args.batch_size, 'repeats': repeats, 'activation_dtype': dtype,
            'device_peak': device_peak, 'one_process_per_point': not in_process,
            'max_memory_gib': max_memory_gib,
            'step': 'forward + backward + AdamW update, one device',
            'baseline': rows[0].arch.name,
            'architectures': [{'name': r.arch.name, 'note': r.arch.note,
                               'gin_files': list(r.gin_files), 'bindings': list(r.bindings),
                               'num_params': r.num_params,
                               'param_ratio': round(r.param_ratio, 5)} for r in rows]}
  path = environment.write(args.name, config, points)
  plot(points, path.with_suffix('.png'),
       f'{args.name}: train step on {environment.machine_info()["device_kind"]}, batch '
       f'{args.batch_size}, {dtype}')
  print(f'wrote {path} and {path.with_suffix(".png")}')
  return path


if __name__ == '__main__':
  main()
