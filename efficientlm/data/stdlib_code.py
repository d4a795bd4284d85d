"""`stdlib_code_lm`: a real code corpus on every machine, with no download: the Python standard
library's own source files, modelled byte by byte.

Documents are the `*.py` files under `sysconfig.get_paths()['stdlib']` (or a given root), minus
test suites (any directory named `test`, `tests` or `idle_test`, and files `test_*.py`),
`site-packages` / `dist-packages` and `__pycache__`. A file goes to 'validation' when the first 8
bytes of sha256(its path relative to the root, '/'-separated), read as a big-endian integer,
fall below `validation_fraction` x 2**64; otherwise to 'train'. So the split is by file (no file
in both), independent of the order files are listed in and of which other files exist, and the
same on every machine with the same Python version (the file set differs between versions:
results record the version and the file and byte counts).

Tokens are UTF-8 bytes (seqio.ByteVocabulary, as ByT5: id = byte + 3; 0 pad, 1 EOS, 2 unk; 259
ids), so no vocabulary is trained and bits per byte is exact: each document is its n bytes plus
one EOS, cut into 'targets'-long sequences (preprocessors.split_into_sequences), and

  bits/byte = (mean loss per target token in nats) / ln 2 x (tokens / bytes),

with tokens / bytes = (bytes + files) / bytes over the split (`corpus_stats`). An evaluation
that reads only the first batches of the split (MAX_EVAL_BATCHES) sees slightly different
files; the ratio differs from 1 by one EOS per file (about 1e-4 here), so the bias is negligible.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import sys
import sysconfig

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data import preprocessors
from efficientlm.data.registry import add_task
from efficientlm.data.resumable_source import ResumableFunctionSource

TASK_NAME = 'stdlib_code_lm'
SPLITS = ('train', 'validation')
SKIPPED_DIRECTORIES = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                                 '__pycache__'})
VOCABULARY = seqio.ByteVocabulary()
VOCAB_SIZE = VOCABULARY.vocab_size  # 259
_tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False,
                              with_eos=True)


def stdlib_root() -> str:
  """This interpreter's standard library directory."""
  return sysconfig.get_paths()['stdlib']


def source_files(root: str) -> list[str]:
  """Sorted relative ('/'-separated) paths of the corpus's files under `root`."""
  base = pathlib.Path(root)
  if not base.is_dir():
    raise FileNotFoundError(f'stdlib_code_lm: {root!r} is not a directory; pass the root of a '
                            "Python standard library (sysconfig.get_paths()['stdlib']).")
  paths = []
  for path in base.rglob('*.py'):
    relative = path.relative_to(base)
    if SKIPPED_DIRECTORIES & set(relative.parts[:-1]) or relative.name.startswith('test_'):
      continue
    if path.is_file():
      paths.append(relative.as_posix())
  return sorted(paths)


def in_validation(relative_path: str, validation_fraction: float) -> bool:
  digest = hashlib.sha256(relative_path.encode()).digest()
  return int.from_bytes(digest[:8], 'big') < validation_fraction * 2**64


@functools.lru_cache(maxsize=8)
def split_files(root: str, validation_fraction: float) -> dict[str, tuple[str, ...]]:
  """split -> the relative paths of its files (sorted). Cached: the corpus is listed once."""
  splits = {s: [] for s in SPLITS}
  for path in source_files(root):
    splits['validation' if in_validation(path, validation_fraction) else 'train'].append(path)
  for split, paths in splits.items():
    if not paths:
      raise ValueError(f'stdlib_code_lm: no file of {root!r} fell in the {split!r} split '
                       f'(validation_fraction = {validation_fraction}); use a fraction in (0, 1) '
                       'and a root with more files.')
  return {s: tuple(p) for s, p in splits.items()}


def corpus_stats(root: str | None = None, validation_fraction: float = 0.05) -> dict:
  """Per split: files, bytes, tokens (bytes + one EOS per file), bytes_per_token; and what the
  corpus is (root, Python version), for results files."""
  root = root or stdlib_root()
  stats = {'root': root, 'python': sys.version.split()[0],
           'validation_fraction': validation_fraction}
  for split, paths in split_files(root, validation_fraction).items():
    size = sum(os.path.getsize(os.path.join(root, p)) for p in paths)
    tokens = size + len(paths)
    stats[split] = {'files': len(paths), 'bytes': size, 'tokens': tokens,
                    'bytes_per_token': size / tokens}
  return stats


def _documents(split: str, shuffle_files: bool, seed=None, root: str = '',
               validation_fraction: float = 0.05) -> tf.data.Dataset:
  paths = [os.path.join(root, p) for p in split_files(root, validation_fraction)[split]]
  files = tf.data.Dataset.from_tensor_slices(paths)
  if shuffle_files:
    files = files.shuffle(len(paths), seed=seed)
  return files.map(lambda path: {'targets': tf.io.read_file(path)})


def register_stdlib_code_lm(name: str = TASK_NAME, root: str | None = None,
                            validation_fraction: float = 0.05) -> str:
  """Registers the byte-level LM task `name` on the standard library at `root` (default: this
  interpreter's); returns `name`. Files are listed when a dataset is first built, not here.

  In gin: MIXTURE_OR_TASK_NAME = 'stdlib_code_lm' (registered on import of tasks.py), with a
          model VOCAB_SIZE of at least 259.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f'register_stdlib_code_lm: validation_fraction = {validation_fraction}; it '
                     'must be in (0, 1).')
  add_task(
      name,
      source=ResumableFunctionSource(
          functools.partial(_documents, root=root or stdlib_root(),
                            validation_fraction=validation_fraction),
          splits=SPLITS),
      output_features={'targets': seqio.Feature(VOCABULARY, add_eos=True)},
      preprocessors=[_tokenize, preprocessors.split_into_sequences])
  return name
