"""Quality of each architecture (benchmarks/architectures.py) at one training budget, as one table.

  python scripts/compare_architectures.py --output_dir runs/compare        # every row and task
  python scripts/compare_architectures.py --output_dir runs/compare --architectures dense mqa \
      --tasks synthetic_recall --steps 500

Each (task, architecture) pair trains through the project's own trainer, `python -m
efficientlm.main` (via benchmarks/measured_run.py, which adds memory.json) with
configs/runs/compare_architectures.gin, in its own process and MODEL_DIR
(OUTPUT_DIR/<task>/<architecture>); its progress lines stream to the terminal. Equal budgets:
within a task every architecture trains the same steps x batch x length tokens, with the same
optimizer and schedule (AdamW, linear warmup then cosine decay) and the same data order (seed 0),
at a matched parameter count (architectures.resolve), and is evaluated on the same validation
batches. Tasks:

  synthetic_recall     multi-query associative recall; metric: answer accuracy
  synthetic_induction  induction heads; metric: answer accuracy
  stdlib_code_lm       bytes of the Python standard library's source, split by file; metric:
                       validation bits per byte = loss / ln 2 x tokens / bytes (stdlib_code.py)
  stdlib_code_streams  the same corpus read as document streams (data/document_streams.py): row
                       r of every batch continues row r's files, segment after segment, in order
                       (DOCUMENT_STREAMS = True, SHUFFLE_TRAIN_EXAMPLES = False, PACK = False
                       for every row, so all rows train on the same segments), and the
                       Block-Recurrent rows carry their state and window across steps
                       (CARRY_STATE = True); evaluated as stdlib_code_lm (unstreamed validation
                       rows, each starting fresh); metric: bits per byte

A task's `data` is the seqio task it reads (MIXTURE_OR_TASK_NAME; default: its name), its
`bindings` are applied to every row after the row's own, and its `row_bindings` (macros such as
CARRY_STATE) only to the rows whose gin files define or use the macro: the trainer refuses a
binding of a macro that nothing reads. --row_gin_bindings does the same for a run, e.g. sizes
of the long-context rows at long lengths:

  python scripts/compare_architectures.py --output_dir runs/compare_streams \
      --tasks stdlib_code_streams --architectures block_window block_recurrent perceiver_ar \
      --code_length 1024 --row_gin_bindings 'BLOCK_SIZE = 128' \
      --row_gin_bindings 'NUM_LATENTS = 256'

Tasks on the code corpus use --code_length.

Resuming: killing the harness (Ctrl-C, SIGTERM) lets the current run save a checkpoint; the
same command again skips every finished pair (OUTPUT_DIR/<task>/<arch>/result.json exists) and
resumes the unfinished one from its checkpoint. OUTPUT_DIR/budget.json holds the budget: a rerun
with another budget stops (it would mix budgets in one table); use a new --output_dir.

Writes OUTPUT_DIR/comparison.json (machine, budget, corpus, rows), comparison.md (the table) and
comparison.png (per task: the quality metric, tokens/s and step memory of each architecture).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence

from benchmarks import architectures, environment

RUN_GIN = 'runs/compare_architectures.gin'
_ROOT = pathlib.Path(__file__).resolve().parent.parent  # for the runs' `-m benchmarks...`
RESULT_FILE = 'result.json'
BUDGET_FILE = 'budget.json'


CODE_DATA = 'stdlib_code_lm'  # the seqio task whose rows are --code_length long


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # the table's task column and OUTPUT_DIR/<name>
  vocab_size: int  # the model's; at least the task's vocabulary
  length: int  # TASK_FEATURE_LENGTHS['targets']
  metric: str  # the table's quality column: 'accuracy' (higher is better) or 'bits_per_byte'
  data: str = ''  # the seqio task (MIXTURE_OR_TASK_NAME); '' = name
  bindings: tuple[str, ...] = ()  # for every row of this task, after the row's bindings
  row_bindings: tuple[str, ...] = ()  # macros, for the rows that define or use them only

  @property
  def data_name(self) -> str:
    return self.data or self.name


TASKS = {t.name: t for t in (
    # Unpacked rows (runs/compare_architectures.gin: PACK = False), since BigBird and LSH attend
    # over whole rows; lengths a multiple of their 16-token blocks/chunks in the tiny gins.
    Task('synthetic_recall', 64, 64, 'accuracy'),  # one 49-token example per row
    Task('synthetic_induction', 64, 64, 'accuracy'),  # one 64-token example per row
    Task('stdlib_code_lm', 384, 512, 'bits_per_byte'),  # 259 byte ids, rounded up to 128s
    # Streams need unshuffled, unpacked rows; the streams task sets both for every row.
    Task('stdlib_code_streams', 384, 512, 'bits_per_byte', data=CODE_DATA,
         bindings=('DOCUMENT_STREAMS = True', 'SHUFFLE_TRAIN_EXAMPLES = False', 'PACK = False'),
         row_bindings=('CARRY_STATE = True',)),
)}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every architecture gets; recorded in OUTPUT_DIR/budget.json."""

  steps: int = 1000
  batch_size: int = 32
  warmup_steps: int = 100
  peak_learning_rate: float = 3e-3
  code_length: int = 512
  max_eval_batches: int = 20
  base: str = architectures.DEFAULT_BASE
  bindings: tuple[str, ...] = ()
  row_bindings: tuple[str, ...] = ()  # macros, for the rows that define or use them only

  def __post_init__(self):
    object.__setattr__(self, 'bindings', tuple(self.bindings))
    object.__setattr__(self, 'row_bindings', tuple(self.row_bindings))
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f'Budget: warmup_steps {self.warmup_steps} must be in [0, steps = '
                       f'{self.steps}); lower --warmup_steps or raise --steps.')

  def length(self, task: Task) -> int:
    return self.code_length if task.data_name == CODE_DATA else task.length

  def tokens(self, task: Task) -> int:
    return self.steps * self.batch_size * self.length(task)


