"""MODEL_DIR's run lock on a local disk and on object storage: exclusive, stale after its holder dies, taken over on
request, lost by a holder whose lock was taken over. (Two real training processes on one MODEL_DIR
are in test_run_safety.py.)"""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from efficientlm.errors import RunLockedError
from efficientlm.training import run_lock


def _write_lock(directory, **fields):
  record = {'host': socket.gethostname(), 'pid': 1, 'started': time.time(),
            'heartbeat': time.time(), 'purpose': 'train', 'token': 'theirs', 'command': 'x'}
  record.update(fields)
  (directory / run_lock.LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def _holder(directory):
  return json.loads((directory / run_lock.LOCK_NAME).read_text())


def test_one_holder_at_a_time_and_released_on_exit(tmp_path):
  with run_lock.hold(tmp_path) as lock:
    assert _holder(tmp_path)['token'] == lock.token
    with run_lock.hold(tmp_path) as again:  # reentrant in one process (main, then the trainer)
      assert again is lock
    other = run_lock.RunLock(tmp_path)
    with pytest.raises(RunLockedError) as info:
      other.acquire()
    message = str(info.value)
    assert f'{tmp_path} is in use by another run' in message
    assert f'host {socket.gethostname()} pid ' in message and '--take_over_lock' in message
  assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, capsys):
  _write_lock(tmp_path, pid=_dead_pid())
  with run_lock.hold(tmp_path) as lock:
    assert _holder(tmp_path)['token'] == lock.token
  assert 'on this host is gone' in capsys.readouterr().out


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh(tmp_path, capsys):
  _write_lock(tmp_path, host='tpu-worker-7', pid=4242)
  with pytest.raises(RunLockedError, match='host tpu-worker-7 pid 4242'):
    run_lock.RunLock(tmp_path).acquire()
  assert _holder(tmp_path)['token'] == 'theirs'  # untouched
  _write_lock(tmp_path, host='tpu-worker-7', pid=4242, heartbeat=time.time() - 3600)
  with run_lock.hold(tmp_path, stale_after_s=600) as lock:
    assert _holder(tmp_path)['token'] == lock.token
  assert "heartbeat is 3600 s old" in capsys.readouterr().out


def test_take_over_a_live_looking_lock_on_request(tmp_path):
  _write_lock(tmp_path, host='tpu-worker-7', pid=4242)
  with run_lock.hold(tmp_path, take_over=True) as lock:
    assert _holder(tmp_path)['token'] == lock.token


def test_a_holder_whose_lock_was_taken_over_knows_and_leaves_it_alone(tmp_path):
  first = run_lock.RunLock(tmp_path, refresh_s=0.05)
  first.acquire()
  heartbeat = _holder(tmp_path)['heartbeat']
  time.sleep(0.3)
  assert _holder(tmp_path)['heartbeat'] > heartbeat  # refreshed while alive
  second = run_lock.RunLock(tmp_path, take_over=True)
  second.acquire()
  assert not first.verify()
  first.release()  # must not delete the new holder's lock
  assert _holder(tmp_path)['token'] == second.token
  second.release()
  assert not (tmp_path / run_lock.LOCK_NAME).exists()


# --- the same rules on object storage (gs://), through tensorstore's kvstore ---------------------


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/run backed by tensorstore's file driver: the lock's own code, every call it makes
  to the kvstore included; only the driver under it differs from Cloud Storage's."""
  root = tmp_path / 'bucket'
  monkeypatch.setattr(run_lock, '_kvstore_spec',
                      lambda url: {'driver': 'file', 'path': str(root) + '/' +
                                   url[len('gs://bucket/'):]})
  return root


def test_object_storage_one_holder_at_a_time_and_released_on_exit(bucket):
  with run_lock.hold('gs://bucket/run') as lock:
    assert _holder(bucket / 'run')['token'] == lock.token
    with pytest.raises(RunLockedError, match='gs://bucket/run is in use by another run'):
      run_lock.RunLock('gs://bucket/run').acquire()
    assert lock.verify()
  assert not (bucket / 'run' / run_lock.LOCK_NAME).exists()


def test_object_storage_stale_and_taken_over_locks(bucket, capsys):
  (bucket / 'run').mkdir(parents=True)
  _write_lock(bucket / 'run', host='tpu-worker-7', pid=4242, heartbeat=time.time() - 3600)
  with run_lock.hold('gs://bucket/run') as lock:
    assert 'its heartbeat is 3600 s old' in capsys.readouterr().out
    _write_lock(bucket / 'run', host='tpu-worker-7', pid=4242)  # taken over behind its back
    assert not lock.verify()
  assert _holder(bucket / 'run')['token'] == 'theirs'  # the new holder's lock is left alone


def test_object_storage_exactly_one_of_racing_creators_wins(bucket):
  """The create is one conditional write: of 8 threads with their own stores, one wins."""
  (bucket / 'run').mkdir(parents=True)
  for attempt in range(5):
    objects = [run_lock._KvStoreObject(  # pylint: disable=protected-access
        run_lock.storage.as_path(f'gs://bucket/run/LOCK{attempt}')) for _ in range(8)]
    barrier = threading.Barrier(len(objects))
    won = []

    def create(obj, i):
      barrier.wait()
      if obj.create(f'holder {i}'):
        won.append(i)

    threads = [threading.Thread(target=create, args=(obj, i)) for i, obj in enumerate(objects)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    assert len(won) == 1, won
    assert (bucket / 'run' / f'LOCK{attempt}').read_text() == f'holder {won[0]}'


def test_object_storage_that_cannot_be_reached_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(run_lock, '_kvstore_spec', lambda url: {'driver': 'no-such-driver'})
  with pytest.raises(run_lock.RunError, match='Cannot use the run lock gs://bucket/run/RUN_LOCK'):
    run_lock.RunLock('gs://bucket/run')
