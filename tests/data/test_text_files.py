"""register_text_lm on temporary .txt and .jsonl files."""

import itertools
import json
import os
import re

import gin
import numpy as np
import pytest
import seqio

from efficientlm import gin_config
from efficientlm.data import pipeline, tasks
from efficientlm.data.config import DatasetConfig
from tests.data import batch_checks

_WORDS = ('the quick brown fox jumps over lazy dog while seven wizards quietly hex '
          'jolly boxing vampires under a pale moon').split()


def _text(rng, words):
  lines = [' '.join(rng.choice(_WORDS, size=12)) for _ in range(words // 12)]
  return '\n'.join(lines)


@pytest.fixture
def corpus(tmp_path):
  """12 .txt documents and a .jsonl of 20; returns (glob, {document text})."""
  rng = np.random.default_rng(0)
  docs = set()
  for i in range(12):
    text = _text(rng, 240)
    (tmp_path / f'book_{i}.txt').write_text(text)
    docs.add(text)
  lines = [_text(rng, 60) for _ in range(20)]
  with open(tmp_path / 'notes.jsonl', 'w') as f:
    for text in lines:
      f.write(json.dumps({'text': text, 'id': 1}) + '\n\n')  # blank lines are skipped
  docs.update(lines)
  return str(tmp_path / '*'), docs


def _split_documents(name, split):
  ds = seqio.get_mixture_or_task(name).source.get_dataset(split, shuffle=False)
  return [ex['targets'].decode() for ex in ds.as_numpy_iterator()]


def test_trains_reuses_and_tokenizes(corpus, tmp_path):
  files, docs = corpus
  name = tasks.register_text_lm(files, name='my_text', vocab_size=120, validation_fraction=0.3)
  assert name == 'my_text'
  (model,) = [p for p in os.listdir(tmp_path / '.text_lm_cache') if p.endswith('.model')]
  model_path = tmp_path / '.text_lm_cache' / model
  mtime = model_path.stat().st_mtime_ns
  tasks.register_text_lm(files, name='my_text', vocab_size=120, validation_fraction=0.3)
  assert model_path.stat().st_mtime_ns == mtime  # reused, not retrained
  vocab = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
  assert str(vocab.sentencepiece_model_file) == str(model_path)
  assert 30 < vocab.vocab_size <= 120

  # Every document is in exactly one split; both splits have .txt and .jsonl documents.
  train, validation = _split_documents(name, 'train'), _split_documents(name, 'validation')
  assert sorted(train + validation) == sorted(docs)
  assert validation and len(validation) < len(train)

  cfg = DatasetConfig(name, {'targets': 64}, batch_size=4)
  for b in itertools.islice(pipeline.get_iterator(cfg, 'decoder'), 3):
    tokens = b['decoder_target_tokens']
    assert tokens.shape == (4, 64) and tokens.max() < vocab.vocab_size
    batch_checks.assert_packed(tokens, b['decoder_segment_ids'], b['decoder_positions'])
    for row, seg in zip(tokens, b['decoder_segment_ids']):
      for s in batch_checks.segments(row, seg):
        assert s[-1] == 1 or len(s) == 64  # a sequence ends its document or fills the row
        assert 2 not in s  # no unknown pieces: the model was trained on this text
  # The first sequence decodes to the start of a training document (its last word may be cut).
  cfg = DatasetConfig(name, {'targets': 64}, batch_size=1, shuffle=False, pack=False)
  first = next(pipeline.get_iterator(cfg, 'decoder'))['decoder_target_tokens'][0]
  words = vocab.decode(first.tolist()).split()[:-1]
  assert len(words) > 5 and any(d.split()[:len(words)] == words for d in train)

def test_iterator_save_restore_on_text(corpus, tmp_path):
  files, _ = corpus
  name = tasks.register_text_lm(files, name='my_text_ckpt', vocab_size=120)
  cfg = DatasetConfig(name, {'targets': 32}, batch_size=2)
  saved = pipeline.get_iterator(cfg, 'decoder')
  list(itertools.islice(saved, 5))
  saved.save(str(tmp_path / 'ckpt'))
  expected = list(itertools.islice(saved, 3))
  restored = pipeline.get_iterator(cfg, 'decoder')
  restored.restore(str(tmp_path / 'ckpt'))
  for a, b in zip(expected, itertools.islice(restored, 3)):
    np.testing.assert_array_equal(a['decoder_target_tokens'], b['decoder_target_tokens'])


def test_given_model_is_used(corpus):
  files, _ = corpus
  from tests.data.conftest import SENTENCEPIECE_MODEL  # pylint: disable=g-import-not-at-top
  name = tasks.register_text_lm(files, name='given_model', sentencepiece_model=SENTENCEPIECE_MODEL)
  assert seqio.get_mixture_or_task(name).output_features['targets'].vocabulary.vocab_size == 26


def test_registered_from_gin(corpus):
  files, _ = corpus
  gin.clear_config()
  try:
    gin.parse_config(['from __gin__ import dynamic_registration',
                      'from efficientlm.data import tasks',
                      'MIXTURE_OR_TASK_NAME = @tasks.register_text_lm()',
                      f"tasks.register_text_lm.files = '{files}'",
                      "tasks.register_text_lm.name = 'gin_text'",
                      'tasks.register_text_lm.vocab_size = 100'])
    assert gin_config.macro('MIXTURE_OR_TASK_NAME') == 'gin_text'
  finally:
    gin.clear_config()
  assert 'gin_text' in seqio.TaskRegistry.names()


def test_empty_glob_is_named(tmp_path):
  glob = str(tmp_path / 'nothing' / '*.txt')
  with pytest.raises(FileNotFoundError, match=re.escape(f'glob {glob!r} matches no files')):
    tasks.register_text_lm(glob)


def test_bad_jsonl_line_is_located(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: expected a JSON object with a "text"'):
    tasks.register_text_lm(str(tmp_path / '*.jsonl'), name='bad')


def test_span_corruption_objective_makes_encoder_decoder_pairs(corpus):
  files, _ = corpus
  name = tasks.register_text_lm(files, name='my_text_spans', vocab_size=120,
                                validation_fraction=0.3, objective='span_corruption')
  vocab = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
  first_sentinel = vocab.vocab_size - 1  # T5's sentinels count down from the top of the vocab
  cfg = DatasetConfig(name, {'inputs': 64, 'targets': 16}, batch_size=2, shuffle=False,
                      pack=False)
  batch = next(pipeline.get_iterator(cfg, 'enc_dec'))
  for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
    assert first_sentinel in inputs.tolist()
    assert targets[0] == first_sentinel  # targets: each sentinel, then the span it replaced
  with pytest.raises(ValueError, match='objective'):
    tasks.register_text_lm(files, name='bad', objective='mlm')


def test_documents_written_as_one_long_line_train_a_vocabulary(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(3):  # ~20 KB lines: over SentencePiece's default 4192-byte limit
    (tmp_path / f'{i}.txt').write_text(' '.join(rng.choice(_WORDS, size=3000)))
  name = tasks.register_text_lm(str(tmp_path / '*.txt'), name='long_lines', vocab_size=60,
                                validation_fraction=0.0)
  vocab = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
  assert 2 not in vocab.encode(' '.join(_WORDS))  # every word is covered


_BAD_BYTE = b'\xff'  # never valid in UTF-8


@pytest.mark.parametrize('suffix,trains_vocabulary', [('.txt', True), ('.txt', False),
                                                      ('.jsonl', True)])
def test_invalid_utf8_is_located(tmp_path, suffix, trains_vocabulary):
  from tests.data.conftest import SENTENCEPIECE_MODEL  # pylint: disable=g-import-not-at-top
  good, bad = ('caf\u00e9 au lait\n', 'second line ') if suffix == '.txt' else (
      '{"text": "caf\u00e9"}\n', '{"text": "second ')
  prefix = (good + bad).encode()  # 'é' is two bytes: the offset counts bytes, not characters
  path = tmp_path / f'bad{suffix}'
  path.write_bytes(prefix + _BAD_BYTE + b' end"}\n')
  model = None if trains_vocabulary else SENTENCEPIECE_MODEL
  with pytest.raises(ValueError, match=re.escape(f'{path}:2: byte offset {len(prefix)} ')) as e:
    tasks.register_text_lm(str(path), name='bad_bytes', sentencepiece_model=model,
                           validation_fraction=0.0, vocab_size=40)
  assert "encoding_errors = 'replace'" in str(e.value)  # and how to go on


def test_replace_reads_invalid_bytes_as_the_replacement_character(tmp_path):
  rng = np.random.default_rng(2)
  txt = (_text(rng, 120) + ' ').encode() + _BAD_BYTE + b'\xfe tail'
  jsonl = b'{"text": "bad ' + _BAD_BYTE + b' line"}\n'
  (tmp_path / 'book.txt').write_bytes(txt)
  (tmp_path / 'notes.jsonl').write_bytes(jsonl)
  name = tasks.register_text_lm(str(tmp_path / '*'), name='replaced', vocab_size=40,
                                validation_fraction=0.0, encoding_errors='replace')
  expected = {txt.decode('utf-8', 'replace'), 'bad \ufffd line'}
  assert '\ufffd\ufffd tail' in txt.decode('utf-8', 'replace')  # the reference does replace
  assert set(_split_documents(name, 'train')) == expected
  with pytest.raises(ValueError, match="encoding_errors 'ignore'"):
    tasks.register_text_lm(str(tmp_path / '*'), name='replaced', encoding_errors='ignore')


def test_vocabulary_training_is_announced_and_reported(tmp_path, capsys):
  rng = np.random.default_rng(2)
  texts = [_text(rng, 600) + '\n\n' for _ in range(3)]  # blank lines are not training lines
  for i, text in enumerate(texts):
    (tmp_path / f'{i}.txt').write_text(text)
  nonblank = [line for text in texts for line in text.splitlines() if line.strip()]
  size = sum(os.path.getsize(tmp_path / f'{i}.txt') for i in range(3))
  files = str(tmp_path / '*.txt')
  tasks.register_text_lm(files, name='announced', vocab_size=60, validation_fraction=0.0,
                         cache_dir=str(tmp_path / 'cache'))
  (model,) = (tmp_path / 'cache').glob('*.model')
  lines = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith('register_text_lm: ')]
  assert len(lines) == 2, lines
  assert lines[0] == ('register_text_lm: training a 60-piece SentencePiece vocabulary on the '
                      f'training split (3 files, {size:,} bytes) for {model}')
  trained = re.fullmatch(r'register_text_lm: trained the vocabulary in (\d+\.\d) s on (\d+) '
                         r'lines \(([\d,]+) bytes\): (.*)', lines[1])
  assert trained, lines[1]
  assert int(trained[2]) == len(nonblank) == 150
  assert int(trained[3].replace(',', '')) == sum(len(line.encode()) for line in nonblank)
  assert trained[4] == str(model)

  tasks.register_text_lm(files, name='announced', vocab_size=60, validation_fraction=0.0,
                         cache_dir=str(tmp_path / 'cache'))
  assert capsys.readouterr().out.splitlines() == [
      f'register_text_lm: using the SentencePiece vocabulary cached at {model}']
