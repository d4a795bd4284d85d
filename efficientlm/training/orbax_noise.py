"""What Orbax and tensorstore print when a checkpoint save or restore fails, reduced to one line
each: the Checkpointer reports the failure itself, once, with the path and what to do.

Two sources, measured on a save that hit the file-size limit (1,762 lines of stderr before this):
- tensorstore completes its futures after Orbax has given up on the operation and closed its
  event loop; each completion's `loop.call_soon_threadsafe` raises "Event loop is closed" and is
  printed as an unraisable exception (100-230 tracebacks). Those, and only those, are dropped.
- Orbax's background threads log the error with its traceback (absl logger, 5 records). The
  records stay; their tracebacks go (the error's text is in the record and in our message).
"""

from __future__ import annotations

import logging
import sys

_installed = False


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


def install() -> None:
  """Idempotent; called by every Checkpointer."""
  global _installed
  if _installed:
    return
  _installed = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('absl').addFilter(_StripOrbaxTracebacks())
