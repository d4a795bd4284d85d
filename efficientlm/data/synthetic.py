"""Synthetic languages for testing what a small model can recall (H3, Fu et al. 2023; Zoology,
Arora et al. 2023), generated in-process and deterministic.

Token ids: 0 pad, 1 EOS, then task tokens. Each example is a 'targets' sequence ending in EOS and
'targets_loss_weights' (float32): 1.0 exactly at the tokens the task asks for, 0 elsewhere, so
training and evaluation score recall only.

Example `i` of a split is a pure function of (split, i): TF's stateless RNG seeded by
(split id, i). The 'train' split is a 2**62-long range (never exhausted), 'validation' the first
`num_validation_examples` indices of a different seed stream. Generation is in TF ops rather than
numpy so that the tf.data iterator stays checkpointable (a py_function makes it refuse to save).

What a small model learns quickly (2 CPU cores, the tiny decoder of configs/models/decoder/
tiny.gin: 2 layers, d 128, 4 query heads of 32 dims, one KV head; AdamW 3e-3, batch 32):
induction with its defaults and recall with its defaults (16 key ids, 8 pairs, 16 queries)
both reach 100% answer accuracy within about 500 steps. Recall gets much harder as the key
alphabet grows (a head must keep that many keys apart in its 32 dims) and as pairs are added:
31 key ids and 16 pairs, or 63 key ids even with 4 pairs, stay at the copy-some-value plateau
for thousands of steps; MQAR at Zoology's scale needs Zoology-scale training.

The model's vocab must cover the task's: in a run gin share one macro, e.g.

  VOCAB_SIZE = 64
  MIXTURE_OR_TASK_NAME = @tasks.register_synthetic_recall()
  tasks.register_synthetic_recall.vocab_size = %VOCAB_SIZE
"""

from __future__ import annotations

import dataclasses
import functools

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data.registry import add_task
from efficientlm.data.resumable_source import ResumableFunctionSource

PAD_ID, EOS_ID = 0, 1
_SPLIT_IDS = {'train': 0, 'validation': 1}
_TRAIN_EXAMPLES = 2**62


