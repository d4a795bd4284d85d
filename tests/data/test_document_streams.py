"""Document streams (data/document_streams.py) on a tiny byte-level corpus whose every document
is known: each row must read its own documents' bytes in order, resets where documents start."""

import numpy as np
import pytest

from efficientlm.data import document_streams, pipeline, stdlib_code
from efficientlm.data.config import DatasetConfig
from efficientlm.errors import ConfigError

LENGTH = 16
ROWS = 2


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(task name, the train documents' token lists in source order)."""
  root = tmp_path_factory.mktemp('streams') / 'lib'
  root.mkdir()
  # With their EOS: shorter than a segment, exactly one or two segments (EOS at a full
  # segment's end), and longer.
  for i, size in enumerate((1, 15, 31, 19, 39, 8, 15, 16)):
    (root / f'm{i}.py').write_bytes(bytes(65 + (i * 7 + j) % 26 for j in range(size)))
  name = stdlib_code.register_stdlib_code_lm('streams_test_lm', root=str(root),
                                             validation_fraction=0.3)
  files = stdlib_code.split_files(str(root), 0.3)['train']
  # ByteVocabulary: id = byte + 3; every document ends with EOS (1).
  docs = [[b + 3 for b in (root / f).read_bytes()] + [1] for f in files]
  assert any(len(d) % LENGTH == 0 for d in docs[::ROWS]), [len(d) for d in docs]
  return name, docs


def _expected_rows(docs, row, num_rows, steps):
  """What row `row` should hold, derived from the documents alone: its documents (row, row + n,
  ...; repeated), each cut into LENGTH-token targets in order; inputs are the stream shifted by
  one (of the padded row), BOS (0) at a document's start; reset at a document's first segment."""
  mine = docs[row::num_rows]
  out, d = [], 0
  while len(out) < steps:
    tokens = mine[d % len(mine)]
    for start in range(0, len(tokens), LENGTH):
      targets = tokens[start:start + LENGTH]
      targets = targets + [0] * (LENGTH - len(targets))
      # seqio shifts the padded row, so a short segment's EOS is also its next input.
      inputs = ([0] if start == 0 else [tokens[start - 1]]) + targets[:-1]
      out.append((inputs, targets, int(start == 0)))
    d += 1
  return out[:steps]


def _config(name, **kw):
  kw = dict(dict(batch_size=ROWS, shuffle=False, pack=False, document_streams=True), **kw)
  return DatasetConfig(name, {'targets': LENGTH}, **kw)


def test_rows_continue_their_documents_in_order_and_resume(corpus, tmp_path):
  name, docs = corpus
  it = pipeline.get_iterator(_config(name), 'decoder')
  steps = 9
  batches = [next(it) for _ in range(steps)]
  for row in range(ROWS):
    expected = _expected_rows(docs, row, ROWS, steps)
    for t, (inputs, targets, reset) in enumerate(expected):
      np.testing.assert_array_equal(batches[t]['decoder_input_tokens'][row], inputs)
      np.testing.assert_array_equal(batches[t]['decoder_target_tokens'][row], targets)
      assert batches[t][document_streams.RESET_FEATURE][row] == reset, (row, t)
  # A restored iterator continues every stream where the saved one stood.
  it = pipeline.get_iterator(_config(name), 'decoder')
  for _ in range(4):
    next(it)
  it.save(str(tmp_path))
  resumed = pipeline.get_iterator(_config(name), 'decoder')
  resumed.restore(str(tmp_path))
  for t in range(4, steps):
    got = next(resumed)
    for key in ('decoder_input_tokens', document_streams.RESET_FEATURE):
      np.testing.assert_array_equal(got[key], batches[t][key])


def test_two_processes_share_the_rows_of_one_global_batch(corpus):
  name, docs = corpus
  cfg = _config(name, batch_size=4)
  whole = next(pipeline.get_iterator(cfg, 'decoder'))
  halves = [next(pipeline.get_iterator(cfg, 'decoder', i, 2)) for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h['decoder_target_tokens'] for h in halves]), whole['decoder_target_tokens'])
  assert whole['decoder_target_tokens'][3, 0] == docs[3][0]  # row r starts at document r


@pytest.mark.parametrize('change, fix', [
    (dict(shuffle=True), 'shuffle = False'), (dict(pack=True), 'pack = False')])
def test_stream_preconditions_name_the_fix(corpus, change, fix):
  with pytest.raises(ConfigError, match=fix):
    pipeline.get_iterator(_config(corpus[0], **change), 'decoder')


def test_streams_feed_decoder_models_only(corpus):
  with pytest.raises(ConfigError, match="'decoder' feature converter"):
    pipeline.get_iterator(_config(corpus[0]), 'enc_dec')
