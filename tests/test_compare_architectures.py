"""benchmarks/compare_architectures.py: the table, skipping finished pairs after a kill, one
budget per output directory. The fast tests use a stand-in for the training run that writes what
the trainer writes (metrics.jsonl, memory.json); the slow one trains for real, in process."""

import json
import math
import pathlib
import shlex

import pytest

from benchmarks import architectures, compare_architectures as compare

_TINY = ('TransformerConfig.num_decoder_layers = 1', 'TransformerConfig.emb_dim = 32',
         'TransformerConfig.head_dim = 8', 'TransformerConfig.mlp_dim = 64', 'LOG_EVERY = 1',
         'CHECKPOINT_EVERY = 2')
_BUDGET = compare.Budget(steps=3, batch_size=8, warmup_steps=1, max_eval_batches=1,
                         bindings=_TINY)
_TASKS = [compare.TASKS['synthetic_recall'], compare.TASKS['stdlib_code_lm']]
_COLUMNS = {'task', 'architecture', 'num_params', 'train_tokens', 'accuracy', 'loss',
            'bits_per_byte', 'tokens_per_s', 'step_memory_bytes', 'device_peak_bytes'}


def _binding(argv, name):
  (value,) = [a.split(' = ', 1)[1] for a in argv if a.startswith(f'--gin_bindings={name} = ')]
  return value


def _last_binding(argv, name):  # gin: the last binding of a name wins
  return [a.split(' = ', 1)[1] for a in argv if a.startswith(f'--gin_bindings={name} = ')][-1]


