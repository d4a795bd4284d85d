"""Synthetic recall and induction: every weighted answer is re-derived in plain Python from the
sequence itself; examples are a function of (split, index)."""

import numpy as np
import pytest

from efficientlm.data import pipeline, synthetic
from efficientlm.data.config import DatasetConfig
from tests.data import batch_checks


def _sequences(name, length, split='train', batches=2, pack=True, shuffle=True):
  """(tokens, weights) of each example, cut out of packed rows by segment id."""
  cfg = DatasetConfig(name, {'targets': length}, split=split, batch_size=4, pack=pack,
                      shuffle=shuffle)
  out = []
  it = pipeline.get_iterator(cfg, 'decoder')
  for _ in range(batches):
    b = next(it)
    if pack:
      batch_checks.assert_packed(b['decoder_target_tokens'], b['decoder_segment_ids'],
                                 b['decoder_positions'])
      seg = b['decoder_segment_ids']
    else:
      seg = (b['decoder_target_tokens'] > 0).astype(int)
    for tokens, weights, s in zip(b['decoder_target_tokens'], b['decoder_loss_weights'], seg):
      out += zip(batch_checks.segments(tokens, s), batch_checks.segments(weights, s))
  return out


def _check_recall(tokens, weights, vocab=64, num_keys=16, pairs=8, queries=16):
  is_key = lambda t: 2 <= t < 2 + num_keys
  is_value = lambda t: 2 + num_keys <= t < vocab
  assert len(tokens) == 2 * pairs + 2 * queries + 1 and tokens[-1] == 1
  memory = {}
  for k, v in zip(tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]):
    assert is_key(k) and is_value(v) and k not in memory
    memory[k] = v
  answers = []
  for i in range(2 * pairs, 2 * pairs + 2 * queries, 2):
    assert tokens[i] in memory and tokens[i + 1] == memory[tokens[i]]
    answers.append(i + 1)
  np.testing.assert_array_equal(np.flatnonzero(weights), answers)
  assert np.all(weights[answers] == 1.0)


def _check_induction(tokens, weights, vocab=64, length=64):
  assert len(tokens) == length and tokens[-1] == 1
  assert np.all((tokens[:-1] >= 2) & (tokens[:-1] < vocab))
  markers = np.flatnonzero(tokens == 2)
  assert len(markers) == 2 and markers[1] == length - 3
  answer = markers[1] + 1
  assert tokens[answer] == tokens[markers[0] + 1]
  np.testing.assert_array_equal(np.flatnonzero(weights), [answer])
  assert weights[answer] == 1.0


def test_recall_answers_follow_from_the_pairs():
  examples = _sequences('synthetic_recall', 128)  # two examples per packed row
  assert len(examples) >= 8
  for tokens, weights in examples:
    _check_recall(tokens, weights)


def test_induction_answer_is_the_token_after_the_first_marker():
  for tokens, weights in _sequences('synthetic_induction', 64):
    _check_induction(tokens, weights)


def test_custom_recall_registration():
  name = synthetic.register_synthetic_recall('recall_small', vocab_size=32, num_keys=8,
                                             num_pairs=4, num_queries=6)
  assert name == 'recall_small'
  synthetic.register_synthetic_recall('recall_small', vocab_size=32, num_keys=8, num_pairs=4,
                                      num_queries=6)
  examples = _sequences(name, 21, pack=False)
  for tokens, weights in examples:
    _check_recall(tokens, weights, vocab=32, num_keys=8, pairs=4, queries=6)
  # Queries are drawn with replacement: six queries over four keys must repeat one.
  assert all(len(set(tokens[8:20:2])) < 6 for tokens, _ in examples)


def test_same_split_and_index_same_example():
  first = _sequences('synthetic_recall', 49, pack=False, shuffle=False)
  again = _sequences('synthetic_recall', 49, pack=False, shuffle=False)
  validation = _sequences('synthetic_recall', 49, split='validation', pack=False, shuffle=False)
  for (a, wa), (b, wb) in zip(first, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(wa, wb)
  train_set = {tuple(t) for t, _ in first}
  assert len(train_set) == len(first)  # indices give distinct examples
  assert not train_set & {tuple(t) for t, _ in validation}
  for tokens, weights in validation:
    _check_recall(tokens, weights)


def test_sequence_longer_than_targets_length_is_an_error():
  cfg = DatasetConfig('synthetic_recall', {'targets': 32}, batch_size=2)
  with pytest.raises(ValueError, match=r"makes sequences of 49 tokens.*\['targets'\] is 32"):
    pipeline.get_iterator(cfg, 'decoder')


@pytest.mark.parametrize('kwargs,match', [(dict(num_pairs=17), 'num_pairs = 17'),
                                          (dict(num_queries=0), 'num_queries = 0'),
                                          (dict(num_keys=62), 'num_keys = 62')])
def test_bad_recall_parameters_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.register_synthetic_recall('recall_bad', **kwargs)
