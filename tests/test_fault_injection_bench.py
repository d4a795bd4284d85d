"""benchmarks/fault_injection.py: its books on hand-made faults (a damaged step the trainer reads
without a word, an intact one moved aside or deleted), its file damage, and its whole loop on a
tiny job: one SIGKILL during a save and two corruptions must end bit-identical, each corruption
detected or harmless, no checkpoint lost."""

from __future__ import annotations

import os
import pathlib
import random
import shutil

from benchmarks import fault_injection
from benchmarks.faults import corruption, independent, kills
from benchmarks.faults.ledger import Ledger, manifest
from efficientlm.training import metrics


def _step(checkpoints, step, content=b'x' * 100):
  path = checkpoints / str(step)
  (path / 'params').mkdir(parents=True)
  (path / 'params' / 'data').write_bytes(content)
  return path


def _run(resumed, unreadable=()):
  return {'resumed_from': resumed, 'start_step': resumed or 0, 'unreadable': list(unreadable)}


def _ledger(tmp_path, steps, keep=None):
  checkpoints = tmp_path / 'checkpoints'
  for s in steps:
    _step(checkpoints, s)
  ledger = Ledger(checkpoints, keep)
  ledger.after_run(1, _run(None))  # enters the steps
  return ledger, checkpoints


def _moved(checkpoints, step, reason='checksums'):
  target = checkpoints / f'{step}.unreadable'
  (checkpoints / str(step)).rename(target)
  return {'step_dir': str(checkpoints / str(step)), 'reason': reason, 'moved_to': str(target)}


def test_a_harmful_corruption_read_without_a_word_is_reported_as_undetected(tmp_path):
  ledger, _ = _ledger(tmp_path, [2, 4])
  ledger.add_corruption(ledger.live()[4], {'independent': {'verdict': 'differs'}})
  ledger.add_corruption(ledger.live()[2], {'independent': {'verdict': 'unreadable'}})
  ledger.after_run(2, _run(4))  # resumed from the damaged step 4
  assert [c['outcome'] for c in ledger.corruptions] == ['undetected and harmful', 'pending']
  ledger.never_read()
  assert ledger.corruptions[1]['outcome'] == 'never read'  # step 2 was never tried


def test_detected_harmless_and_false_alarms_are_told_apart(tmp_path):
  ledger, checkpoints = _ledger(tmp_path, [2, 4, 6])
  ledger.add_corruption(ledger.live()[6], {'independent': {'verdict': 'differs'}})
  ledger.add_corruption(ledger.live()[2], {'independent': {'verdict': 'same'}})
  # The run moves 6 (damaged) and 4 (intact: a false alarm) aside and resumes from 2.
  ledger.after_run(2, _run(2, [_moved(checkpoints, 6), _moved(checkpoints, 4)]))
  assert [c['outcome'] for c in ledger.corruptions] == ['detected', 'harmless']
  assert [a['step'] for a in ledger.false_alarms] == [4]
  assert [(x['step'], x['how']) for x in ledger.lost] == [(4, 'moved aside')]
  assert not ledger.unexplained


def test_a_deleted_or_changed_intact_step_is_a_loss_unless_the_keep_policy_removed_it(tmp_path):
  ledger, checkpoints = _ledger(tmp_path, [2, 4, 6])
  (checkpoints / '4' / 'params' / 'data').write_bytes(b'y' * 100)
  shutil.rmtree(checkpoints / '2')
  ledger.after_run(2, _run(6))
  assert [(x['step'], x['how']) for x in ledger.lost] == [(2, 'deleted')]
  assert [m['step'] for m in ledger.modified] == [4]
  kept, kept_dir = _ledger(tmp_path / 'kept', [2, 4, 6], keep=2)
  shutil.rmtree(kept_dir / '2')  # two newer steps exist
  kept.after_run(2, _run(6))
  assert not kept.lost and kept.instances[0].fate == 'removed by keep policy'


def test_a_step_skipped_without_being_moved_aside_is_unexplained(tmp_path):
  ledger, _ = _ledger(tmp_path, [2, 4])
  ledger.after_run(2, _run(2))  # 4 is newer, yet neither read nor moved
  assert 'steps [4] skipped' in ledger.unexplained[0]['what']


def test_damage_changes_only_what_it_records(tmp_path):
  rng = random.Random(3)
  original = bytes(range(256)) * 8
  flips = truncations = 0
  for i in range(40):
    path = tmp_path / f'f{i}'
    path.write_bytes(original)
    what = corruption.damage(path, rng)
    data = path.read_bytes()
    if what['op'] == 'flip':
      flips += 1
      start, end = what['offset'], what['offset'] + what['count']
      assert 1 <= what['count'] <= 64 and len(data) == len(original)
      assert data[:start] == original[:start] and data[end:] == original[end:]
      assert bytes(a ^ b for a, b in zip(data[start:end], original[start:end])) == bytes.fromhex(
          what['xor_masks'])
      assert all(data[start:end][j] != original[start + j] for j in range(what['count']))
    else:
      truncations += 1
      assert data == original[:what['new_size']] and what['new_size'] < len(original)
  assert flips and truncations


