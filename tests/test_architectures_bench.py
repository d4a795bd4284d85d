"""benchmarks/architectures.py (rows, matched parameters) and architectures_bench.py (ratios,
memory), on a tiny model. No timing assertions: times are only checked to be positive."""

import math

import pytest

from benchmarks import architectures, architectures_bench

_TINY = [*architectures_bench.QUICK_BINDINGS, 'VOCAB_SIZE = 64']


def test_mqa_gets_the_dropped_kv_weights_back_in_its_mlp():
  # models/decoder/tiny.gin: emb 128, 4 heads of 32, MLP 512 of one GELU matrix in + one out.
  # Multi-query keeps 1 of 4 key/value heads: it drops 2 x 128 x 3 x 32 = 24576 weights per
  # layer, which an MLP 24576 / (2 x 128) = 96 wider gives back exactly.
  dense, mqa = architectures.resolve(architectures.select(['mqa']),
                                     bindings=['VOCAB_SIZE = 64'])
  assert (dense.arch.name, mqa.arch.name) == ('dense', 'mqa')
  assert mqa.bindings[-1] == 'TransformerConfig.mlp_dim = 608'
  assert mqa.num_params == dense.num_params == dense.baseline_params


def test_select_keeps_the_baseline_first_and_names_unknown_rows():
  assert [a.name for a in architectures.select(['mqa'])] == ['dense', 'mqa']
  with pytest.raises(ValueError, match='ARCHITECTURES'):
    architectures.select(['nope'])


def test_ratios_divide_by_the_baseline_at_the_same_length():
  points = [{'architecture': 'dense', 'length': 8, 'seconds': 2.0, 'memory_bytes': 100},
            {'architecture': 'x', 'length': 8, 'seconds': 3.0, 'memory_bytes': 50},
            {'architecture': 'dense', 'length': 16, 'seconds': 4.0, 'memory_bytes': None},
            {'architecture': 'x', 'length': 16, 'seconds': 1.0, 'memory_bytes': 10},
            {'architecture': 'x', 'length': 32, 'error': 'OOM'}]
  out = architectures_bench.add_ratios(points, 'dense')
  assert [p['seconds_ratio'] for p in out] == [1.0, 1.5, 1.0, 0.25, None]
  assert [p['memory_bytes_ratio'] for p in out] == [1.0, 0.5, None, None, None]


@pytest.mark.slow  # two rows x (init, optimizer init, train step) compiled: ~10 s on 2 cores
def test_tiny_bench_measures_rows_against_dense(tmp_path):
  points, rows = architectures_bench.run(architectures.select(['mqa']), [16], batch_size=2,
                                         repeats=1, base=architectures.DEFAULT_BASE,
                                         bindings=_TINY)
  assert [p['architecture'] for p in points] == [r.arch.name for r in rows] == ['dense', 'mqa']
  dense, mqa = points
  assert 'error' not in dense and 'error' not in mqa
  assert dense['seconds'] > 0 and dense['seconds_ratio'] == 1.0
  assert mqa['seconds_ratio'] == pytest.approx(mqa['seconds'] / dense['seconds'], rel=1e-3)
  assert mqa['temp_bytes_ratio'] == pytest.approx(mqa['temp_bytes'] / dense['temp_bytes'],
                                                  rel=1e-3)
  assert mqa['num_params'] == dense['num_params']
  # The step's arguments are float32 parameters and AdamW's two moments (12 bytes per
  # parameter), two [2, 16] int32 token arrays and a few int32 scalars (step, Adam's count).
  floor = 12 * dense['num_params'] + 2 * 2 * 16 * 4
  assert floor < dense['argument_bytes'] <= floor + 64
  assert dense['memory_bytes'] > dense['argument_bytes']
  architectures_bench.plot(points, tmp_path / 'plot.png', 'tiny')
  assert (tmp_path / 'plot.png').stat().st_size > 0


def test_every_row_builds_with_parameters_matched_to_dense():
  """Every architecture gin in the row list parses on the base model and is matched: the ones
  that add parameters (evolving's convolutions) or drop some (LSH's key projection, MQA's KV
  heads) get the MLP width that brings them back to dense's count (within one MLP unit)."""
  rows = architectures.resolve(architectures.select(None), bindings=['VOCAB_SIZE = 64'])
  assert [r.arch.name for r in rows][:1] == ['dense'] and len(rows) == len(
      architectures.ARCHITECTURES)
  for row in rows:
    one_unit = 128 * 2 * 2  # emb_dim x (gelu wi + wo) x layers of models/decoder/tiny.gin
    assert abs(row.num_params - row.baseline_params) <= one_unit, row


def test_token_mixer_exponent_is_the_log_log_slope():
  """Closed forms: seconds = c L^2 has exponent 2, c L log L a slope between 1 and 2."""
  from benchmarks import token_mixer_bench  # pylint: disable=g-import-not-at-top
  square = [{'length': n, 'seconds': 3e-9 * n * n} for n in (1024, 2048, 4096)]
  assert abs(token_mixer_bench.exponent(square, 1024) - 2) < 1e-9
  nlogn = [{'length': n, 'seconds': 1e-8 * n * math.log(n)} for n in (1024, 2048, 4096, 8192)]
  assert 1.05 < token_mixer_bench.exponent(nlogn, 1024) < 1.2
  assert token_mixer_bench.exponent(square, 2048 * 4) is None


def test_token_mixer_bench_times_each_mixer_and_decode_step():
  from benchmarks import token_mixer_bench  # pylint: disable=g-import-not-at-top
  result = token_mixer_bench.run(['h3'], [16, 32], batch=1, emb_dim=16, repeats=1, fit_from=16,
                                 contexts=(8, 16), log=lambda _: None)
  assert [(p['length'], p['seconds'] > 0) for p in result['train']] == [(16, True), (32, True)]
  assert [(d['context'], d['seconds'] > 0) for d in result['decode']] == [(8, True), (16, True)]
  assert set(result['summary']['h3']) == {'exponent', 'decode_ratio'}
