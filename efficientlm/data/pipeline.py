"""The input pipeline's entry points: this process's share of every global batch, as numpy.

  train_iter = get_iterator(cfg, 'decoder', jax.process_index(), jax.process_count())
  batch = next(train_iter)   # {'decoder_input_tokens': int32 [B / processes, L], ...}
  evals = get_eval_iterators(cfg, 'decoder', jax.process_index(), jax.process_count())

Training: each process reads its own shard of the data (seqio ShardInfo), shuffled and repeated,
and batches cfg.batch_size // num_shards rows. Evaluation: every process reads the whole eval
split in the same order and keeps its block of rows of each global batch, so all processes run
the same number of eval steps (SPMD needs it) and the global batches cover the split exactly once.
"""

from __future__ import annotations

import dataclasses

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data import document_streams, feature_converters, tfds_source
from efficientlm.data import tasks  # noqa: F401  (registers the built-in tasks)
from efficientlm.data.config import DatasetConfig
from efficientlm.data.iterator import DataIterator

EVAL_SPLITS = ('validation', 'test')


def get_iterator(cfg: DatasetConfig, feature_converter: str, shard_index: int = 0,
                 num_shards: int = 1, num_epochs: int | None = None) -> DataIterator:
  """Batches of cfg.split for process `shard_index`; `num_epochs=None` repeats forever."""
  rows = _rows_per_shard(cfg, shard_index, num_shards)
  if cfg.document_streams:
    document_streams.check_config(cfg, feature_converter)
    ds = document_streams.get_iterator_dataset(cfg, shard_index, num_shards, rows,
                                               _model_features, num_epochs=num_epochs)
    return DataIterator(ds.prefetch(tf.data.AUTOTUNE), process_index=shard_index)
  ds = _model_features(cfg, feature_converter, cfg.split, shuffle=cfg.shuffle,
                       num_epochs=num_epochs, shard_info=seqio.ShardInfo(shard_index, num_shards))
  ds = ds.batch(rows, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return DataIterator(ds, process_index=shard_index)


def get_eval_iterators(cfg: DatasetConfig, feature_converter: str, shard_index: int = 0,
                       num_shards: int = 1) -> dict[str, DataIterator]:
  """task name -> one unshuffled epoch of its validation (else test) split, for each task of the
  mixture. The last global batch is padded with all-zero rows (zero loss weight)."""
  rows = _rows_per_shard(cfg, shard_index, num_shards)
  iterators = {}
  for task in seqio.get_subtasks(_provider(cfg.mixture_or_task_name)):
    split = next((s for s in EVAL_SPLITS if s in task.splits), None)
    if split is None:
      raise ValueError(f'Task {task.name} has neither a validation nor a test split (it has '
                       f'{list(task.splits)}); nothing to evaluate.')
    task_cfg = dataclasses.replace(cfg, mixture_or_task_name=task.name)
    ds = _model_features(task_cfg, feature_converter, split, shuffle=False, num_epochs=1,
                         shard_info=None)
    ds = ds.batch(cfg.batch_size).map(lambda b: {
        k: _pad_rows(v, cfg.batch_size)[shard_index * rows:(shard_index + 1) * rows]
        for k, v in b.items()})
    iterators[task.name] = DataIterator(ds.prefetch(tf.data.AUTOTUNE), process_index=shard_index)
  return iterators


def _rows_per_shard(cfg: DatasetConfig, shard_index: int, num_shards: int) -> int:
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index {shard_index} is not in [0, num_shards = {num_shards}).')
  if cfg.batch_size % num_shards:
    raise ValueError(f'DatasetConfig.batch_size {cfg.batch_size} is not divisible by the number '
                     f'of shards (processes) {num_shards}; use a multiple of {num_shards}.')
  return cfg.batch_size // num_shards


def _provider(name: str) -> seqio.DatasetProviderBase:
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f'Unknown seqio task or mixture {name!r}. Registered tasks: '
                     f'{sorted(seqio.TaskRegistry.names())}; register yours first (e.g. '
                     'efficientlm.data.tasks.register_text_lm).') from e


def _model_features(cfg: DatasetConfig, converter: str, split: str, *, shuffle: bool,
                    num_epochs: int | None, shard_info: seqio.ShardInfo | None) -> tf.data.Dataset:
  provider = _provider(cfg.mixture_or_task_name)
  for task in seqio.get_subtasks(provider):  # None restores the source's own data dir
    tfds_source.override_data_dir(task.source, cfg.tfds_data_dir)
  # try_in_mem_cache=False: seqio would ask TFDS for split sizes (absent under tfds mock data),
  # and an in-memory cache would be written into every iterator checkpoint.
  ds = provider.get_dataset(cfg.task_feature_lengths, split=split, use_cached=cfg.use_cached,
                            shuffle=shuffle, seed=cfg.seed, shard_info=shard_info,
                            num_epochs=num_epochs, try_in_mem_cache=False)
  return feature_converters.convert(ds, converter, cfg.task_feature_lengths, pack=cfg.pack)


def _pad_rows(batch: tf.Tensor, rows: int) -> tf.Tensor:
  padding = [[0, rows - tf.shape(batch)[0]]] + [[0, 0]] * (batch.shape.rank - 1)
  return tf.ensure_shape(tf.pad(batch, padding), [rows] + batch.shape[1:].as_list())

