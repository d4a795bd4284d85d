"""Sweeps over inference layouts: analytical predictions and measured times, as CSV/JSON/PNG.

  python scripts/inference_sweep.py --gin_file=sweeps/tiny_cpu8.gin --gin.MODEL_DIR="'/tmp/sw'"

`sweep` enumerates model x mesh x batch x prompt length x layout x weight dtype x phase. Each
point is one row of kind 'predicted' (`perf_model.predict` for each of `models` on each of
`hardware`, paper mode; `torus` adds torus-mode time) or 'measured' (`measure_model` timed on the
local devices by `sweep_measure`, one layer times the layers, next to its own prediction on the
nominal `measure_hardware`; on CPU with no nominal hardware the prediction columns are empty).
A point that cannot run keeps its row, with status 'invalid' (sizes do not divide, or the layout
code refuses it) or 'does_not_fit' (HBM of the nominal hardware) and the reason. Decode points
read `decode_context` cached tokens (each prompt length if None). Writes into output_dir:
sweep.csv, sweep.json (rows + metadata), best_layouts.csv, calibration.json (when measured) and
plots/*.png (`sweep_plots`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import pathlib
import platform
import time
from typing import Any, Sequence

from efficientlm.inference import perf_model as pm
from efficientlm.inference import sweep_progress
from efficientlm.inference.hardware import GiB, get_hardware
from efficientlm.inference.layout_spec import Layout

NAMED_MODELS = {'palm_8b': pm.PALM_8B, 'palm_62b': pm.PALM_62B, 'palm_540b': pm.PALM_540B,
                # The paper's experiments pad PaLM 540B to 64 heads.
                'palm_540b_64h': dataclasses.replace(pm.PALM_540B, num_heads=64,
                                                     name='palm_540b_64h')}
COLUMNS = ('kind', 'status', 'reason', 'model', 'hardware', 'measured_device', 'mesh',
           'num_chips', 'phase', 'batch', 'length', 'context', 'layout', 'weight_dtype', 'time',
           'compute_time', 'memory_time', 'comm_time', 'mfu', 'chip_seconds_per_token',
           'dollars_per_million_tokens', 'memory_per_chip_gib', 'fits', 'torus_time',
           'measured_time', 'measured_mfu', 'measured_chip_seconds_per_token')
GROUP = ('kind', 'model', 'hardware', 'mesh', 'phase', 'batch', 'length', 'context',
         'weight_dtype')


@dataclasses.dataclass(frozen=True)
class Point:
  kind: str  # 'predicted' or 'measured'
  model: pm.ModelSpec
  hardware: str | None  # nominal hardware of the prediction columns
  mesh: tuple[int, int, int]
  phase: str
  batch: int
  length: int  # tokens per sequence in this pass (1 for decode)
  context: int
  layout: Layout
  weight_dtype: str


def resolve_model(model: Any) -> pm.ModelSpec:
  """A PaLM preset name, a ModelSpec, or a (decoder-only) TransformerConfig."""
  if isinstance(model, pm.ModelSpec):
    return model
  if isinstance(model, str):
    if model not in NAMED_MODELS:
      raise ValueError(f'Unknown model {model!r}; known: {", ".join(NAMED_MODELS)} (or pass a '
                       'ModelSpec or TransformerConfig).')
    return NAMED_MODELS[model]
  return pm.ModelSpec.from_transformer_config(
      model, name=f'decoder_{model.num_decoder_layers}x{model.emb_dim}')


def parse_layouts(layouts: str | Sequence[str], model: pm.ModelSpec) -> list[Layout]:
  """'all' (perf_model.candidate_layouts) or 'ffn/attention[/block]' strings; the block
  defaults to the model's."""
  if layouts == 'all':
    return pm.candidate_layouts(model)
  if isinstance(layouts, str):
    layouts = [layouts]
  parsed = []
  for text in layouts:
    parts = text.split('/')
    if not 1 <= len(parts) <= 3 or not all(parts):
      raise ValueError(f"Layout {text!r}: write 'ffn/attention/block', e.g. '2d/heads/serial'.")
    if len(parts) < 3:
      parts = (parts + ['heads'])[:2] + ['parallel' if model.parallel_block else 'serial']
    parsed.append(Layout(*parts))  # raises ValueError naming the bad field
  return parsed


def invalid_reason(model: pm.ModelSpec, layout: Layout, batch: int, mesh) -> str:
  block = 'parallel' if model.parallel_block else 'serial'
  if layout.block != block:
    return f'layout {layout.name} has a {layout.block} block but {model.name} is {block}'
  try:
    pm.validate_layout(model, layout, batch, pm.parse_mesh(mesh))
  except ValueError as e:
    return str(e)
  return ''