@dataclasses.dataclass(frozen=True)
class RecallSpec:
  """Multi-query associative recall (MQAR): `num_pairs` key-value pairs with distinct keys, then
  `num_queries` queries, each a key drawn (with replacement) from the pairs and followed by its
  value, the weighted answer:

    k1 v1 k2 v2 ... kP vP  q1 a1 ... qQ aQ  EOS      (length 2P + 2Q + 1; 49 by default)

  Keys are ids [2, 2 + num_keys), values [2 + num_keys, vocab_size); values may repeat. Queries
  are drawn with replacement so that no answer can be had by elimination (with distinct queries
  the last one is whatever value is left). Defaults: vocab 64 (16 key ids, 46 value ids), 8
  pairs, 16 queries.
  """

  vocab_size: int = 64
  num_keys: int = 16
  num_pairs: int = 8
  num_queries: int = 16

  def __post_init__(self):
    if not 1 <= self.num_keys <= self.vocab_size - 3:
      raise ValueError(f'RecallSpec.num_keys = {self.num_keys}; with vocab_size '
                       f'{self.vocab_size} it must be in [1, {self.vocab_size - 3}] (ids 0 and 1 '
                       'are pad and EOS, and at least one id must be a value).')
    if not 1 <= self.num_pairs <= self.num_keys:
      raise ValueError(f'RecallSpec.num_pairs = {self.num_pairs}; pairs have distinct keys, so it '
                       f'must be in [1, num_keys = {self.num_keys}].')
    if self.num_queries < 1:
      raise ValueError(f'RecallSpec.num_queries = {self.num_queries}; it must be at least 1.')

  @property
  def length(self) -> int:
    return 2 * self.num_pairs + 2 * self.num_queries + 1

  def example(self, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    key_seed, value_seed, query_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    first_value = 2 + self.num_keys
    keys = 2 + _sample_distinct(self.num_keys, self.num_pairs, key_seed)
    values = tf.random.stateless_uniform([self.num_pairs], value_seed, minval=first_value,
                                         maxval=self.vocab_size, dtype=tf.int32)
    asked = tf.random.stateless_uniform([self.num_queries], query_seed, minval=0,
                                        maxval=self.num_pairs, dtype=tf.int32)
    pairs = _interleave(keys, values)
    queries = _interleave(tf.gather(keys, asked), tf.gather(values, asked))
    weights = tf.concat([tf.zeros([2 * self.num_pairs]), tf.tile([0.0, 1.0], [self.num_queries]),
                         [0.0]], axis=0)
    return {'targets': tf.concat([pairs, queries, [EOS_ID]], axis=0),
            'targets_loss_weights': weights}


@dataclasses.dataclass(frozen=True)
class InductionSpec:
  """Induction heads: random tokens in which a marker appears twice; the token after the second
  marker (the weighted answer) repeats the token after the first:

    t t t MARKER a t t ... t MARKER a EOS      (`length` tokens, EOS included; 64 by default)

  Ids: 2 is the marker, content tokens [3, vocab_size). Defaults: vocab 64, length 64.
  """

  vocab_size: int = 64
  length: int = 64
  marker_id: int = dataclasses.field(default=2, init=False)

  def __post_init__(self):
    if self.vocab_size < 5:
      raise ValueError(f'InductionSpec.vocab_size = {self.vocab_size}; it needs at least 5 ids.')
    if self.length < 6:
      raise ValueError(f'InductionSpec.length = {self.length}; it needs at least 6 tokens.')

  def example(self, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    content_seed, position_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    n = self.length - 1  # tokens before EOS; the last two are the second marker and the answer
    tokens = tf.random.stateless_uniform([n], content_seed, minval=self.marker_id + 1,
                                         maxval=self.vocab_size, dtype=tf.int32)
    first = tf.random.stateless_uniform([], position_seed, minval=0, maxval=n - 3, dtype=tf.int32)
    tokens = tf.tensor_scatter_nd_update(
        tokens, [[first], [n - 2], [n - 1]], tf.stack([self.marker_id, self.marker_id,
                                                       tokens[first + 1]]))
    weights = tf.one_hot(n - 1, n + 1, dtype=tf.float32)
    return {'targets': tf.concat([tokens, [EOS_ID]], axis=0), 'targets_loss_weights': weights}


def _sample_distinct(population: int, count: int, seed: tf.Tensor) -> tf.Tensor:
  return tf.argsort(tf.random.stateless_uniform([population], seed))[:count]


def _interleave(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  return tf.reshape(tf.stack([a, b], axis=1), [-1])


def _indices(split: str, shuffle_files: bool, seed=None, num_validation: int = 1000):
  """The source: example indices with their split id; the examples are made after sharding."""
  del shuffle_files, seed  # an example depends on (split, index) only; the Task shuffles
  size = _TRAIN_EXAMPLES if split == 'train' else num_validation
  return tf.data.Dataset.range(size).map(
      lambda i: {'split': tf.constant(_SPLIT_IDS[split], tf.int64), 'index': i})


def _generate(dataset, sequence_length, spec, task_name):
  if sequence_length and sequence_length.get('targets', spec.length) < spec.length:
    raise ValueError(f"Task {task_name} makes sequences of {spec.length} tokens but "
                     f"task_feature_lengths['targets'] is {sequence_length['targets']}; set it to "
                     f'at least {spec.length}.')
  return dataset.map(lambda ex: spec.example(tf.stack([ex['split'], ex['index']])),
                     num_parallel_calls=tf.data.AUTOTUNE)


def _register(name: str, spec, num_validation_examples: int) -> str:
  weights = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.float32)
  add_task(
      name,
      source=ResumableFunctionSource(
          functools.partial(_indices, num_validation=num_validation_examples),
          splits=tuple(_SPLIT_IDS),
          num_input_examples={'train': _TRAIN_EXAMPLES, 'validation': num_validation_examples}),
      output_features={
          'targets': seqio.Feature(seqio.PassThroughVocabulary(spec.vocab_size, eos_id=EOS_ID),
                                   add_eos=False),
          'targets_loss_weights': weights},
      preprocessors=[functools.partial(_generate, spec=spec, task_name=name)])
  return name


def register_synthetic_recall(name: str = 'synthetic_recall', vocab_size: int = 64,
                              num_keys: int = 16, num_pairs: int = 8, num_queries: int = 16,
                              num_validation_examples: int = 1000) -> str:
  """Registers an MQAR task (see RecallSpec) and returns its name, for gin's @-references."""
  return _register(name, RecallSpec(vocab_size, num_keys, num_pairs, num_queries),
                   num_validation_examples)


def register_synthetic_induction(name: str = 'synthetic_induction', vocab_size: int = 64,
                                 length: int = 64, num_validation_examples: int = 1000) -> str:
  """Registers an induction-heads task (see InductionSpec) and returns its name."""
  return _register(name, InductionSpec(vocab_size, length), num_validation_examples)


RECALL_VOCAB_SIZE = RecallSpec().vocab_size
INDUCTION_VOCAB_SIZE = InductionSpec().vocab_size
