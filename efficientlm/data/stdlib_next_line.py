"""`stdlib_code_next_line`: a multiple-choice task on the Python standard library's source, made
on every machine with no download: given the code before a line, which of C lines comes next?

Files and splits are stdlib_code_lm's (stdlib_code.py: by file, on a hash of its path), so a model
pretrained on stdlib_code_lm's training split has never read a validation example's file. In
each file, a candidate line is any line but the first whose text without surrounding whitespace
has at least `min_line_bytes` bytes and which, with its newline, fits in `max_line_bytes`. Up to
`examples_per_file` candidates are asked (the first in the order of sha256('<path>:<line>')):
  inputs   the `context_bytes` bytes before the line (the end of the previous line included)
  choices  the line and C - 1 candidate lines drawn from all the split's files (sorted; the k-th
           draw is number sha256('<path>:<line>:<k>') mod their count), each differing from the
           others and from it beyond surrounding whitespace, newline included; the correct line
           sits at label = sha256('<path>:<line>:label') mod C
So every choice is real standard-library code; the right one continues the context (its
indentation, names and what was just opened). Distractors from the same file instead (same
names, same style) were too hard to learn for the tiny decoder of configs/runs/tfew.gin's header:
35% of 798 validation examples before and after 300 steps of full fine-tuning with T-Few's
losses (chance 25%). Tokens are bytes (ByT5 ids: byte + 3, as stdlib_code_lm), no EOS.
Everything is a pure function of the files' bytes and relative paths, so both splits are the same
on every machine with the same Python version. Lengths differ between choices, which is where
length-normalized scoring (T-Few) and summed log-probs differ.

Use: MIXTURE_OR_TASK_NAME = 'stdlib_code_next_line' with TASK_FEATURE_LENGTHS = {'inputs':
context_bytes, 'targets': max_line_bytes} (128 and 48 by default), PACK = False and a model
VOCAB_SIZE of at least 259; see configs/runs/tfew.gin.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np
from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden

from efficientlm.data import choices, stdlib_code
from efficientlm.data.registry import add_task
from efficientlm.data.resumable_source import ResumableFunctionSource

TASK_NAME = 'stdlib_code_next_line'
_BYTE_OFFSET = 3  # ByteVocabulary: id = byte + 3 (0 pad, 1 EOS, 2 unk)


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'big')


def _candidates(lines: list[bytes], min_line_bytes: int, max_line_bytes: int) -> list[int]:
  return [i for i, line in enumerate(lines) if i > 0 and b'\0' not in line and
          len(line.strip()) >= min_line_bytes and len(line) + 1 <= max_line_bytes]


def file_examples(path: str, lines: list[bytes], pool: list[bytes], num_choices: int,
                  context_bytes: int, min_line_bytes: int, max_line_bytes: int,
                  examples_per_file: int) -> list[tuple[bytes, list[bytes], int]]:
  """(context, choices, label) of the file with relative path `path` and lines `lines`; the
  distractors come from `pool` (sorted candidate lines of the split)."""
  asked = sorted(_candidates(lines, min_line_bytes, max_line_bytes),
                 key=lambda i: _hash(f'{path}:{i}'))[:examples_per_file]
  examples = []
  for i in asked:
    line, others, k = lines[i], [], 0
    taken = {line.strip()}
    while len(others) < num_choices - 1:  # ends: the pool has num_choices distinct lines
      other = pool[_hash(f'{path}:{i}:{k}') % len(pool)]
      if other.strip() not in taken:
        others.append(other)
        taken.add(other.strip())
      k += 1
    label = _hash(f'{path}:{i}:label') % num_choices
    options = others[:label] + [line] + others[label:]
    context = (b'\n'.join(lines[:i]) + b'\n')[-context_bytes:]
    examples.append((context, [o + b'\n' for o in options], label))
  return examples


def split_examples(root: str, split: str, validation_fraction: float, num_choices: int,
                   context_bytes: int, min_line_bytes: int, max_line_bytes: int,
                   examples_per_file: int) -> dict[str, np.ndarray]:
  """The split as arrays of token ids: inputs [N, context_bytes] and choices [N, C,
  max_line_bytes] (0-padded), label [N]; and, for tests, each example's file (relative path),
  context and correct line as bytes. An example of another split whose context and correct
  line are a training example's is left out (the codec tables' generated files share lines).
  Cached: each split is built once per process."""
  return _split_examples(root, split, validation_fraction, num_choices, context_bytes,
                         min_line_bytes, max_line_bytes, examples_per_file)


@functools.lru_cache(maxsize=4)
def _split_examples(root, split, validation_fraction, num_choices, context_bytes, min_line_bytes,
                    max_line_bytes, examples_per_file):
  files = {}
  for path in stdlib_code.split_files(root, validation_fraction)[split]:
    with open(os.path.join(root, path), 'rb') as f:
      files[path] = f.read().split(b'\n')
  pool = sorted({lines[i] for lines in files.values()
                 for i in _candidates(lines, min_line_bytes, max_line_bytes)})
  if len({line.strip() for line in pool}) < num_choices:
    raise ValueError(f'{TASK_NAME}: the {split!r} split under {root!r} has fewer than '
                     f'{num_choices} distinct candidate lines; lower num_choices or '
                     'min_line_bytes.')
  rows = []
  for path, lines in files.items():
    rows += [(path,) + ex for ex in file_examples(path, lines, pool, num_choices, context_bytes,
                                                  min_line_bytes, max_line_bytes,
                                                  examples_per_file)]
  if split != 'train':  # generated files (codec tables) repeat code: no example in both splits
    train = split_examples(root, 'train', validation_fraction, num_choices, context_bytes,
                           min_line_bytes, max_line_bytes, examples_per_file)
    seen = set(zip(train['contexts'], train['answers']))
    rows = [r for r in rows if (r[1], r[2][r[3]]) not in seen]
  if not rows:
    raise ValueError(f'{TASK_NAME}: no example of the {split!r} split under {root!r} is left '
                     'once those of the training split are removed.')
  inputs = np.zeros((len(rows), context_bytes), np.int32)
  options = np.zeros((len(rows), num_choices, max_line_bytes), np.int32)
  for n, (_, context, lines, _) in enumerate(rows):
    inputs[n, :len(context)] = np.frombuffer(context, np.uint8) + _BYTE_OFFSET
    for c, line in enumerate(lines):
      options[n, c, :len(line)] = np.frombuffer(line, np.uint8) + _BYTE_OFFSET
  return {'inputs': inputs, 'choices': options,
          'label': np.array([r[3] for r in rows], np.int32),
          'file': np.array([r[0] for r in rows]),
          'contexts': [r[1] for r in rows], 'answers': [r[2][r[3]] for r in rows]}


def _examples(split: str, shuffle_files: bool, seed=None, spec=None) -> tf.data.Dataset:
  del shuffle_files, seed  # examples are fixed; the Task shuffles them for training
  arrays = split_examples(split=split, **spec)
  ds = tf.data.Dataset.from_tensor_slices({k: arrays[k] for k in ('inputs', 'choices',
                                                                  'label')})
  return ds.map(lambda ex: {**ex, 'inputs': ex['inputs'][:tf.math.count_nonzero(
      ex['inputs'], dtype=tf.int32)]})


def _fit_lengths(ds: tf.data.Dataset, sequence_length, max_line_bytes: int,
                 task_name: str) -> tf.data.Dataset:
  """Keeps the last task_feature_lengths['inputs'] bytes of each context (those next to the
  line; seqio would keep the first); every choice must fit in 'targets'."""
  if not sequence_length:
    return ds
  if sequence_length.get('targets', max_line_bytes) < max_line_bytes:
    raise ValueError(f"Task {task_name} has choices of up to {max_line_bytes} bytes but "
                     f"task_feature_lengths['targets'] is {sequence_length['targets']}; set it "
                     f'to at least {max_line_bytes} (or register the task with a smaller '
                     'max_line_bytes).')
  keep = sequence_length.get('inputs')
  if keep is None:
    return ds
  return ds.map(lambda ex: {**ex, 'inputs': ex['inputs'][-keep:]})


def register_stdlib_code_next_line(name: str = TASK_NAME, root: str | None = None,
                                   num_choices: int = 4, context_bytes: int = 128,
                                   min_line_bytes: int = 8, max_line_bytes: int = 48,
                                   examples_per_file: int = 24,
                                   validation_fraction: float = 0.05) -> str:
  """Registers the task `name` on the standard library at `root` (default: this interpreter's);
  returns `name`. Files are read when a dataset is first built, not here."""
  if num_choices < 2:
    raise ValueError(f'{name}: num_choices = {num_choices}; it needs at least 2.')
  if not 0 < min_line_bytes < max_line_bytes:
    raise ValueError(f'{name}: min_line_bytes = {min_line_bytes} and max_line_bytes = '
                     f'{max_line_bytes}; need 0 < min_line_bytes < max_line_bytes.')
  if context_bytes < 1 or examples_per_file < 1:
    raise ValueError(f'{name}: context_bytes = {context_bytes} and examples_per_file = '
                     f'{examples_per_file}; both must be at least 1.')
  spec = dict(root=root or stdlib_code.stdlib_root(), validation_fraction=validation_fraction,
              num_choices=num_choices, context_bytes=context_bytes,
              min_line_bytes=min_line_bytes, max_line_bytes=max_line_bytes,
              examples_per_file=examples_per_file)
  add_task(name,
           source=ResumableFunctionSource(functools.partial(_examples, spec=spec),
                                          splits=stdlib_code.SPLITS),
           output_features=choices.output_features(stdlib_code.VOCABULARY),
           preprocessors=[functools.partial(_fit_lengths, max_line_bytes=max_line_bytes,
                                            task_name=name)])
  return name
