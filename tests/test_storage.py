"""Run directories on cloud storage keep their URL (pathlib would turn gs://b into gs:/b)."""

from __future__ import annotations

import os
import pathlib

import pytest

from efficientlm import storage
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training import metrics as metrics_lib
from efficientlm.training import run_lock
from efficientlm.training import trainer
from tests.training import tiny_run


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  assert str(storage.as_path('gs://bucket/run') / 'checkpoints') == 'gs://bucket/run/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert str(storage.as_path('runs/a')) == os.path.join(str(tmp_path), 'runs', 'a')


def test_a_url_that_pathlib_folded_is_refused():
  with pytest.raises(ValueError, match='folded'):
    storage.as_path(pathlib.Path('gs://bucket/run'))


class _Reached(Exception):
  pass


def test_trainer_opens_checkpoints_and_event_files_under_the_gs_url(monkeypatch, tmp_path):
  """The trainer hands the run lock, Orbax, the gin config and TensorBoard gs:// paths (no bucket
  here: the lock's kvstore is a local directory, the rest are recorded; the run stops once the
  second event writer is made)."""
  opened, locks = [], []

  class Writer:

    def __init__(self, log_dir, enabled=None):
      opened.append(('events', str(log_dir)))
      if str(log_dir).endswith('eval'):
        raise _Reached

  class Checkpointer:

    def __init__(self, directory, *args):
      opened.append(('checkpoints', str(storage.as_path(directory))))

    def steps(self):
      return []

    def restore_latest(self, *args):
      return None

    def close(self):
      pass

  def kvstore_spec(url):
    locks.append(url)
    return {'driver': 'file', 'path': str(tmp_path) + '/'}

  monkeypatch.setattr(run_lock, '_kvstore_spec', kvstore_spec)
  monkeypatch.setattr(metrics_lib, 'MetricWriter', Writer)
  monkeypatch.setattr(ckpt_lib, 'Checkpointer', Checkpointer)
  monkeypatch.setattr(trainer, '_write_gin_config',
                      lambda model_dir, name, *_: opened.append(('gin', str(model_dir / name))))
  with pytest.raises(_Reached):
    tiny_run.train('gs://bucket/run', 1)
  assert opened == [('checkpoints', 'gs://bucket/run/checkpoints'),
                    ('gin', 'gs://bucket/run/config.gin'), ('events', 'gs://bucket/run/train'),
                    ('events', 'gs://bucket/run/eval'),
                    ('gin', 'gs://bucket/run/operative_config.gin')]
  assert locks == ['gs://bucket/run/']
  assert not (tmp_path / run_lock.LOCK_NAME).exists()  # taken, then released
