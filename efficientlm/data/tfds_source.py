"""A seqio TFDS source that reads prepared data only, and says how to prepare what is missing."""

from __future__ import annotations

import os
from collections.abc import Sequence

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio



class DatasetNotPreparedError(FileNotFoundError):
  pass


class TfdsSource(seqio.TfdsDataSource):
  """seqio.TfdsDataSource, read-only: a training job never starts a TFDS download or build
  (C4 takes hours of Apache Beam), and a dataset missing from the data dir raises
  DatasetNotPreparedError naming the dataset, the directory and how to prepare it.
  """

  def __init__(self, tfds_name: str, splits: Sequence[str], how_to_prepare: str = ''):
    super().__init__(tfds_name=tfds_name, splits=splits, read_only=True)
    self._how_to_prepare = how_to_prepare

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    try:
      return super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    except (AssertionError, KeyError, tf.errors.NotFoundError) as e:
      builder = self.tfds_dataset.builder
      if builder.is_prepared():
        raise
      root = builder.data_dir_root
      raise DatasetNotPreparedError(
          f'TFDS dataset {self.tfds_dataset.name} is not prepared in data_dir {root} (looked '
          f'for {builder.data_dir}). Prepare it with `tfds build {self.tfds_dataset.name} '
          f'--data_dir={root}`{self._how_to_prepare}, or point DatasetConfig.tfds_data_dir '
          '(or the TFDS_DATA_DIR environment variable) at a prepared copy, e.g. a GCS bucket.'
      ) from e

  def list_shards(self, split: str) -> Sequence[str]:
    try:
      return super().list_shards(split)
    except (AssertionError, KeyError):
      # No split metadata: the data is missing (get_dataset then says so) or mocked by
      # tfds.testing.mock_data. One shard makes seqio shard by example instead of by file.
      return [split]


def override_data_dir(source: seqio.DataSource, data_dir: str | None) -> None:
  """Points a TFDS source at `data_dir`; None: back to its own (or TFDS_DATA_DIR's)."""
  if isinstance(source, seqio.TfdsDataSource):
    source.tfds_dataset.override_data_dir(None if data_dir is None else os.fspath(data_dir))
