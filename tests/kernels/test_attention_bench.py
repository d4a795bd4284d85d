"""Smoke test: benchmarks.attention_bench --quick runs on CPU and writes its JSON."""

from __future__ import annotations

import json

from benchmarks import attention_bench
from benchmarks import environment


def test_quick_grid_runs_and_records(tmp_path, monkeypatch):
  monkeypatch.setattr(environment, 'RESULTS', tmp_path)
  path = attention_bench.main(['--quick', '--causal', 'yes', '--decode-context', '128'])
  assert path.parent == tmp_path
  data = json.loads(path.read_text())
  assert data['config']['interpret_mode'] is True
  rows = data['results']['attention']
  assert [r['variant'] for r in rows] == ['MHA', 'GQA', 'MQA']
  for row in rows:
    for name in ('forward', 'fwd_bwd'):
      assert row['pallas'][name]['seconds'] > 0, row
      assert row['xla'][name]['tflops'] > 0, row
    assert 'error' in row['cudnn']  # GPU only: recorded, not raised
    assert row['ratios']['forward_pallas_over_xla'] is not None
    assert row['ratios']['forward_pallas_over_cudnn'] is None
  assert rows[1]['jax_pallas']['kv_heads_repeated'] == 2
  decode = data['results']['decode']
  assert {r['variant'] for r in decode} == {'MQA', 'GQA'}
  for row in decode:
    assert row['pallas']['kv_read_gb_per_s'] > 0
    assert row['pallas']['fraction_of_hbm'] is None  # no HBM figure for a CPU


def test_hbm_bandwidth_by_device_kind():
  assert attention_bench.hbm_bandwidth('NVIDIA H100 80GB HBM3') == ('h100', 3.35e12)
  assert attention_bench.hbm_bandwidth('NVIDIA H200')[0] == 'h200'
  assert attention_bench.hbm_bandwidth('cpu') == (None, None)
