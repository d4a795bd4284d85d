"""The gin-driven entry point: flags, errors that name the culprit, a tiny run end to end."""

import json

import pytest

from efficientlm import main

TINY_RUN = ['--gin_file=runs/recall_tiny.gin', '--gin.TRAIN_STEPS=4', '--gin.WARMUP_STEPS=1',
            '--gin.BATCH_SIZE=8',
            '--gin.CHECKPOINT_EVERY=2', '--gin.LOG_EVERY=2', '--gin.EVAL_EVERY=None',
            '--gin.MAX_EVAL_BATCHES=1']


def test_flags():
  args = main.parse_flags(['--gin_file=a.gin', '--gin_file', 'b.gin', '--gin.X=3',
                           '--gin_bindings=Y = 4', '--gin_search_paths=/p,/q',
                           '--gin_search_paths=/r', '--run_mode=eval'])
  assert args.gin_file == ['a.gin', 'b.gin']
  assert args.gin_bindings == ['Y = 4', 'X = 3']
  assert args.gin_search_paths == ['/p', '/q', '/r'] and args.run_mode == 'eval'
  with pytest.raises(SystemExit):
    main.parse_flags(['--gin_file=a.gin', '--bogus=1'])
  with pytest.raises(SystemExit):
    main.parse_flags([])


def test_missing_model_dir_is_named():
  with pytest.raises(ValueError, match='MODEL_DIR'):
    main.main(['--gin_file=runs/recall_tiny.gin'])


def test_typo_in_a_binding_is_named(tmp_path):
  with pytest.raises(ValueError, match='totl_steps'):
    main.main(['--gin_file=runs/recall_tiny.gin', f"--gin.MODEL_DIR='{tmp_path}'",
               '--gin.trainer.train.totl_steps=5'])


@pytest.mark.parametrize('flag,message', [
    ("--gin.TRAIN_STEPS='ten'", "TRAIN_STEPS = 'ten' is bound to trainer.train.total_steps"),
    ('--gin.TRAIN_STEPZ=4', '--gin.TRAIN_STEPZ: no loaded gin file defines or uses the macro '
     'TRAIN_STEPZ; did you mean TRAIN_STEPS?'),
    ('--gin_bindings=TRAIN_STEPZ = 4', 'did you mean TRAIN_STEPS?'),
])
def test_a_bad_macro_is_named_before_the_run(tmp_path, flag, message):
  # WARMUP_STEPS=-1 stops the run at its first step should the check miss (not 1500 steps on).
  with pytest.raises(ValueError, match=message):
    main.main(['--gin_file=runs/recall_tiny.gin', f"--gin.MODEL_DIR='{tmp_path}'",
               '--gin.WARMUP_STEPS=-1', flag])
  assert not list(tmp_path.iterdir())  # stopped before writing anything


@pytest.mark.slow
def test_train_then_eval_end_to_end(tmp_path, capsys):
  results = main.main(TINY_RUN + [f"--gin.MODEL_DIR='{tmp_path}'"])
  assert 'eval/synthetic_recall/accuracy' in results
  assert 'TRAIN_STEPS = 4' in (tmp_path / 'config.gin').read_text()
  operative = (tmp_path / 'operative_config.gin').read_text()
  assert 'TRAIN_STEPS = 4' in operative and 'trainer.train.total_steps = %TRAIN_STEPS' in operative
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2', '4']
  assert 'saved checkpoint 4' in capsys.readouterr().out

  eval_dir = tmp_path / 'eval_run'
  scores = main.main(['--run_mode=eval', '--gin_file=models/switch/decoder_tiny.gin',
                      '--gin_file=runs/eval.gin', f"--gin.MODEL_DIR='{eval_dir}'",
                      f"--gin.CHECKPOINT_PATH='{tmp_path / 'checkpoints'}'",
                      '--gin.VOCAB_SIZE=64', "--gin.ACTIVATION_DTYPE='float32'",
                      "--gin.MIXTURE_OR_TASK_NAME='synthetic_recall'",
                      "--gin.TASK_FEATURE_LENGTHS={'targets': 98}", '--gin.BATCH_SIZE=8',
                      '--gin.MAX_EVAL_BATCHES=1'])
  written = json.loads((eval_dir / 'eval_results.json').read_text())
  assert written['step'] == 4 and written['metrics'] == pytest.approx(scores)
  # The eval run mode scores the checkpoint exactly as the trainer's own final evaluation did.
  assert scores['synthetic_recall/loss'] == pytest.approx(
      results['eval/synthetic_recall/loss'], rel=1e-5)
  # The run's own flags with --run_mode=eval (what `make eval` runs) inherit every setting of the
  # trainer's evaluation: the same numbers, bit for bit, and the training's configs untouched.
  configs = {name: (tmp_path / name).read_text() for name in ('config.gin', 'operative_config.gin')}
  same = main.main(TINY_RUN + [f"--gin.MODEL_DIR='{tmp_path}'", '--run_mode=eval'])
  assert same == {k[len('eval/'):]: v for k, v in results.items() if k.startswith('eval/')}
  assert json.loads((tmp_path / 'eval_results.json').read_text())['step'] == 4
  assert {name: (tmp_path / name).read_text() for name in configs} == configs
  assert 'evaluation.evaluate' in (tmp_path / 'eval_operative_config.gin').read_text()
