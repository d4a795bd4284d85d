"""What the input pipeline reads: one frozen dataclass, bound by the run gins.

Imports no TensorFlow, so the trainer can build and validate it without paying for TF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """A seqio mixture or task and how to batch it.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture (see efficientlm.data.tasks).
    task_feature_lengths: task feature -> length, e.g. {'inputs': 512, 'targets': 114} for span
      corruption or {'targets': 1024} for a decoder-only LM.
    split: the split `get_iterator` reads.
    batch_size: the GLOBAL batch size, over all processes.
    shuffle: shuffle the examples (training); evaluation never shuffles.
    seed: seeds shuffling and the random preprocessing (span corruption, prefix split); None
      draws a fresh seed, so the data is then not reproducible.
    pack: pack several examples into each row (segment ids and positions mark them).
    use_cached: read the offline seqio cache of the task (seqio's cache_tasks_main).
    tfds_data_dir: where TFDS datasets are prepared (local or gs://); None uses TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    document_streams: (training) row r of every batch continues row r's document of the previous
      batch, segment after segment, for models that carry state across steps (see
      efficientlm/data/document_streams.py); needs shuffle = False and pack = False.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = 'train'
  batch_size: int = 8
  shuffle: bool = True
  seed: int | None = 0
  pack: bool = True
  use_cached: bool = False
  tfds_data_dir: str | None = None
  document_streams: bool = False

  def __post_init__(self):
    # A private copy: a caller mutating its dict later must not change this config.
    object.__setattr__(self, 'task_feature_lengths', dict(self.task_feature_lengths))
    if not self.mixture_or_task_name:
      raise ValueError('DatasetConfig.mixture_or_task_name is empty; name a registered task.')
    if not self.task_feature_lengths:
      raise ValueError('DatasetConfig.task_feature_lengths is empty; give e.g. {"targets": 512}.')
    for feature, length in self.task_feature_lengths.items():
      if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ValueError(f'DatasetConfig.task_feature_lengths[{feature!r}] = {length!r}; '
                         'lengths must be positive integers.')
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      raise ValueError(f'DatasetConfig.batch_size = {self.batch_size!r}; it must be a positive '
                       'integer (the global batch size over all processes).')

  def __hash__(self):  # a frozen dataclass is hashable; the lengths dict alone is not
    fields = dataclasses.astuple(self)
    return hash(fields[:1] + (tuple(sorted(self.task_feature_lengths.items())),) + fields[2:])

