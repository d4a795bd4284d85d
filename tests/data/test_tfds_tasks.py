"""C4 and PG19 tasks end to end through seqio on TFDS mock data, with the seqio test vocabulary
bound through gin; a long book cut into sequences; the error for data that is not prepared."""

import importlib

import numpy as np
import pytest
import seqio
import tensorflow as tf

from efficientlm.data import pipeline, tasks
from efficientlm.data.config import DatasetConfig
from efficientlm.data.tfds_source import DatasetNotPreparedError
from tests.data import batch_checks
from tests.data.conftest import VOCAB_SIZE

EOS = 1


def _batches(name, lengths, converter, n=2, batch_size=4):
  it = pipeline.get_iterator(DatasetConfig(name, lengths, batch_size=batch_size), converter)
  return [next(it) for _ in range(n)]


def _assert_decoder_packing(b):
  batch_checks.assert_packed(b['decoder_target_tokens'], b['decoder_segment_ids'],
                             b['decoder_positions'])
  batch_checks.assert_shifted(b['decoder_input_tokens'], b['decoder_target_tokens'],
                              b['decoder_segment_ids'])


def _sentinels(seq):
  return [t for t in seq if t >= VOCAB_SIZE - 100]


@pytest.mark.usefixtures('mock_tfds')
def test_c4_span_corruption():
  for b in _batches('c4_v220_span_corruption', {'inputs': 32, 'targets': 12}, 'enc_dec'):
    assert b['encoder_input_tokens'].shape == (4, 32)
    assert b['decoder_target_tokens'].shape == (4, 12)
    batch_checks.assert_packed(b['encoder_input_tokens'], b['encoder_segment_ids'],
                               b['encoder_positions'])
    _assert_decoder_packing(b)
    for key in ('encoder_input_tokens', 'decoder_target_tokens'):
      assert b[key].max() < VOCAB_SIZE
    rows = zip(b['encoder_input_tokens'], b['encoder_segment_ids'], b['decoder_target_tokens'],
               b['decoder_segment_ids'])
    for enc, enc_seg, dec, dec_seg in rows:
      assert enc_seg.max() == dec_seg.max()
      for inputs, targets in zip(batch_checks.segments(enc, enc_seg),
                                 batch_checks.segments(dec, dec_seg)):
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert targets[0] == VOCAB_SIZE - 1  # targets start with the first sentinel
        expected = list(range(VOCAB_SIZE - 1, VOCAB_SIZE - 1 - len(_sentinels(targets)), -1))
        assert _sentinels(targets) == expected and _sentinels(inputs) == expected
    np.testing.assert_array_equal(b['decoder_loss_weights'], b['decoder_target_tokens'] > 0)


def test_c4_v310_reads_version_3_1_0():
  task = seqio.get_mixture_or_task('c4_v310_span_corruption')
  assert task.source.tfds_dataset.name == 'c4/en:3.1.0'
  assert seqio.get_mixture_or_task('c4_v220_lm').source.tfds_dataset.name == 'c4/en:2.2.0'


@pytest.mark.usefixtures('mock_tfds')
@pytest.mark.parametrize('name', ['c4_v220_lm', 'pg19_lm'])
def test_decoder_lm_tasks(name):
  for b in _batches(name, {'targets': 16}, 'decoder'):
    assert b['decoder_target_tokens'].shape == (4, 16)
    _assert_decoder_packing(b)
    assert b['decoder_target_tokens'].max() < VOCAB_SIZE
    np.testing.assert_array_equal(b['decoder_loss_weights'], b['decoder_target_tokens'] > 0)
    # EOS ends each document: a sequence ends with it unless a longer document continues.
    for row, seg in zip(b['decoder_target_tokens'], b['decoder_segment_ids']):
      for s in batch_checks.segments(row, seg):
        assert s[-1] == EOS or len(s) == 16
        assert EOS not in s[:-1]