class Interrupted(RuntimeError):
  """A run ended without finishing (stopped by a signal): rerun the same command to resume."""


# --- one (task, architecture) run ------------------------------------------------------------

def task_bindings(task: Task, budget: Budget) -> list[str]:
  return [f"MIXTURE_OR_TASK_NAME = '{task.data_name}'", f'VOCAB_SIZE = {task.vocab_size}',
          f"TASK_FEATURE_LENGTHS = {{'targets': {budget.length(task)}}}", *task.bindings]


def run_arguments(row: architectures.Resolved, task: Task, budget: Budget,
                  model_dir: pathlib.Path) -> list[str]:
  """The flags of `python -m efficientlm.main` for one pair (row: resolved with RUN_GIN and the
  task's and the budget's shared bindings)."""
  files = row.gin_files
  bindings = [*row.bindings, f'TRAIN_STEPS = {budget.steps}',
              f'BATCH_SIZE = {budget.batch_size}', f'WARMUP_STEPS = {budget.warmup_steps}',
              f'PEAK_LEARNING_RATE = {budget.peak_learning_rate}',
              f'MAX_EVAL_BATCHES = {budget.max_eval_batches}', f"MODEL_DIR = '{model_dir}'"]
  return [*(f'--gin_file={f}' for f in files), *(f'--gin_bindings={b}' for b in bindings)]


def subprocess_runner(argv: Sequence[str]) -> int:
  """Runs one pair in its own process. On Ctrl-C the child (same process group) saves its
  checkpoint: wait for it rather than kill it, then stop. A SIGTERM to this process is passed
  on to the child, which saves and exits; the pair is then unfinished and the harness stops."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(_ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]))
  child = subprocess.Popen([sys.executable, '-m', 'benchmarks.measured_run', *argv], env=env)
  previous = signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
  try:
    return child.wait()
  except KeyboardInterrupt:
    print('compare_architectures: waiting for the run to save its checkpoint (Ctrl-C again '
          'stops it at once)', file=sys.stderr, flush=True)
    child.wait()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)


def in_process_runner(argv: Sequence[str]) -> int:
  """The same run in this process (tests; device peaks then accumulate over rows)."""
  from benchmarks import measured_run  # pylint: disable=g-import-not-at-top
  return measured_run.run(argv)


def _records(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_result(model_dir: pathlib.Path, task: Task, budget: Budget,
                bytes_per_token: float | None) -> dict | None:
  """The pair's numbers from its MODEL_DIR, or None if its final evaluation is not there."""
  final = [r for r in _records(model_dir / 'eval' / 'metrics.jsonl') if r['step'] == budget.steps]
  if not final:
    return None
  scores = final[-1]
  speeds = [r['tokens_per_s'] for r in _records(model_dir / 'train' / 'metrics.jsonl')
            if r.get('tokens_per_s')]
  if len(speeds) > 1:  # the first window holds the first batch's pipeline start-up
    speeds = speeds[1:]
  memory_path = model_dir / 'memory.json'
  memory = json.loads(memory_path.read_text()) if memory_path.exists() else {}
  loss = scores[f'{task.data_name}/loss']
  return {
      'accuracy': scores[f'{task.data_name}/accuracy'],
      'loss': loss,
      'bits_per_byte': (loss / math.log(2) / bytes_per_token if bytes_per_token else None),
      'tokens_per_s': statistics.median(speeds) if speeds else None,
      'step_memory_bytes': memory.get('step_memory_bytes'),
      'device_peak_bytes': memory.get('device_peak_bytes'),
  }


