"""Run mode `prune`: one-shot pruning of a checkpoint, layer by layer, without retraining
(SparseGPT, Frantar & Alistarh 2023; or the magnitude baseline through the same steps).

  python -m efficientlm.main --run_mode=prune --gin_file=models/decoder/tiny.gin \
      --gin_file=runs/prune.gin --gin.SOURCE_CHECKPOINT="'/runs/lm'" \
      --gin.MODEL_DIR="'/runs/lm_2of4'" --gin.SPARSITY="'2:4'"
  # then --run_mode=eval with the same flags evaluates the pruned model.

For each unit of plan.py (the transformer layers in forward order), with the units before it
already pruned: run the calibration batches through the model and record H = 2 X X^T / n for
every linear layer of the unit (hessians.py), prune each selected kernel (sparsegpt.py, or
magnitude.py with METHOD = 'magnitude'), save the progress (progress.py). The output is
MODEL_DIR/checkpoints/<source step> (parameters only, in the model's own layout; it restores
and decodes like any checkpoint) and MODEL_DIR/prune_report.json: per kernel its shape, kind,
the sparsity reached and the relative reconstruction error ||WX - W'X||^2 / ||WX||^2 on the
calibration inputs, with magnitude pruning's error for the same Hessian beside it.

Cost: unit k's capture runs the calibration batches through units 0..k (XLA drops the rest),
so the forward work is about L/2 passes over the model instead of the authors' one pass that
keeps every layer's outputs; in exchange any stack (encoder-decoder, MoE, token mixers with
linear projections) is handled by the model's own code. The source checkpoint is only read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from efficientlm import partitioning, storage
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import RestoreOptions, restore
from efficientlm.checkpoints.source import flatten, unflatten
from efficientlm.compression import hessians, magnitude, plan, sparsegpt
from efficientlm.compression.progress import Progress
from efficientlm.compression.spec import METHODS, PruneSpec
from efficientlm.errors import ConfigError
from efficientlm.models.model import BaseModel
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training.data_source import DataSource, global_batch_spec, make_iterator
from efficientlm.training.metrics import log

REPORT_FILE = 'prune_report.json'


def _calibration(dataset: DataSource, feature_converter: str, sequences: int):
  """(local batches, global batch spec): the first batches covering `sequences` sequences."""
  if not isinstance(sequences, int) or sequences < 1:
    raise ConfigError(f'CALIBRATION_SEQUENCES = {sequences!r}; give a positive number of '
                      'sequences (the paper uses 128 of 2048 tokens).')
  iterator = make_iterator(dataset, feature_converter)
  spec = global_batch_spec(iterator)
  rows = next(iter(spec.values())).shape[0]
  batches = [next(iterator) for _ in range(math.ceil(sequences / rows))]
  return batches, spec


def _check_source(source_checkpoint: str, model_dir: str) -> None:
  source, target = str(storage.as_path(source_checkpoint)), str(storage.as_path(model_dir))
  if not storage.is_url(source):
    source, target = str(storage.as_path(source).resolve()), str(storage.as_path(target).resolve())
  if source == target or source.startswith(target.rstrip('/') + '/'):
    raise ConfigError(f'SOURCE_CHECKPOINT {source_checkpoint} lies inside MODEL_DIR {model_dir}; '
                      'pruning writes a new checkpoint and never writes over its source: choose '
                      'a new MODEL_DIR.')


def _prune_kernel(kernel, gram, count, method: str, spec: PruneSpec):
  """(pruned kernel in the kernel's dtype, zero fraction, relative error, magnitude pruning's
  relative error) from the accumulated input statistics; expert kernels [E, in, out] per
  expert. The algorithms' own programs are shared by every kernel of the same shape."""
  hessian = hessians.hessian((gram, count))
  magnitude_fn = functools.partial(magnitude.prune, spec=spec)
  if method == 'sparsegpt':
    fn = functools.partial(sparsegpt.prune, spec=spec)
  else:
    fn = lambda k, h: magnitude_fn(k)  # noqa: E731
  if kernel.ndim == 3:
    fn, magnitude_fn = jax.vmap(fn), jax.vmap(magnitude_fn)
  pruned, _ = fn(kernel, hessian)
  baseline, _ = magnitude_fn(kernel)
  return (pruned.astype(kernel.dtype),) + _statistics(hessian, kernel, pruned, baseline)


