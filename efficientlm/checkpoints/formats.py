"""One entry point for reading any checkpoint we support, by name or by looking at the path.

  t5x          legacy T5X: a `checkpoint` msgpack file (or the checkpoint_N/ directory holding it),
               arrays inline or in tensorstore; local paths or gs://
  t5x_orbax    T5X's Orbax format (a PyTree with `target` = params)
  hf           a Hugging Face T5 / T5.1.1 / SwitchTransformers directory (config.json + safetensors)
  efficientlm  our own runs: MODEL_DIR, MODEL_DIR/checkpoints or one <step> directory
"""

from __future__ import annotations

from etils import epath

from efficientlm.checkpoints import orbax_source, t5x_legacy
from efficientlm.checkpoints.source import Source, from_tree

FORMATS = ('t5x', 't5x_orbax', 'hf', 'efficientlm')


def detect_format(path: str) -> str:
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f'Checkpoint path {path} does not exist.')
  if root.is_file():
    with root.open('rb') as f:
      first = f.read(1)
    if first and (0x80 <= first[0] <= 0x8f or first[0] in (0xde, 0xdf)):  # a msgpack map
      return 't5x'
  elif (root / 'checkpoint').exists() and not (root / 'checkpoint').is_dir():
    return 't5x'
  elif (root / 'config.json').exists() and (root / 'model.safetensors').exists():
    return 'hf'
  elif orbax_source.is_pytree_dir(root) or orbax_source.is_pytree_dir(root / 'state'):
    return 't5x_orbax'
  else:
    try:
      orbax_source.efficientlm_step_dir(path)
      return 'efficientlm'
    except FileNotFoundError:
      pass
  raise ValueError(
      f'Unknown checkpoint format at {path}: expected a T5X checkpoint (a `checkpoint` msgpack '
      'file), a T5X Orbax checkpoint, a Hugging Face directory (config.json + '
      'model.safetensors) or an efficientlm run (<step>/params).')


def open_checkpoint(path: str, fmt: str = 'auto') -> Source:
  """The checkpoint's parameters as a Source (nothing large is read yet, except for Hugging Face
  safetensors and inline T5X arrays, which live in one file)."""
  path = str(path)
  if fmt == 'auto':
    fmt = detect_format(path)
  if fmt == 't5x':
    return t5x_legacy.open_t5x(path)
  if fmt == 't5x_orbax':
    return orbax_source.open_t5x_orbax(path)
  if fmt == 'efficientlm':
    return orbax_source.open_efficientlm(path)
  if fmt == 'hf':
    from efficientlm.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
    _, params = hf_t5.load_hf(path)
    return from_tree(path, 'hf', params)
  raise ValueError(f'Unknown checkpoint format {fmt!r}; expected one of {FORMATS} or auto.')
