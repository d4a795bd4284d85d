"""The one gin-driven entry point (T5X-compatible flags).

  python -m efficientlm.main --gin_file=models/t5_1_1/base.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR="'/tmp/t5_base'" [--gin_bindings="TRAIN_STEPS = 1000"] [--run_mode=train]

Gin files are searched in configs/ and in --gin_search_paths. `--gin.NAME=VALUE` is shorthand for
`--gin_bindings="NAME = VALUE"`. The run mode picks the function the run gin configures:
train -> efficientlm.training.trainer.train, eval -> efficientlm.training.evaluation.evaluate,
upcycle -> efficientlm.checkpoints.upcycle.upcycle (a dense checkpoint -> MODEL_DIR's first MoE
checkpoint; then --run_mode=train continues it), infer -> efficientlm.inference.infer.infer
(prompts in, MODEL_DIR/predictions.jsonl out), sweep -> efficientlm.inference.sweep.sweep
(inference layout sweeps: MODEL_DIR/sweep.csv, sweep.json, best_layouts.csv, plots/),
prune -> efficientlm.compression.prune.prune (one-shot SparseGPT or magnitude pruning of a
checkpoint into MODEL_DIR's first checkpoint, plus MODEL_DIR/prune_report.json).
Multi-host: --distributed on every host of a TPU slice (see efficientlm.distributed), or an
explicit --coordinator_address/--num_processes/--process_id; each process reads its own data
shard, process 0 writes logs and metrics, all processes write their checkpoint shards.
The parsed config is written to MODEL_DIR/config.gin and, once the run has built everything,
the operative config (the values actually used) to MODEL_DIR/operative_config.gin (in training,
only once the run's checkpoints have been accepted: a run stopped because MODEL_DIR belongs to
another configuration writes nothing there). The other run modes write <run_mode>_config.gin and
<run_mode>_operative_config.gin, so that evaluating a training run in its own MODEL_DIR keeps the
training's configs.
The run modes that write checkpoints or resumable output (train, upcycle, infer, prune) hold
MODEL_DIR's run lock (efficientlm.training.run_lock): a second run on the same MODEL_DIR stops at
once.
An error a user can act on (efficientlm.errors.RunError) ends the run with its message alone and
exit status 1.
Compiled programs are kept in a persistent cache (efficientlm.compile_cache: ~/.cache/efficientlm/
jax, or $JAX_COMPILATION_CACHE_DIR), so a rerun or resumed run skips recompiling; set the
directory with --compilation_cache_dir=DIR, or turn it off with --compilation_cache_dir=''.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pathlib
import sys

import gin
import jax

from efficientlm import compile_cache, distributed, gin_config, storage
from efficientlm.errors import RunError
from efficientlm.training import preemption, run_lock

RUN_MODES = {
    'train': 'efficientlm.training.trainer:train',
    'eval': 'efficientlm.training.evaluation:evaluate',
    'upcycle': 'efficientlm.checkpoints.upcycle:upcycle',
    'infer': 'efficientlm.inference.infer:infer',
    'sweep': 'efficientlm.inference.sweep:sweep',
    'prune': 'efficientlm.compression.prune:prune',
}
LOCKED_RUN_MODES = ('train', 'upcycle', 'infer', 'prune')
# The trainer writes config.gin and operative_config.gin itself, once it has accepted MODEL_DIR.
WRITES_OWN_CONFIG = ('train',)


def parse_flags(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m efficientlm.main',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file, searched in configs/ and --gin_search_paths (repeatable)')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='a gin binding such as "TRAIN_STEPS = 100" (repeatable)')
  parser.add_argument('--gin_search_paths', action='append', default=[],
                      help='comma-separated directories to search for gin files (repeatable)')
  parser.add_argument('--run_mode', choices=sorted(RUN_MODES), default='train')
  cluster = parser.add_argument_group('multi-process (efficientlm.distributed)')
  cluster.add_argument('--distributed', action='store_true',
                       help='jax.distributed.initialize() with auto-detection (multi-host TPU)')
  cluster.add_argument('--coordinator_address', default=None, help='host:port of process 0')
  cluster.add_argument('--num_processes', type=int, default=None)
  cluster.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--take_over_lock', action='store_true',
                      help="take over MODEL_DIR's run lock even if its holder looks alive (use "
                      'only when you know that process is gone)')
  parser.add_argument('--compilation_cache_dir', default=None,
                      help="persistent compilation cache directory ('' turns it off; default: "
                      '$JAX_COMPILATION_CACHE_DIR, else ~/.cache/efficientlm/jax)')
  args, rest = parser.parse_known_args(argv)
  for flag in rest:
    if not flag.startswith('--gin.') or '=' not in flag:
      parser.error(f'unrecognized argument {flag!r}')
    name, value = flag[len('--gin.'):].split('=', 1)
    args.gin_bindings.append(f'{name} = {value}')
  args.gin_search_paths = [p for group in args.gin_search_paths for p in group.split(',') if p]
  if not args.gin_file:
    parser.error('at least one --gin_file is required')
  return args


def _run_fn(run_mode: str):
  module_name, fn_name = RUN_MODES[run_mode].split(':')
  fn = getattr(importlib.import_module(module_name), fn_name)
  return gin.get_configurable(fn)


def main(argv: list[str] | None = None):
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  compile_cache.configure(args.compilation_cache_dir)  # before anything compiles
  distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                         args.process_id)
  # Training turns SIGTERM and Ctrl-C into "save and stop" from here on, start-up included.
  with (preemption.handling() if args.run_mode == 'train' else contextlib.nullcontext()):
    return _main(args)


def _main(args: argparse.Namespace):
  gin_config.parse(args.gin_file, args.gin_bindings, args.gin_search_paths)
  gin_config.check_command_line_macros(args.gin_bindings)
  gin_config.check_binding_types()
  directory = storage.as_path(gin_config.macro('MODEL_DIR'))
  writes = jax.process_index() == 0
  own_config = writes and args.run_mode not in WRITES_OWN_CONFIG
  lock = (run_lock.hold(directory, take_over=args.take_over_lock, purpose=args.run_mode)
          if writes and args.run_mode in LOCKED_RUN_MODES else contextlib.nullcontext())
  with lock:
    if own_config:
      directory.mkdir(parents=True, exist_ok=True)
      (directory / f'{args.run_mode}_config.gin').write_text(gin.config_str())
    try:
      return _run_fn(args.run_mode)()
    finally:
      if own_config:
        (directory / f'{args.run_mode}_operative_config.gin').write_text(
            gin.operative_config_str())


def run(argv: list[str] | None = None) -> int:
  """The command line: main(), with a RunError printed as one message (exit status 1)."""
  try:
    main(argv)
  except RunError as e:
    print(f'efficientlm: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


def run_then(first: str, flag: str, then: str, argv: list[str] | None = None) -> int:
  """A launcher's command line (scripts/upcycle.py, scripts/prune.py): run mode `first`, then,
  with `flag` given and `first` successful, run mode `then` with the same flags."""
  args = sys.argv[1:] if argv is None else argv
  rest = [a for a in args if a != flag]
  if any(a.startswith('--run_mode') for a in rest):
    sys.exit(f'scripts/{pathlib.Path(sys.argv[0]).name} sets the run mode itself; drop '
             '--run_mode.')
  status = run([f'--run_mode={first}'] + rest)
  if status == 0 and flag in args:
    status = run([f'--run_mode={then}'] + rest)
  return status


if __name__ == '__main__':
  sys.exit(run())
