"""Vocabularies: the gin-configurable default SentencePiece model of the C4 and PG19 tasks.

Tasks are registered when `efficientlm.data.tasks` is imported, which happens while gin parses
the run gin and before its bindings apply. So the tasks hold `DEFAULT_VOCABULARY`, a stand-in that
calls `default_vocabulary()` through gin each time it is used; a binding such as

  vocabularies.default_vocabulary.path = '/data/vocab/sentencepiece.model'

therefore reaches tasks registered before it. Nothing reads the model file until a dataset is
built (seqio's SentencePieceVocabulary loads lazily).
"""

from __future__ import annotations

import functools

import gin
from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio


T5_VOCABULARY = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'


def default_vocabulary(path: str = T5_VOCABULARY, extra_ids: int = 100) -> seqio.Vocabulary:
  """T5's 32k SentencePiece model with 100 sentinel ids (vocab 32100); bind `path` to a copy."""
  return sentencepiece_vocabulary(path, extra_ids)


@functools.lru_cache(maxsize=None)
def sentencepiece_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """One instance per model, so its SentencePiece processor is loaded once per process."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def _configured_default() -> seqio.Vocabulary:
  try:
    configured = gin.get_configurable(default_vocabulary)
  except ValueError:  # gin has never seen default_vocabulary: no bindings to apply.
    configured = default_vocabulary
  return configured()


class GinDefaultVocabulary(seqio.Vocabulary):
  """`default_vocabulary()` as gin binds it at the moment of use."""

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return _configured_default()

  @property
  def bos_id(self):
    return self.resolved.bos_id

  @property
  def eos_id(self):
    return self.resolved.eos_id

  @property
  def pad_id(self):
    return self.resolved.pad_id

  @property
  def unk_id(self):
    return self.resolved.unk_id

  @property
  def extra_ids(self):
    return self.resolved.extra_ids

  @property
  def vocab_size(self):
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self):
    return self.resolved._base_vocab_size  # pylint: disable=protected-access

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.resolved.decode_tf(ids)

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.resolved.decode_tf(ids)

  def __eq__(self, other):
    return isinstance(other, GinDefaultVocabulary) or self.resolved == other

  def __hash__(self):
    return hash(GinDefaultVocabulary)

  def __repr__(self):
    return 'GinDefaultVocabulary()'


DEFAULT_VOCABULARY = GinDefaultVocabulary()
