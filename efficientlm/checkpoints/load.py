"""Parameters for a model from any supported checkpoint (formats.py), restored with T5X
semantics (restore.py): what `RESTORE_PATH` (finetuning, upcycling) and evaluation use.

A checkpoint of an (IA)3 run holds only its vectors and names its base checkpoint; it loads as
the base with the vectors applied (ia3_checkpoint.py): unmerged for a model with
TransformerConfig.ia3, merged into the kernels for one without.
"""

from __future__ import annotations

from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import Initializer, RestoreOptions, RestoreReport, restore
from efficientlm.checkpoints.source import Source
from efficientlm.training.metrics import log


def load_params(path: str, abstract_params, options: RestoreOptions | None = None,
                initializer: Initializer | None = None, fmt: str = 'auto'
                ) -> tuple[int | None, object, RestoreReport]:
  """(checkpoint step or None, parameters on the abstract tree's shardings, report)."""
  return load_source(open_checkpoint(path, fmt), abstract_params, options, initializer)


def load_source(source: Source, abstract_params, options: RestoreOptions | None = None,
                initializer: Initializer | None = None
                ) -> tuple[int | None, object, RestoreReport]:
  """`load_params` of an opened checkpoint."""
  from efficientlm.checkpoints import ia3_checkpoint  # pylint: disable=g-import-not-at-top
  base = ia3_checkpoint.recorded_base(source)
  if base is not None:
    return ia3_checkpoint.load(source, base, abstract_params, options, initializer)
  log(f'restoring parameters from {source.describe()}')
  params, report = restore(source, abstract_params, options or RestoreOptions(), initializer)
  log(report.summary())
  return source.step, params, report