@jax.jit
def _statistics(hessian, kernel, pruned, baseline):
  return (jnp.mean(pruned == 0), hessians.relative_error(hessian, kernel, pruned),
          hessians.relative_error(hessian, kernel, baseline))


def _capture_unit(work: BaseModel, partitioner, unit: str, params, batches):
  total = None
  for local in batches:
    with partitioner.context():
      try:
        sums = hessians.capture(work, unit, params, partitioner.shard_batch(local))
      except jax.errors.UnexpectedTracerError as e:
        raise ConfigError(f'The linear layers of {unit} run inside a JAX transform (scan, remat '
                          'or a custom gradient) of their token mixer, so their inputs cannot be '
                          f'recorded; leave this kind of layer out (PRUNE_LAYER_KINDS).') from e
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  return total or {}


def _prune_unit(unit: plan.Unit, flat: dict, sums, method: str, spec: PruneSpec,
                sequences: int) -> list[dict[str, Any]]:
  counts = {name: np.asarray(jax.device_get(sums[name][1])) for name in unit.kernels
            if name in sums}
  for name, count in counts.items():  # all of them before any kernel changes
    hessians.check_tokens(name, count, flat[name].shape[-2], sequences)
  rows = []
  for name in unit.kernels:
    kernel = flat[name]
    row = {'name': name, 'kind': hessians.kernel_kind(name), 'shape': list(kernel.shape)}
    if name not in sums:
      rows.append(dict(row, skipped='not called through DenseGeneral or MoE Experts, so its '
                       'inputs were not recorded; left unchanged'))
      continue
    pruned, zeros, error, baseline = _prune_kernel(*_one_device(kernel, *sums[name]), method,
                                                   spec)
    flat[name] = _from_one_device(pruned, kernel.sharding)
    rows.append(dict(row, sparsity=float(zeros), tokens=float(counts[name].min()),
                     error=float(error), magnitude_error=float(baseline)))
  return rows


def _identity(tree):
  return tree


def _one_device(*arrays):
  """The arrays whole on this process's first device. SparseGPT's column loop is sequential: on
  a split kernel every step would be a collective, and a replicated program would run once per
  device; one device per process does it once (each process the same)."""
  device = jax.local_devices()[0]
  if all(x.is_fully_addressable for x in arrays):
    return [jax.device_put(x, device) for x in arrays]
  mesh = arrays[0].sharding.mesh  # arrays span several processes: replicate, take ours
  replicated = jax.jit(_identity, out_shardings=NamedSharding(mesh, PartitionSpec()))(arrays)
  return [x.addressable_data(0) for x in replicated]


