"""A sweep's progress on stdout: one line rewritten in place on a terminal, whole lines in a log.

A `\\r` update per point suits a terminal but turns a redirected log into one line of every
point. When the stream is not a terminal, a line is printed for the first point, then every
`lines_every` points (about 1/`max_lines` of the sweep), and for the last point, so a log of
the 616-point PaLM sweep holds about 20 progress lines.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO


class Progress:
  """`update(i, text)` after point i (0-based) of `total`; `close()` ends the progress display."""

  def __init__(self, total: int, stream: TextIO | None = None, max_lines: int = 20):
    self.total = total
    self.stream = stream or sys.stdout
    # Asked once: a stream does not become a terminal halfway through a sweep.
    self.in_place = self.stream.isatty()
    self.lines_every = max(1, math.ceil(total / max_lines))
    self._pending_newline = False
    self._width = 0

  def update(self, i: int, text: str) -> None:
    line = f'[{i + 1}/{self.total}] {text}'
    if self.in_place:  # padded to cover a longer previous line
      self.stream.write('\r' + line.ljust(self._width))
      self._width = len(line)
      self._pending_newline = True
    elif i == 0 or (i + 1) % self.lines_every == 0 or i + 1 == self.total:
      self.stream.write(line + '\n')
    else:
      return
    self.stream.flush()

  def close(self) -> None:
    """Ends the line rewritten in place, so what follows starts on its own line."""
    if self._pending_newline:
      self.stream.write('\n')
      self.stream.flush()
      self._pending_newline = False