class FakeRun:
  """Writes a finished run's files: train windows of 100, 200, 300 tokens/s; eval loss by
  architecture. `interrupt` names pairs that stop before their final evaluation."""

  LOSS = {'dense': 1.5, 'mqa': 2.0, 'block_recurrent': 1.0}

  def __init__(self, interrupt=()):
    self.calls, self.interrupt = [], set(interrupt)

  def __call__(self, argv):
    model_dir = pathlib.Path(_binding(argv, 'MODEL_DIR').strip("'"))
    task = _binding(argv, 'MIXTURE_OR_TASK_NAME').strip("'")
    arch = model_dir.name
    self.calls.append((task, arch))
    steps = int(_binding(argv, 'TRAIN_STEPS'))
    (model_dir / 'train').mkdir(parents=True)
    (model_dir / 'eval').mkdir()
    (model_dir / 'train' / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': s, 'tokens_per_s': 100.0 * s}) + '\n' for s in (1, 2, 3)))
    eval_step = steps - 1 if (task, arch) in self.interrupt else steps
    (model_dir / 'eval' / 'metrics.jsonl').write_text(json.dumps(
        {'step': eval_step, f'{task}/loss': self.LOSS[arch], f'{task}/accuracy': 0.25}) + '\n')
    (model_dir / 'memory.json').write_text(json.dumps({'step_memory_bytes': 1000,
                                                       'device_peak_bytes': None}))
    return 0


def test_table_rows_columns_and_bits_per_byte(tmp_path):
  table = compare.compare(tmp_path, architectures.select(['mqa']), _TASKS, _BUDGET, FakeRun())
  rows = table['rows']
  assert [(r['task'], r['architecture']) for r in rows] == [
      ('synthetic_recall', 'dense'), ('synthetic_recall', 'mqa'),
      ('stdlib_code_lm', 'dense'), ('stdlib_code_lm', 'mqa')]
  assert all(_COLUMNS <= set(r) for r in rows)
  assert all(r['tokens_per_s'] == 250.0 for r in rows)  # median of the windows after the first
  assert [r['train_tokens'] for r in rows] == [3 * 8 * 64] * 2 + [3 * 8 * 512] * 2
  assert rows[0]['num_params'] == rows[1]['num_params']  # matched
  validation = table['corpus']['validation']
  # nats per token x tokens / bytes / ln 2.
  expected = 2.0 * validation['tokens'] / validation['bytes'] / math.log(2)
  assert rows[3]['bits_per_byte'] == pytest.approx(expected, rel=1e-12)
  assert rows[0]['bits_per_byte'] is None
  lines = (tmp_path / 'comparison.md').read_text().splitlines()
  header = [line for line in lines if line.startswith('| task')][0]
  assert {c.strip() for c in header.strip('|').split('|')} == _COLUMNS
  assert sum(line.startswith('| synthetic_recall') or line.startswith('| stdlib_code_lm')
             for line in lines) == 4
  assert 'same tokens' in lines[2]
  assert json.loads((tmp_path / 'comparison.json').read_text())['rows'] == rows
  assert (tmp_path / 'comparison.png').stat().st_size > 0


def test_a_killed_comparison_resumes_where_it_stopped(tmp_path):
  first = FakeRun(interrupt={('synthetic_recall', 'mqa')})
  with pytest.raises(compare.Interrupted, match='run the same command again'):
    compare.compare(tmp_path, architectures.select(['mqa']), _TASKS[:1], _BUDGET, first)
  assert first.calls == [('synthetic_recall', 'dense'), ('synthetic_recall', 'mqa')]
  assert (tmp_path / 'synthetic_recall' / 'dense' / 'result.json').exists()
  assert not (tmp_path / 'synthetic_recall' / 'mqa' / 'result.json').exists()
  assert not (tmp_path / 'comparison.json').exists()
  # The rerun: the finished pair is skipped, the stopped one runs again (the trainer would
  # resume it from its checkpoint: same MODEL_DIR).
  second = _Resume()
  table = compare.compare(tmp_path, architectures.select(['mqa']), _TASKS[:1], _BUDGET, second)
  assert second.calls == [('synthetic_recall', 'mqa')]
  assert [r['architecture'] for r in table['rows']] == ['dense', 'mqa']


class _Resume(FakeRun):
  def __call__(self, argv):  # a resumed run appends to the files of the stopped one
    model_dir = pathlib.Path(_binding(argv, 'MODEL_DIR').strip("'"))
    for name in ('train', 'eval'):
      for path in (model_dir / name).glob('*'):
        path.unlink()
      (model_dir / name).rmdir()
    return super().__call__(argv)


def test_another_budget_in_the_same_directory_stops(tmp_path):
  compare.compare(tmp_path, architectures.select(['mqa']), _TASKS[:1], _BUDGET, FakeRun())
  other = compare.Budget(steps=5, batch_size=8, warmup_steps=1, max_eval_batches=1,
                         bindings=_TINY)
  with pytest.raises(ValueError, match=r'steps.*new --output_dir'):
    compare.compare(tmp_path, architectures.select(['mqa']), _TASKS[:1], other, FakeRun())


def test_run_arguments_name_the_run_gin_and_budget(tmp_path):
  row = architectures.resolve(architectures.select(['mqa']), bindings=['VOCAB_SIZE = 64'],
                              run_gins=(compare.RUN_GIN,),
                              parse_only=[f"MODEL_DIR = '{tmp_path}'"])[0]
  argv = compare.run_arguments(row, compare.TASKS['synthetic_recall'], _BUDGET, tmp_path / 'd')
  assert argv[:2] == ['--gin_file=models/decoder/tiny.gin',
                      '--gin_file=runs/compare_architectures.gin']
  assert _binding(argv, 'TRAIN_STEPS') == '3' and _binding(argv, 'BATCH_SIZE') == '8'
  assert shlex.split(shlex.join(argv)) == argv  # the printed command is the one that runs


def test_streams_task_gives_every_row_the_same_streamed_code_and_carries_state(tmp_path):
  """stdlib_code_streams: every row reads stdlib_code_lm as document streams (unshuffled,
  unpacked), --code_length long; the Block-Recurrent row, which starts fresh on the other tasks,
  carries its state here. Scored in bits per byte of the code corpus."""
  streams = compare.TASKS['stdlib_code_streams']
  budget = compare.Budget(steps=3, batch_size=8, warmup_steps=1, max_eval_batches=1,
                          code_length=128, bindings=_TINY, row_bindings=('BLOCK_SIZE = 32',))
  run = _Recording()
  table = compare.compare(tmp_path, architectures.select(['block_recurrent']), [streams],
                          budget, run)
  assert [c[0] for c in run.calls] == ['stdlib_code_lm'] * 2
  for argv in run.argvs:
    assert _binding(argv, 'DOCUMENT_STREAMS') == 'True'
    assert _binding(argv, 'SHUFFLE_TRAIN_EXAMPLES') == 'False'
    assert _binding(argv, 'PACK') == 'False'
    assert _binding(argv, 'TASK_FEATURE_LENGTHS') == "{'targets': 128}"
  # Macros only where a gin file reads them (the trainer refuses the others).
  dense_argv, brt_argv = run.argvs
  assert not any('CARRY_STATE' in a or 'BLOCK_SIZE' in a for a in dense_argv)
  assert _last_binding(brt_argv, 'CARRY_STATE') == 'True'
  assert _last_binding(brt_argv, 'BLOCK_SIZE') == '32'
  assert '`BLOCK_SIZE = 32`' in (tmp_path / 'comparison.md').read_text()
  dense, brt = table['rows']
  assert (dense['task'], brt['task']) == ('stdlib_code_streams',) * 2
  assert pathlib.Path(brt['model_dir']) == tmp_path / 'stdlib_code_streams' / 'block_recurrent'
  assert dense['train_tokens'] == 3 * 8 * 128
  validation = table['corpus']['validation']
  assert brt['bits_per_byte'] == pytest.approx(
      1.0 * validation['tokens'] / validation['bytes'] / math.log(2), rel=1e-12)
  # The same row on a task without streams starts every row fresh (its own binding).
  recall = _Recording()
  compare.compare(tmp_path / 'recall', architectures.select(['block_recurrent']), _TASKS[:1],
                  _BUDGET, recall)
  assert _last_binding(recall.argvs[1], 'CARRY_STATE') == 'False'
  assert not any('DOCUMENT_STREAMS' in a for a in recall.argvs[1])


def test_streams_bindings_reach_the_model_and_the_data(tmp_path):
  """The gin the trainer parses: carry_state on for the streams task only, and the training
  data's DatasetConfig streaming, unshuffled and unpacked."""
  import gin  # pylint: disable=g-import-not-at-top
  from efficientlm.data.config import DatasetConfig  # pylint: disable=g-import-not-at-top
  budget = compare.Budget(steps=3, batch_size=8, warmup_steps=1, code_length=128)
  for task, carry in ((compare.TASKS['stdlib_code_streams'], True),
                      (compare.TASKS['stdlib_code_lm'], False)):
    row = architectures.resolve(
        architectures.select(['block_recurrent']), bindings=compare.task_bindings(task, budget),
        run_gins=(compare.RUN_GIN,), parse_only=[f"MODEL_DIR = '{tmp_path}'"],
        row_bindings=task.row_bindings)[1]
    model = architectures.build_model(row.gin_files, [*row.bindings, f"MODEL_DIR = '{tmp_path}'"])
    assert model.module.config.carry_state is carry
    with gin.config_scope('train'):
      data = gin.get_configurable(DatasetConfig)()
    assert (data.document_streams, data.shuffle, data.pack) == (carry, not carry, False)


class _Recording(FakeRun):
  def __init__(self):
    super().__init__()
    self.argvs = []

  def __call__(self, argv):
    self.argvs.append(list(argv))
    return super().__call__(argv)


@pytest.mark.slow  # a real training run of 3 steps, in process (the baseline row)
def test_real_runs_through_the_trainer_and_a_rerun_skips_them(tmp_path):
  table = compare.compare(tmp_path, architectures.select(['dense']), _TASKS[:1], _BUDGET,
                          compare.in_process_runner)
  assert [r['architecture'] for r in table['rows']] == ['dense']
  for row in table['rows']:
    assert 0.0 <= row['accuracy'] <= 1.0 and math.isfinite(row['loss'])
    assert row['step_memory_bytes'] > 0 and row['tokens_per_s'] > 0
    checkpoints = pathlib.Path(row['model_dir']) / 'checkpoints'
    assert (checkpoints / '3').is_dir()  # trained to the end by the trainer itself
  rerun = FakeRun()
  again = compare.compare(tmp_path, architectures.select(['dense']), _TASKS[:1], _BUDGET, rerun)
  assert rerun.calls == [] and again['rows'] == table['rows']
