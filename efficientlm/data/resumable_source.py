"""A seqio function source for pipelines whose position is checkpointed.

seqio warns, each time a FunctionDataSource is read for training, that an uncached function
source "often results in insufficient shuffling on restarts, resulting in overfitting". That
concerns pipelines restarted from their beginning. Ours never are: a restart restores the
checkpointed tf.data iterator (efficientlm.data.iterator), shuffle buffers and seeds included, so
it continues the same order. The synthetic tasks and the user's text files use this source, which
reads exactly as seqio's does, without the warning.
"""

from __future__ import annotations

from efficientlm.data import tensorflow_cpu  # noqa: F401  (first: TF quietly, with GPUs hidden)
import seqio


class ResumableFunctionSource(seqio.FunctionDataSource):

  def get_dataset(self, split='train', shuffle=True, seed=None, shard_info=None, **unused):
    del unused  # sequence_length, use_cached, num_epochs: unused by function sources
    if shard_info and shard_info.num_shards > 1:
      raise ValueError('A function source does not support low-level sharding; the seqio Task '
                       'shards its dataset instead.')
    if seed is None:
      return self._dataset_fn(split=split, shuffle_files=shuffle)
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)
