"""Errors that stop a run with one message: `python -m efficientlm.main` prints the message,
without a traceback, and exits with status 1. Each says what happened, to which path or value, and
what to do; the code that raises them has already left the run directory as it should stay."""

from __future__ import annotations


class RunError(Exception):
  """Base: an expected way for a run to stop (not a bug)."""


class ConfigError(RunError, ValueError):
  """A configuration or input the run cannot use (a gin value, a data file, a prompt file)."""


class RunLockedError(RunError):
  """Another process holds MODEL_DIR's run lock."""


class CheckpointMismatchError(RunError):
  """A checkpoint in MODEL_DIR does not fit the configured model (a different configuration)."""


class CheckpointDamagedError(RunError):
  """A checkpoint read for evaluation, inference, conversion or RESTORE_PATH is damaged."""


class CheckpointReadError(RunError):
  """A checkpoint could not be read for a reason that is not its corruption (storage errors that
  persisted through the retries): nothing was moved or skipped."""


class CheckpointSaveError(RunError):
  """A checkpoint save failed (disk full, permissions, storage errors)."""
