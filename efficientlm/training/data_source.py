"""Where training and evaluation get batches: efficientlm.data pipelines (imported lazily, as they
bring TensorFlow) or, for tests and custom pipelines, plain callables."""

from __future__ import annotations

from typing import Any

import jax

# A DatasetConfig, or a callable (shard_index, num_shards) -> iterator of local numpy batches
# (for eval: -> {task name: iterator}). Iterators expose `element_spec`: name -> (shape, dtype),
# and, to be checkpointed, `save(dir)` / `restore(dir)`.
DataSource = Any


def _dataset_config_cls():
  from efficientlm.data.config import DatasetConfig  # pylint: disable=g-import-not-at-top
  return DatasetConfig


def make_iterator(source: DataSource, feature_converter: str):
  """This process's iterator over the training data of `source`."""
  index, count = jax.process_index(), jax.process_count()
  if isinstance(source, _dataset_config_cls()):
    from efficientlm.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
    return pipeline.get_iterator(source, feature_converter, index, count)
  if callable(source):
    return source(index, count)
  raise TypeError(f'A data source is a DatasetConfig or a callable, got {type(source)}.')


def make_eval_iterators(source: DataSource, feature_converter: str) -> dict[str, Any]:
  """task name -> this process's one-epoch iterator over the eval split of `source`."""
  index, count = jax.process_index(), jax.process_count()
  if isinstance(source, _dataset_config_cls()):
    from efficientlm.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.get_eval_iterators(source, feature_converter, index, count)
  if callable(source):
    return dict(source(index, count))
  raise TypeError(f'An eval data source is a DatasetConfig or a callable, got {type(source)}.')


def global_batch_spec(iterator) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the global batches assembled from every process's `iterator` rows."""
  spec = getattr(iterator, 'element_spec', None)
  if spec is None:
    raise TypeError('A data iterator must expose element_spec: name -> (shape, dtype).')
  return {k: jax.ShapeDtypeStruct((shape[0] * jax.process_count(),) + tuple(shape[1:]), dtype)
          for k, (shape, dtype) in spec.items()}
