"""Runs gcloud commands, or prints them without running anything (--dry-run).

Every command of the launcher goes through one Runner, so a dry run prints exactly the command
lines a real run would execute, shell-quoted so they can be pasted into a terminal.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO


_FLAG = re.compile(r'^(--[A-Za-z0-9_.-]+=)(.*)$', re.S)


def render(argv: Sequence[str]) -> str:
  """The command as a shell line; `--flag=value` quotes only the value (`--command='...'`)."""
  words = []
  for arg in argv:
    flag = _FLAG.match(arg)
    words.append(flag.group(1) + shlex.quote(flag.group(2)) if flag else shlex.quote(arg))
  return ' '.join(words)


class Runner:
  """Executes argv lists with subprocess, or prints them when `dry_run`."""

  def __init__(self, dry_run: bool = False, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.lines: list[str] = []  # everything printed, for tests and summaries

  def _print(self, line: str) -> None:
    self.lines.append(line)
    print(line, file=self.out, flush=True)

  def note(self, text: str) -> None:
    """A comment line (progress, or what a local step would do)."""
    self._print(f'# {text}')

  def run(self, argv: Sequence[str]) -> None:
    """Runs a command to completion; a failure stops the launcher with its exit status."""
    self._print(render(argv))
    if not self.dry_run:
      subprocess.run(list(argv), check=True)

  def output(self, argv: Sequence[str], dry_run_result: str = '') -> str:
    """A command's stdout (stripped); in a dry run, prints it and returns `dry_run_result`."""
    if self.dry_run:
      self._print(render(argv))
      return dry_run_result
    return subprocess.run(list(argv), check=True, capture_output=True,
                          text=True).stdout.strip()

  def local(self, description: str, fn: Callable[[], object]) -> None:
    """A step done here in Python (packing the checkout); a dry run only describes it."""
    self.note(description)
    if not self.dry_run:
      fn()

  def sleep(self, seconds: float) -> None:
    if not self.dry_run:
      time.sleep(seconds)
