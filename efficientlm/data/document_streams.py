"""Document streams: each batch row reads its own documents' segments, in order, step after step.

Models that carry state from one training step to the next (Block-Recurrent Transformer layers,
layers/block_recurrent.py, with TransformerConfig.carry_state) need row r of step t+1 to continue
the text that row r held at step t (Hutchins et al. 2022, sec. 4: PG19 books split into
segments fed in order, state carried between them). `DatasetConfig.document_streams = True`
makes the training pipeline do that:

  row r of the global batch (B rows) is stream r: the task's documents r, r + B, r + 2B, ... in
  the source's order (seqio ShardInfo(r, B), so each stream tokenizes only its own documents),
  each cut into consecutive 'targets'-long segments by the task (split_into_sequences), one
  segment per step; at a document's end the row goes on with its next document.

Features: the decoder converter's (unpacked) plus `decoder_stream_reset` [B] int32, 1 where the
row starts a document (the trainer then resets that row's state). A continuing segment's first
input is the previous segment's last target instead of BOS, so each stream is one token sequence
(the model sees every token as an input once, like training on the unsplit document).

A document's end is where its EOS is (every LM task here tokenizes with EOS); tasks without a
'targets'-only LM preprocessing cannot stream. The per-stream pipelines are tf.data throughout,
so the iterator checkpoint (data/iterator.py) resumes every stream at its segment.
"""

from __future__ import annotations

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data.config import DatasetConfig
from efficientlm.errors import ConfigError
from efficientlm.models.model import STREAM_RESET_FEATURE as RESET_FEATURE


def check_config(cfg: DatasetConfig, feature_converter: str) -> None:
  """The streams' preconditions, each error naming the binding to change."""
  if feature_converter != 'decoder':
    raise ConfigError(f'DatasetConfig.document_streams feeds decoder-only language models (the '
                      f"'decoder' feature converter), not {feature_converter!r}.")
  if set(cfg.task_feature_lengths) != {'targets'}:
    raise ConfigError('DatasetConfig.document_streams needs task_feature_lengths = {"targets": '
                      f'L}} (one stream of text per row), got {cfg.task_feature_lengths}.')
  if cfg.pack:
    raise ConfigError('DatasetConfig.document_streams rows hold one document each: set '
                      'DatasetConfig.pack = False.')
  if cfg.shuffle:
    raise ConfigError("DatasetConfig.document_streams reads each document's segments in order "
                      '(a shuffled stream would carry state into unrelated text): set '
                      'DatasetConfig.shuffle = False.')


def _stream(cfg: DatasetConfig, index: int, num_streams: int, split: str,
            num_epochs: int | None, eos_id: int, model_features) -> tf.data.Dataset:
  """Stream `index`: its documents' segments in order, as decoder features plus the reset.
  `model_features`: pipeline._model_features (the task's dataset through the converter)."""
  ds = model_features(cfg, 'decoder', split, shuffle=False, num_epochs=num_epochs,
                      shard_info=seqio.ShardInfo(index, num_streams))

  def link(previous, features):
    """previous: (this row's last target so far, whether its document ended)."""
    last_target, ended = previous
    reset = tf.cast(ended, tf.int32)
    inputs = features['decoder_input_tokens']
    inputs = tf.tensor_scatter_nd_update(inputs, [[0]],
                                         tf.where(ended, inputs[:1], last_target[None]))
    targets = features['decoder_target_tokens']
    real = tf.reduce_sum(tf.cast(targets > 0, tf.int32))
    new_last = tf.where(real > 0, targets[tf.maximum(real - 1, 0)], last_target)
    done = tf.reduce_any(tf.equal(targets, eos_id))
    return (new_last, done), dict(features, decoder_input_tokens=inputs, **{RESET_FEATURE: reset})

  return ds.scan((tf.constant(0, tf.int32), tf.constant(True)), link)


def get_iterator_dataset(cfg: DatasetConfig, shard_index: int, num_shards: int, rows: int,
                         model_features, split: str | None = None,
                         num_epochs: int | None = None) -> tf.data.Dataset:
  """This process's rows (global rows shard_index * rows ...) of every batch, as one dataset;
  `model_features` as for _stream."""
  provider = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  vocabulary = provider.output_features['targets'].vocabulary
  first = shard_index * rows
  streams = tuple(_stream(cfg, first + j, rows * num_shards, split or cfg.split, num_epochs,
                          vocabulary.eos_id, model_features) for j in range(rows))
  return tf.data.Dataset.zip(streams).map(
      lambda *rows_: {k: tf.stack([r[k] for r in rows_]) for k in rows_[0]})
