"""Inference sweeps: analytical rows equal perf_model, best layouts, a measured run on 8 devices,
progress as whole lines in a log and in place on a terminal."""

from __future__ import annotations

import collections
import csv
import io
import json
import re
import sys

import pytest

from efficientlm.inference import perf_model as pm
from efficientlm.inference import sweep, sweep_progress
from efficientlm.inference.layout_spec import Layout
from efficientlm.models.config import TransformerConfig

MODELS = {'palm_8b': pm.PALM_8B, 'palm_540b': pm.PALM_540B}
ANALYTICAL = dict(models=['palm_8b', 'palm_540b'], hardware=['tpu_v4'], meshes=[(2, 2, 2)],
                  batches=[1, 6, 16], prompt_lengths=[128], decode_context=512,
                  layouts=['2d/heads/parallel', '2d/batch_xyz', 'wg_xyz/heads', '1d/batch_z',
                           '2d/heads/serial'],
                  weight_dtypes=['bfloat16', 'int8'], phases=['prefill', 'decode'], torus=True)


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def analytical(tmp_path_factory):
  directory = tmp_path_factory.mktemp('analytical')
  sweep.sweep(output_dir=str(directory), **ANALYTICAL)
  return directory


def test_analytical_rows_equal_perf_model(analytical):
  rows = read_csv(analytical / 'sweep.csv')
  assert len(rows) == 2 * 3 * 2 * 5 * 2  # models x batches x phases x layouts x dtypes
  assert {r['kind'] for r in rows} == {'predicted'}
  predicted = 0
  for row in rows:
    if row['status'] == 'invalid':
      assert row['reason'] and row['time'] == ''
      continue
    model, layout = MODELS[row['model']], Layout(*row['layout'].split('/'))
    prefill = row['phase'] == 'prefill'
    args = (model, 'tpu_v4', (2, 2, 2), layout, row['phase'], int(row['batch']),
            128 if prefill else None, 0 if prefill else 512, row['weight_dtype'])
    p = pm.predict(*args)
    for column in ('time', 'comm_time', 'mfu', 'chip_seconds_per_token'):
      assert float(row[column]) == pytest.approx(getattr(p, column), rel=1e-12), column
    assert float(row['torus_time']) == pytest.approx(pm.predict(*args, mode='torus').time)
    assert row['status'] == ('ok' if p.fits else 'does_not_fit')
    predicted += 1
  assert predicted > 20
  reasons = {r['reason'] for r in rows if r['status'] == 'invalid'}
  assert any('batch 6 is not divisible' in r for r in reasons)
  assert any('serial block but palm_8b is parallel' in r for r in reasons)
  # PaLM 540B in bf16 needs about 135 GB per chip on 8 chips.
  assert any(r['status'] == 'does_not_fit' and 'GiB per chip' in r['reason'] for r in rows)


def test_best_layouts_are_the_fastest_valid_rows(analytical):
  rows = [r for r in read_csv(analytical / 'sweep.csv') if r['status'] == 'ok']
  groups = collections.defaultdict(list)
  for r in rows:
    groups[tuple(r[c] for c in sweep.GROUP)].append(r)
  best = read_csv(analytical / 'best_layouts.csv')
  assert len(best) == len(groups)
  for b in best:
    fastest = min(groups[tuple(b[c] for c in sweep.GROUP)], key=lambda r: float(r['time']))
    assert (b['by'], b['layout'], float(b['time'])) == (
        'predicted', fastest['layout'], float(fastest['time']))


def test_analytical_outputs(analytical):
  record = json.loads((analytical / 'sweep.json').read_text())
  assert record['metadata']['jax'] and record['metadata']['config']['models'] == [
      'palm_8b', 'palm_540b']
  assert len(record['rows']) == len(read_csv(analytical / 'sweep.csv'))
  plots = sorted((analytical / 'plots').glob('*.png'))
  assert plots and all(p.stat().st_size > 1000 for p in plots)
  assert not (analytical / 'calibration.json').exists()  # nothing measured


