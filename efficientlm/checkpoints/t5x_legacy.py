"""Legacy T5X checkpoints: a msgpack file `checkpoint` (flax serialization) holding
`{'version', 'optimizer': {'target': params, 'state': {'step', 'param_states'}}}`.

Small arrays are inline; large ones are tensorstore (zarr) spec dicts whose `kvstore.path` is
relative to the checkpoint directory, written with the `gfile` or `gcs` kvstore driver and, for
gcs, a placeholder bucket (facts: ../shared/specs/t5x_checkpoints.md and T5X's checkpoints.py).
We resolve each spec against where the checkpoint is now: a local directory (`file` driver) or
`gs://bucket/...` (`gcs` driver). Arrays are opened lazily and each device's slice read alone.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from efficientlm.checkpoints.source import Leaf, Source, flatten

_GS = re.compile(r'^gs://([^/]+)/?(.*)$')


def is_tensorstore_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and {'driver', 'kvstore'} <= set(value)


def resolve_spec(spec: Mapping[str, Any], checkpoint_dir: str) -> dict[str, Any]:
  """The spec with its relative path made absolute for where the checkpoint lives now."""
  spec = copy.deepcopy(dict(spec))
  kvstore = dict(spec['kvstore'])
  if kvstore.get('driver') not in ('file', 'gfile', 'gcs'):
    raise ValueError(f'Unsupported tensorstore kvstore driver {kvstore.get("driver")!r} in '
                     f'{checkpoint_dir}.')
  relative = kvstore.get('path', spec.pop('path', None))
  if relative is None:
    raise ValueError(f'Tensorstore spec without a path in {checkpoint_dir}: {spec}')
  match = _GS.match(checkpoint_dir)
  if match:
    bucket, prefix = match.groups()
    kvstore = {'driver': 'gcs', 'bucket': bucket, 'path': _join(prefix, relative)}
  else:
    kvstore = {'driver': 'file', 'path': _join(checkpoint_dir, relative)}
  spec['kvstore'] = kvstore
  return spec


def _join(directory: str, relative: str) -> str:
  return f'{directory.rstrip("/")}/{relative}' if directory else relative


def tensorstore_leaf(spec: Mapping[str, Any], name: str) -> Leaf:
  """A lazily opened zarr array. T5X keeps the metadata in the spec too, so a copy without the
  `.zarray` file (some test data) still opens: tensorstore is then told to assume it."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  try:
    store = ts.open(spec, open=True, read=True).result()
  except ValueError as e:
    if 'does not exist' not in str(e) or 'metadata' not in spec:
      raise FileNotFoundError(f'Array {name!r}: cannot open {spec["kvstore"]}: {e}') from e
    store = ts.open(spec, open=True, read=True, assume_metadata=True).result()
  dtype = np.dtype(store.dtype.numpy_dtype)
  return Leaf(tuple(store.shape), dtype, lambda index: store[index].read().result())


def read_msgpack(path: epath.Path) -> dict[str, Any]:
  from flax import serialization  # pylint: disable=g-import-not-at-top

  try:
    contents = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f'{path} is not a T5X msgpack checkpoint: {type(e).__name__}: {e}') from e
  if not isinstance(contents, Mapping) or 'optimizer' not in contents:
    raise ValueError(f'{path} is not a T5X checkpoint: expected a top-level `optimizer` entry, '
                     f'found {sorted(contents) if isinstance(contents, Mapping) else contents!r}.')
  return contents


def checkpoint_file(path: str) -> epath.Path:
  """The msgpack file of a checkpoint given as the directory `checkpoint_N/` or the file."""
  path = epath.Path(path)
  if path.is_dir():
    path = path / 'checkpoint'
  if not path.exists():
    raise FileNotFoundError(f'T5X checkpoint file {path} does not exist.')
  return path


def open_t5x(path: str, with_optimizer_state: bool = False) -> Source:
  """Params under `optimizer/target` (and, if asked, the optimizer state under `state/`)."""
  file = checkpoint_file(path)
  contents = read_msgpack(file)
  directory = str(file.parent)
  optimizer = contents['optimizer']
  tree = {'target': optimizer.get('target', {})}
  if with_optimizer_state:
    tree['state'] = optimizer.get('state', {})
  leaves = {}
  for name, value in flatten(_resolved(tree, directory)).items():
    short = name[len('target/'):] if name.startswith('target/') else name
    if isinstance(value, _Spec):
      leaves[short] = tensorstore_leaf(value.spec, short)
    else:
      leaves[short] = Leaf.from_array(value)
  step = optimizer.get('state', {}).get('step')
  return Source(str(path), 't5x', leaves, None if step is None else int(np.asarray(step)))


class _Spec:
  """Marks a tensorstore spec as one leaf (flatten would otherwise descend into it)."""

  def __init__(self, spec):
    self.spec = spec


def _resolved(tree: Mapping[str, Any], directory: str) -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if is_tensorstore_spec(value):
      out[key] = _Spec(resolve_spec(value, directory))
    elif isinstance(value, Mapping):
      out[key] = _resolved(value, directory)
    else:
      out[key] = value
  return out
