"""Orbax checkpoints of a training run: parameters, optimizer state and the data position.

A checkpoint `MODEL_DIR/<step>/` holds the items `params` and `opt_state` (sharded arrays,
restorable onto any mesh), `dataset` (each process's input-pipeline position) and `meta` (JSON).
Checkpoints written before training (upcycling, conversion) hold only `params` and `meta`: the
trainer starts their optimizer state fresh and their data from the beginning.
Orbax writes a step to a temporary directory and renames it when complete, so a save cut short
by a crash is never listed. A step that is listed but cannot be read is skipped, with a
message, in favour of the one before it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from efficientlm import storage
from efficientlm.training.metrics import log

ITEMS = ('params', 'opt_state', 'dataset', 'meta')


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores an iterator that has `save(dir)` / `restore(dir)` (efficientlm.data)."""

  def save(self, directory: epath.Path, args: DataIteratorSave):
    args.iterator.save(str(directory))

  def restore(self, directory: epath.Path, args: DataIteratorRestore):
    args.iterator.restore(str(directory))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def _savable(iterator) -> bool:
  return hasattr(iterator, 'save') and hasattr(iterator, 'restore')


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any | None


class Checkpointer:
  """Keeps the last `keep` checkpoints plus every step divisible by `keep_period`."""

  def __init__(self, directory: str | pathlib.Path, keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True):
    self.directory = storage.as_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS,
        item_handlers={'dataset': DataIteratorHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt_state=None, iterator=None, wait: bool = False,
           meta: dict | None = None) -> bool:
    """Saves `step` unless it already exists (a resumed run re-reaching its start step)."""
    self.manager.wait_until_finished()  # one save in flight; also surfaces its errors
    if step in self.manager.all_steps():
      return False
    items = {'params': ocp.args.StandardSave(params),
             'meta': ocp.args.JsonSave({'step': step, 'process_count': jax.process_count(),
                                        **(meta or {})})}
    if opt_state is not None:
      items['opt_state'] = ocp.args.StandardSave(opt_state)
    if iterator is not None and _savable(iterator):
      items['dataset'] = DataIteratorSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.manager.wait_until_finished()
    return True

  def restore_latest(self, abstract_params, abstract_opt_state, iterator=None) -> Restored | None:
    """The newest readable checkpoint restored onto the shardings of the abstract trees.

    An unreadable step is reported and the one before it tried, down to the oldest."""
    for step in reversed(self.steps()):
      try:
        return self._restore(step, abstract_params, abstract_opt_state, iterator)
      except Exception as e:  # pylint: disable=broad-except
        older = [s for s in self.steps() if s < step]
        log(f'Checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: '
            f'{str(e)[:300]}); ' + (f'falling back to step {older[-1]}.' if older else
                                    'no older checkpoint: starting from scratch.'))
    return None

  def _restore(self, step, abstract_params, abstract_opt_state, iterator) -> Restored:
    step_dir = self.directory / str(step)
    items = {'params': ocp.args.StandardRestore(abstract_params)}
    params_only = not (step_dir / 'opt_state').exists()
    if params_only:
      log(f'Checkpoint {step_dir} has parameters only (upcycled or converted): the optimizer '
          'state starts fresh and the data from the beginning.')
    else:
      items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
      if iterator is not None and _savable(iterator):
        if not (step_dir / 'dataset').exists():
          raise FileNotFoundError(f'checkpoint {step} has no data iterator position to resume '
                                  'from')
        items['dataset'] = DataIteratorRestore(iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, restored['params'], None if params_only else restored['opt_state'])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
