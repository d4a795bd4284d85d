"""benchmarks/architectures.py (rows, matched parameters) and architectures_bench.py (ratios,
memory), on a tiny model. No timing assertions: times are only checked to be positive."""

import math
import subprocess

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
  # A step over the memory limit is compiled and analysed but not run.
  over = architectures_bench.measure_point(rows[0], 16, 2, 1, max_memory_bytes=1000)
  assert over['error'].startswith('not run: the step needs')
  assert over['memory_bytes'] == dense['memory_bytes'] and 'seconds' not in over
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
    if not row.arch.match_params:
      continue
    # emb_dim x (gelu wi + wo) x layers of models/decoder/tiny.gin, plus the sparse FFN's
    # rank-16 controller per unit; widths rounded to a multiple are off by up to half of one.
    one_unit = (128 * 2 + 16) * 2
    assert abs(row.num_params - row.baseline_params) <= one_unit * max(
        1, row.arch.mlp_multiple / 2), row
    width = [b for b in row.bindings if b.startswith('TransformerConfig.mlp_dim = ')]
    assert not width or int(width[-1].split(' = ')[1]) % row.arch.mlp_multiple == 0, row
  by_name = {r.arch.name: r for r in rows}
  # Same weights as dense multi-head attention (the sliding window and Perceiver AR's
  # cross-attention have its four projections): nothing to match, so no mlp_dim binding. This
  # also fails if the block-recurrent layers' 'recurrent' state were counted as parameters.
  for name in ('block_window', 'perceiver_ar'):
    assert by_name[name].num_params == by_name['dense'].num_params
    assert not any('mlp_dim' in b for b in by_name[name].bindings)
  assert by_name['block_recurrent'].num_params > 2 * by_name['dense'].num_params  # its states


def test_rows_fit_the_harness_lengths_and_start_fresh_without_streams():
  """The comparison's 64-token synthetic rows and 512-byte code rows suit every row's block,
  chunk and latent sizes; the Block-Recurrent rows carry no state unless a task binds it."""
  for arch in architectures.ARCHITECTURES:
    files, bindings = architectures.gin_arguments(arch, architectures.DEFAULT_BASE,
                                                  ['VOCAB_SIZE = 64'])
    model = architectures.build_model(files, bindings)
    for length in (64, 512):
      assert architectures_bench.length_problem(model, length) is None, (arch.name, length)
    assert not model.module.config.carry_state, arch.name


def test_length_problem_names_the_binding():
  def model(name, *bindings):
    (arch,) = [a for a in architectures.ARCHITECTURES if a.name == name]
    files, extra = architectures.gin_arguments(arch, architectures.DEFAULT_BASE, bindings)
    return architectures.build_model(files, extra)

  brt = model('block_recurrent', 'BLOCK_SIZE = 512')
  assert architectures_bench.length_problem(brt, 1024) is None
  assert architectures_bench.length_problem(brt, 1000) == (
      'BLOCK_SIZE = 512 does not divide the length 1000')
  perceiver = model('perceiver_ar', 'NUM_LATENTS = 1024')
  assert architectures_bench.length_problem(perceiver, 1024) is None
  assert architectures_bench.length_problem(perceiver, 512) == (
      'NUM_LATENTS = 1024 > the length 512')
  assert 'LSH_CHUNK = 16' in architectures_bench.length_problem(model('terraformer'), 40)


def test_a_point_killed_for_memory_is_recorded_not_fatal(monkeypatch):
  """One process per point: a kill (the CPU's out-of-memory end) becomes the point's error; a
  finished point's line is read back."""
  outcomes = iter([subprocess.CompletedProcess([], -9, '', ''),
                   subprocess.CompletedProcess(
                       [], 0, architectures_bench._POINT_PREFIX + '{"seconds": 2.0}\n', '')])
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: next(outcomes))
  killed = architectures_bench._point_in_subprocess(['--lengths', '8'], 'dense', 8)
  assert killed == {'error': 'process killed by SIGKILL (out of memory?)'}
  assert architectures_bench._point_in_subprocess([], 'dense', 8) == {'seconds': 2.0}


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
