"""One writer per MODEL_DIR: an exclusive lock file held for the life of a run.

`MODEL_DIR/RUN_LOCK` is a JSON record (host, pid, start time, command, a random token, and a
heartbeat time a background thread refreshes every `refresh_s`). It is created exclusively:
O_CREAT | O_EXCL on a local disk, a write conditioned on the object's absence on Cloud Storage
(gs://, through tensorstore's kvstore: a generation-0 precondition), so of two processes
starting at once exactly one gets it; the other stops at once with a RunLockedError naming the
holder. A multi-host job is one run: only process 0 takes the lock.

A lock is stale, and taken over with a message, when its holder is on this host and its process
is gone, or when its heartbeat is older than `stale_after_s` (a host that died without
releasing it). `take_over=True` (python -m efficientlm.main --take_over_lock) takes over a lock
that looks alive, for a holder the user knows is dead. If a running holder finds its lock taken
over, it stops at its next step without saving (`RunLock.lost`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from etils import epath

from efficientlm import storage
from efficientlm.errors import RunError, RunLockedError

LOCK_NAME = 'RUN_LOCK'


def _now() -> float:
  return time.time()


def _iso(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M:%S UTC')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class _LocalFile:
  """Exclusive create / compare-and-replace on a local file."""

  def __init__(self, path: epath.Path):
    self.path = path

  def create(self, text: str) -> bool:
    self.path.parent.mkdir(parents=True, exist_ok=True)  # a new MODEL_DIR
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def read(self) -> str | None:
    try:
      return self.path.read_text()
    except FileNotFoundError:
      return None

  def replace(self, text: str) -> None:
    tmp = self.path.parent / f'.{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}'
    tmp.write_text(text)
    os.replace(tmp, self.path)

  def delete(self) -> None:
    with contextlib.suppress(FileNotFoundError):
      self.path.unlink()


def _kvstore_spec(url: str) -> str | dict:
  """The tensorstore kvstore holding `url`'s directory (tests point it at a local one)."""
  return url


