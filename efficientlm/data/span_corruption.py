"""T5's span-corruption objective (Raffel et al. 2020, section 3.1.4), written from the paper.

Documents are concatenated into one token stream and cut into pieces of `tokens_length` tokens.
In each piece, `noise_density` of the tokens (15%) form noise spans of mean length 3; the inputs
keep the other tokens with each noise span replaced by a sentinel, and the targets are each
sentinel followed by the span it replaced:

  tokens   a b c d e f g h       (noise: c d, g)
  inputs   a b <S1> e f <S2> h   <S1> = vocab_size - 1, <S2> = vocab_size - 2, ...
  targets  <S1> c d <S2> g

`tokens_length` is the longest piece whose inputs, EOS included, fit the 'inputs' length
(`random_spans_helper`; 568 tokens for 512 inputs, with targets of 114).
"""

from __future__ import annotations

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data import preprocessors

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) in a piece of `length` tokens; `noise_mask` uses the same rule.

  Python's round and tf.round both round half to even, so the two always agree.
  """
  length = max(length, 2)
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, num_spans


def random_spans_helper(inputs_length: int, noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(tokens_length, targets_length): raw tokens per piece and the targets they make.

  The inputs of a piece of n tokens hold its non-noise tokens, a sentinel per noise span and EOS;
  tokens_length is the largest n whose inputs fit `inputs_length`. The targets hold the noise
  tokens, a sentinel per span and EOS.
  """
  def lengths(n):
    num_noise, num_spans = noise_counts(n, noise_density, mean_noise_span_length)
    return n - num_noise + num_spans + 1, num_noise + num_spans + 1

  if inputs_length < 3:
    raise ValueError(f'span corruption needs an inputs length of at least 3, got {inputs_length}.')
  tokens_length = inputs_length - 1  # fits: a piece's spans never outnumber its noise tokens
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def _random_partition(num_items: tf.Tensor, num_parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Lengths of `num_parts` non-empty runs that split `num_items`, uniformly at random."""
  # A run starts after each of num_parts - 1 cuts, placed in distinct gaps between items.
  is_cut = tf.range(num_items - 1) < num_parts - 1
  is_cut = tf.gather(is_cut, tf.argsort(tf.random.stateless_uniform([num_items - 1], seed)))
  run_of_item = tf.concat([[0], tf.cumsum(tf.cast(is_cut, tf.int32))], axis=0)
  return tf.math.bincount(run_of_item, minlength=num_parts, dtype=tf.int32)


def noise_mask(length: tf.Tensor, seeds, noise_density: float = NOISE_DENSITY,
               mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.Tensor:
  """Bool [length], True at noise tokens: T5's random_spans_noise_mask.

  Spans alternate non-noise, noise, non-noise, ..., noise; both kinds' lengths are random
  partitions, so the counts are exact (`noise_counts`). Pieces shorter than 2 tokens are treated
  as 2 long and truncated, as in T5.
  """
  true_length = length
  length = tf.maximum(length, 2)
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  kept_lengths = _random_partition(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  span_index = tf.repeat(tf.range(2 * num_spans), span_lengths)
  return tf.equal(span_index % 2, 1)[:true_length]


def replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor,
                                 vocab_size: int) -> tf.Tensor:
  """Each run of masked tokens becomes one sentinel: vocab_size - 1, then vocab_size - 2, ..."""
  previous = tf.pad(mask[:-1], [[1, 0]])
  starts = tf.logical_and(mask, tf.logical_not(previous))
  sentinels = vocab_size - tf.cumsum(tf.cast(starts, tokens.dtype))
  tokens = tf.where(starts, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(tf.logical_and(mask, previous)))


@seqio.map_over_dataset(num_seeds=2)
def _corrupt(features, seeds, vocab_size, noise_density, mean_noise_span_length):
  tokens = features['targets']
  mask = noise_mask(tf.size(tokens), seeds, noise_density, mean_noise_span_length)
  return {'inputs': replace_spans_with_sentinels(tokens, mask, vocab_size),
          'targets': replace_spans_with_sentinels(tokens, tf.logical_not(mask), vocab_size)}


def span_corruption(dataset: tf.data.Dataset, sequence_length, output_features,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """seqio preprocessor: tokenized documents in 'targets' -> span-corrupted inputs/targets.

  Follow it with seqio.preprocessors.append_eos_after_trim; the lengths leave room for EOS.
  """
  tokens_length, targets_length = random_spans_helper(
      sequence_length['inputs'], noise_density, mean_noise_span_length)
  if sequence_length['targets'] < targets_length:
    raise ValueError(
        f"Span corruption with an inputs length of {sequence_length['inputs']} makes targets of "
        f"up to {targets_length} tokens, but task_feature_lengths['targets'] is "
        f"{sequence_length['targets']}; set it to {targets_length}.")
  dataset = preprocessors.concatenate_and_split(dataset, tokens_length)
  return _corrupt(dataset, vocab_size=output_features['targets'].vocabulary.vocab_size,
                  noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
