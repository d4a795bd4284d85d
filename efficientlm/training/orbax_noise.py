"""What Orbax and tensorstore print when a checkpoint save or restore fails, reduced to one line
each: the Checkpointer reports the failure itself, once, with the path and what to do.

Two sources, measured on a save that hit the file-size limit (1,762 lines of stderr before this):
- tensorstore completes its futures after Orbax has given up on the operation and closed its
  event loop; each completion's `loop.call_soon_threadsafe` raises "Event loop is closed" and is
  printed as an unraisable exception (100-230 tracebacks). Those, and only those, are dropped.
- Orbax's background threads log the error with its traceback (absl logger, one record per
  thread that saw it: 4 to 9 on a 2 MB tmpfs, more under load). Within one save or restore the
  first record stays, without its traceback (the error's text is in the record and in our
  message); the repeats are dropped (and counted).
- On a full disk (measured on a 2 MB tmpfs), Orbax's abandoned write tasks and gathering futures
  are garbage-collected as the interpreter shuts down: asyncio logs "Task exception was never
  retrieved" (or "_GatheringFuture exception ...") for each (14 records with tracebacks), and
  their coroutines fail to import what their cleanup needs (8 unraisable tracebacks). Both are
  dropped: they repeat the error the save already reported.
"""

from __future__ import annotations

import logging
import sys

_installed = False


def _is_orbax_leftover(unraisable) -> bool:
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and '/orbax/' in code.co_filename.replace('\\', '/')


def _is_closed_loop_callback(unraisable) -> bool:
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    return False
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is None or tb.tb_frame.f_code.co_filename.endswith(('asyncio/base_events.py',
                                                                 'asyncio\\base_events.py'))


class _OrbaxErrors(logging.Filter):
  """Strips the tracebacks of Orbax's records; keeps the first error of an operation only."""

  def __init__(self):
    super().__init__()
    self.shown = False
    self.dropped = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' not in record.pathname:
      return True
    if record.exc_info:
      if record.exc_info[0]:
        record.msg = f'{record.msg} ({record.exc_info[0].__name__})'
      record.exc_info, record.exc_text = None, None
    if record.levelno < logging.ERROR:
      return True
    if self.shown:
      self.dropped += 1
      return False
    self.shown = True
    return True


def _through_orbax(exc_info) -> bool:
  tb = exc_info[2] if exc_info and len(exc_info) == 3 else None
  while tb is not None:
    if '/orbax/' in tb.tb_frame.f_code.co_filename.replace('\\', '/'):
      return True
    tb = tb.tb_next
  return False


class _DropOrbaxLeftoverTasks(logging.Filter):
  """asyncio's "... exception was never retrieved" for a task or future of an Orbax save."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if 'exception was never retrieved' not in message.split('\n', 1)[0]:
      return True
    orbax = ('/orbax/' in str(getattr(record, 'future', '')) + message or
             '.orbax-checkpoint-tmp' in message or _through_orbax(record.exc_info))
    return not orbax


_errors = _OrbaxErrors()


def new_operation() -> None:
  """A save or restore begins: its first Orbax error is shown again."""
  _errors.shown = False


def install() -> None:
  """Idempotent; called by every Checkpointer."""
  global _installed
  if _installed:
    return
  _installed = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (_is_closed_loop_callback(unraisable) or _is_orbax_leftover(unraisable)):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('absl').addFilter(_errors)
  logging.getLogger('asyncio').addFilter(_DropOrbaxLeftoverTasks())
