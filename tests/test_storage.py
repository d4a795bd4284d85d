"""Run directories on cloud storage keep their URL (pathlib would turn gs://b into gs:/b)."""

from __future__ import annotations

import os
import pathlib

import pytest

from efficientlm import storage
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training import metrics as metrics_lib
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


def test_trainer_opens_checkpoints_and_event_files_under_the_gs_url(monkeypatch):
  """The trainer hands Orbax and TensorBoard gs:// paths (no bucket here: it stops at the
  checkpointer, after both metric writers are made)."""
  logs, checkpoints = [], []

  class Writer:

    def __init__(self, log_dir, enabled=None):
      logs.append(str(log_dir))

  def checkpointer(directory, *args):
    checkpoints.append(str(storage.as_path(directory)))
    raise _Reached

  monkeypatch.setattr(metrics_lib, 'MetricWriter', Writer)
  monkeypatch.setattr(ckpt_lib, 'Checkpointer', checkpointer)
  with pytest.raises(_Reached):
    tiny_run.train('gs://bucket/run', 1)
  assert logs == ['gs://bucket/run/train', 'gs://bucket/run/eval']
  assert checkpoints == ['gs://bucket/run/checkpoints']