def grid(models, hardware, meshes, batches, prompt_lengths, layouts, weight_dtypes, phases,
         decode_context, measure_model=None, measure_hardware=None) -> list[Point]:
  """Every point of the sweep, predicted ones first."""
  for name in hardware:
    get_hardware(name)  # unknown names raise here, before any work
  for dtype in weight_dtypes:
    if dtype not in pm.WEIGHT_BYTES:
      raise ValueError(f'weight_dtype {dtype!r} not in {sorted(pm.WEIGHT_BYTES)}.')
  for phase in phases:
    if phase not in pm.PHASES:
      raise ValueError(f'phase {phase!r} not in {pm.PHASES}.')
  runs = [('predicted', resolve_model(m), h) for m in models for h in hardware]
  if measure_model is not None:
    runs.append(('measured', resolve_model(measure_model), measure_hardware))
  points = []
  for kind, model, hw in runs:
    for mesh in meshes:
      mesh = tuple(pm.parse_mesh(mesh).values())
      for phase in phases:
        passes = ([(p, 0) for p in prompt_lengths] if phase == 'prefill' else
                  sorted({(1, decode_context or p) for p in prompt_lengths}))
        for batch in batches:
          for length, context in passes:
            for layout in parse_layouts(layouts, model):
              for dtype in weight_dtypes:
                points.append(Point(kind, model, hw, mesh, phase, batch, length, context,
                                    layout, dtype))
  return points


def _predict(point: Point, mode: str = 'paper') -> pm.Prediction:
  return pm.predict(point.model, point.hardware, point.mesh, point.layout, point.phase,
                    point.batch, point.length if point.phase == 'prefill' else None,
                    point.context, point.weight_dtype, mode=mode)


def _row(point: Point, device: str) -> dict:
  row = dict.fromkeys(COLUMNS)
  row.update(kind=point.kind, status='ok', reason='', model=point.model.name,
             hardware=point.hardware or '', mesh='x'.join(map(str, point.mesh)),
             num_chips=point.mesh[0] * point.mesh[1] * point.mesh[2], phase=point.phase,
             batch=point.batch, length=point.length, context=point.context,
             layout=point.layout.name, weight_dtype=point.weight_dtype,
             measured_device=device if point.kind == 'measured' else '')
  return row


def _fill_prediction(row: dict, p: pm.Prediction, torus: bool, point: Point) -> None:
  row.update(time=p.time, compute_time=p.compute_time, memory_time=p.memory_time,
             comm_time=p.comm_time, mfu=p.mfu, chip_seconds_per_token=p.chip_seconds_per_token,
             dollars_per_million_tokens=p.dollars_per_million_tokens,
             memory_per_chip_gib=p.memory_per_chip / GiB, fits=p.fits)
  if torus:
    row['torus_time'] = _predict(point, 'torus').time
  if not p.fits:
    row.update(status='does_not_fit', reason=(
        f'needs {p.memory_per_chip / GiB:.1f} GiB per chip, {p.hardware} has '
        f'{p.hbm_bytes / GiB:.1f} GiB'))


def _measure(row: dict, point: Point, config, repeats: int, decoders: dict) -> None:
  from efficientlm.inference import sweep_measure as sm  # imports the layout code lazily
  cfg = sm.measured_config(config, point.weight_dtype)
  key = (point.layout, point.mesh, cfg.param_dtype)
  if key not in decoders:
    try:
      decoders[key] = sm.make_decoder(cfg, point.layout, sm.build_mesh(point.mesh))
    except ValueError as e:  # the layout code's own constraints (e.g. KV heads vs mesh)
      decoders[key] = str(e)
  decoder = decoders[key]
  if isinstance(decoder, str):
    row.update(status='invalid', reason=decoder)
    return
  seconds = sm.time_layers(decoder, point.phase, point.batch, point.length, point.context,
                           point.weight_dtype == 'int8', repeats)
  tokens = point.batch * point.length
  row.update(measured_time=seconds, measured_chip_seconds_per_token=row['num_chips'] * seconds
             / tokens)
  if point.hardware and not row['measured_device'].startswith('cpu'):
    # MFU against the nominal peak only means something on that hardware, not on a CPU.
    row['measured_mfu'] = pm.mfu(point.model.total_params, tokens, seconds, row['num_chips'],
                                 get_hardware(point.hardware).peak_flops)


def best_layouts(rows: Sequence[dict]) -> list[dict]:
  """The fastest valid layout per group (GROUP), by predicted and, if measured, measured time."""
  best: dict[tuple, dict] = {}
  for row in rows:
    if row['status'] != 'ok':
      continue
    for by, column in (('predicted', 'time'), ('measured', 'measured_time')):
      if row[column] is None:
        continue
      key = tuple(row[c] for c in GROUP) + (by,)
      if key not in best or row[column] < best[key]['time']:
        best[key] = {**{c: row[c] for c in GROUP}, 'by': by, 'layout': row['layout'],
                     'time': row[column]}
  return list(best.values())


