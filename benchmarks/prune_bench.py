"""SparseGPT versus magnitude pruning on a decoder trained here: validation bits per byte after
one-shot pruning to 50% unstructured, 2:4 and 4:8 (and 50% jointly with int8).

  python -m benchmarks.prune_bench [--output_dir runs/prune_bench] [--steps 400]

1. Trains (or reuses, if OUTPUT_DIR/dense holds its last step) models/decoder/tiny.gin with 4
   layers (d_model 128, MLP 512, multi-query attention) on `stdlib_code_lm`, the Python standard
   library's source as bytes, through `python -m efficientlm.main` with
   runs/compare_architectures.gin (AdamW, warmup and cosine decay, 512-byte rows).
2. Prunes it for each (pattern, method) through run mode `prune` (runs/prune.gin) into
   OUTPUT_DIR/<method>_<pattern>: CALIBRATION_SEQUENCES training rows, every attention and MLP
   kernel of the 4 layers (embeddings, tied with the logits, stay dense).
3. Evaluates the dense model and each pruned one with run mode `eval` on the same validation
   batches (MAX_EVAL_BATCHES of BATCH_SIZE rows, unshuffled), and reports loss, perplexity
   (per byte token) and bits per byte = loss / ln 2 / (bytes per token of the split).

Every step runs in this process through efficientlm.main.run, as on the command line (the
commands are recorded in the JSON). Writes benchmarks/results/prune_stdlib_code_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')

from benchmarks import environment  # noqa: E402
from efficientlm import main as main_lib  # noqa: E402

TASK = 'stdlib_code_lm'
MODEL = ['--gin_file=models/decoder/tiny.gin',
         '--gin_bindings=model_config.TransformerConfig.num_decoder_layers = 4',
         '--gin.VOCAB_SIZE=384', "--gin.ACTIVATION_DTYPE='float32'"]
DATA = [f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.TASK_FEATURE_LENGTHS={'targets': 512}",
        '--gin.PACK=False']
VARIANTS = [('sparsegpt', 0.5, False), ('magnitude', 0.5, False),
            ('sparsegpt', '2:4', False), ('magnitude', '2:4', False),
            ('sparsegpt', '4:8', False), ('magnitude', '4:8', False),
            ('sparsegpt', 0.5, True), ('magnitude', 0.5, True)]


def _run(argv: list[str]) -> float:
  start = time.perf_counter()
  print('$ ' + _command(argv), flush=True)
  if main_lib.run(argv) != 0:
    raise SystemExit(f'failed: {argv}')
  return time.perf_counter() - start


def _command(argv: list[str]) -> str:
  return 'python -m efficientlm.main ' + shlex.join(argv)


def _name(method: str, sparsity, int8: bool) -> str:
  pattern = str(sparsity).replace(':', 'of') if isinstance(sparsity, str) else f'{sparsity:g}'
  return f'{method}_{pattern}' + ('_int8' if int8 else '')


def _evaluate(model_dir: pathlib.Path, eval_flags: list[str], commands: list) -> dict:
  results = model_dir / 'eval_results.json'
  argv = (['--run_mode=eval'] + MODEL + ['--gin_file=runs/prune.gin'] + DATA + eval_flags +
          [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.SOURCE_CHECKPOINT='{model_dir}'"])
  commands.append(argv)
  if not results.exists():
    _run(argv)
  metrics = json.loads(results.read_text())['metrics']
  return {'loss': metrics[f'{TASK}/loss'], 'accuracy': metrics[f'{TASK}/accuracy'],
          'tokens': metrics[f'{TASK}/num_tokens']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output_dir', default='runs/prune_bench')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--calibration_sequences', type=int, default=64)
  parser.add_argument('--eval_batches', type=int, default=16)
  args = parser.parse_args()
  out = pathlib.Path(args.output_dir).resolve()
  dense = out / 'dense'
  commands, times = [], {}

  train = (['--run_mode=train'] + MODEL + ['--gin_file=runs/compare_architectures.gin'] + DATA +
           [f"--gin.MODEL_DIR='{dense}'", f'--gin.TRAIN_STEPS={args.steps}',
            f'--gin.BATCH_SIZE={args.batch_size}', f'--gin.WARMUP_STEPS={args.steps // 10}',
            '--gin.MAX_EVAL_BATCHES=1', f'--gin.CHECKPOINT_EVERY={args.steps}'])
  commands.append(train)
  if not (dense / 'checkpoints' / str(args.steps)).exists():
    times['train_s'] = _run(train)

  eval_flags = [f'--gin.BATCH_SIZE={args.batch_size}',
                f'--gin.MAX_EVAL_BATCHES={args.eval_batches}']
  from efficientlm.data import stdlib_code  # pylint: disable=g-import-not-at-top  (TF)
  corpus = stdlib_code.corpus_stats()
  bytes_per_token = corpus['validation']['bytes_per_token']

  def row(metrics: dict) -> dict:
    return dict(metrics, perplexity=math.exp(metrics['loss']),
                bits_per_byte=metrics['loss'] / math.log(2) / bytes_per_token)

  rows = [dict(method='dense', pattern='-', int8=False, sparsity=0.0,
               **row(_evaluate(dense, eval_flags, commands)))]
  for method, sparsity, int8 in VARIANTS:
    name = _name(method, sparsity, int8)
    target = out / name
    sparsity_flag = f'--gin.SPARSITY={sparsity!r}'
    prune = (['--run_mode=prune'] + MODEL + ['--gin_file=runs/prune.gin'] + DATA +
             [f"--gin.MODEL_DIR='{target}'", f"--gin.SOURCE_CHECKPOINT='{dense}'",
              f"--gin.METHOD='{method}'", sparsity_flag, f'--gin.INT8={int8}',
              f'--gin.CALIBRATION_SEQUENCES={args.calibration_sequences}'])
    commands.append(prune)
    if not (target / 'prune_report.json').exists():
      times[f'{name}_prune_s'] = _run(prune)
    report = json.loads((target / 'prune_report.json').read_text())
    rows.append(dict(method=method, pattern=str(sparsity), int8=int8,
                     sparsity=report['sparsity'], mean_layer_error=report['mean_error'],
                     **row(_evaluate(target, eval_flags, commands))))

  config = {'task': TASK, 'model': 'models/decoder/tiny.gin, 4 layers, d_model 128, MLP 512, '
            'multi-query attention, vocab 384 (byte ids)', 'train_steps': args.steps,
            'batch_size': args.batch_size, 'row_length': 512,
            'calibration_sequences': args.calibration_sequences,
            'eval_batches': args.eval_batches, 'corpus': corpus,
            'commands': [_command(c) for c in commands],
            'seconds': times}
  path = environment.write('prune_stdlib_code', config, rows)
  print(f'{"method":10} {"pattern":8} {"int8":5} {"sparsity":>8} {"layer err":>9} '
        f'{"loss":>7} {"bits/byte":>9}')
  for r in rows:
    print(f'{r["method"]:10} {r["pattern"]:8} {str(r["int8"]):5} {r["sparsity"]:8.3f} '
          f'{r.get("mean_layer_error", 0.0):9.4f} {r["loss"]:7.4f} {r["bits_per_byte"]:9.4f}')
  print(path)


if __name__ == '__main__':
  main()
