"""Tasks with answer choices: examples -> [C, ...] rows of each feature converter's features
(data/choices.py), and the stdlib_code_next_line task (data/stdlib_next_line.py)."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from efficientlm.data import feature_converters, pipeline, stdlib_code, stdlib_next_line
from efficientlm.data.config import DatasetConfig
from efficientlm.errors import ConfigError
from tests.data import fake_stdlib

# Two examples of 3 choices: the first has an absent choice (all zero), the second a short prompt.
INPUTS = [[5, 6, 7], [8, 9]]
CHOICES = [[[3, 4, 0], [10, 0, 0], [0, 0, 0]], [[11, 12, 13], [14, 0, 0], [15, 16, 0]]]
LABELS = [1, 2]


def _examples(labels=LABELS):
  def gen():
    for inputs, options, label in zip(INPUTS, CHOICES, labels):
      yield {'inputs': np.array(inputs, np.int32), 'choices': np.array(options, np.int32),
             'label': np.int32(label)}
  spec = {'inputs': tf.TensorSpec([None], tf.int32), 'choices': tf.TensorSpec([3, None], tf.int32),
          'label': tf.TensorSpec([], tf.int32)}
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def _convert(name, lengths=None, labels=LABELS, pack=False):
  ds = feature_converters.convert(_examples(labels), name, lengths or {'inputs': 4, 'targets': 3},
                                  pack=pack)
  return list(ds.as_numpy_iterator())


def test_encoder_decoder_rows_are_prompt_and_choice():
  first, second = _convert('enc_dec')
  np.testing.assert_array_equal(first['encoder_input_tokens'], [[5, 6, 7, 0]] * 3)
  np.testing.assert_array_equal(first['decoder_target_tokens'], CHOICES[0])
  np.testing.assert_array_equal(first['decoder_input_tokens'], [[0, 3, 4], [0, 10, 0], [0] * 3])
  np.testing.assert_array_equal(first['decoder_loss_weights'], np.array(CHOICES[0]) > 0)
  assert first['decoder_loss_weights'].dtype == np.float32
  np.testing.assert_array_equal(first['choice_is_correct'], [0, 1, 0])
  np.testing.assert_array_equal(second['encoder_input_tokens'], [[8, 9, 0, 0]] * 3)
  np.testing.assert_array_equal(second['choice_is_correct'], [0, 0, 1])


@pytest.mark.parametrize('name', ['decoder', 'prefix_lm'])
def test_decoder_rows_are_prompt_then_choice_with_loss_on_the_choice(name):
  for ex, inputs, options, label in zip(_convert(name), INPUTS, CHOICES, LABELS):
    for c, choice in enumerate(options):
      choice = [t for t in choice if t]
      row = np.zeros(7, np.int32)
      row[:len(inputs) + len(choice)] = inputs + choice
      np.testing.assert_array_equal(ex['decoder_target_tokens'][c], row)
      np.testing.assert_array_equal(ex['decoder_input_tokens'][c], np.concatenate([[0], row[:-1]]))
      weights = np.zeros(7)
      weights[len(inputs):len(inputs) + len(choice)] = 1
      np.testing.assert_array_equal(ex['decoder_loss_weights'][c], weights)
    np.testing.assert_array_equal(ex['choice_is_correct'], np.arange(3) == label)
    if name == 'prefix_lm':  # the prompt (and, as seqio has it, one position more) bidirectional
      np.testing.assert_array_equal(ex['decoder_causal_attention'][:, :len(inputs)], 1)
      np.testing.assert_array_equal(ex['decoder_causal_attention'][:, len(inputs) + 1:], 0)


def test_bad_choices_are_errors_that_name_the_fix():
  with pytest.raises(ConfigError, match='pack = False'):
    _convert('decoder', pack=True)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"longer than task_feature_lengths\["):
    _convert('enc_dec', {'inputs': 4, 'targets': 2})
  with pytest.raises(tf.errors.InvalidArgumentError, match="label is not one of its choices"):
    _convert('enc_dec', labels=[2, 0])  # the first example's choice 2 is absent


# --- stdlib_code_next_line on a fake standard library ------------------------------------------

SPEC = dict(validation_fraction=0.3, num_choices=3, context_bytes=16, min_line_bytes=8,
            max_line_bytes=40, examples_per_file=5)


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory):
  return str(fake_stdlib.write(tmp_path_factory.mktemp('stdlib')))


def test_next_line_examples_are_the_files_lines_deterministic_and_splits_disjoint(
    fake_root, tmp_path):
  splits = {s: stdlib_next_line.split_examples(fake_root, s, **SPEC)
            for s in ('train', 'validation')}
  files = {s: set(a['file']) for s, a in splits.items()}
  assert files['train'] and files['validation'] and not files['train'] & files['validation']
  assert set(stdlib_code.split_files(fake_root, 0.3)['validation']) >= files['validation']
  pairs = {s: set(zip(a['contexts'], a['answers'])) for s, a in splits.items()}
  assert not pairs['train'] & pairs['validation']
  for split, arrays in splits.items():
    texts = {p: open(os.path.join(fake_root, p), 'rb').read()
             for p in stdlib_code.split_files(fake_root, 0.3)[split]}
    split_lines = {line for text in texts.values() for line in text.split(b'\n')}
    for n, path in enumerate(arrays['file']):
      choices = [bytes(int(t) - 3 for t in row if t) for row in arrays['choices'][n]]
      context = bytes(int(t) - 3 for t in arrays['inputs'][n] if t)
      answer = choices[arrays['label'][n]]
      assert answer == arrays['answers'][n] and context == arrays['contexts'][n]
      # The line after the context in its file; the others, lines of the same split's files.
      assert (context + answer) in texts[path] and context.endswith(b'\n')
      assert len({c.strip() for c in choices}) == 3
      assert all(c.endswith(b'\n') and c[:-1] in split_lines for c in choices)
  # Rebuilt from a copy elsewhere (another cache entry): the same examples.
  copy = fake_stdlib.write(tmp_path / 'copy')
  again = stdlib_next_line.split_examples(str(copy), 'validation', **SPEC)
  for key in ('inputs', 'choices', 'label'):
    np.testing.assert_array_equal(again[key], splits['validation'][key])


def test_next_line_task_batches_through_the_pipeline(fake_root):
  name = stdlib_next_line.register_stdlib_code_next_line('fake_next_line', root=fake_root, **SPEC)
  cfg = DatasetConfig(name, {'inputs': 16, 'targets': 40}, split='validation', batch_size=4,
                      shuffle=False, pack=False)
  batches = list(pipeline.get_eval_iterators(cfg, 'decoder')[name])
  assert batches[0]['decoder_target_tokens'].shape == (4, 3, 56)
  correct = np.concatenate([b['choice_is_correct'] for b in batches])
  real = correct.sum(-1) == 1
  expected = stdlib_next_line.split_examples(fake_root, 'validation', **SPEC)
  assert real.sum() == len(expected['label']) and not correct[~real].any()  # padding: all zero
  np.testing.assert_array_equal(np.argmax(correct[real], -1), expected['label'])
  with pytest.raises(ValueError, match="'targets'] is 20; set it to at least 40"):
    next(pipeline.get_iterator(dataclasses.replace(cfg, task_feature_lengths={
        'inputs': 16, 'targets': 20}), 'decoder'))
