"""The built-in seqio tasks, registered (idempotently) when this module is imported.

  c4_v220_span_corruption, c4_v310_span_corruption   T5 pretraining on TFDS c4/en:2.2.0, :3.1.0
                                                      ('inputs', 'targets'; 'enc_dec' converter)
  c4_v220_lm         decoder-only LM on c4/en:2.2.0 ('targets'; 'decoder' converter)
  c4_v220_prefix_lm  T5's prefix LM: text cut at a random point ('inputs', 'targets';
                     'prefix_lm' or 'enc_dec' converter)
  pg19_lm            whole PG19 books cut into 'targets'-long sequences ('targets')
  synthetic_recall, synthetic_induction   see synthetic.py ('targets', 'targets_loss_weights')
  stdlib_code_lm     byte-level LM on the Python standard library's own source files, split by
                     file; no download (stdlib_code.py; 'targets')
  stdlib_code_next_line  multiple choice on the same files: which of 4 lines comes next
                     (stdlib_next_line.py; 'inputs', 'choices', 'label': see choices.py)
  text_lm            made by register_text_lm(files=...) on the user's files (text_files.py)

The C4 and PG19 tasks use `default_vocabulary()` (T5's SentencePiece model: 32000 pieces + 100
sentinels = 32100 ids), resolved through gin when a dataset is built, so a run gin can bind its
path to a local copy. Their data must be prepared with TFDS (see DatasetConfig.tfds_data_dir).
"""

from __future__ import annotations

import functools

from efficientlm.data import tensorflow_cpu  # noqa: F401  (first: TF quietly, with GPUs hidden)
import seqio

from efficientlm.data import preprocessors, span_corruption, vocabularies
from efficientlm.data.registry import add_task
from efficientlm.data.tfds_source import TfdsSource
# Re-exported so that a gin file needs only `from efficientlm.data import tasks`.
from efficientlm.data.synthetic import (INDUCTION_VOCAB_SIZE, RECALL_VOCAB_SIZE,  # noqa: F401
                                        register_synthetic_induction, register_synthetic_recall)
from efficientlm.data.stdlib_code import register_stdlib_code_lm  # noqa: F401
from efficientlm.data.stdlib_next_line import register_stdlib_code_next_line  # noqa: F401
from efficientlm.data.text_files import register_text_lm  # noqa: F401
from efficientlm.data.vocabularies import default_vocabulary  # noqa: F401

_C4_HOW = (' (C4 is built from Common Crawl with Apache Beam: `pip install apache-beam` and pass '
           '--beam_pipeline_options for Dataflow; it takes hours)')
_tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
_tokenize_with_eos = functools.partial(_tokenize, with_eos=True)
_append_eos = seqio.preprocessors.append_eos_after_trim


def _features(*names: str) -> dict[str, seqio.Feature]:
  return {name: seqio.Feature(vocabularies.DEFAULT_VOCABULARY, add_eos=True) for name in names}


def _text_as_targets(text_feature: str):
  return functools.partial(seqio.preprocessors.rekey, key_map={'targets': text_feature})


def _c4(version: str) -> TfdsSource:
  return TfdsSource(f'c4/en:{version}', splits=('train', 'validation'), how_to_prepare=_C4_HOW)


def _register_span_corruption(name: str, source: TfdsSource) -> None:
  add_task(name, source=source, output_features=_features('inputs', 'targets'),
           preprocessors=[_text_as_targets('text'), _tokenize, seqio.CacheDatasetPlaceholder(),
                          span_corruption.span_corruption, _append_eos])


def _register_lm(name: str, source: TfdsSource, text_feature: str) -> None:
  add_task(name, source=source, output_features=_features('targets'),
           preprocessors=[_text_as_targets(text_feature), _tokenize_with_eos,
                          seqio.CacheDatasetPlaceholder(), preprocessors.split_into_sequences])


def _register_prefix_lm(name: str, source: TfdsSource) -> None:
  add_task(name, source=source, output_features=_features('inputs', 'targets'),
           preprocessors=[_text_as_targets('text'), _tokenize, seqio.CacheDatasetPlaceholder(),
                          preprocessors.prefix_lm, _append_eos])


def vocab_size(mixture_or_task_name: str) -> int:
  """Vocabulary size of a registered task's 'targets' (for the model's VOCAB_SIZE, which may be
  larger: T5 models use 32128 for the 32100 ids of the default vocabulary).

  For C4 and PG19 this reads the SentencePiece model, so it must be reachable.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  return provider.output_features['targets'].vocabulary.vocab_size


_register_span_corruption('c4_v220_span_corruption', _c4('2.2.0'))
_register_span_corruption('c4_v310_span_corruption', _c4('3.1.0'))
_register_lm('c4_v220_lm', _c4('2.2.0'), 'text')
_register_prefix_lm('c4_v220_prefix_lm', _c4('2.2.0'))
_register_lm('pg19_lm', TfdsSource('pg19:0.1.1', splits=('train', 'validation', 'test')),
             'book_text')
register_synthetic_recall()
register_synthetic_induction()
register_stdlib_code_lm()
register_stdlib_code_next_line()
