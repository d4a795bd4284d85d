"""seqio preprocessors that cut tokenized documents into training examples."""

from __future__ import annotations

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio



def split_tokens(tokens: tf.Tensor, length: int) -> tf.data.Dataset:
  """Consecutive pieces of the 1-D `tokens`: `length` tokens each, the last one possibly fewer."""
  size = tf.size(tokens)
  num_pieces = (size + length - 1) // length
  pieces = tf.reshape(tf.pad(tokens, [[0, num_pieces * length - size]]), [num_pieces, length])
  sizes = tf.minimum(length, size - tf.range(num_pieces) * length)
  return tf.data.Dataset.from_tensor_slices((pieces, sizes)).map(lambda p, n: p[:n])


def split_into_sequences(dataset: tf.data.Dataset, sequence_length,
                         key: str = 'targets') -> tf.data.Dataset:
  """Each document (tokenized, with its EOS) becomes examples of sequence_length[key] tokens.

  Pieces are consecutive and only the last piece of a document is shorter, so a sequence never
  holds two documents (packing may later put several in one row, with separate segment ids).
  Works for any length: a PG19 book of 100k tokens and 2k or 64k sequences alike.
  """
  length = sequence_length[key]
  return dataset.flat_map(lambda ex: split_tokens(ex[key], length).map(lambda t: {key: t}))


def concatenate_and_split(dataset: tf.data.Dataset, length: int, key: str = 'targets',
                          documents_per_group: int = 128) -> tf.data.Dataset:
  """T5's reduce_concat_tokens + split_tokens: groups of documents joined end to end (no
  separator) and cut into pieces of `length` tokens, so short documents waste no padding."""
  groups = dataset.map(lambda ex: ex[key]).ragged_batch(documents_per_group)
  return groups.flat_map(lambda g: split_tokens(g.flat_values, length).map(lambda t: {key: t}))


@seqio.map_over_dataset(num_seeds=1)
def _split_at_random_point(features, seed, max_inputs, max_targets):
  tokens = features['targets']
  size = tf.size(tokens)
  # Uniform over the cut points that leave a non-empty prefix and suffix that fit.
  low = tf.maximum(1, size - max_targets)
  high = tf.minimum(size - 1, max_inputs)
  cut = tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)
  return {'inputs': tokens[:cut], 'targets': tokens[cut:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
  """T5's prefix-LM objective: documents (tokenized, no EOS) are cut into chunks of up to
  inputs + targets - 2 tokens, and each chunk at a random point into 'inputs' and 'targets'.

  T5 cuts chunks of the inputs length uniformly; here the cut is uniform over the points where
  both halves fit their lengths, leaving one token each for the EOS appended afterwards
  (follow with seqio.preprocessors.append_eos_after_trim).
  """
  max_inputs, max_targets = sequence_length['inputs'] - 1, sequence_length['targets'] - 1
  if min(max_inputs, max_targets) < 1:
    raise ValueError(f'prefix_lm needs inputs and targets lengths of at least 2, got '
                     f'{dict(sequence_length)}.')
  dataset = split_into_sequences(dataset, {'targets': max_inputs + max_targets})
  dataset = dataset.filter(lambda ex: tf.size(ex['targets']) >= 2)
  return _split_at_random_point(dataset, max_inputs=max_inputs, max_targets=max_targets)