@pytest.mark.usefixtures('mock_tfds')
def test_c4_prefix_lm():
  for b in _batches('c4_v220_prefix_lm', {'inputs': 10, 'targets': 10}, 'prefix_lm'):
    assert b['decoder_target_tokens'].shape == (4, 20)
    _assert_decoder_packing(b)
    rows = zip(b['decoder_target_tokens'], b['decoder_segment_ids'], b['decoder_loss_weights'],
               b['decoder_causal_attention'])
    for row, seg, weights, causal in rows:
      for s, w, c in zip(*(batch_checks.segments(x, seg) for x in (row, weights, causal))):
        (first_eos, last), = [np.flatnonzero(s == EOS)]  # inputs EOS, then targets EOS
        assert last == len(s) - 1 and 1 <= first_eos <= 9 and len(s) - first_eos - 1 <= 10
        np.testing.assert_array_equal(w, np.arange(len(s)) > first_eos)  # loss on targets
        np.testing.assert_array_equal(c, np.arange(len(s)) <= first_eos + 1)  # seqio's prefix


def _split_books(books, length):
  task = seqio.get_mixture_or_task('pg19_lm')
  ds = tf.data.Dataset.from_tensor_slices({'book_text': books})
  ds = task.preprocess_postcache(task.preprocess_precache(ds), {'targets': length})
  return [ex['targets'] for ex in ds.as_numpy_iterator()]


@pytest.mark.usefixtures('test_vocabulary')
def test_long_books_split_into_full_sequences_within_each_book():
  vocab = tasks.vocabularies.DEFAULT_VOCABULARY
  books = ['e' * 5000, 'a' * 3000]  # one piece per letter in the test vocabulary
  tokens = [vocab.encode(b) + [EOS] for b in books]
  assert len(set(tokens[0][1:-1])) == len(set(tokens[1][1:-1])) == 1
  pieces = _split_books(books, 2048)
  counts = [-(-len(t) // 2048) for t in tokens]
  assert len(pieces) == sum(counts) == 5
  for book, (start, count) in enumerate([(0, counts[0]), (counts[0], counts[1])]):
    mine = pieces[start:start + count]
    assert [len(p) for p in mine[:-1]] == [2048] * (count - 1)
    np.testing.assert_array_equal(np.concatenate(mine), tokens[book])
  for p in pieces:  # a sequence never mixes the 'e' book and the 'a' book
    assert not (set(p) >= set(vocab.encode('e')[-1:] + vocab.encode('a')[-1:]))


def test_registering_again_reads_no_vocabulary(monkeypatch):
  opened = []
  monkeypatch.setattr(tf.io.gfile, 'GFile', lambda path, *args, **kwargs: opened.append(path))
  importlib.reload(tasks)  # registers every task a second time
  assert not opened  # seqio reads SentencePiece models through GFile; nothing was read
  assert {'c4_v220_span_corruption', 'c4_v310_span_corruption', 'c4_v220_lm', 'c4_v220_prefix_lm',
          'pg19_lm', 'synthetic_recall', 'synthetic_induction'} <= set(seqio.TaskRegistry.names())


def test_missing_tfds_dataset_names_dataset_and_data_dir(tmp_path):
  cfg = DatasetConfig('c4_v220_lm', {'targets': 16}, tfds_data_dir=str(tmp_path))
  with pytest.raises(DatasetNotPreparedError) as error:
    pipeline.get_iterator(cfg, 'decoder')
  message = str(error.value)
  for part in ('c4/en:2.2.0', f'data_dir {tmp_path}', 'Apache Beam', 'TFDS_DATA_DIR',
               f'tfds build c4/en:2.2.0 --data_dir={tmp_path}'):
    assert part in message, (part, message)


@pytest.mark.usefixtures('test_vocabulary')
def test_vocab_size_of_registered_tasks():
  assert tasks.vocab_size('c4_v220_span_corruption') == VOCAB_SIZE  # the gin-bound model + 100
  assert tasks.vocab_size('synthetic_recall') == tasks.RECALL_VOCAB_SIZE == 64
  assert tasks.vocab_size('synthetic_induction') == tasks.INDUCTION_VOCAB_SIZE == 64
