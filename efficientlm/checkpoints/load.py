"""Parameters for a model from any supported checkpoint (formats.py), restored with T5X
semantics (restore.py): what `RESTORE_PATH` (finetuning, upcycling) and evaluation use."""

from __future__ import annotations

from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import Initializer, RestoreOptions, RestoreReport, restore
from efficientlm.training.metrics import log


def load_params(path: str, abstract_params, options: RestoreOptions | None = None,
                initializer: Initializer | None = None, fmt: str = 'auto'
                ) -> tuple[int | None, object, RestoreReport]:
  """(checkpoint step or None, parameters on the abstract tree's shardings, report)."""
  source = open_checkpoint(path, fmt)
  log(f'restoring parameters from {source.describe()}')
  params, report = restore(source, abstract_params, options or RestoreOptions(), initializer)
  log(report.summary())
  return source.step, params, report
