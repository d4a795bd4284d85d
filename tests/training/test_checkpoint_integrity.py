"""The Checkpointer on real faults in real Orbax files: damage is detected, moved aside and the
previous step used; a checkpoint of another configuration stops with both shapes named; storage
errors are retried, never taken for damage. Small trees, no training (the trainer-level cases are
in test_run_safety.py)."""

import errno
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from efficientlm.errors import CheckpointMismatchError, CheckpointReadError
from efficientlm.training import checkpoints, integrity

MESH = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))


def _sharded(x, spec):
  return jax.device_put(x, jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec(*spec)))


def _state(seed, rows=256):
  """Arrays big enough that Orbax stores them in data files, not inline in its b-tree."""
  rng = np.random.default_rng(seed)
  params = {'dense': {'kernel': _sharded(rng.normal(size=(rows, 64)).astype(np.float32),
                                         ('data', 'model'))},
            'bias': _sharded(rng.normal(size=(64,)).astype(np.float32), (None,)),
            'embed': _sharded(rng.normal(size=(rows, 32)).astype(jnp.bfloat16), ('model', None))}
  opt_state = {'mu': jax.tree.map(lambda x: x * 0.5, params), 'count': jnp.int32(seed)}
  return params, opt_state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save(directory, steps, **kwargs):
  ckpt = checkpoints.Checkpointer(directory, keep=None, async_save=False)
  for step in steps:
    params, opt_state = _state(step, **kwargs)
    ckpt.save(step, params, opt_state, wait=True)
  ckpt.close()


def _restore(directory, **kwargs):
  params, opt_state = _state(0, **kwargs)
  ckpt = checkpoints.Checkpointer(directory, keep=None, read_retries=2)
  try:
    return ckpt.restore_latest(_abstract(params), _abstract(opt_state))
  finally:
    ckpt.close()


def _assert_equal_trees(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path, offset: int, count: int = 64) -> None:
  data = bytearray(path.read_bytes())
  for i in range(offset, offset + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*'))
          if p.is_file()}


def test_checksum_is_independent_of_sharding_and_sensitive_to_every_value():
  params, _ = _state(1)
  table, finite = integrity.describe(params)
  assert finite
  # The same values on one device, and on a different mesh layout, give the same checksums.
  local, _ = integrity.describe(jax.device_get(params))
  moved, _ = integrity.describe(jax.tree.map(lambda x: _sharded(np.asarray(x), (None,) * x.ndim),
                                             params))
  assert local == table == moved
  # One changed bit, or two swapped values, change it.
  kernel = np.asarray(params['dense']['kernel'])
  flipped = kernel.view(np.uint32).copy()
  flipped[100, 3] ^= 1
  swapped = kernel.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for changed in (flipped.view(np.float32), swapped):
    other, _ = integrity.describe({**params, 'dense': {'kernel': changed}})
    assert other['dense/kernel']['checksum'] != table['dense/kernel']['checksum']
    assert other['bias'] == table['bias']
  _, finite = integrity.describe({'x': np.array([1.0, np.nan], np.float32)})
  assert not finite