def _from_one_device(value: jax.Array, sharding) -> jax.Array:
  """A value every process holds whole, as a global array with `sharding`."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _unit_line(index: int, total: int, unit: plan.Unit, rows, seconds: float) -> str:
  done = [r for r in rows if 'error' in r]
  if not done:
    return f'prune [{index + 1}/{total}] {unit.name}: nothing pruned ({len(rows)} skipped)'
  mean = lambda key: sum(r[key] for r in done) / len(done)  # noqa: E731
  return (f'prune [{index + 1}/{total}] {unit.name}: {len(done)} kernels, sparsity '
          f'{mean("sparsity"):.3f}, error {mean("error"):.4g} (magnitude '
          f'{mean("magnitude_error"):.4g}), {seconds:.1f} s')


def _dataset_description(dataset: DataSource) -> Any:
  if dataclasses.is_dataclass(dataset):
    return dataclasses.asdict(dataset)
  return getattr(dataset, '__qualname__', type(dataset).__qualname__)


def prune(*,
          model: BaseModel,
          partitioner: partitioning.Partitioner,
          model_dir: str,
          source_checkpoint: str,
          calibration_dataset: DataSource,
          source_format: str = 'auto',
          method: str = 'sparsegpt',
          sparsity: float | str = 0.5,
          int8: bool = False,
          layer_kinds: Sequence[str] = plan.LAYER_KINDS,
          include_logits: bool = False,
          calibration_sequences: int = 128,
          block_size: int = 128,
          dampening: float = 0.01) -> dict[str, Any]:
  """Run mode `prune`: writes MODEL_DIR/checkpoints/<step> and prune_report.json; returns the
  report. `sparsity`: a fraction (unstructured) or 'n:m'; `int8`: round the kept weights to
  the int8 grid jointly; `layer_kinds`: any of plan.LAYER_KINDS."""
  if method not in METHODS:
    raise ConfigError(f"METHOD = {method!r}; choose one of {METHODS}.")
  spec = PruneSpec.parse(sparsity, int8=int8, block_size=block_size, dampening=dampening)
  _check_source(source_checkpoint, model_dir)
  directory = storage.as_path(model_dir) / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  progress = None
  try:
    if checkpointer.steps():
      raise ConfigError(f'{directory} already holds checkpoints {checkpointer.steps()}; prune '
                        'into a new MODEL_DIR (pruning never writes over a checkpoint).')
    work = plan.work_model(model)
    batches, batch_spec = _calibration(calibration_dataset, model.feature_converter,
                                       calibration_sequences)
    abstract, _ = partitioner.abstract_params(work.param_initializer(batch_spec),
                                              jax.random.key(0))
    cfg = model.module.config
    units = plan.make_plan({k: v.shape for k, v in flatten(abstract).items()}, spec,
                           tuple(layer_kinds), include_logits, cfg.logits_via_embedding)
    config = {'source_checkpoint': str(source_checkpoint), 'method': method,
              'spec': dataclasses.asdict(spec), 'layer_kinds': list(layer_kinds),
              'include_logits': include_logits, 'calibration_sequences': calibration_sequences,
              'calibration_dataset': _dataset_description(calibration_dataset)}
    progress = Progress(model_dir, config)
    resumed = progress.resume(abstract)
    if resumed is None:
      source = open_checkpoint(source_checkpoint, source_format)
      log(f'pruning {source.describe()} ({spec.describe()}, {method}, {len(units)} layers, '
          f'{len(batches) * next(iter(batch_spec.values())).shape[0]} calibration sequences)')
      # Strict: an array of the checkpoint that the model lacks (another depth, say) is an
      # error, not a layer silently left out of the pruned checkpoint.
      try:
        params, restore_report = restore(source, abstract, RestoreOptions(strict=True))
      except ValueError as e:
        raise ConfigError(f'{e}\nThe model gin must describe the SOURCE_CHECKPOINT model exactly '
                          '(pruning keeps every other parameter as it is).') from e
      log(restore_report.summary())
      done, report, source_step = 0, [], source.step
    else:
      params, report = resumed.params, resumed.report
      done, source_step = resumed.units_done, resumed.source_step
    flat = flatten(params)
    sequences = len(batches) * next(iter(batch_spec.values())).shape[0]
    for index in range(done, len(units)):
      start = time.perf_counter()
      unit = units[index]
      sums = _capture_unit(work, partitioner, unit.name, unflatten(flat), batches)
      rows = _prune_unit(unit, flat, sums, method, spec, sequences)
      report.extend(rows)
      log(_unit_line(index, len(units), unit, rows, time.perf_counter() - start))
      if index + 1 < len(units):  # after the last one, the pruned checkpoint itself
        progress.save(index + 1, unflatten(flat), report, source_step)
    model_abstract, _ = partitioner.abstract_params(model.param_initializer(batch_spec),
                                                    jax.random.key(0))
    out = plan.to_model_layout(unflatten(flat), model, model_abstract)
    step = source_step or 0
    checkpointer.save(step, out, wait=True,
                      meta={'pruned_from': str(source_checkpoint), 'pruning': config})
    result = {'source_checkpoint': str(source_checkpoint), 'step': step, 'config': config,
              'kernels': report, **_summary(report)}
    if jax.process_index() == 0:
      path = storage.as_path(model_dir) / REPORT_FILE
      path.write_text(json.dumps(result, indent=2) + '\n')
    progress.remove()
    log(f'wrote pruned checkpoint {directory / str(step)}: sparsity {result["sparsity"]:.3f} of '
        f'the pruned kernels, mean relative error {result["mean_error"]:.4g} (magnitude '
        f'{result["mean_magnitude_error"]:.4g}); report {storage.as_path(model_dir) / REPORT_FILE}')
    return result
  finally:
    if progress is not None:
      progress.close()
    checkpointer.close()


def _summary(report) -> dict[str, float]:
  done = [r for r in report if 'error' in r]
  weights = [math.prod(r['shape']) for r in done]
  total = max(sum(weights), 1)
  return {'sparsity': sum(w * r['sparsity'] for w, r in zip(weights, done)) / total,
          'mean_error': float(np.mean([r['error'] for r in done])) if done else 0.0,
          'mean_magnitude_error': (float(np.mean([r['magnitude_error'] for r in done]))
                                   if done else 0.0),
          'pruned_kernels': len(done), 'skipped_kernels': len(report) - len(done)}