# --- the comparison --------------------------------------------------------------------------

def _check_budget(output_dir: pathlib.Path, budget: Budget) -> None:
  path = output_dir / BUDGET_FILE
  recorded = dataclasses.asdict(budget)
  recorded['bindings'] = list(recorded['bindings'])
  recorded['row_bindings'] = list(recorded['row_bindings'])
  if path.exists():
    previous = json.loads(path.read_text())
    previous.setdefault('row_bindings', [])  # directories from before row bindings existed
    if previous != recorded:
      changed = sorted(k for k in set(previous) | set(recorded)
                       if previous.get(k) != recorded.get(k))
      raise ValueError(f'{output_dir} holds runs of another budget ({", ".join(changed)}: '
                       f'{[previous.get(k) for k in changed]} there, '
                       f'{[recorded.get(k) for k in changed]} now); one table needs one budget, '
                       'so use a new --output_dir (or the same flags as before).')
  output_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(recorded, indent=2) + '\n')


def _corpus_stats(tasks: Sequence[Task]) -> dict | None:
  if not any(t.data_name == CODE_DATA for t in tasks):
    return None
  from efficientlm.data import stdlib_code  # pylint: disable=g-import-not-at-top  (TF)
  return stdlib_code.corpus_stats()


def compare(output_dir: str | pathlib.Path, archs: Sequence[architectures.Architecture],
            tasks: Sequence[Task], budget: Budget,
            runner: Callable[[Sequence[str]], int] = subprocess_runner) -> dict:
  """Trains every unfinished (task, architecture) pair and writes the table; returns it."""
  output_dir = pathlib.Path(output_dir).absolute()  # MODEL_DIRs for processes anywhere
  _check_budget(output_dir, budget)
  corpus = _corpus_stats(tasks)
  bytes_per_token = corpus['validation']['bytes_per_token'] if corpus else None
  pairs = [(task, arch) for task in tasks for arch in archs]
  rows, failed = [], []
  for task in tasks:
    shared = [*task_bindings(task, budget), *budget.bindings]
    for row in architectures.resolve(archs, budget.base, shared, run_gins=(RUN_GIN,),
                                     parse_only=[f"MODEL_DIR = '{output_dir}'"],
                                     row_bindings=[*task.row_bindings, *budget.row_bindings]):
      index = len(rows) + len(failed) + 1
      model_dir = output_dir / task.name / row.arch.name
      label = f'[{index}/{len(pairs)}] {task.name} / {row.arch.name}'
      result_path = model_dir / RESULT_FILE
      if result_path.exists():
        print(f'{label}: finished earlier, skipped ({result_path})', flush=True)
        rows.append(json.loads(result_path.read_text()))
        continue
      argv = run_arguments(row, task, budget, model_dir)
      print(f'{label}: training {budget.steps} steps x {budget.batch_size} x '
            f'{budget.length(task)} tokens, {row.num_params:,} parameters, in {model_dir}\n'
            f'  python -m efficientlm.main {shlex.join(argv)}', flush=True)
      status = runner(argv)
      if status != 0:
        print(f'{label}: FAILED (exit status {status}); going on with the others', flush=True)
        failed.append(f'{task.name}/{row.arch.name}')
        continue
      numbers = read_result(model_dir, task, budget,
                            bytes_per_token if task.data_name == CODE_DATA else None)
      if numbers is None:
        raise Interrupted(f'{label} stopped before its final evaluation; run the same command '
                          'again to resume it (finished pairs are skipped).')
      result = {'task': task.name, 'architecture': row.arch.name, 'note': row.arch.note,
                'num_params': row.num_params, 'param_ratio': round(row.param_ratio, 5),
                'steps': budget.steps, 'train_tokens': budget.tokens(task),
                'metric': task.metric, **numbers, 'model_dir': str(model_dir)}
      result_path.write_text(json.dumps(result, indent=2) + '\n')
      rows.append(result)
  table = {'machine': environment.machine_info(), 'budget': json.loads(
      (output_dir / BUDGET_FILE).read_text()), 'equal_budgets': EQUAL_BUDGETS,
      'corpus': corpus, 'failed': failed, 'rows': rows}
  (output_dir / 'comparison.json').write_text(json.dumps(table, indent=2) + '\n')
  (output_dir / 'comparison.md').write_text(markdown(table))
  plot(rows, output_dir / 'comparison.png')
  print(f'wrote {output_dir / "comparison.md"}, .json and .png' +
        (f'; FAILED: {failed}' if failed else ''), flush=True)
  return table


