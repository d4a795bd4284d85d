"""The trainer: microbatching, resume equivalence, preemption, NaN handling, mesh changes."""

import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from efficientlm import partitioning
from efficientlm.training import checkpoints, optimizers, trainer
from efficientlm.training.steps import TrainState, make_train_step
from tests import helpers
from tests.training import fake_data, tiny_run

VOCAB, LENGTH, BATCH = tiny_run.VOCAB, tiny_run.LENGTH, tiny_run.BATCH
_model, _partitioner, _adamw, _train, _latest_params = (
    tiny_run.model, tiny_run.partitioner, tiny_run.adamw, tiny_run.train, tiny_run.latest_params)


def test_microbatches_equal_the_full_batch_step():
  model = _model()
  partitioner = _partitioner()
  batch = partitioner.shard_batch(helpers.lm_batch(3, 8, LENGTH, VOCAB))
  params, _, _ = partitioner.sharded_init(lambda r: model.init(r, batch)['params'],
                                          jax.random.key(0))
  sgd = optimizers.Optimizer(optax.sgd(0.5), optimizers.constant_schedule(0.5))
  results = []
  for n in (1, 4):
    state = TrainState(step=jax.numpy.int32(0), params=params, opt_state=sgd.tx.init(params))
    with partitioner.context():
      results.append(jax.jit(make_train_step(model, sgd, num_microbatches=n))(state, batch))
  (full, full_metrics), (micro, micro_metrics) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), micro.params,
               full.params)
  for key in ('loss', 'accuracy', 'num_tokens', 'grad_norm'):
    np.testing.assert_allclose(micro_metrics[key], full_metrics[key], rtol=1e-5)
  # The step actually moved the parameters (so the comparison above is not vacuous).
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), full.params,
                                       params))
  assert max(moved) > 1e-3


def test_resume_equals_an_uninterrupted_run(tmp_path):
  straight_log, resumed_log = [], []
  _train(tmp_path / 'straight', 20, log=straight_log)
  _train(tmp_path / 'resumed', 10, log=resumed_log)  # ends with checkpoint 10, process gone
  resumed_log.append('restart')
  _train(tmp_path / 'resumed', 20, log=resumed_log)
  # The resumed run saw exactly the batches the uninterrupted one saw, in order ...
  assert straight_log == list(range(20))
  assert resumed_log == list(range(10)) + ['restart'] + list(range(10, 20))
  # ... and ended with identical parameters.
  step_a, a = _latest_params(tmp_path / 'straight')
  step_b, b = _latest_params(tmp_path / 'resumed')
  assert step_a == step_b == 20
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_loss_decreases_and_checkpoints_are_kept(tmp_path):
  fast = optimizers.adamw(optimizers.constant_schedule(2e-2), weight_decay=0.0)
  results = _train(tmp_path, 40, optimizer=fast, checkpoint_every=10, keep_checkpoints=2,
                   keep_checkpoints_every=20,
                   eval_dataset=fake_data.eval_source(BATCH, LENGTH, VOCAB), eval_every=40)
  assert results['eval/counting/loss'] < np.log(VOCAB) - 1.0
  assert results['loss'] < np.log(VOCAB) - 1.0
  # keep-last-2 plus every 20th.
  assert checkpoints.Checkpointer(tmp_path / 'checkpoints').steps() == [20, 30, 40]
  events = list((tmp_path / 'train').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize('checkpoint_every,caught_by', [
    (1, r'Parameters are not finite after step (\d+)'),  # checked before each save
    (3, r'Loss is (nan|inf) at step (\d+)'),  # between saves: the next step's loss
])
def test_non_finite_values_stop_with_the_step_and_keep_good_checkpoints(tmp_path,
                                                                        checkpoint_every,
                                                                        caught_by):
  explode = optimizers.Optimizer(optax.sgd(1e4), optimizers.constant_schedule(1e4))
  with pytest.raises(FloatingPointError, match=caught_by + '; stopping') as info:
    _train(tmp_path, 50, optimizer=explode, checkpoint_every=checkpoint_every,
           keep_checkpoints=None)
  bad_step = int(info.value.args[0].split('step ')[1].split(';')[0])
  saved = checkpoints.Checkpointer(tmp_path / 'checkpoints').steps()
  assert saved and max(saved) < bad_step
  assert f'checkpoints/{max(saved)}' in info.value.args[0]
  _, params = _latest_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_restore_onto_a_smaller_mesh(tmp_path):
  _train(tmp_path, 4, checkpoint_every=4, partitioner=_partitioner(shape=(8,), axes=('fsdp',),
                                                                   rules='fsdp'))
  _, saved = _latest_params(tmp_path)
  small = _partitioner(devices=jax.devices()[:4], shape=(2, 2))
  model, optimizer = _model(), _adamw()
  spec = trainer.global_batch_spec(fake_data.CountingIterator(BATCH, LENGTH, VOCAB))
  abstract, _, _ = trainer.abstract_state(model, optimizer, small, spec)
  restored = checkpoints.Checkpointer(tmp_path / 'checkpoints').restore_latest(
      abstract.params, abstract.opt_state)
  assert restored.step == 4
  jax.tree.map(np.testing.assert_array_equal, restored.params, saved)
  leaf = restored.params['decoder']['layers_0']['mlp']['wi']['kernel']
  assert leaf.sharding.mesh.devices.size == 4
  assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, 'model')


