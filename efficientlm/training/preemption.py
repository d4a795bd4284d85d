"""Stopping a run cleanly on SIGTERM (TPU preemption, `kill`), from the first moment of start-up.

One process: a Python SIGTERM handler sets a flag; the trainer checks it between start-up phases
(a signal before the first step stops the run with nothing to save, exit status 0) and after
every step (it saves that step and returns). `python -m efficientlm.main` installs the handler
before it parses gin or builds anything, so a signal during imports or compilation is not lost.

Several processes: each may get the signal at a different step, so the flag alone would stop
them at different steps (and the collective checkpoint would hang). jax.distributed's preemption
sync manager catches SIGTERM itself and `reached_preemption_sync_point` turns true on every
process at the same step; a Python handler would replace its signal handler, so none is
installed then.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax


class StopRequest:
  """The process-wide flag the handler sets."""

  requested = False


def _handle(signum, frame):
  del signum, frame
  StopRequest.requested = True


def install() -> bool:
  """Installs the SIGTERM handler (single-process runs, main thread); True if it did."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    return False
  signal.signal(signal.SIGTERM, _handle)
  return True


class PreemptionWatcher(contextlib.AbstractContextManager):
  """Installs the handler for the block if nobody has, and answers whether to stop."""

  def __init__(self):
    self._previous = None

  def __enter__(self):
    if signal.getsignal(signal.SIGTERM) is not _handle:
      previous = signal.getsignal(signal.SIGTERM)
      if install():
        self._previous = previous
    return self

  @property
  def requested(self) -> bool:
    """A stop was requested (this process's flag; for start-up, before any collective step)."""
    return StopRequest.requested

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return StopRequest.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    StopRequest.requested = False
    return False
