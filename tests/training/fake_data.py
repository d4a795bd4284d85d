"""A deterministic, checkpointable in-memory LM data source for trainer tests (no TensorFlow).

Batch i of a run is a pure function of (seed, i): sequences count up from a random start modulo
the vocabulary, so a model can learn them. Each process (shard) takes its rows of every batch.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np


class CountingIterator:

  def __init__(self, batch_size: int, length: int, vocab: int, seed: int = 0,
               shard_index: int = 0, num_shards: int = 1, delay: float = 0.0,
               hold: tuple[int, str] | None = None):
    self.batch_size, self.length, self.vocab, self.seed = batch_size, length, vocab, seed
    self.delay = delay  # seconds per batch, to slow a run down for preemption tests
    # (index, path): batch `index` waits until the file `path` exists, so that a test can signal
    # or kill the run at a known step instead of racing it.
    self.hold = hold
    self.rows = slice(shard_index * batch_size // num_shards,
                      (shard_index + 1) * batch_size // num_shards)
    self.shard_index = shard_index
    self.position = 0
    local = (batch_size // num_shards, length)
    self.element_spec = {'decoder_input_tokens': (local, np.int32),
                         'decoder_target_tokens': (local, np.int32),
                         'decoder_loss_weights': (local, np.float32)}

  def batch(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, index])
    start = rng.integers(0, self.vocab - 2, size=(self.batch_size, 1))
    targets = (start + np.arange(self.length)) % (self.vocab - 2) + 2
    inputs = np.concatenate([np.zeros((self.batch_size, 1)), targets[:, :-1]], axis=1)
    return {'decoder_input_tokens': inputs[self.rows].astype(np.int32),
            'decoder_target_tokens': targets[self.rows].astype(np.int32),
            'decoder_loss_weights': np.ones_like(targets[self.rows], np.float32)}

  def __iter__(self):
    return self

  def __next__(self):
    if self.hold is not None and self.position == self.hold[0]:
      while not pathlib.Path(self.hold[1]).exists():
        time.sleep(0.05)
    if self.delay:
      time.sleep(self.delay)
    out = self.batch(self.position)
    self.position += 1
    return out

  # Under process_<i>/, as efficientlm.data.DataIterator writes: the processes of a job share
  # the checkpoint directory.
  def _path(self, directory: str) -> pathlib.Path:
    return pathlib.Path(directory) / f'process_{self.shard_index}' / 'position.json'

  def save(self, directory: str) -> None:
    path = self._path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'position': self.position}))

  def restore(self, directory: str) -> None:
    self.position = json.loads(self._path(directory).read_text())['position']


def source(batch_size: int, length: int, vocab: int, seed: int = 0, log: list | None = None,
           delay: float = 0.0, hold: tuple[int, str] | None = None):
  """A train data source; `log`, if given, records the index of every batch handed out."""

  def make(shard_index, num_shards):
    iterator = CountingIterator(batch_size, length, vocab, seed, shard_index, num_shards, delay,
                                hold)
    if log is None:
      return iterator
    return _Logged(iterator, log)

  return make


def eval_source(batch_size: int, length: int, vocab: int, num_batches: int = 2):
  def make(shard_index, num_shards):
    iterator = CountingIterator(batch_size, length, vocab, 1234, shard_index, num_shards)
    return {'counting': _Finite(iterator, num_batches)}

  return make


class _Logged:

  def __init__(self, inner, log):
    self.inner, self.log, self.element_spec = inner, log, inner.element_spec

  def __iter__(self):
    return self

  def __next__(self):
    self.log.append(self.inner.position)
    return next(self.inner)

  def save(self, directory):
    self.inner.save(directory)

  def restore(self, directory):
    self.inner.restore(directory)


class _Finite:

  def __init__(self, inner, num_batches):
    self.inner, self.num_batches, self.element_spec = inner, num_batches, inner.element_spec

  def __iter__(self):
    return (self.inner.batch(i) for i in range(self.num_batches))


class StreamIterator(CountingIterator):
  """Document streams (as data/document_streams.py delivers them): every document spans
  `segments` consecutive batches of its row, and `decoder_stream_reset` marks its first one.
  Row r's document d counts up from a start drawn from (seed, r, d), so a state carried across
  steps helps predict it."""

  def __init__(self, *args, segments: int = 3, **kwargs):
    super().__init__(*args, **kwargs)
    self.segments = segments
    local = self.element_spec['decoder_input_tokens'][0]
    self.element_spec = dict(self.element_spec, decoder_stream_reset=((local[0],), np.int32))

  def batch(self, index: int) -> dict[str, np.ndarray]:
    document, segment = divmod(index, self.segments)
    rows = np.arange(self.batch_size)
    start = np.array([np.random.default_rng([self.seed, r, document]).integers(0, self.vocab - 2)
                      for r in rows])[:, None]
    offset = segment * self.length
    stream = (start + offset - 1 + np.arange(self.length + 1)) % (self.vocab - 2) + 2
    inputs = stream[:, :-1].copy()
    if segment == 0:
      inputs[:, 0] = 0  # BOS at a document's start; later segments continue the stream
    targets = stream[:, 1:]
    return {'decoder_input_tokens': inputs[self.rows].astype(np.int32),
            'decoder_target_tokens': targets[self.rows].astype(np.int32),
            'decoder_loss_weights': np.ones_like(targets[self.rows], np.float32),
            'decoder_stream_reset': np.full((self.batch_size,), int(segment == 0),
                                            np.int32)[self.rows]}


def stream_source(batch_size: int, length: int, vocab: int, seed: int = 0, segments: int = 3):
  def make(shard_index, num_shards):
    return StreamIterator(batch_size, length, vocab, seed, shard_index, num_shards,
                          segments=segments)

  return make
