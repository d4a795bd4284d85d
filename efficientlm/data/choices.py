"""Tasks with answer choices, for rank classification and T-Few's losses (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
sec. 3.2): the task format, and how examples become the model's batches.

A choices task's examples hold (after its preprocessors):
  'inputs'   int32 [I]       the prompt
  'choices'  int32 [C, T]    the answer choices, right-padded with 0 (0 is never a token inside
                             a choice); an all-zero row is no choice, so examples with fewer
                             choices than the task's C fit one static shape
  'label'    int32 []        the index of the correct choice
T-Few's batches (and T5X's rank classification) score each choice as the targets of the prompt.
`convert` makes one element per example, each choice a row of the model's usual features:
  'enc_dec'    encoder_input_tokens [C, I] (the prompt, repeated), decoder_input_tokens,
               decoder_target_tokens, decoder_loss_weights [C, T] (the choice)
  'decoder'    decoder_* [C, I + T]: the prompt then the choice, loss weights on the choice only
  'prefix_lm'  the same, with decoder_causal_attention (the prompt attended bidirectionally)
and choice_is_correct [C] (int32, 1 at the label), so that batches are [E, C, ...] for E examples.
With the examples axis first, whatever splits a batch (data-parallel shards, processes,
microbatches) keeps each example's choices together, which the losses over choices need;
BaseModel runs the network on the E * C rows. DatasetConfig.batch_size counts examples. An
encoder-decoder model encodes each row's copy of the prompt (the authors' code encodes it once
and repeats its states): the same values for C times the encoder's compute.

Choices are expanded here, after seqio has shuffled the examples, and unpacked: a choice is a
row. A prompt longer than task_feature_lengths['inputs'] is cut by seqio as usual; a choice longer
than 'targets' stops the pipeline with an error naming the lengths (cutting choices could make
two of them equal).
"""

from __future__ import annotations

from collections.abc import Mapping

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.errors import ConfigError

INPUTS, CHOICES, LABEL = 'inputs', 'choices', 'label'
IS_CORRECT = 'choice_is_correct'  # the model's name for it: models.model.CHOICE_IS_CORRECT
_PASSTHROUGH = {IS_CORRECT: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """The seqio output features of a choices task whose tokens are ids of `vocabulary`."""
  return {INPUTS: seqio.Feature(vocabulary, add_eos=False),
          CHOICES: seqio.Feature(vocabulary, add_eos=False, rank=2),
          LABEL: seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, rank=0)}


def has_choices(ds: tf.data.Dataset) -> bool:
  return CHOICES in ds.element_spec


def num_choices(ds: tf.data.Dataset) -> int:
  count = ds.element_spec[CHOICES].shape[0]
  if count is None:
    raise ValueError("A choices task's 'choices' must have a static number of rows (pad absent "
                     'choices with all-zero rows).')
  return count


def convert(ds: tf.data.Dataset, converter: type[seqio.FeatureConverter], name: str,
            task_feature_lengths: Mapping[str, int], pack: bool) -> tf.data.Dataset:
  """Examples of a choices task -> elements of [C, ...] model features (see the module doc)
  made by the feature converter class `converter` (registered as `name`)."""
  if pack:
    raise ConfigError('This task has answer choices, which are scored one per row: set '
                      'DatasetConfig.pack = False (PACK = False in the run gins).')
  missing = {INPUTS, 'targets'} - set(task_feature_lengths)
  if missing:
    raise ConfigError(f'A task with answer choices needs task_feature_lengths for the prompt '
                      f"and a choice: {{'inputs': ..., 'targets': ...}}; got "
                      f'{dict(task_feature_lengths)}.')
  count = num_choices(ds)
  max_choice = task_feature_lengths['targets']
  rows = ds.flat_map(lambda ex: _rows(ex, count, max_choice, concatenate=name == 'decoder'))
  lengths = {IS_CORRECT: 1}
  if name == 'decoder':  # the LM converter reads one sequence: prompt + choice
    lengths['targets'] = task_feature_lengths[INPUTS] + max_choice
  else:
    lengths.update({INPUTS: task_feature_lengths[INPUTS], 'targets': max_choice})
  rows = converter(pack=False, passthrough_features=_PASSTHROUGH)(
      rows, task_feature_lengths=lengths)
  # The converters map row by row in order, so C consecutive rows are one example's choices.
  return rows.batch(count, drop_remainder=True).map(
      lambda ex: {**ex, IS_CORRECT: ex[IS_CORRECT][:, 0]})


def _rows(example, count: int, max_choice: int, concatenate: bool) -> tf.data.Dataset:
  choices, label, inputs = example[CHOICES], example[LABEL], example[INPUTS]
  lengths = tf.reduce_sum(tf.cast(choices != 0, tf.int32), axis=1)
  checks = [
      tf.debugging.assert_less_equal(
          tf.reduce_max(lengths), max_choice,
          message=f"A choice is longer than task_feature_lengths['targets'] = {max_choice}; "
                  'raise it to the length of the longest choice.'),
      tf.debugging.assert_equal(
          (label >= 0) & (label < count) & (tf.gather(lengths, tf.clip_by_value(
              label, 0, count - 1)) > 0), True,
          message=f"An example's label is not one of its choices (0..{count - 1}, non-empty)."),
  ]
  with tf.control_dependencies(checks):
    lengths = tf.identity(lengths)

  def row(index):
    choice = choices[index, :lengths[index]]
    correct = tf.cast(tf.equal(index, label), tf.int32)[None]
    if concatenate:
      weights = tf.concat([tf.zeros(tf.shape(inputs), tf.float32),
                           tf.ones(tf.shape(choice), tf.float32)], axis=0)
      return {'targets': tf.concat([inputs, choice], axis=0), 'targets_loss_weights': weights,
              IS_CORRECT: correct}
    return {INPUTS: inputs, 'targets': choice, IS_CORRECT: correct}

  return tf.data.Dataset.range(count).map(lambda i: row(tf.cast(i, tf.int32)))