class _KvStoreObject:
  """Exclusive create on object storage (gs://), through tensorstore, the library Orbax writes
  the checkpoints with: a write conditioned on the object not existing (on Cloud Storage,
  x-goog-if-generation-match: 0), which exactly one of two racing writers wins."""

  def __init__(self, path: epath.Path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    directory, _, self.key = str(path).rpartition('/')
    self.url = str(path)
    try:
      self.store = ts.KvStore.open(_kvstore_spec(directory + '/')).result()
    except Exception as e:  # pylint: disable=broad-except  (bad URL, no credentials)
      raise self._error(e) from e

  def _error(self, error: Exception) -> RunError:
    return RunError(f'Cannot use the run lock {self.url} ({type(error).__name__}: {error}). '
                    'Check that the bucket exists and that this machine may write to it.')

  def _call(self, operation, *args, **kwargs):
    try:
      return operation(*args, **kwargs).result()
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(e) from e

  def create(self, text: str) -> bool:
    missing = self._call(self.store.read, self.key)
    if missing.state != 'missing':
      return False
    # A failed condition is no error: it returns an empty generation.
    written = self._call(self.store.write, self.key, text.encode(),
                         if_equal=missing.stamp.generation)
    return bool(written.generation)

  def read(self) -> str | None:
    result = self._call(self.store.read, self.key)
    return result.value.decode() if result.state == 'value' else None

  def replace(self, text: str) -> None:
    self._call(self.store.write, self.key, text.encode())

  def delete(self) -> None:
    self._call(self.store.write, self.key, None)


class RunLock:
  """The lock on one MODEL_DIR (see the module docstring)."""

  def __init__(self, model_dir, refresh_s: float = 30.0, stale_after_s: float = 600.0,
               take_over: bool = False, purpose: str = 'train'):
    directory = storage.as_path(model_dir)
    self.path = directory / LOCK_NAME
    self.refresh_s, self.stale_after_s, self.take_over = refresh_s, stale_after_s, take_over
    self.purpose = purpose
    self.token = uuid.uuid4().hex
    self.lost = False
    self._file = (_KvStoreObject(self.path) if storage.is_url(directory) else
                  _LocalFile(self.path))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._started = _now()

  def _record(self) -> dict[str, Any]:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': self._started,
            'heartbeat': _now(), 'purpose': self.purpose, 'token': self.token,
            'command': ' '.join(sys.argv)[:500]}

  def holder(self) -> dict[str, Any] | None:
    text = self._file.read()
    if text is None:
      return None
    try:
      return json.loads(text)
    except ValueError:
      return {'damaged': text[:200]}

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    if 'damaged' in holder:
      return 'the lock file is damaged'
    if holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1))):
      return f'its process {holder.get("pid")} on this host is gone'
    age = _now() - float(holder.get('heartbeat', 0))
    if age > self.stale_after_s:
      return f'its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)'
    return None

  def describe(self, holder: dict[str, Any]) -> str:
    if 'damaged' in holder:
      return 'an unreadable lock record'
    return (f'host {holder.get("host")} pid {holder.get("pid")} ({holder.get("purpose")}), '
            f'started {_iso(float(holder.get("started", 0)))}, last heartbeat '
            f'{_now() - float(holder.get("heartbeat", 0)):.0f} s ago')

  def acquire(self) -> None:
    if self._file.create(json.dumps(self._record())):
      return self._start_heartbeat()
    holder = self.holder()
    if holder is None:  # released between our attempt and the read
      return self.acquire()
    reason = self._stale_reason(holder)
    if reason is None and not self.take_over:
      raise RunLockedError(
          f'{self.path.parent} is in use by another run: {self.describe(holder)}. Two runs '
          'writing one MODEL_DIR would corrupt it. Wait for that run to end, or use another '
          f'MODEL_DIR. If that process is gone (its host died), the lock goes stale '
          f'{self.stale_after_s / 60:.0f} min after its last heartbeat and the next run takes it '
          'over; to take it over now, run again with --take_over_lock.')
    from efficientlm.training.metrics import log  # pylint: disable=g-import-not-at-top
    log(f'Taking over the run lock {self.path} from {self.describe(holder)}: '
        f'{reason or "--take_over_lock"}.')
    self._file.replace(json.dumps(self._record()))
    return self._start_heartbeat()

  def verify(self) -> bool:
    """Whether this process still holds the lock (checked before every checkpoint save)."""
    if not self.lost:
      holder = self.holder()
      self.lost = holder is None or holder.get('token') != self.token
    return not self.lost

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name='efficientlm-run-lock', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.refresh_s):
      holder = self.holder()
      if holder is None or holder.get('token') != self.token:
        self.lost = True
        print(f'The run lock {self.path} was taken over by '
              f'{self.describe(holder) if holder else "nobody (it was deleted)"}; this run '
              'stops at its next step without saving.', file=sys.stderr, flush=True)
        return
      self._file.replace(json.dumps(self._record()))

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self.holder()
    if holder is not None and holder.get('token') == self.token:
      self._file.delete()


# The locks this process holds, by lock path: a run mode that calls the trainer takes it once.
_HELD: dict[str, RunLock] = {}


@contextlib.contextmanager
def hold(model_dir, enabled: bool = True, **kwargs):
  """Holds MODEL_DIR's lock for the block (reentrant within a process); yields the RunLock, or
  None when disabled (processes other than 0 of a multi-host job)."""
  if not enabled:
    yield None
    return
  key = str(storage.as_path(model_dir) / LOCK_NAME)
  if key in _HELD:
    yield _HELD[key]
    return
  lock = RunLock(model_dir, **kwargs)
  lock.acquire()
  _HELD[key] = lock
  try:
    yield lock
  finally:
    del _HELD[key]
    lock.release()
