"""What Orbax and tensorstore print when a checkpoint save or restore fails, reduced to one line
each: the Checkpointer reports the failure itself, once, with the path and what to do.

Two sources, measured on a save that hit the file-size limit (1,762 lines of stderr before this):
- tensorstore completes its futures after Orbax has given up on the operation and closed its
  event loop; each completion's `loop.call_soon_threadsafe` raises "Event loop is closed" and is
  printed as an unraisable exception (100-230 tracebacks). Those, and only those, are dropped.
- Orbax's background threads log the error with its traceback (absl logger, 5 records). The
  records stay; their tracebacks go (the error's text is in the record and in our message).
- On a full disk (measured on a 2 MB tmpfs), Orbax's abandoned write tasks are garbage-collected
  as the interpreter shuts down: asyncio logs "Task exception was never retrieved" for each
  (14 records with tracebacks), and their coroutines fail to import what their cleanup needs (8
  unraisable tracebacks). Both are dropped: they repeat the error the save already reported.
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


class _StripOrbaxTracebacks(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and 'orbax' in record.pathname:
      record.msg = f'{record.msg} ({record.exc_info[0].__name__})' if record.exc_info[0] else \
          record.msg
      record.exc_info, record.exc_text = None, None
    return True


class _DropOrbaxLeftoverTasks(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith('Task exception was never retrieved') and
                '/orbax/' in str(getattr(record, 'future', '')) + record.getMessage())


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
  logging.getLogger('absl').addFilter(_StripOrbaxTracebacks())
  logging.getLogger('asyncio').addFilter(_DropOrbaxLeftoverTasks())
