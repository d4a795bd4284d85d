"""Checkpoints of (IA)3 runs: their vectors, applied to the base checkpoint they were trained on.

An (IA)3 run (training/parameter_efficient.py) checkpoints only the vectors (and their optimizer
state); its sealed meta record names the base (path, format, step). Reading one (`load`, which
checkpoints/load.py calls for every such checkpoint, so eval, infer and RESTORE_PATH take them):
- for a model with TransformerConfig.ia3 (the run's own): the base's parameters plus the vectors;
- for a model without: the vectors merged into the base's kernels (layers/ia3.merge), i.e. the
  parameters of the plain model that computes the same function, decoding at its usual cost.
Vectors that do not fit the base (another model's) stop with both checkpoints named and the fix.
`write_merged` (scripts/merge_ia3.py) writes the merged parameters as a new run checkpoint, into
a new directory: the base and the (IA)3 run are only read.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from efficientlm import partitioning, storage
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import Initializer, RestoreOptions, RestoreReport, restore
from efficientlm.checkpoints.source import Source, flatten
from efficientlm.errors import CheckpointDamagedError, ConfigError
from efficientlm.layers import ia3
from efficientlm.training import integrity
from efficientlm.training import parameter_efficient as peft
from efficientlm.training.metrics import log


def recorded_base(source: Source) -> dict[str, Any] | None:
  """The base checkpoint an (IA)3 run's checkpoint names; None for any other checkpoint."""
  if source.format != 'efficientlm':
    return None
  meta = storage.as_path(source.path) / 'meta' / 'metadata'
  if not meta.exists():
    return None
  try:
    payload = integrity.unseal(json.loads(meta.read_text()))
  except ValueError as e:
    raise CheckpointDamagedError(f'Checkpoint {source.path} is damaged: its metadata record does '
                                 f'not match its checksum ({e}).') from e
  return ((payload or {}).get(peft.META_KEY) or {}).get('base_checkpoint')


def _replicated(shapes, mesh):
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def load(source: Source, base: Mapping[str, Any], abstract_params,
         options: RestoreOptions | None = None, initializer: Initializer | None = None,
         base_path: str | None = None) -> tuple[int | None, Any, RestoreReport]:
  """(step of the vectors, parameters for `abstract_params`, the base's restore report): the
  base read from `base_path` (default: the recorded one), the vectors applied (see above)."""
  from efficientlm.checkpoints.load import load_source  # pylint: disable=g-import-not-at-top
  base_path = base_path or base['resolved']
  abstract_vectors, abstract_base = peft.split(abstract_params, ia3.is_vector)
  merge = not flatten(abstract_vectors)
  if merge:  # a plain model: read the vectors its kernels would have, replicated (they are tiny)
    mesh = jax.tree.leaves(abstract_base)[0].sharding.mesh
    abstract_vectors = _replicated(ia3.vector_shapes(abstract_base), mesh)
  which = (f'the (IA)3 vectors of {source.path} (trained on the base '
           f'{peft.describe_base(base)})')
  try:
    base_source = open_checkpoint(base_path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'Cannot read the base checkpoint of {which}: {e}\nIf it moved, write the '
                      'merged model with scripts/merge_ia3.py --base NEW_PATH.') from e
  if base_path != base['resolved']:
    log(f'{which}: reading the base from {base_path} instead, as asked')
  try:
    vectors, _ = restore(source, abstract_vectors, RestoreOptions(strict=True))  # tiny: first
    _, base_params, report = load_source(base_source, abstract_base, options, initializer)
  except ValueError as e:
    raise ConfigError(
        f'Cannot apply {which} to the base {base_source.describe()} for this model: {e}\n'
        'Apply vectors to the base they were trained on, with the model gin of that run (its '
        'shapes are the vectors\' shapes); a base of other shapes needs its own (IA)3 run.'
    ) from e
  params = peft.combine(vectors, base_params)
  if merge:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_base)
    params = jax.jit(ia3.merge, out_shardings=shardings)(params)
  log(f'applied {len(flatten(vectors))} (IA)3 vectors of step {source.step}'
      f'{" merged into the kernels" if merge else ""}')
  return source.step, params, report


def plain_model(model):
  """`model` built without (IA)3 vectors (TransformerConfig.ia3 = False)."""
  cfg = model.module.config
  if not cfg.ia3:
    return model
  module = model.module.clone(config=dataclasses.replace(cfg, ia3=False))
  return dataclasses.replace(model, module=module)


def _inside(path: pathlib.Path, directory: str) -> bool:
  if storage.is_url(directory):
    return False
  root = pathlib.Path(directory).resolve()
  return path == root or root in path.parents


def write_merged(ia3_path: str, output: str, model, base_path: str | None = None,
                 partitioner: partitioning.Partitioner | None = None) -> pathlib.Path:
  """Writes the vectors of the (IA)3 checkpoint `ia3_path` (a run, its checkpoints/ or a step)
  merged into their base (`base_path`, default: the recorded one) as a parameters-only run
  checkpoint `output/checkpoints/<step>` of the plain `model`. `output` must be new or empty and
  outside both checkpoints; returns it."""
  from efficientlm.checkpoints.upcycle import abstract_params  # pylint: disable=g-import-not-at-top
  from efficientlm.training import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  source = open_checkpoint(ia3_path)
  base = recorded_base(source)
  if base is None:
    raise ConfigError(f'{source.describe()} is not an (IA)3 checkpoint (its meta record names no '
                      'base checkpoint): there is nothing to merge.')
  target = pathlib.Path(output).resolve()
  for name, directory in (('(IA)3 run', ia3_path), ('base checkpoint', base_path or base['path']),
                          ('base checkpoint', base['resolved'])):
    if _inside(target, directory):
      raise ConfigError(f'--output {output} is inside the {name} {directory}; write the merged '
                        'model to a new directory outside it.')
  if target.exists() and any(target.iterdir()):
    raise FileExistsError(f'{output} exists and is not empty; choose a new output directory.')
  model = plain_model(model)
  partitioner = partitioner or partitioning.Partitioner((-1,), ('data',), 'data_parallel')
  abstract, _ = abstract_params(model, partitioner)
  step, params, _ = load(source, base, abstract, base_path=base_path)
  checkpointer = ckpt_lib.Checkpointer(target / 'checkpoints', keep=None, async_save=False)
  checkpointer.save(step or 0, params, meta={'ia3_merged': {
      'vectors': str(source.path), 'base': base_path or base['resolved']}})
  checkpointer.close()
  log(f'wrote the merged model to {target / "checkpoints" / str(step or 0)}')
  return target
