"""The decoder converter's loss weights through packing and padding, on hand-built examples."""

import numpy as np
import pytest
import tensorflow as tf

from efficientlm.data import feature_converters


def _dataset(weighted: bool):
  examples = [([5, 6, 7, 1], [0.0, 1.0, 0.0, 0.0]), ([8, 9, 1], [1.0, 0.0, 0.5])]

  def gen():
    for targets, weights in examples:
      ex = {'targets': np.array(targets, np.int32)}
      if weighted:
        ex['targets_loss_weights'] = np.array(weights, np.float32)
      yield ex

  spec = {'targets': tf.TensorSpec([None], tf.int32)}
  if weighted:
    spec['targets_loss_weights'] = tf.TensorSpec([None], tf.float32)
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def _convert(weighted: bool, pack: bool):
  ds = feature_converters.convert(_dataset(weighted), 'decoder', {'targets': 10}, pack=pack)
  return list(ds.as_numpy_iterator())


def test_packed_weights_follow_their_tokens():
  (row,) = _convert(weighted=True, pack=True)
  np.testing.assert_array_equal(row['decoder_target_tokens'], [5, 6, 7, 1, 8, 9, 1, 0, 0, 0])
  np.testing.assert_array_equal(row['decoder_input_tokens'], [0, 5, 6, 7, 0, 8, 9, 0, 0, 0])
  np.testing.assert_array_equal(row['decoder_loss_weights'], [0, 1, 0, 0, 1, 0, 0.5, 0, 0, 0])
  np.testing.assert_array_equal(row['decoder_segment_ids'], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(row['decoder_positions'], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
  assert row['decoder_loss_weights'].dtype == np.float32


def test_padded_weights():
  rows = _convert(weighted=True, pack=False)
  assert set(rows[0]) == {'decoder_target_tokens', 'decoder_input_tokens', 'decoder_loss_weights'}
  np.testing.assert_array_equal(rows[1]['decoder_target_tokens'], [8, 9, 1] + [0] * 7)
  np.testing.assert_array_equal(rows[1]['decoder_loss_weights'], [1, 0, 0.5] + [0] * 7)


def test_without_task_weights_every_real_token_counts():
  (row,) = _convert(weighted=False, pack=True)
  np.testing.assert_array_equal(row['decoder_loss_weights'], [1] * 7 + [0] * 3)
  assert row['decoder_loss_weights'].dtype == np.float32


def test_unknown_converter_is_named():
  with pytest.raises(ValueError, match="'decoder_only'.*'decoder', 'enc_dec', 'prefix_lm'"):
    feature_converters.make_feature_converter('decoder_only')
