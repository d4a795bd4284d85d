"""Stopping a run cleanly on SIGTERM (TPU preemption, `kill`) or Ctrl-C, from the first moment of
start-up.

One process: a Python handler sets a flag; the trainer checks it between start-up phases (a
signal before the first step stops the run with nothing to save, exit status 0) and after every
step (it saves that step and returns). Ctrl-C (SIGINT) is the same request; a second Ctrl-C
stops at once (KeyboardInterrupt), without saving. `python -m efficientlm.main` enters
`handling()` before it parses gin or builds anything, so a signal during the data pipeline or
compilation is not lost; the previous handlers come back when the run ends, so a process that
runs several things (a test worker) keeps its own Ctrl-C.

Several processes: each may get the signal at a different step, so the flag alone would stop
them at different steps (and the collective checkpoint would hang). jax.distributed's preemption
sync manager catches SIGTERM itself and `reached_preemption_sync_point` turns true on every
process at the same step; a Python handler would replace its signal handler, so none is
installed then (Ctrl-C keeps Python's default there).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import jax


class StopRequest:
  """The process-wide flag the handlers set, and which signal set it."""

  requested = False
  by: str | None = None


def _handle_term(signum, frame):
  del signum, frame
  StopRequest.requested, StopRequest.by = True, StopRequest.by or 'SIGTERM'


def _handle_int(signum, frame):
  if StopRequest.requested:  # the second Ctrl-C: stop now
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.default_int_handler(signum, frame)
  StopRequest.requested, StopRequest.by = True, 'Ctrl-C'
  print('\nCtrl-C: the run saves a checkpoint after this step and stops (Ctrl-C again stops at '
        'once, without saving).', file=sys.stderr, flush=True)


_HANDLERS = {signal.SIGTERM: _handle_term, signal.SIGINT: _handle_int}


@contextlib.contextmanager
def handling():
  """Installs the handlers for the block (single-process runs, main thread; reentrant) and
  restores the previous ones and clears the flag afterwards."""
  installed = (jax.process_count() == 1 and
               threading.current_thread() is threading.main_thread() and
               signal.getsignal(signal.SIGTERM) is not _handle_term)
  previous = {}
  if installed:
    for signum, handler in _HANDLERS.items():
      previous[signum] = signal.signal(signum, handler)
  try:
    yield
  finally:
    if installed:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
      StopRequest.requested, StopRequest.by = False, None


class PreemptionWatcher(contextlib.AbstractContextManager):
  """The trainer's view: the handlers for the run, and whether to stop."""

  def __init__(self):
    self._handling = handling()

  def __enter__(self):
    self._handling.__enter__()
    return self

  @property
  def requested(self) -> bool:
    """A stop was requested (this process's flag; for start-up, before any collective step)."""
    return StopRequest.requested

  @property
  def signal_name(self) -> str:
    return StopRequest.by or 'SIGTERM'

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return StopRequest.requested

  def __exit__(self, *exc):
    return self._handling.__exit__(*exc)