EQUAL_BUDGETS = ('Within a task every architecture trained the same tokens (steps x batch x '
                 'length), with the same optimizer and schedule (AdamW, warmup + cosine), data '
                 'order and evaluation batches, at a matched parameter count.')
COLUMNS = ('task', 'architecture', 'num_params', 'train_tokens', 'accuracy', 'loss',
           'bits_per_byte', 'tokens_per_s', 'step_memory_bytes', 'device_peak_bytes')


def _cell(value) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:.4g}'
  return f'{value:,}' if isinstance(value, int) else str(value)


def markdown(table: dict) -> str:
  budget = table['budget']
  lines = [f'# Architecture comparison ({table["machine"]["device_kind"]})', '',
           f'{table["equal_budgets"]} Budget: {budget["steps"]} steps of batch '
           f'{budget["batch_size"]}, warmup {budget["warmup_steps"]}, peak learning rate '
           f'{budget["peak_learning_rate"]}; base {budget["base"]}; evaluation on '
           f'{budget["max_eval_batches"]} validation batches. accuracy: of the answers '
           '(synthetic tasks) or of next bytes (code); loss: validation nats per token; '
           'step memory: XLA memory analysis of the compiled train step, per device.' +
           ''.join(f' {label}: {", ".join(f"`{b}`" for b in budget.get(key) or ())}.'
                   for key, label in (('bindings', 'Bindings of every row'),
                                      ('row_bindings', 'Bindings of the rows that use them'))
                   if budget.get(key)), '',
           '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(_cell(row.get(c)) for c in COLUMNS) + ' |' for row in table['rows']]
  if table['failed']:
    lines += ['', f'Failed (see their MODEL_DIR): {", ".join(table["failed"])}']
  return '\n'.join(lines) + '\n'


def plot(rows: Sequence[dict], path: pathlib.Path) -> None:
  """One column per task; rows of panels: the task's metric, tokens/s, step memory."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = list(dict.fromkeys(r['task'] for r in rows)) or ['none']
  fig, axes = plt.subplots(3, len(tasks), figsize=(4 * len(tasks), 8), squeeze=False)
  for column, task in enumerate(tasks):
    here = [r for r in rows if r['task'] == task]
    metric = here[0]['metric'] if here else 'accuracy'
    for ax, key in zip(axes[:, column], (metric, 'tokens_per_s', 'step_memory_bytes')):
      shown = [r for r in here if r.get(key) is not None]
      ax.bar([r['architecture'] for r in shown], [r[key] for r in shown])
      ax.set_title(f'{task}: {key}', fontsize=9)
      if key == 'accuracy':
        ax.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  defaults = Budget()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--architectures', nargs='+', default=None,
                      help='rows of benchmarks/architectures.py (default: all; dense always)')
  parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
  parser.add_argument('--steps', type=int, default=defaults.steps)
  parser.add_argument('--batch_size', type=int, default=defaults.batch_size)
  parser.add_argument('--warmup_steps', type=int, default=defaults.warmup_steps)
  parser.add_argument('--peak_learning_rate', type=float, default=defaults.peak_learning_rate)
  parser.add_argument('--code_length', type=int, default=defaults.code_length,
                      help='sequence length of the code tasks (stdlib_code_lm, '
                      'stdlib_code_streams; bytes)')
  parser.add_argument('--max_eval_batches', type=int, default=defaults.max_eval_batches)
  parser.add_argument('--base', default=defaults.base, help='base model gin of every row')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='applied to every run, e.g. "TransformerConfig.num_decoder_layers = 4"')
  parser.add_argument('--row_gin_bindings', action='append', default=[],
                      help='macro bindings applied to the rows whose gin files define or use the '
                      'macro, e.g. "BLOCK_SIZE = 128" (the Block-Recurrent rows)')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  budget = Budget(args.steps, args.batch_size, args.warmup_steps, args.peak_learning_rate,
                  args.code_length, args.max_eval_batches, args.base, tuple(args.gin_bindings),
                  tuple(args.row_gin_bindings))
  try:
    table = compare(args.output_dir, architectures.select(args.architectures),
                    [TASKS[t] for t in args.tasks], budget)
  except Interrupted as e:
    print(f'compare_architectures: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print('compare_architectures: stopped; run the same command again to resume (finished '
          'pairs are skipped).', file=sys.stderr, flush=True)
    return 130
  return 1 if table['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