def test_every_kind_of_checkpoint_file_is_named():
  names = {
      'params/ocdbt.process_0/d/0a1b': 'array data (per-process OCDBT files)',
      'opt_state/d/9f': 'OCDBT index', 'params/manifest.ocdbt': 'OCDBT index',
      'params/ocdbt.process_0/manifest.ocdbt': 'OCDBT index',
      'params/_METADATA': 'Orbax metadata', '_CHECKPOINT_METADATA': 'Orbax metadata',
      'opt_state/array_metadatas/process_0': 'Orbax metadata', 'meta/metadata': 'meta record',
      'dataset/process_0/iterator.index': 'data iterator',
      'dataset/SHA256SUMS.process_0.json': 'data iterator',
      'params/commit_success.txt': 'commit marker'}
  assert {n: corruption.kind_of(pathlib.Path(n)) for n in names} == names


def _orbax_item(path, seed):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tree = {'kernel': jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
          'scale': jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / 'params', tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def test_the_independent_read_judges_damage_against_the_pristine_copy(tmp_path):
  _orbax_item(tmp_path / 'intact', 0)
  template = independent.read_arrays(tmp_path / 'intact' / 'params')
  for name in ('pristine', 'damaged', 'other'):
    _orbax_item(tmp_path / name, 1)
  # An earlier corruption the trainer's restore never reads (it restores onto its own shardings)
  # left the pristine copy's _sharding unparsable: the copy is still the reference.
  for name in ('pristine', 'damaged'):
    (tmp_path / name / 'params' / '_sharding').write_text('{not json')
  assert independent.compare_item(tmp_path / 'pristine', tmp_path / 'damaged', 'params',
                                  template)['verdict'] == 'same'
  data = max((p for p in (tmp_path / 'damaged' / 'params').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)
  damage = bytearray(data.read_bytes())
  damage[len(damage) // 2] ^= 0x40
  data.write_bytes(bytes(damage))
  assert independent.compare_item(tmp_path / 'pristine', tmp_path / 'damaged', 'params',
                                  template)['verdict'] == 'differs'
  assert independent.compare_item(tmp_path / 'pristine', tmp_path / 'damaged', None,
                                  template)['verdict'] == 'same'  # a file outside the items


def test_runs_are_compared_by_their_metrics_without_timings():
  line = metrics.train_line(7, {'loss': 4.132, 'accuracy': 0.0107, 'step_time_s': 0.1845,
                                 'tokens_per_s': 17000.9, 'mfu': 0.41}, '7/20 35% ETA 0m02s')
  assert kills.metrics_text(line) == 'loss 4.1320 accuracy 0.0107'
  slower = metrics.train_line(7, {'loss': 4.132, 'accuracy': 0.0107, 'step_time_s': 0.3,
                                  'tokens_per_s': 9000.0, 'mfu': 0.2}, '7/20 35% ETA 0m05s')
  assert kills.metrics_text(slower) == kills.metrics_text(line)


def test_the_benchmark_on_a_tiny_job_ends_bit_identical_with_every_corruption_accounted_for(
    tmp_path):
  # The job runs as `make train` does, on one CPU device (not the 8 the test process emulates).
  env = dict(os.environ, XLA_FLAGS=' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')))
  config = fault_injection.Config(
      steps=8, checkpoint_every=2, kills=1, corruptions=2, seed=0,
      model_dir=str(tmp_path / 'faults'), kill_kinds=('sigkill_save',),
      gin_bindings=('BATCH_SIZE = 8', 'trainer.train.eval_dataset = None'),
      # The reference before the faulty runs (the benchmark's default), not beside the first: the
      # faulty runs then load its programs from the persistent compilation cache instead of two
      # runs compiling them at once on two busy cores (52 s -> 42 s here).
      parallel_reference=False, run_timeout_s=300,
      save_kill_delay_s=0.1)  # within the 0.2-1 s a save takes here, so the kill lands in it
  results = fault_injection.Benchmark(config, env=env, say=lambda *_: None).run()
  summary = results['summary']
  assert summary['kills_sent']['sigkill_save'] == 1 and summary['restarts'] >= 1, summary
  assert summary['bit_identical'] and summary['arrays_compared'] > 20, summary
  assert summary['corruptions_injected'] == 2, summary
  assert summary['corruptions_detected'] + summary['corruptions_harmless_not_read'] == 2, summary
  assert summary['good_checkpoints_lost'] == 0 and summary['false_alarms'] == 0, summary
  assert not summary['unexplained'] and summary['unexpected_exits'] == 0, summary
  assert summary['goal_met'], summary
  for c in results['corruptions']:  # the pristine copy kept outside the run directory
    assert manifest(tmp_path / 'faults' / c['pristine_copy'])
