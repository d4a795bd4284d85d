"""get_iterator / get_eval_iterators: checkpointed position, multi-process shards, eval padding."""

import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from efficientlm.data import pipeline, registry, synthetic
from efficientlm.data.config import DatasetConfig

RECALL = DatasetConfig('synthetic_recall', {'targets': 128}, batch_size=4)


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_model_shapes():
  it = pipeline.get_iterator(RECALL, 'decoder')
  expected = {k: ((4, 128), np.float32 if k == 'decoder_loss_weights' else np.int32)
              for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                        'decoder_segment_ids', 'decoder_positions')}
  assert it.element_spec == expected
  batch = next(it)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


def test_restored_iterator_continues_where_the_saved_one_was(tmp_path):
  saved = pipeline.get_iterator(RECALL, 'decoder', shard_index=1, num_shards=2)
  _take(saved, 3)
  saved.save(str(tmp_path))
  assert (tmp_path / 'process_1').is_dir()
  expected = _take(saved, 4)
  restored = pipeline.get_iterator(RECALL, 'decoder', shard_index=1, num_shards=2)
  restored.restore(str(tmp_path))
  _assert_same(_take(restored, 4), expected)
  # Without the restore the same config starts over, so the comparison above can fail.
  fresh = _take(pipeline.get_iterator(RECALL, 'decoder', shard_index=1, num_shards=2), 4)
  assert not np.array_equal(fresh[0]['decoder_target_tokens'], expected[0]['decoder_target_tokens'])


def test_restore_without_a_checkpoint_names_the_path(tmp_path):
  it = pipeline.get_iterator(RECALL, 'decoder')
  with pytest.raises(FileNotFoundError, match='process_0'):
    it.restore(str(tmp_path))


def test_shards_split_the_unsharded_stream():
  cfg = DatasetConfig('synthetic_recall', {'targets': 49}, batch_size=4, pack=False,
                      shuffle=False)
  rows = lambda it, n: [r for b in _take(it, n) for r in b['decoder_target_tokens']]
  whole = rows(pipeline.get_iterator(cfg, 'decoder'), 3)  # examples 0..11 in order
  shard0 = rows(pipeline.get_iterator(cfg, 'decoder', shard_index=0, num_shards=2), 3)
  shard1 = rows(pipeline.get_iterator(cfg, 'decoder', shard_index=1, num_shards=2), 3)
  assert len(shard0) == len(shard1) == 6
  np.testing.assert_array_equal(shard0, whole[0::2])
  np.testing.assert_array_equal(shard1, whole[1::2])
  assert not {tuple(r) for r in shard0} & {tuple(r) for r in shard1}


def test_batch_not_divisible_by_shards():
  cfg = DatasetConfig('synthetic_recall', {'targets': 64}, batch_size=6)
  with pytest.raises(ValueError, match='batch_size 6 is not divisible .* 4'):
    pipeline.get_iterator(cfg, 'decoder', shard_index=0, num_shards=4)


@pytest.mark.parametrize('num_shards', [1, 2])
def test_eval_is_one_padded_epoch(num_shards):
  synthetic.register_synthetic_recall('recall_eval', num_validation_examples=10)
  cfg = DatasetConfig('recall_eval', {'targets': 49}, batch_size=4, pack=False)
  per_shard = []
  for shard in range(num_shards):
    (name, it), = pipeline.get_eval_iterators(cfg, 'decoder', shard, num_shards).items()
    assert name == 'recall_eval'
    batches = list(it)
    assert len(batches) == 3  # ceil(10 / 4) global batches, on every process
    for b in batches:
      assert all(v.shape == (4 // num_shards, 49) for v in b.values())
    per_shard.append(batches)
  # Global batch i is the shards' rows in order; its last two rows in batch 3 are padding.
  rows = {k: np.concatenate([np.concatenate([s[i][k] for s in per_shard]) for i in range(3)])
          for k in per_shard[0][0]}
  real = rows['decoder_loss_weights'].sum(axis=1) > 0
  np.testing.assert_array_equal(real, [True] * 10 + [False] * 2)
  for k, v in rows.items():
    assert not v[10:].any(), k
  assert len({tuple(r) for r in rows['decoder_target_tokens'][:10]}) == 10
  expected = synthetic.RecallSpec().example(tf.constant([1, 0], tf.int64))['targets'].numpy()
  np.testing.assert_array_equal(rows['decoder_target_tokens'][0], expected)  # validation index 0


def test_eval_needs_a_validation_or_test_split():
  registry.add_task('train_only', source=seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensors({'targets': [3, 1]}),
      splits=['train']), output_features={'targets': seqio.Feature(
          seqio.PassThroughVocabulary(8))})
  cfg = DatasetConfig('train_only', {'targets': 8}, batch_size=2)
  with pytest.raises(ValueError, match="train_only has neither a validation nor a test split"):
    pipeline.get_eval_iterators(cfg, 'decoder')


def test_unknown_task_is_named():
  with pytest.raises(ValueError, match="Unknown seqio task or mixture 'c4_v999_lm'"):
    pipeline.get_iterator(DatasetConfig('c4_v999_lm', {'targets': 8}), 'decoder')