def test_unreadable_or_partial_checkpoints_fall_back_to_the_previous_one(tmp_path, capsys):
  _train(tmp_path, 20, checkpoint_every=10)
  newest = tmp_path / 'checkpoints' / '20' / 'params'
  shutil.rmtree(newest)
  newest.mkdir()  # present but empty: listed, unreadable
  # A save cut short by a crash: Orbax's temporary directory, never renamed into place.
  partial = tmp_path / 'checkpoints' / '30.orbax-checkpoint-tmp-1234567'
  (partial / 'params').mkdir(parents=True)
  (partial / 'params' / 'junk').write_bytes(b'\x00' * 10)
  log = []
  _train(tmp_path, 20, log=log)
  out = capsys.readouterr().out
  assert 'checkpoints/20 is unreadable' in out and 'Falling back to step 10' in out
  assert log == list(range(10, 20))  # resumed from 10 and retrained 10..19
  assert (tmp_path / 'checkpoints' / '20.unreadable' / 'params').is_dir()  # moved, not deleted


def test_restore_path_starts_from_another_runs_parameters(tmp_path):
  _train(tmp_path / 'pretrain', 5, checkpoint_every=5)
  _, pretrained = _latest_params(tmp_path / 'pretrain')
  sgd0 = optimizers.Optimizer(optax.sgd(0.0), optimizers.constant_schedule(0.0))
  _train(tmp_path / 'finetune', 1, optimizer=sgd0, checkpoint_every=1,
         restore_path=str(tmp_path / 'pretrain' / 'checkpoints'))
  step, finetuned = _latest_params(tmp_path / 'finetune')
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, finetuned, pretrained)  # lr 0: unchanged


def test_missing_restore_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    _train(tmp_path, 1, restore_path=str(tmp_path / 'nowhere'))


def test_sigterm_saves_the_current_step_and_the_run_resumes_exactly(tmp_path):
  """A preempted process (SIGTERM) saves where it is and exits cleanly; resuming from there
  ends with the parameters of an uninterrupted run."""
  child = subprocess.Popen(
      [sys.executable, '-m', 'tests.training.tiny_run', str(tmp_path / 'preempted'), '30', '0.1'],
      cwd=pathlib.Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  lines = []
  for line in child.stdout:
    lines.append(line)
    if line.startswith('step 5:'):
      child.send_signal(signal.SIGTERM)
      break
  rest, _ = child.communicate(timeout=120)
  lines.append(rest)
  output = ''.join(lines)
  assert child.returncode == 0, output
  match = re.search(r'SIGTERM: saved checkpoint (\d+) and stopped', output)
  assert match, output
  stopped = int(match.group(1))
  assert 5 <= stopped < 30
  assert checkpoints.Checkpointer(tmp_path / 'preempted' / 'checkpoints').steps()[-1] == stopped

  log = []
  _train(tmp_path / 'preempted', 30, log=log)
  assert log == list(range(stopped, 30))  # nothing lost, nothing repeated
  _train(tmp_path / 'straight', 30)
  _, resumed = _latest_params(tmp_path / 'preempted')
  _, straight = _latest_params(tmp_path / 'straight')
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_a_relative_model_dir_works(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _train('relative_run', 4, checkpoint_every=2)
  assert checkpoints.Checkpointer(tmp_path / 'relative_run' / 'checkpoints').steps() == [2, 4]
