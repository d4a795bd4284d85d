"""Parameter-efficient fine-tuning: train the (IA)3 vectors of a model, its base parameters frozen.

(IA)3 (Liu et al. 2022; layers/ia3.py) adds vectors l_k, l_v, l_ff (ones at first) to a model
built with TransformerConfig.ia3. A training run of such a model (runs/ia3_finetune.gin):
- splits the parameters by a predicate on their flat name (`trainable`; here ia3.is_vector):
  TrainState.params holds only the vectors, so the optimizer state exists for them alone, and
  gradients are taken with respect to them alone (steps.py);
- reads the frozen rest at every start from the base checkpoint (any format the project reads:
  our runs, T5X, Hugging Face) and passes it to the jitted step as an argument that is neither
  updated, nor donated, nor checkpointed;
- records the base (path, format, step) in every checkpoint's sealed meta record, so the
  checkpoints hold the vectors, their optimizer state and the data position only. A resumed run
  reads the recorded base; a BASE_CHECKPOINT naming another one is an error naming both.
Reading such a checkpoint for eval, infer or RESTORE_PATH applies the vectors to the recorded
base (checkpoints/ia3_checkpoint.py); scripts/merge_ia3.py writes them merged into a new run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientlm import partitioning, storage
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import Initializer, RestoreOptions
from efficientlm.checkpoints.source import Source, flatten, unflatten
from efficientlm.errors import ConfigError
from efficientlm.layers import ia3

# The meta record's entry for a parameter-efficient run: {'method': 'ia3', 'base_checkpoint':
# {'path', 'resolved', 'format', 'step'}} (see `base_record`).
META_KEY = 'parameter_efficient'


def split(tree: Mapping[str, Any], trainable: Callable[[str], bool]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the leaves whose flat name `trainable` selects, the others), each nested as `tree`."""
  flat = flatten(tree)
  chosen = {k: v for k, v in flat.items() if trainable(k)}
  return unflatten(chosen), unflatten({k: v for k, v in flat.items() if k not in chosen})


def combine(trainable: Mapping[str, Any],
            frozen: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The whole tree from `split`'s halves (`frozen` None: `trainable` is the whole tree)."""
  if frozen is None:
    return trainable
  return unflatten({**flatten(frozen), **flatten(trainable)})


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _absolute(path: str) -> str:
  return str(path) if storage.is_url(path) else os.path.abspath(path)


def base_record(path: str, source: Source) -> dict[str, Any]:
  """What a checkpoint records of its base: the path given, the checkpoint it resolved to (a
  run's newest step), its format and step."""
  return {'path': _absolute(path), 'resolved': _absolute(source.path), 'format': source.format,
          'step': source.step}


def same_base(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  return (a['resolved'], a['step']) == (b['resolved'], b['step'])


def describe_base(record: Mapping[str, Any]) -> str:
  step = '' if record.get('step') is None else f', step {record["step"]}'
  return f'{record["resolved"]} ({record["format"]}{step})'


@dataclasses.dataclass
class FrozenBase:
  """The frozen half of an (IA)3 run: which parameters train, and where the others come from."""

  base_checkpoint: str | None  # BASE_CHECKPOINT; None: the one the run's checkpoints recorded
  trainable: Callable[[str], bool] = ia3.is_vector
  record: dict[str, Any] | None = None  # the base actually read (set by `load`)

  @classmethod
  def for_run(cls, model, base_checkpoint: str | None,
              restore_path: str | None) -> FrozenBase | None:
    """None for a model without (IA)3 vectors (every parameter trains); errors for the settings
    that cannot go together."""
    if not getattr(model.module.config, 'ia3', False):
      if base_checkpoint:
        raise ConfigError(
            f'BASE_CHECKPOINT = {base_checkpoint!r} freezes a base under (IA)3 vectors, but the '
            'model has none: set TransformerConfig.ia3 = True (runs/ia3_finetune.gin does), or '
            'fine-tune every parameter with RESTORE_PATH instead (runs/finetune.gin).')
      return None
    if restore_path:
      raise ConfigError(
          f'RESTORE_PATH = {restore_path!r} starts every parameter from a checkpoint, but this '
          'model has (IA)3 vectors (TransformerConfig.ia3), which train on a frozen base: name the '
          "base with BASE_CHECKPOINT and set RESTORE_PATH = None (runs/ia3_finetune.gin).")
    return cls(base_checkpoint)

  def split_abstract(self, model, partitioner: partitioning.Partitioner, batch_spec):
    """(abstract trainable parameters, abstract frozen ones), with their shardings."""
    full, _ = partitioner.abstract_params(model.param_initializer(batch_spec), jax.random.key(0))
    trainable, frozen = split(full, self.trainable)
    if not flatten(trainable):
      raise ConfigError('TransformerConfig.ia3 is set but the model has no (IA)3 vectors.')
    return trainable, frozen

  @staticmethod
  def init_trainable(abstract_trainable):
    """The vectors' initial values, ones (as the layers initialize them), on their shardings;
    nothing of the base is initialized."""
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract_trainable),
                   out_shardings=jax.tree.map(lambda a: a.sharding, abstract_trainable))()

  def load(self, abstract_frozen, recorded: Mapping[str, Any] | None, model_dir: str,
           options: RestoreOptions | None = None, initializer: Initializer | None = None):
    """The frozen parameters from the base checkpoint. `recorded`: the base the run's newest
    checkpoint names (None for a new run)."""
    from efficientlm.checkpoints.load import load_source  # pylint: disable=g-import-not-at-top
    path = self.base_checkpoint or (recorded or {}).get('resolved')
    if not path:
      raise ConfigError(
          'This model has (IA)3 vectors (TransformerConfig.ia3), which train on a frozen base '
          f'checkpoint, and {model_dir} has no checkpoint naming one: set BASE_CHECKPOINT (e.g. '
          "--gin.BASE_CHECKPOINT=\"'/runs/t5_base'\" with runs/ia3_finetune.gin).")
    try:
      source = open_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f'The base checkpoint of this (IA)3 run cannot be opened: {e}') from e
    record = base_record(path, source)
    if recorded is not None and not same_base(recorded, record):
      raise ConfigError(
          f'The (IA)3 vectors in {model_dir} were trained on the base {describe_base(recorded)}, '
          f'but BASE_CHECKPOINT = {self.base_checkpoint!r} is {describe_base(record)}. Vectors '
          'fit only the base they were trained on: to continue this run, set '
          f"--gin.BASE_CHECKPOINT=\"'{recorded['resolved']}'\"; to train on the other base, "
          'start a new MODEL_DIR. Nothing was changed.')
    try:
      _, params, _ = load_source(source, abstract_frozen, options, initializer)
    except ValueError as e:
      raise ConfigError(
          f'The base checkpoint {describe_base(record)} does not fit this (IA)3 model: {e}\nUse '
          'the model gin the base was trained with (the vectors take their shapes from the '
          'model), or a base of this model\'s shapes. Nothing was changed.') from e
    self.record = record
    return params

  @property
  def meta(self) -> dict[str, Any]:
    """The entry of every checkpoint's meta record (after `load`)."""
    return {META_KEY: {'method': 'ia3', 'base_checkpoint': self.record}}
