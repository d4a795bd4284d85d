"""DataIterator: numpy batches from a tf.data pipeline, with a position that can be saved."""

from __future__ import annotations

import os

import numpy as np

from efficientlm.data.tensorflow_cpu import tf


class DataIterator:
  """Yields dicts of numpy arrays; `save` / `restore` checkpoint this process's position.

  The checkpoint is tf.data's own (buffers included), so a DataIterator built from the same
  config and restored yields exactly the batches the saved one would have yielded next.
  """

  def __init__(self, dataset: tf.data.Dataset, process_index: int = 0):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self.process_index = process_index

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """feature -> (shape, dtype) of each batch."""
    return {k: (tuple(s.shape), np.dtype(s.dtype.as_numpy_dtype))
            for k, s in self._dataset.element_spec.items()}

  def _prefix(self, directory: str) -> str:
    return os.path.join(directory, f'process_{self.process_index}', 'iterator')

  def save(self, directory: str) -> None:
    """Writes the position under `directory`/process_<i>/ (local or gs://)."""
    self._checkpoint.write(self._prefix(directory))

  def restore(self, directory: str) -> None:
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + '.index'):
      raise FileNotFoundError(f'No data iterator checkpoint for process {self.process_index} at '
                              f'{prefix}; was it saved with the same number of processes?')
    self._checkpoint.read(prefix).assert_consumed()