def _write_csv(path: pathlib.Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
  with path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows({c: '' if r[c] is None else r[c] for c in columns} for r in rows)


def _calibration(rows, predictions, info: dict) -> dict:
  points = [(p, r['measured_time']) for r, p in zip(rows, predictions)
            if r['kind'] == 'measured' and r['status'] == 'ok' and p is not None]
  out = {'device': info['platform'], 'device_kind': info['device_kind'],
         'hardware': sorted({r['hardware'] for r in rows if r['kind'] == 'measured'}),
         'model': sorted({r['model'] for r in rows if r['kind'] == 'measured'}),
         'num_points': len(points), 'calibration': None, 'note': ''}
  if info['platform'] == 'cpu':
    out['note'] = ('Measured on CPU: these timings say nothing about interconnects or the '
                   'nominal hardware; use them for trends only.')
  if points:
    try:
      out['calibration'] = dataclasses.asdict(pm.fit_calibration(points))
    except ValueError as e:
      out['note'] += f' Fit failed: {e}'
  else:
    out['note'] += ' No measured points with a nominal hardware prediction to fit.'
  return out


def sweep(*, output_dir: str, models: Sequence[Any] = (), hardware: Sequence[str] = ('tpu_v4',),
          meshes: Sequence[Sequence[int]] = ((2, 2, 2),), batches: Sequence[int] = (1,),
          prompt_lengths: Sequence[int] = (2048,), layouts: str | Sequence[str] = 'all',
          weight_dtypes: Sequence[str] = ('bfloat16',),
          phases: Sequence[str] = ('prefill', 'decode'), decode_context: int | None = None,
          measure: bool = False, measure_model=None, measure_hardware: str | None = 'auto',
          repeats: int = 5, torus: bool = False, plots: bool = True, dry_run: bool = False
          ) -> list[dict] | list[Point]:
  """Runs the sweep (see module doc); returns the rows (dry_run: the points, nothing run).

  measure_hardware: nominal hardware for the measured rows' prediction columns; 'auto' picks
  the local device's spec (None on CPU), None or 'cpu' means no prediction.
  """
  import jax  # for device info only; the analytical rows need no accelerator

  if isinstance(hardware, str):
    hardware = [hardware]
  if measure:
    from efficientlm.inference import sweep_measure as sm  # the layout code, only if measuring
    if measure_model is None:
      raise ValueError('measure=True needs a measure_model (a decoder-only TransformerConfig).')
    for mesh in meshes:
      sm.check_mesh(tuple(pm.parse_mesh(mesh).values()))
    if measure_hardware == 'auto':
      measure_hardware = sm.auto_hardware()
    elif measure_hardware == 'cpu':
      measure_hardware = None
    if measure_hardware is not None:
      get_hardware(measure_hardware)
  points = grid(models, hardware, meshes, batches, prompt_lengths, layouts, weight_dtypes,
                phases, decode_context, measure_model if measure else None, measure_hardware)
  if dry_run:
    return points

  devices = jax.local_devices()
  info = {'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
          'local_device_count': len(devices), 'device_count': jax.device_count()}
  device = f'{info["platform"]}:{info["device_kind"]}'
  start = time.perf_counter()
  progress = sweep_progress.Progress(len(points))
  rows, predictions, decoders = [], [], {}
  for i, point in enumerate(points):
    row, prediction = _row(point, device), None
    reason = invalid_reason(point.model, point.layout, point.batch, point.mesh)
    if reason:
      row.update(status='invalid', reason=reason)
    elif point.hardware:
      prediction = _predict(point)
      _fill_prediction(row, prediction, torus, point)
    if point.kind == 'measured' and row['status'] == 'ok':
      _measure(row, point, measure_model, repeats, decoders)
    rows.append(row)
    predictions.append(prediction)
    elapsed = time.perf_counter() - start
    progress.update(i, f'{point.kind} {point.model.name} {point.phase} B={point.batch} '
                    f'{point.layout.name} {point.weight_dtype} {row["status"]}  {elapsed:.1f}s')
  progress.close()
  elapsed = time.perf_counter() - start
  print(f'swept {len(points)} points in {elapsed:.1f}s '
        f'({sum(r["status"] == "ok" for r in rows)} ok)')

  directory = pathlib.Path(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  _write_csv(directory / 'sweep.csv', rows, COLUMNS)
  _write_csv(directory / 'best_layouts.csv', best_layouts(rows), GROUP + ('by', 'layout', 'time'))
  config = dict(models=[resolve_model(m).name for m in models], hardware=list(hardware),
                meshes=[list(m) for m in meshes], batches=list(batches),
                prompt_lengths=list(prompt_lengths), layouts=layouts,
                weight_dtypes=list(weight_dtypes), phases=list(phases),
                decode_context=decode_context, measure=measure,
                measure_model=dataclasses.asdict(measure_model) if measure_model else None,
                measure_hardware=measure_hardware, repeats=repeats, torus=torus)
  metadata = {**info, 'jax': jax.__version__, 'python': platform.python_version(),
              'devices': [str(d) for d in devices], 'elapsed_s': elapsed,
              'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'config': config}
  (directory / 'sweep.json').write_text(
      json.dumps({'metadata': metadata, 'rows': rows}, indent=1, default=str) + '\n')
  if any(r['kind'] == 'measured' for r in rows):
    (directory / 'calibration.json').write_text(
        json.dumps(_calibration(rows, predictions, info), indent=2) + '\n')
  if plots:
    from efficientlm.inference import sweep_plots
    sweep_plots.plot_groups(rows, directory / 'plots')
  return rows