def test_flipped_data_bytes_restore_silently_in_orbax_but_are_detected(tmp_path):
  _save(tmp_path, [1, 2])
  data_file = _largest_file(tmp_path / '2' / 'params')
  _flip(data_file, data_file.stat().st_size // 2)
  damaged = _snapshot(tmp_path / '2')
  # The fault is real and silent without our checksums: Orbax restores changed values.
  plain = ocp.PyTreeCheckpointer().restore(tmp_path / '2' / 'params')
  expected, _ = _state(2)
  assert any(not np.array_equal(np.asarray(plain[k]['kernel'] if k == 'dense' else plain[k]),
                                np.asarray(expected[k]['kernel'] if k == 'dense' else expected[k]))
             for k in ('dense', 'embed', 'bias'))

  restored = _restore(tmp_path)
  assert restored.step == 1
  params, opt_state = _state(1)
  _assert_equal_trees(restored.params, params)
  _assert_equal_trees(restored.opt_state, opt_state)
  # Kept byte for byte under another name, never listed again; step 2 can be written anew.
  assert _snapshot(tmp_path / '2.unreadable') == damaged
  assert not (tmp_path / '2').exists()
  _save(tmp_path, [2])
  assert _restore(tmp_path).step == 2


@pytest.mark.parametrize('damage', ['truncate_data', 'delete_opt_state', 'meta_bytes',
                                    'orbax_metadata', 'meta_checksum_digit'])
def test_damaged_checkpoints_fall_back_to_the_previous_step(tmp_path, capsys, damage):
  _save(tmp_path, [1, 2])
  step_dir = tmp_path / '2'
  if damage == 'truncate_data':
    data_file = _largest_file(step_dir / 'opt_state')
    data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 3])
  elif damage == 'delete_opt_state':  # a training checkpoint that lost part of its state
    for p in sorted((step_dir / 'opt_state').rglob('*'), reverse=True):
      p.unlink() if p.is_file() else p.rmdir()
    (step_dir / 'opt_state').rmdir()
  elif damage == 'meta_bytes':
    _flip(step_dir / 'meta' / 'metadata', 10, 4)
  elif damage == 'orbax_metadata':
    _flip(step_dir / 'params' / '_METADATA', 50, 8)
  elif damage == 'meta_checksum_digit':  # valid JSON, one recorded checksum changed
    record = json.loads((step_dir / 'meta' / 'metadata').read_text())
    entry = record['arrays']['params/bias']
    entry['checksum'] = ('0' if entry['checksum'][0] != '0' else '1') + entry['checksum'][1:]
    (step_dir / 'meta' / 'metadata').write_text(json.dumps(record))
  restored = _restore(tmp_path)
  assert restored is not None and restored.step == 1
  assert restored.opt_state is not None
  out = capsys.readouterr().out
  assert f'{step_dir} is unreadable' in out and 'Falling back to step 1' in out
  assert (tmp_path / '2.unreadable').is_dir()


def test_non_finite_values_are_never_the_last_good_checkpoint(tmp_path, capsys):
  _save(tmp_path, [1])
  params, opt_state = _state(2)
  params['bias'] = params['bias'].at[3].set(jnp.nan)  # consistent checksums, NaN content
  ckpt = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False)
  ckpt.save(2, params, opt_state, wait=True)
  ckpt.close()
  assert _restore(tmp_path).step == 1
  assert 'non-finite' in capsys.readouterr().out


def test_a_parameters_only_checkpoint_restores_without_optimizer_state(tmp_path):
  params, _ = _state(3)
  ckpt = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False)
  ckpt.save(3, params, meta={'upcycled_from': 'dense'}, wait=True)
  ckpt.close()
  record = json.loads((tmp_path / '3' / 'meta' / 'metadata').read_text())
  assert record['kind'] == 'parameters' and record['items'] == ['params']
  restored = _restore(tmp_path)
  assert restored.step == 3 and restored.opt_state is None
  _assert_equal_trees(restored.params, params)


def test_another_configuration_stops_naming_the_arrays_and_changes_nothing(tmp_path):
  _save(tmp_path, [1, 2])
  before = _snapshot(tmp_path)
  with pytest.raises(CheckpointMismatchError) as info:
    _restore(tmp_path, rows=128)
  message = str(info.value)
  assert 'params/dense/kernel: the model has float32[128, 64], the checkpoint float32[256, 64]' \
      in message
  assert 'params/embed: the model has bfloat16[128, 32]' in message
  assert 'more (optimizer state included)' in message and 'new MODEL_DIR' in message
  assert 'RESTORE_PATH' in message
  assert _snapshot(tmp_path) == before  # nothing moved, renamed or written


def test_checkpoints_written_before_the_integrity_record_still_restore(tmp_path):
  """Format 1 (meta without kind, items or checksums): shapes checked from Orbax's metadata."""
  _save(tmp_path, [1])
  meta = tmp_path / '1' / 'meta' / 'metadata'
  meta.write_text(json.dumps({'step': 1, 'process_count': 1}))
  restored = _restore(tmp_path)
  assert restored.step == 1 and restored.opt_state is not None
  with pytest.raises(CheckpointMismatchError, match=r'float32\[128, 64\]'):
    _restore(tmp_path, rows=128)


