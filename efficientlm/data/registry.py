"""Idempotent task registration: registering a name again replaces the task.

Gin may call a registration function once per parse, and tests import task modules repeatedly;
seqio's own registry raises on a duplicate name.
"""

from __future__ import annotations

from efficientlm.data import tensorflow_cpu  # noqa: F401  (first: TF quietly, with GPUs hidden)
import seqio


def add_task(name: str, **task_kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)