def test_measured_sweep_on_eight_devices(tmp_path, capsys):
  config = TransformerConfig(vocab_size=64, emb_dim=64, num_heads=8, num_kv_heads=1, head_dim=8,
                             mlp_dim=128, num_encoder_layers=0, num_decoder_layers=2,
                             mlp_activations=('gelu',), position_embedding='rotary',
                             logits_via_embedding=True)
  rows = sweep.sweep(output_dir=str(tmp_path), meshes=[(2, 2, 2)], batches=[8],
                     prompt_lengths=[8], decode_context=16,
                     layouts=['2d/batch_xyz', 'wg_xyz/heads', '1d/heads'],
                     weight_dtypes=['bfloat16'], phases=['decode'], measure=True,
                     measure_model=config, measure_hardware='tpu_v4', repeats=2)
  assert '[3/3]' in capsys.readouterr().out
  measured = [r for r in read_csv(tmp_path / 'sweep.csv') if r['kind'] == 'measured']
  assert len(measured) == len(rows) == 3
  for row in measured:
    assert row['status'] == 'ok' and float(row['measured_time']) > 0
    assert row['hardware'] == 'tpu_v4' and row['measured_device'].startswith('cpu')
    assert float(row['time']) == pytest.approx(pm.predict(
        pm.ModelSpec.from_transformer_config(config), 'tpu_v4', (2, 2, 2),
        Layout(*row['layout'].split('/')), 'decode', 8, None, 16).time)
  best = read_csv(tmp_path / 'best_layouts.csv')
  assert {b['by'] for b in best} == {'predicted', 'measured'}
  calibration = json.loads((tmp_path / 'calibration.json').read_text())
  assert calibration['device'] == 'cpu' and 'interconnects' in calibration['note']
  assert calibration['num_points'] == 3 and calibration['calibration'] is not None
  assert list((tmp_path / 'plots').glob('measured_*.png'))



def _progress(out):
  """The [i/N] of each progress line or in-place update, in order."""
  return [int(m) for m in re.findall(r'\[(\d+)/\d+\]', out)]


def test_progress_in_a_log_is_a_few_whole_lines(tmp_path, capsys):
  # capsys's stdout is not a terminal, as when a sweep's output goes to a file.
  sweep.sweep(output_dir=str(tmp_path), plots=False, **ANALYTICAL)
  out = capsys.readouterr().out
  total = 2 * 3 * 2 * 5 * 2
  assert '\r' not in out and out.endswith('\n')
  lines = out.splitlines()
  assert lines[-1].startswith(f'swept {total} points in ')
  shown = _progress(out)
  assert len(lines) == len(shown) + 1  # nothing but progress lines and the summary
  assert 10 <= len(shown) <= 22, shown  # about 20, not one per point
  assert shown[0] == 1 and shown[-1] == total and shown == sorted(set(shown))


def test_progress_on_a_terminal_is_rewritten_in_place(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
  sweep.sweep(output_dir=str(tmp_path), plots=False, **ANALYTICAL)
  out = capsys.readouterr().out
  total = 2 * 3 * 2 * 5 * 2
  updates = out.split('\r')[1:]
  assert len(updates) == total and _progress(out) == list(range(1, total + 1))
  assert all('\n' not in u for u in updates[:-1])  # one line, rewritten
  # Each update covers the one before it, and the summary starts a line of its own.
  assert all(len(b) >= len(a.rstrip()) for a, b in zip(updates, updates[1:]))
  assert re.fullmatch(rf'\[{total}/{total}\] [^\n]*\nswept {total} points in [^\n]*\n',
                      updates[-1])


def test_progress_of_a_long_sweep_in_a_log():
  stream = io.StringIO()  # not a terminal
  progress = sweep_progress.Progress(616, stream)
  for i in range(616):
    progress.update(i, 'point')
  progress.close()
  shown = _progress(stream.getvalue())
  assert shown[0] == 1 and shown[-1] == 616 and len(shown) <= 22
  assert stream.getvalue().count('\n') == len(shown)


@pytest.mark.parametrize('override,message', [
    (dict(hardware=['tpu_v9']), 'Unknown hardware'),
    (dict(layouts=['3d/heads']), "Layout.ffn = '3d'"),
    (dict(layouts=['2d/heads/serial/x']), 'ffn/attention/block'),
    (dict(models=['gpt5']), 'Unknown model'),
    (dict(measure=True, measure_model=TransformerConfig(num_encoder_layers=0),
          meshes=[(4, 1, 1)]), r'4 chips but there are 8 local devices'),
])
def test_bad_input_is_named(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    sweep.sweep(output_dir=str(tmp_path), **{**ANALYTICAL, **override}, dry_run=True)
