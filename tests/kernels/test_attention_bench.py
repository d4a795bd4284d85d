"""Smoke test: benchmarks.attention_bench --quick runs on CPU and writes its JSON.

Nothing here depends on the machine's speed: times are only checked to be measured (finite,
positive) and the derived rates and ratios to follow from them; their size means nothing on a
CPU in interpret mode.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import attention_bench
from benchmarks import environment


def _measured(seconds) -> bool:
  return isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


@pytest.mark.slow
def test_quick_grid_runs_and_records(tmp_path, monkeypatch):
  monkeypatch.setattr(environment, 'RESULTS', tmp_path)
  # Smaller than --quick's own grid (seq 128, head_dim 64): compiling is what takes the time.
  path = attention_bench.main(['--quick', '--causal', 'yes', '--seq', '64', '--head-dim', '32',
                               '--d-model', '128', '--tokens', '128', '--decode-context', '64'])
  assert path.parent == tmp_path
  data = json.loads(path.read_text())
  assert data['config']['interpret_mode'] is True
  rows = data['results']['attention']
  assert [r['variant'] for r in rows] == ['MHA', 'GQA', 'MQA']
  for row in rows:
    for impl in ('pallas', 'xla', 'jax_pallas'):
      for name, factor in (('forward', 1.0), ('fwd_bwd', attention_bench.FWD_BWD_FLOP_FACTOR)):
        result = row[impl][name]
        assert _measured(result['seconds']), (impl, name, result)
        # Rates are rounded to significant digits, so they stay positive however slow the run.
        assert result['tflops'] == pytest.approx(
            factor * row['forward_flops'] / result['seconds'] / 1e12, rel=1e-3)
    for name in ('forward', 'fwd_bwd'):
      assert row['ratios'][f'{name}_pallas_over_xla'] == pytest.approx(
          row['pallas'][name]['seconds'] / row['xla'][name]['seconds'], rel=1e-3)
      assert row['ratios'][f'{name}_pallas_over_cudnn'] is None
    assert 'error' in row['cudnn']  # GPU only: recorded, not raised
  assert rows[1]['jax_pallas']['kv_heads_repeated'] == 2
  decode = data['results']['decode']
  assert {r['variant'] for r in decode} == {'MQA', 'GQA'}
  for row in decode:
    for impl in ('pallas', 'xla'):
      assert _measured(row[impl]['seconds']), row
      assert row[impl]['kv_read_gb_per_s'] == pytest.approx(
          row['kv_read_bytes'] / row[impl]['seconds'] / 1e9, rel=1e-3)
    assert row['pallas']['fraction_of_hbm'] is None  # no HBM figure for a CPU
    assert row['ratio_pallas_over_xla'] == pytest.approx(
        row['pallas']['seconds'] / row['xla']['seconds'], rel=1e-3)


def test_significant_digits_keep_small_rates_positive():
  assert attention_bench.significant(4.4e-5) == 4.4e-5  # round(4.4e-5, 3) would give 0.0
  assert attention_bench.significant(123456.0) == 123500.0
  assert attention_bench.significant(0.000123456, 2) == 0.00012


def test_hbm_bandwidth_by_device_kind():
  assert attention_bench.hbm_bandwidth('NVIDIA H100 80GB HBM3') == ('h100', 3.35e12)
  assert attention_bench.hbm_bandwidth('NVIDIA H200')[0] == 'h200'
  assert attention_bench.hbm_bandwidth('cpu') == (None, None)
