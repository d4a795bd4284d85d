"""`register_text_lm`: a decoder-only LM task on the user's own text files.

Formats, chosen by extension:
  .txt    one document per file (a book, an article, a source file);
  .jsonl  one document per line, its `text` field.
A document goes to 'validation' when a hash of its identity falls below `validation_fraction`:
the file's base name for .txt (so a file never straddles splits), the line's text for .jsonl
(so duplicate lines share a split). The split is therefore stable across machines and reruns.

Without `sentencepiece_model`, a unigram SentencePiece model (pad 0, EOS 1, unk 2, as T5's) is
trained on the training documents into `cache_dir` (default: `.text_lm_cache` beside the first
file) and reused by later registrations of the same files and vocab size. Training can take
minutes on a large corpus, so it is announced on stdout (what is trained, from how much text, and
where it goes) and its end is reported with the time it took. .jsonl files are
converted once into TFRecords of documents in the same cache, since TensorFlow cannot parse JSON
and a Python step would make the input pipeline uncheckpointable.

Files must be UTF-8. With `encoding_errors='strict'` (the default) every file is read once at
registration and an invalid byte stops it with the file, line and byte offset; with 'replace'
invalid bytes read as U+FFFD, the replacement character, in training and tokenizing alike.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio
import sentencepiece as spm

from efficientlm.data import preprocessors, span_corruption, vocabularies
from efficientlm.data.registry import add_task
from efficientlm.data.resumable_source import ResumableFunctionSource
from efficientlm.errors import ConfigError

_SPLITS = ('train', 'validation')
_tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
_PREPROCESSORS = {
    'lm': [functools.partial(_tokenize, with_eos=True), preprocessors.split_into_sequences],
    'span_corruption': [_tokenize, span_corruption.span_corruption,
                        seqio.preprocessors.append_eos_after_trim],
}
OBJECTIVES = tuple(_PREPROCESSORS)
ENCODING_ERRORS = ('strict', 'replace')
_MAX_LINE_BYTES = 1 << 16


def register_text_lm(files: str, name: str = 'text_lm', sentencepiece_model: str | None = None,
                     vocab_size: int = 8000, validation_fraction: float = 0.05,
                     cache_dir: str | None = None, objective: str = 'lm',
                     encoding_errors: str = 'strict') -> str:
  """Registers task `name` on the .txt / .jsonl files matching the glob `files`; returns `name`.

  objective 'lm': 'targets' only (decoder-only language modelling); 'span_corruption': T5's
  'inputs' / 'targets' pairs, for encoder-decoder models. `encoding_errors`: 'strict' (a file
  that is not UTF-8 is an error) or 'replace' (its invalid bytes read as U+FFFD).

  In gin: MIXTURE_OR_TASK_NAME = @tasks.register_text_lm()
          tasks.register_text_lm.files = '/data/books/*.txt'
  """
  # Directories (our own cache among them, for a glob like 'dir/*') hold no documents.
  paths = sorted(p for p in tf.io.gfile.glob(files) if not tf.io.gfile.isdir(p))
  if not paths:
    raise FileNotFoundError(f'register_text_lm: the glob {files!r} matches no files.')
  unknown = [p for p in paths if not p.endswith(('.txt', '.jsonl'))]
  if unknown:
    raise ValueError(f'register_text_lm: {unknown[:3]} (from glob {files!r}) are neither .txt '
                     '(one document per file) nor .jsonl (one {"text": ...} per line).')
  if objective not in OBJECTIVES:
    raise ValueError(f'register_text_lm: objective {objective!r} not in {OBJECTIVES}.')
  if encoding_errors not in ENCODING_ERRORS:
    raise ValueError(f'register_text_lm: encoding_errors {encoding_errors!r} not in '
                     f'{ENCODING_ERRORS}.')
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f'register_text_lm: validation_fraction = {validation_fraction}; it must '
                     'be in [0, 1).')
  cache_dir = cache_dir or os.path.join(os.path.dirname(paths[0]), '.text_lm_cache')
  split_files = _split_files(paths, validation_fraction, cache_dir, encoding_errors)
  if not split_files['train']:
    raise ValueError(f'register_text_lm: no training documents in {files!r}; lower '
                     f'validation_fraction ({validation_fraction}) or add files.')
  splits = [s for s in _SPLITS if split_files[s]]
  if 'validation' not in splits:
    logging.warning('register_text_lm: no document of %r fell in the validation split.', files)
  if sentencepiece_model is None:
    sentencepiece_model = _trained_sentencepiece(split_files['train'], vocab_size, cache_dir,
                                                 encoding_errors)
  vocabulary = vocabularies.sentencepiece_vocabulary(sentencepiece_model)
  add_task(
      name,
      source=ResumableFunctionSource(
          functools.partial(_documents, split_files=split_files, encoding_errors=encoding_errors),
          splits=splits),
      output_features={f: seqio.Feature(vocabulary, add_eos=True) for f in
                       (('targets',) if objective == 'lm' else ('inputs', 'targets'))},
      preprocessors=_PREPROCESSORS[objective])
  return name


def _in_validation(identity: bytes, validation_fraction: float) -> bool:
  digest = hashlib.sha256(identity).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < validation_fraction


def _fingerprint(paths: Sequence[str], *extra) -> str:
  """Changes when a file is added, removed, resized or rewritten."""
  stats = [(p, tf.io.gfile.stat(p).length, tf.io.gfile.stat(p).mtime_nsec) for p in paths]
  return hashlib.sha256(repr((stats, extra)).encode()).hexdigest()[:16]


def _split_files(paths: Sequence[str], validation_fraction: float, cache_dir: str,
                 encoding_errors: str) -> dict[str, list[str]]:
  """split -> files of documents: .txt files themselves, .jsonl converted to TFRecords."""
  split_files = {s: [] for s in _SPLITS}
  for path in paths:
    if path.endswith('.txt'):
      if encoding_errors == 'strict':  # tf.data reads bytes, and SentencePiece would make an
        _read_text(path, encoding_errors)  # invalid one <unk>: check them here, before the run.
      in_validation = _in_validation(os.path.basename(path).encode(), validation_fraction)
      split_files['validation' if in_validation else 'train'].append(path)
  jsonl = [p for p in paths if p.endswith('.jsonl')]
  if jsonl:
    # 'strict' keeps the key that records converted before the option existed have, so they and
    # the vocabulary trained on them stay in use.
    key = _fingerprint(jsonl, validation_fraction,
                       *([encoding_errors] if encoding_errors != 'strict' else []))
    records = {s: os.path.join(cache_dir, f'jsonl-{key}-{s}.tfrecord') for s in _SPLITS}
    if not all(tf.io.gfile.exists(r) for r in records.values()):
      _convert_jsonl(jsonl, records, validation_fraction, encoding_errors)
    for split, record in records.items():
      if tf.io.gfile.stat(record).length:
        split_files[split].append(record)
  return split_files


def _decode(data: bytes, path: str, encoding_errors: str, offset: int = 0, line: int = 1) -> str:
  """`data`, the bytes of `path` from byte `offset` (on line `line`), as text."""
  try:
    return data.decode('utf-8', errors=encoding_errors)
  except UnicodeDecodeError as e:
    line += data.count(b'\n', 0, e.start)
    raise ConfigError(
        f'{path}:{line}: byte offset {offset + e.start} ({data[e.start:e.end]!r}) is not UTF-8 '
        f'({e.reason}). Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or set '
        "tasks.register_text_lm.encoding_errors = 'replace' to read invalid bytes as U+FFFD."
    ) from e


def _read_text(path: str, encoding_errors: str) -> str:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return _decode(f.read(), path, encoding_errors)


def _jsonl_documents(path: str, encoding_errors: str) -> Iterator[str]:
  offset = 0
  with tf.io.gfile.GFile(path, 'rb') as f:
    for number, data in enumerate(f, start=1):
      line = _decode(data, path, encoding_errors, offset, number)
      offset += len(data)
      if not line.strip():
        continue
      try:
        yield json.loads(line)['text']
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path}:{number}: expected a JSON object with a "text" field '
                         f'({e!r}).') from e


def _convert_jsonl(paths: Sequence[str], records: dict[str, str], validation_fraction: float,
                   encoding_errors: str) -> None:
  tf.io.gfile.makedirs(os.path.dirname(records['train']))
  writers = {s: tf.io.TFRecordWriter(r + '.tmp') for s, r in records.items()}
  with writers['train'], writers['validation']:
    for path in paths:
      for text in _jsonl_documents(path, encoding_errors):
        data = text.encode()
        writers['validation' if _in_validation(data, validation_fraction) else 'train'].write(data)
  for record in records.values():  # rename last: concurrent processes never read a partial file
    tf.io.gfile.rename(record + '.tmp', record, overwrite=True)


def _read_documents(path: str, encoding_errors: str) -> Iterator[str]:
  if path.endswith('.txt'):
    yield _read_text(path, encoding_errors)
  else:  # converted .jsonl: we wrote it from decoded text, so it is UTF-8
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      yield record.decode()


def _say(message: str) -> None:
  """A line on stdout, flushed. The data package does not import jax, so there is no process-0
  filter: every process that trains a vocabulary says so (each trains its own copy)."""
  print(f'register_text_lm: {message}', flush=True)


def _megabytes(num_bytes: int) -> str:
  return f'{num_bytes / 1e6:.1f} MB' if num_bytes >= 1e5 else f'{num_bytes:,} bytes'


_MAX_SENTENCES = 2_000_000  # SentencePiece trains on a random sample of this many lines at most


def _trained_sentencepiece(paths: Sequence[str], vocab_size: int, cache_dir: str,
                           encoding_errors: str) -> str:
  """Path of a SentencePiece model of the documents in `paths`, trained unless cached."""
  model_path = os.path.join(cache_dir, f'sentencepiece-{vocab_size}-{_fingerprint(paths)}.model')
  if tf.io.gfile.exists(model_path):
    _say(f'using the SentencePiece vocabulary cached at {model_path}')
    return model_path
  size = sum(tf.io.gfile.stat(p).length for p in paths)
  files = f'{len(paths)} file' + ('s' if len(paths) != 1 else '')
  _say(f'training a {vocab_size}-piece SentencePiece vocabulary on the training split ({files}, '
       f'{_megabytes(size)}) for {model_path}')
  read = {'lines': 0, 'bytes': 0}

  def lines():
    for path in paths:
      for doc in _read_documents(path, encoding_errors):
        for line in doc.splitlines():
          if line.strip():
            read['lines'] += 1
            read['bytes'] += len(line.encode())
            yield line

  start = time.perf_counter()
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces
        # SentencePiece silently skips longer lines (default 4192 bytes): allow paragraphs.
        max_sentence_length=_MAX_LINE_BYTES,
        input_sentence_size=_MAX_SENTENCES, shuffle_input_sentence=True,
        # Its own log (minloglevel 0) is ~70 lines of flags and EM iterations written straight
        # to stderr, with an absl warning: the two lines of _say say what matters.
        minloglevel=2)
  except RuntimeError as e:
    if 'sentences_.empty()' not in str(e):
      raise
    raise ValueError(f'register_text_lm: no line of the {len(paths)} files is usable to train a '
                     f'vocabulary: all are empty or longer than {_MAX_LINE_BYTES} bytes (split '
                     'long lines).') from e
  tf.io.gfile.makedirs(cache_dir)
  with tf.io.gfile.GFile(model_path + '.tmp', 'wb') as f:
    f.write(model.getvalue())
  tf.io.gfile.rename(model_path + '.tmp', model_path, overwrite=True)
  sampled = (f', a random {_MAX_SENTENCES:,} of them used'
             if read['lines'] > _MAX_SENTENCES else '')
  _say(f'trained the vocabulary in {time.perf_counter() - start:.1f} s on {read["lines"]:,} '
       f'lines ({_megabytes(read["bytes"])}{sampled}): {model_path}')
  return model_path


def _documents(split: str, shuffle_files: bool, seed=None, split_files=None,
               encoding_errors='strict') -> tf.data.Dataset:
  txt = [f for f in split_files[split] if f.endswith('.txt')]
  records = [f for f in split_files[split] if not f.endswith('.txt')]  # converted .jsonl
  texts = tf.data.TFRecordDataset(records) if records else None
  if txt:
    paths = tf.data.Dataset.from_tensor_slices(txt)
    if shuffle_files:
      paths = paths.shuffle(len(txt), seed=seed)
    files = paths.map(tf.io.read_file)
    if encoding_errors == 'replace':  # as Python's decode did for the vocabulary; SentencePiece
      # would read an invalid byte as <unk> instead.
      files = files.map(lambda text: tf.strings.unicode_transcode(text, 'UTF-8', 'UTF-8',
                                                                  errors='replace'))
    texts = files if texts is None else files.concatenate(texts)
  return texts.map(lambda text: {'targets': text})
