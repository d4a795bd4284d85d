"""Span corruption on hand-built token sequences: counts, sentinels, exact reconstruction."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from efficientlm.data import span_corruption

VOCAB = 1000  # sentinels count down from 999; tokens below stay < 900


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """(start, end) of each run of True."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
  """Puts each sentinel's span from the targets back in its place in the inputs."""
  spans, current = {}, None
  for t in targets:
    if t >= VOCAB - 100:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs:
    out.extend(spans.pop(t) if t >= VOCAB - 100 else [t])
  assert not spans, 'targets hold spans the inputs never refer to'
  return out


def test_random_spans_helper_matches_t5_lengths():
  # T5's pretraining lengths: 512 inputs take 568 raw tokens and make 114 targets.
  assert span_corruption.random_spans_helper(512) == (568, 114)


@pytest.mark.parametrize('length', [568, 100, 37, 7])
def test_noise_fraction_and_span_count(length):
  num_noise = min(max(round(length * 0.15), 1), length - 1)
  num_spans = max(round(num_noise / 3.0), 1)
  for seed in range(3):
    mask = span_corruption.noise_mask(tf.constant(length), tf.constant([[seed, 1], [seed, 2]]))
    mask = mask.numpy()
    runs = _runs(mask)
    assert mask.shape == (length,)
    assert mask.sum() == num_noise
    assert len(runs) == num_spans
    assert not mask[0] and mask[-1]  # spans alternate, starting with kept tokens


def test_mask_is_a_function_of_its_seeds():
  mask = lambda s: span_corruption.noise_mask(tf.constant(568), tf.constant(s)).numpy()
  np.testing.assert_array_equal(mask([[1, 2], [3, 4]]), mask([[1, 2], [3, 4]]))
  assert (mask([[1, 2], [3, 4]]) != mask([[1, 2], [3, 5]])).any()


def test_inputs_and_targets_reconstruct_the_tokens():
  tokens = np.random.default_rng(0).integers(2, 900, size=568).astype(np.int32)
  mask = span_corruption.noise_mask(tf.constant(568), tf.constant([[7, 7], [8, 8]]))
  inputs = span_corruption.replace_spans_with_sentinels(tokens, mask, VOCAB).numpy()
  targets = span_corruption.replace_spans_with_sentinels(tokens, ~mask, VOCAB).numpy()
  sentinels = VOCAB - 1 - np.arange(28)  # round(85 / 3) spans
  np.testing.assert_array_equal(inputs[inputs >= 900], sentinels)
  np.testing.assert_array_equal(targets[targets >= 900], sentinels)
  assert targets[0] == VOCAB - 1
  assert len(inputs) == 568 - 85 + 28 and len(targets) == 85 + 28
  assert _reconstruct(list(inputs), list(targets)) == list(tokens)


def test_preprocessor_concatenates_documents_and_fits_lengths():
  docs = [np.arange(2 + 100 * d, 2 + 100 * d + n, dtype=np.int32)
          for d, n in enumerate([5, 40, 17, 90, 3, 60])]
  ds = tf.data.Dataset.from_generator(lambda: ({'targets': d} for d in docs),
                                      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  features = {k: seqio.Feature(seqio.PassThroughVocabulary(VOCAB)) for k in ('inputs', 'targets')}
  lengths = {'inputs': 32, 'targets': 8}
  tokens_length, targets_length = span_corruption.random_spans_helper(32)
  with seqio.utils.map_seed_manager(0):
    out = list(span_corruption.span_corruption(ds, lengths, features).as_numpy_iterator())
  stream = []
  for ex in out:
    stream += _reconstruct(list(ex['inputs']), list(ex['targets']))
    assert len(ex['inputs']) <= 31 and len(ex['targets']) <= targets_length - 1  # + EOS later
  assert stream == list(np.concatenate(docs))
  assert [len(ex['inputs']) for ex in out[:-1]] == [31] * (len(out) - 1)  # full pieces fill it
  # 34 tokens: 5 noise in 2 spans -> 29 kept + 2 sentinels + EOS = 32 inputs, 5 + 2 + 1 targets.
  assert (tokens_length, targets_length) == (34, 8) and len(out) == -(-215 // 34)


def test_targets_length_too_short_is_named():
  ds = tf.data.Dataset.from_tensors({'targets': tf.range(2, 50)})
  features = {k: seqio.Feature(seqio.PassThroughVocabulary(VOCAB)) for k in ('inputs', 'targets')}
  with pytest.raises(ValueError, match=r"task_feature_lengths\['targets'\] is 100; set it to 114"):
    span_corruption.span_corruption(ds, {'inputs': 512, 'targets': 100}, features)
