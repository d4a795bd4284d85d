"""Orbax PyTree checkpoints as a Source: ours (`MODEL_DIR/checkpoints/<step>/params`) and T5X's
Orbax format (a PyTree whose root holds T5X's state dict, `{'target': params, 'state': ...}`).

Shapes and dtypes come from the checkpoint's metadata without reading arrays; `load` restores the
requested leaves in one partial restore, each straight onto its sharding (Orbax reads only the
slices this host's devices hold) and cast to the requested dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from efficientlm import storage
from efficientlm.checkpoints.source import Leaf, Source, flatten, unflatten


PYTREE_METADATA = '_METADATA'


def is_pytree_dir(path: epath.Path) -> bool:
  return (path / PYTREE_METADATA).exists()


def _tree_metadata(directory: epath.Path) -> Mapping[str, Any]:
  metadata = ocp.PyTreeCheckpointer().metadata(directory)
  tree = getattr(metadata, 'item_metadata', metadata)
  return getattr(tree, 'tree', tree)


def _unreadable(name: str):
  def read(index):
    raise NotImplementedError(f'{name}: Orbax leaves are read through OrbaxSource.load')
  return read


class OrbaxSource(Source):
  """Leaves under `prefix` of the PyTree in `directory`."""

  def __init__(self, path: str, fmt: str, directory: epath.Path, prefix: str,
               step: int | None):
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

  def load(self, requests):
    if not requests:
      return {}
    item, args = {}, {}
    for name, (sharding, dtype) in requests.items():
      leaf = self.leaves[name]
      dtype = np.dtype(dtype or leaf.dtype)
      full = self.prefix + name
      item[full] = jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)
      args[full] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
    restored = ocp.PyTreeCheckpointer().restore(
        self.directory, args=ocp.args.PyTreeRestore(item=unflatten(item),
                                                    restore_args=unflatten(args),
                                                    partial_restore=True))
    flat = flatten(restored)
    return {name: flat[self.prefix + name] for name in requests}


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


def open_efficientlm(path: str) -> OrbaxSource:
  step_dir = efficientlm_step_dir(path)
  return OrbaxSource(str(step_dir), 'efficientlm', step_dir / 'params', '', int(step_dir.name))
