"""Start-up flags of a multi-process run (the two-process runs are in tests/training)."""

from __future__ import annotations

import jax
import pytest

from efficientlm import distributed, main


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining a cluster."""
  seen = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: seen.append(args))
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)  # the backend already started
  return seen


def test_one_process_joins_nothing(calls):
  assert distributed.initialize() is False and calls == []


def test_auto_detection_passes_no_cluster(calls):
  """--distributed: jax finds the coordinator (TPU VM metadata, SLURM, ...)."""
  args = main.parse_flags(['--gin_file=runs/recall_tiny.gin', '--distributed'])
  assert distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                                args.process_id) is True
  assert calls == [(None, None, None)]


def test_explicit_cluster(calls):
  args = main.parse_flags(['--gin_file=x.gin', '--coordinator_address=localhost:1234',
                           '--num_processes=2', '--process_id=1'])
  distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                         args.process_id)
  assert calls == [('localhost:1234', 2, 1)]


@pytest.mark.parametrize('kwargs,message', [
    (dict(coordinator_address='localhost:1234', num_processes=2), 'together'),
    (dict(auto=True, coordinator_address='h:1', num_processes=2, process_id=0), 'not both'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), r'must be in \[0, 2\)'),
])
def test_bad_clusters_are_refused_before_joining(calls, kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)
  assert calls == []
