"""Token-stream preprocessors on hand-built documents."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from efficientlm.data import preprocessors


def _docs(*lengths):
  docs = [np.arange(100 * d + 2, 100 * d + 2 + n, dtype=np.int32) for d, n in enumerate(lengths)]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  return docs, ds


@pytest.mark.parametrize('size,length', [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_split_tokens(size, length):
  pieces = [p.numpy() for p in preprocessors.split_tokens(tf.range(size), length)]
  expected = [np.arange(i, min(i + length, size)) for i in range(0, size, length)]
  assert len(pieces) == len(expected)
  for p, e in zip(pieces, expected):
    np.testing.assert_array_equal(p, e)


def test_split_into_sequences_keeps_documents_apart():
  docs, ds = _docs(9, 3, 8)
  out = [ex['targets'] for ex in preprocessors.split_into_sequences(ds, {'targets': 4})
         .as_numpy_iterator()]
  assert [len(p) for p in out] == [4, 4, 1, 3, 4, 4]
  np.testing.assert_array_equal(np.concatenate(out), np.concatenate(docs))
  assert all(len({t // 100 for t in p}) == 1 for p in out)  # one document per sequence


def test_prefix_lm_cuts_uniformly_where_both_halves_fit():
  # Chunks of 5 + 3 = 8 tokens: inputs 1..5 tokens, targets 1..3 (one more each for EOS).
  docs, ds = _docs(8, 6, 2, 1)
  with seqio.utils.map_seed_manager(0):
    ds = preprocessors.prefix_lm(ds.repeat(200), {'inputs': 6, 'targets': 4})
    out = list(ds.as_numpy_iterator())
  cuts = {8: set(), 6: set(), 2: set()}  # the 1-token document cannot be cut: dropped
  for ex in out:
    whole = np.concatenate([ex['inputs'], ex['targets']])
    (doc,) = [d for d in docs if len(d) == len(whole) and (d == whole).all()]
    cuts[len(doc)].add(len(ex['inputs']))
  assert len(out) == 600
  assert cuts == {8: {5}, 6: {3, 4, 5}, 2: {1}}
