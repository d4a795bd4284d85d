"""benchmarks/sparse_ffn_bench.py at a tiny size: the JSON's structure and its FLOP columns
against their closed forms (no timing assertions)."""

import json

from benchmarks import sparse_ffn_bench


def test_tiny_bench_writes_its_points(tmp_path):
  d, mlp, rank = 8, 32, 2
  path = sparse_ffn_bench.main(['--d_model', str(d), '--mlp_dim', str(mlp), '--block_sizes', '4',
                                '16', '--controller_rank', str(rank), '--repeats', '1',
                                '--name', str(tmp_path / 'tiny')])
  data = json.loads(path.read_text())
  assert {'machine', 'config', 'results'} <= set(data)
  assert data['machine']['platform'] and data['machine']['jax']
  assert data['config']['d_model'] == d and data['config']['block_sizes'] == [4, 16]
  points = data['results']['points']
  assert [p['block_size'] for p in points] == [4, 16]
  for p in points:
    n = p['block_size']
    # One activation (gelu): wi and wo; the controller is r (d + mlp).
    assert p['flops_dense'] == 2 * d * mlp
    assert p['flops_sparse'] == rank * (d + mlp) + 2 * d * mlp // n
    assert p['flops_ratio'] == p['flops_dense'] / p['flops_sparse']
    assert p['num_params_sparse'] == p['num_params_dense'] + rank * (d + mlp)
    assert p['seconds_dense'] > 0 and p['seconds_sparse'] > 0
    assert p['speedup'] == p['seconds_dense'] / p['seconds_sparse']
  assert set(data['results']['summary']) == {'N=4', 'N=16'}
