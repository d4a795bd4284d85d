"""Reading a checkpoint without the trainer's checkpoint code, to judge a corruption on its own.

What each item restores to, read the way the restore reads it:
- params, opt_state: Orbax's StandardCheckpointer onto the pristine copy's shapes, dtypes and
  shardings (as the trainer restores onto its abstract state, so Orbax's saved sharding file is
  not consulted), every array compared bit for bit;
- meta: the JSON record, parsed;
- dataset: the iterator's tf.train checkpoint, every tensor read with TensorFlow's RestoreV2 (which
  checks the bundle's own CRCs) and serialized; plus the parsed SHA256SUMS file.
A corruption whose item restores exactly as the pristine copy's does is harmless: the damaged
bytes are not read (a commit marker, a per-process copy the merged index replaced), or read to
no effect (JSON whitespace). One that changes what is restored, or makes it fail, must be
detected by the trainer.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np

ARRAY_ITEMS = ('params', 'opt_state')


def _orbax():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from efficientlm.training import orbax_noise  # pylint: disable=g-import-not-at-top
  orbax_noise.install()  # a failed read's late tensorstore callbacks: output only, no logic
  if sys.unraisablehook is not _quiet_hook:
    _previous_hook[0] = sys.unraisablehook
    sys.unraisablehook = _quiet_hook
  return ocp


_previous_hook = [sys.unraisablehook]


def _quiet_hook(unraisable):
  """Drops the per-array read coroutines a failed read leaves behind (their error is the read's,
  already reported as its verdict); anything else goes to the previous hook."""
  if getattr(unraisable.object, '__name__', '') != '_read_array_index_and_device_put':
    _previous_hook[0](unraisable)


def read_arrays(item_dir: pathlib.Path, like=None):
  """The item's tree of arrays; onto `like`'s shapes and shardings when given."""
  ocp = _orbax()
  checkpointer = ocp.StandardCheckpointer()
  try:
    if like is None:
      return checkpointer.restore(item_dir)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          like)
    return checkpointer.restore(item_dir, target)
  finally:
    checkpointer.close()


def array_differences(a, b) -> list[str]:
  """Names of the leaves that differ in structure, shape, dtype or any bit."""
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(a)[0]}
  flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(b)[0]}
  names = sorted(set(flat_a) | set(flat_b))
  differ = []
  for name in names:
    x, y = flat_a.get(name), flat_b.get(name)
    if x is None or y is None:
      differ.append(name)
      continue
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      differ.append(name)
  return differ


def _iterator_state(dataset_dir: pathlib.Path) -> dict:
  from efficientlm.data.tensorflow_cpu import tf  # pylint: disable=g-import-not-at-top
  state = {}
  for sums in sorted(dataset_dir.glob('SHA256SUMS*')):
    state[sums.name] = json.loads(sums.read_text())
  for index in sorted(dataset_dir.rglob('*.index')):
    prefix = str(index)[:-len('.index')]
    dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    names = sorted(dtypes)
    tensors = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=names,
                                   shape_and_slices=[''] * len(names),
                                   dtypes=[dtypes[n] for n in names])
    for name, tensor in zip(names, tensors):
      state[f'{index.relative_to(dataset_dir)}:{name}'] = tf.io.serialize_tensor(tensor).numpy()
  return state


def _read_item(step_dir: pathlib.Path, item: str, like=None):
  if item in ARRAY_ITEMS:
    return read_arrays(step_dir / item, like)
  if item == 'meta':
    return json.loads((step_dir / 'meta' / 'metadata').read_text())
  if item == 'dataset':
    return _iterator_state(step_dir / 'dataset')
  raise ValueError(item)


def compare_item(pristine: pathlib.Path, damaged: pathlib.Path, item: str | None,
                 template=None) -> dict:
  """{'verdict': 'same' | 'differs' | 'unreadable' | 'unknown', 'detail': ...} of the damaged
  step's `item` against the pristine copy's; item None (a file outside every item) is the same.
  Arrays are read onto `template`'s shapes and shardings (an intact checkpoint's item, read
  without one): the pristine copy may carry an earlier, harmless corruption of a file only a
  read without a target consults (Orbax's _sharding)."""
  if item is None:
    return {'verdict': 'same', 'detail': 'a file outside every item the restore reads'}
  like = template if item in ARRAY_ITEMS else None
  try:
    good = _read_item(pristine, item, like=like)
  except Exception as e:  # pylint: disable=broad-except
    return {'verdict': 'unknown', 'detail': f'the pristine copy is unreadable too: '
                                            f'{type(e).__name__}: {_brief(str(e))}'}
  try:
    bad = _read_item(damaged, item, like=like)
  except Exception as e:  # pylint: disable=broad-except
    return {'verdict': 'unreadable', 'detail': f'{type(e).__name__}: {_brief(str(e))}'}
  if item in ARRAY_ITEMS:
    differ = array_differences(good, bad)
    if differ:
      return {'verdict': 'differs', 'detail': f'{len(differ)} array(s) differ: {differ[:3]}'}
  elif good != bad:
    keys = sorted(k for k in set(good) | set(bad) if good.get(k) != bad.get(k)) if isinstance(
        good, dict) and isinstance(bad, dict) else []
    return {'verdict': 'differs', 'detail': f'entries differ: {keys[:3]}'}
  return {'verdict': 'same', 'detail': 'restores exactly as the pristine copy'}


def _brief(text: str, limit: int = 300) -> str:
  text = ' '.join(text.split())
  return text if len(text) <= limit else f'{text[:limit // 2]} ... {text[-limit // 2:]}'


def compare_final(a: pathlib.Path, b: pathlib.Path) -> dict:
  """Bit-for-bit comparison of two checkpoints' params and opt_state."""
  result = {'arrays': 0, 'differ': []}
  for item in ARRAY_ITEMS:
    x, y = read_arrays(a / item), read_arrays(b / item)
    result['arrays'] += len(jax.tree.leaves(x))
    result['differ'] += [f'{item}{name}' for name in array_differences(x, y)]
  result['bit_identical'] = not result['differ']
  return result
