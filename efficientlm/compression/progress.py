"""Resuming an interrupted pruning run: MODEL_DIR/prune_progress/<k>/ after every unit.

After unit k (a transformer layer) is pruned, the whole parameter tree so far (units < k pruned,
the rest as in the source) is saved as a parameters-only checkpoint `prune_progress/<k>`
(training.checkpoints.Checkpointer, keeping one), and its sealed metadata record holds the
run's configuration, the source checkpoint's step and the report rows of units 0..k-1, so the
arrays and the report are committed together. A restarted run with the same configuration
continues at unit k; a different configuration stops with an error naming the directory. Once
the pruned checkpoint is written the directory is removed (it holds only what this run wrote).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from efficientlm import storage
from efficientlm.errors import ConfigError
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training import integrity
from efficientlm.training.metrics import log

DIRECTORY = 'prune_progress'


@dataclasses.dataclass
class Resumed:
  units_done: int
  params: Any
  report: list[dict[str, Any]]
  source_step: int | None


class Progress:

  def __init__(self, model_dir: str, config: dict[str, Any]):
    self.directory = storage.as_path(model_dir) / DIRECTORY
    # As JSON stores it (tuples become lists), so a reloaded config compares equal.
    self.config = json.loads(json.dumps(config))
    self._checkpointer = None

  def _open(self) -> ckpt_lib.Checkpointer:
    if self._checkpointer is None:
      self._checkpointer = ckpt_lib.Checkpointer(self.directory, keep=1, async_save=False)
    return self._checkpointer

  def resume(self, abstract_params) -> Resumed | None:
    """The saved state, if a previous run of this configuration left one."""
    if not self.directory.exists():
      return None
    checkpointer = self._open()
    if not checkpointer.steps():
      return None
    restored = checkpointer.restore_latest(abstract_params, None)
    if restored is None:  # damaged and moved aside: start again
      return None
    record = json.loads((self.directory / str(restored.step) / 'meta' /
                         'metadata').read_text())
    state = (integrity.unseal(record) or {}).get('prune')
    if state is None or state['config'] != self.config:
      differ = sorted(k for k in set(self.config) | set((state or {}).get('config', {}))
                      if (state or {}).get('config', {}).get(k) != self.config.get(k))
      raise ConfigError(
          f'{self.directory} holds an interrupted pruning run with another configuration '
          f'(differing: {", ".join(differ) or "unknown"}). Rerun with that configuration to '
          'finish it, or choose a new MODEL_DIR (or delete that directory to start over).')
    log(f'resuming pruning from {self.directory / str(restored.step)}: {restored.step} '
        'layer(s) already pruned')
    return Resumed(restored.step, restored.params, state['report'], state['source_step'])

  def save(self, units_done: int, params, report, source_step: int | None) -> None:
    state = {'config': self.config, 'report': report, 'source_step': source_step}
    self._open().save(units_done, params, wait=True, meta={'prune': state})

  def remove(self) -> None:
    self.close()
    if jax.process_index() == 0 and self.directory.exists():
      self.directory.rmtree()

  def close(self) -> None:
    if self._checkpointer is not None:
      self._checkpointer.close()
      self._checkpointer = None
