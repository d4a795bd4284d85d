"""Orbax PyTree checkpoints as a Source: ours (`MODEL_DIR/checkpoints/<step>/params`) and T5X's
Orbax format (a PyTree whose root holds T5X's state dict, `{'target': params, 'state': ...}`).

Shapes and dtypes come from the checkpoint's metadata without reading arrays; `load` restores the
requested leaves in one partial restore, each straight onto its sharding (Orbax reads only the
slices this host's devices hold) and cast to the requested dtype. Our own checkpoints record a
content checksum of every array (efficientlm.training.integrity); their leaves are verified
after the read, and a mismatch is an error naming the checkpoint and the step before it (eval,
infer, convert and RESTORE_PATH never use damaged values; a training restart moves such a step
aside).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from efficientlm import storage
from efficientlm.checkpoints.source import Leaf, Source, flatten, unflatten
from efficientlm.errors import CheckpointDamagedError
from efficientlm.training import integrity


PYTREE_METADATA = '_METADATA'


def is_pytree_dir(path: epath.Path) -> bool:
  return (path / PYTREE_METADATA).exists()


def _tree_metadata(directory: epath.Path) -> Mapping[str, Any]:
  metadata = ocp.PyTreeCheckpointHandler().metadata(directory)
  tree = getattr(metadata, 'item_metadata', metadata)
  return getattr(tree, 'tree', tree)


def _unreadable(name: str):
  def read(index):
    raise NotImplementedError(f'{name}: Orbax leaves are read through OrbaxSource.load')
  return read


class OrbaxSource(Source):
  """Leaves under `prefix` of the PyTree in `directory`."""

  def __init__(self, path: str, fmt: str, directory: epath.Path, prefix: str,
               step: int | None, checksums: Mapping[str, str] | None = None):
    flat = flatten(_tree_metadata(directory))
    leaves = {}
    for name, meta in flat.items():
      if not name.startswith(prefix):
        continue
      short = name[len(prefix):]
      leaves[short] = Leaf(tuple(meta.shape), np.dtype(meta.dtype), _unreadable(short))
    super().__init__(path, fmt, leaves, step)
    self.directory = directory
    self.prefix = prefix
    self.checksums = checksums or {}  # leaf name -> recorded checksum

  def load(self, requests):
    if not requests:
      return {}
    item, args = {}, {}
    for name, (sharding, dtype) in requests.items():
      leaf = self.leaves[name]
      # Checksummed leaves are read as stored, verified, then cast.
      read_dtype = leaf.dtype if name in self.checksums else np.dtype(dtype or leaf.dtype)
      full = self.prefix + name
      item[full] = jax.ShapeDtypeStruct(leaf.shape, read_dtype, sharding=sharding)
      args[full] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=read_dtype)
    restored = ocp.PyTreeCheckpointHandler().restore(
        self.directory, args=ocp.args.PyTreeRestore(item=unflatten(item),
                                                    restore_args=unflatten(args),
                                                    partial_restore=True))
    flat = flatten(restored)
    out = {name: flat[self.prefix + name] for name in requests}
    self._verify({name: x for name, x in out.items() if name in self.checksums})
    return {name: x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
            for (name, (_, dtype)), x in zip(requests.items(), out.values())}

  def _verify(self, arrays: Mapping[str, jax.Array]) -> None:
    if not arrays:
      return
    table, _ = integrity.describe(arrays)
    bad = sorted(name for name, entry in table.items()
                 if entry['checksum'] != self.checksums[name])
    if bad:
      step_dir = self.directory.parent
      older = sorted(int(p.name) for p in step_dir.parent.iterdir()
                     if p.name.isdigit() and int(p.name) < int(step_dir.name))
      raise CheckpointDamagedError(
          f'Checkpoint {step_dir} is damaged: {len(bad)} array(s) do not match the checksums '
          f'recorded when it was saved ({", ".join(bad[:4])}{" ..." if len(bad) > 4 else ""}). '
          + (f'Use the step before it: {step_dir.parent / str(older[-1])}.' if older else
             'There is no earlier step in that directory.') +
          ' (Training in its MODEL_DIR moves a damaged step aside and resumes from the one '
          'before.)')


def _step_from_name(path: epath.Path) -> int | None:
  for part in (path.name, path.parent.name):
    digits = part.rsplit('_', 1)[-1]
    if digits.isdigit():
      return int(digits)
  return None


def open_t5x_orbax(path: str) -> OrbaxSource:
  """T5X's Orbax format: the PyTree at `path` (or `path/state`) with params under `target`."""
  root = storage.as_path(path)
  for directory in (root, root / 'state'):
    if is_pytree_dir(directory):
      tree = _tree_metadata(directory)
      if 'target' not in tree:
        raise ValueError(f'{directory} is an Orbax checkpoint but not a T5X one: no `target` '
                         f'entry (found {sorted(tree)}).')
      return OrbaxSource(path, 't5x_orbax', directory, 'target/', _step_from_name(root))
  raise FileNotFoundError(f'No Orbax PyTree ({PYTREE_METADATA}) at {root} or {root / "state"}.')


def efficientlm_step_dir(path: str) -> epath.Path:
  """One step of an efficientlm run: given the step directory, the run's `checkpoints/` directory
  or the run directory (MODEL_DIR), the newest step."""
  root = storage.as_path(path)
  if not root.exists():
    raise FileNotFoundError(f'Checkpoint path {root} does not exist.')
  if (root / 'params').exists():
    return root
  for directory in (root, root / 'checkpoints'):
    steps = sorted((int(p.name), p) for p in directory.iterdir()
                   if p.name.isdigit() and (p / 'params').exists()) if directory.exists() else []
    if steps:
      return steps[-1][1]
  raise FileNotFoundError(f'No efficientlm checkpoint under {root}: expected <step>/params '
                          'directories (MODEL_DIR/checkpoints/<step>/params).')


def _recorded_checksums(step_dir: epath.Path) -> dict[str, str]:
  """{parameter name: checksum} from the step's sealed record; empty for checkpoints written
  before checksums were recorded."""
  meta = step_dir / 'meta' / 'metadata'
  if not meta.exists():
    return {}
  try:
    payload = integrity.unseal(json.loads(meta.read_text()))
  except ValueError as e:
    raise CheckpointDamagedError(f'Checkpoint {step_dir} is damaged: its metadata record does '
                                 f'not match its checksum ({e}).') from e
  arrays = (payload or {}).get('arrays') or {}
  return {name[len('params/'):]: entry['checksum'] for name, entry in arrays.items()
          if name.startswith('params/')}


def open_efficientlm(path: str) -> OrbaxSource:
  step_dir = efficientlm_step_dir(path)
  return OrbaxSource(str(step_dir), 'efficientlm', step_dir / 'params', '', int(step_dir.name),
                     _recorded_checksums(step_dir))