def test_storage_errors_are_retried_and_then_stop_without_moving_anything(tmp_path, monkeypatch):
  _save(tmp_path, [1, 2])
  before = _snapshot(tmp_path)
  delays = []
  monkeypatch.setattr(checkpoints.time, 'sleep', delays.append)
  real_restore = ocp.CheckpointManager.restore
  failures = {'left': 2}

  def flaky(self, *args, **kwargs):
    if failures['left'] > 0:
      failures['left'] -= 1
      raise OSError(errno.ETIMEDOUT, 'Connection timed out')
    return real_restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky)
  assert _restore(tmp_path).step == 2  # two timeouts, then it reads
  assert delays == [1.0, 2.0]

  failures['left'] = 100
  with pytest.raises(CheckpointReadError, match='nothing was skipped or moved'):
    _restore(tmp_path)
  assert _snapshot(tmp_path) == before
  # A tensorstore status that is the storage's, not the data's, counts as a storage error.
  assert checkpoints.is_storage_error(ValueError('UNAVAILABLE: GCS returned 503'))
  assert not checkpoints.is_storage_error(ValueError('DATA_LOSS: Error decoding manifest'))
  assert not checkpoints.is_storage_error(FileNotFoundError(errno.ENOENT, 'gone'))


def test_data_position_files_are_checksummed(tmp_path, capsys):
  class Position:
    def __init__(self, value=0):
      self.value = value

    def save(self, directory):
      pathlib.Path(directory, 'position.json').write_text(json.dumps(self.value))

    def restore(self, directory):
      self.value = json.loads(pathlib.Path(directory, 'position.json').read_text())

  ckpt = checkpoints.Checkpointer(tmp_path, keep=None, async_save=False)
  for step in (1, 2):
    params, opt_state = _state(step)
    ckpt.save(step, params, opt_state, Position(step * 10), wait=True)
  ckpt.close()
  (tmp_path / '2' / 'dataset' / 'position.json').write_text('21')  # one digit changed
  params, opt_state = _state(0)
  position = Position()
  ckpt = checkpoints.Checkpointer(tmp_path, keep=None)
  restored = ckpt.restore_latest(_abstract(params), _abstract(opt_state), position)
  ckpt.close()
  assert restored.step == 1 and position.value == 10
  assert 'does not match its checksum' in capsys.readouterr().out


def test_with_several_processes_an_iterator_must_write_under_its_process_directory(
    tmp_path, monkeypatch):
  """The processes of a job share the `dataset` directory: a position file outside process_<i>/
  would be written and hashed by several of them at once (a race that once made a checkpoint
  look damaged to one process only), so saving it is refused."""
  class SharedFile:
    def save(self, directory):
      pathlib.Path(directory, 'position.json').write_text('0')

  class OwnDirectory:
    def save(self, directory):
      pathlib.Path(directory, 'process_1').mkdir()
      pathlib.Path(directory, 'process_1', 'position.json').write_text('0')

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  handler = checkpoints.DataIteratorHandler()
  (tmp_path / 'a').mkdir()
  with pytest.raises(ValueError, match='must write its position under process_<its index>/'):
    handler.save(epath.Path(tmp_path / 'a'), checkpoints.DataIteratorSave(SharedFile()))
  (tmp_path / 'b').mkdir()
  handler.save(epath.Path(tmp_path / 'b'), checkpoints.DataIteratorSave(OwnDirectory()))
  sums = json.loads((tmp_path / 'b' / 'SHA256SUMS.process_1.json').read_text())
  assert list(sums) == ['process_1/position.json']


def test_eval_and_restore_path_refuse_damaged_values(tmp_path):
  """Readers of our checkpoints outside training (eval, infer, convert, RESTORE_PATH) verify the
  recorded checksums too, and name the step to use instead."""
  from efficientlm.checkpoints.load import load_params  # pylint: disable=g-import-not-at-top
  from efficientlm.errors import CheckpointDamagedError  # pylint: disable=g-import-not-at-top
  _save(tmp_path, [1, 2])
  params, _ = _state(0)
  step, loaded, _ = load_params(str(tmp_path), _abstract(params))
  assert step == 2
  _assert_equal_trees(loaded, _state(2)[0])
  data_file = _largest_file(tmp_path / '2' / 'params')
  _flip(data_file, data_file.stat().st_size // 2)
  with pytest.raises(CheckpointDamagedError,
                     match=rf'Checkpoint {tmp_path}/2 is damaged.*Use the step before it: '
                           rf'{tmp_path}/1'):
    load_params(str(tmp_path), _abstract(params))
  step, loaded, _ = load_params(str(tmp_path / '1'), _abstract(params))
  _assert_equal_trees(loaded, _state(1)[0])
