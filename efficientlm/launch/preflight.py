"""Checks a run's gin config against the TPU slice before any TPU time is spent.

Parses the user's gin files and overrides here (no TPU, no devices: the Partitioner is never
built) and checks what would otherwise fail only after the slice is up and installed: the mesh
must use exactly the slice's devices (times the number of slices), the global batch must split
over the data-parallel shards and the hosts, and MODEL_DIR must be shared storage when there is
more than one host.

Mesh semantics follow efficientlm.partitioning.Partitioner: `mesh_shape` (one entry may be -1)
is laid over the devices of one slice (ICI); with Multislice, `dcn_mesh_shape` gives each axis's
factor across slices (DCN), and the full mesh is their elementwise product. The batch is split
over every axis its activation rule names (Partitioner.data_shards: 'data', 'fsdp', 'expert'),
never over 'model'.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import gin

from efficientlm import gin_config, partitioning
from efficientlm.launch import tpu_slices


class PreflightError(ValueError):
  """The config cannot run on the slice; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The Partitioner's gin bindings (with its defaults for what is unbound)."""

  mesh_shape: tuple[int, ...]
  axis_names: tuple[str, ...]
  rules: Any = 'data_parallel'
  dcn_mesh_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the run will look like on the slice(s)."""

  mesh: dict[str, int]  # full mesh, all slices
  ici_mesh: dict[str, int]  # one slice
  data_shards: int
  processes: int
  global_batch: int

  def summary(self, slice_type: tpu_slices.SliceType, num_slices: int) -> str:
    slices = f'{num_slices} x ' if num_slices > 1 else ''
    return (f'preflight ok: mesh {self.mesh} on {slices}{slice_type.accelerator_type} '
            f'({slice_type.chips} chips, {slice_type.hosts} host(s), {slice_type.devices} JAX '
            f'devices per slice); global batch {self.global_batch} = '
            f'{self.global_batch // self.data_shards} per data shard x {self.data_shards} shards, '
            f'{self.global_batch // self.processes} per host x {self.processes} hosts')


def _resolve(shape: Sequence[int], names: Sequence[str], devices: int, what: str,
             fix: str) -> tuple[int, ...]:
  """partitioning.create_mesh's checks of `shape`, for `devices` devices that are not here."""
  try:
    shape = partitioning.resolve_mesh_shape(shape, names, devices, what, hint=fix)
  except ValueError as e:
    raise PreflightError(str(e)) from e
  if math.prod(shape) != devices:
    raise PreflightError(f'{what} {shape} needs {math.prod(shape)} devices but there are '
                         f'{devices}. {fix}')
  return shape


def plan(mesh_config: MeshConfig, slice_type: tpu_slices.SliceType, num_slices: int,
         global_batch: int, num_microbatches: int = 1) -> Plan:
  """Checks a mesh and a global batch against `num_slices` slices of `slice_type`."""
  names = tuple(mesh_config.axis_names)
  fix = (f'A {slice_type.accelerator_type} slice has {slice_type.devices} JAX devices '
         f'({slice_type.chips} chips); make the product of '
         'partitioning.Partitioner.mesh_shape equal that, or use -1 for one axis.')
  ici = _resolve(mesh_config.mesh_shape, names, slice_type.devices,
                 'partitioning.Partitioner.mesh_shape (one slice)', fix)
  dcn = mesh_config.dcn_mesh_shape
  if dcn is None:
    if num_slices > 1:
      raise PreflightError(
          f'--num-slices {num_slices} but partitioning.Partitioner.dcn_mesh_shape is not set; '
          f'set it to the per-axis factors across slices, e.g. --gin.partitioning.Partitioner.'
          f'dcn_mesh_shape="({num_slices},{",".join(["1"] * (len(names) - 1))})" for data '
          'parallelism over the slices.')
    dcn = (1,) * len(names)
  dcn = _resolve(dcn, names, num_slices, 'partitioning.Partitioner.dcn_mesh_shape (across slices)',
                 f'Its product must be the number of slices, --num-slices {num_slices}.')
  ici_mesh = dict(zip(names, ici))
  mesh = {n: i * d for n, i, d in zip(names, ici, dcn)}
  shards = partitioning.data_shards(mesh, mesh_config.rules)
  processes = slice_type.hosts * num_slices
  if global_batch % shards:
    raise PreflightError(
        f'Global batch size BATCH_SIZE={global_batch} is not divisible by the data-parallel size '
        f'{shards} (mesh {mesh}: every axis but model splits the batch). Set --gin.BATCH_SIZE to '
        f'a multiple of {shards}, e.g. {_next_multiple(global_batch, shards)}, or change the mesh.')
  if global_batch % processes:
    raise PreflightError(
        f'Global batch size BATCH_SIZE={global_batch} does not split over the {processes} hosts '
        f'(each loads its own share); set --gin.BATCH_SIZE to a multiple of {processes}, e.g. '
        f'{_next_multiple(global_batch, processes)}.')
  if global_batch % num_microbatches:
    raise PreflightError(f'Global batch size BATCH_SIZE={global_batch} is not divisible by '
                         f'NUM_MICROBATCHES={num_microbatches}.')
  return Plan(mesh=mesh, ici_mesh=ici_mesh, data_shards=shards, processes=processes,
              global_batch=global_batch)


def check_parameters(model: Any, mesh: dict[str, int], rules: Any) -> None:
  """Every parameter splits evenly over the full mesh (heads over 'model', experts over
  'expert', ...); shapes come from jax.eval_shape, so nothing is allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  batch = model.dummy_batch(1, {'inputs': 8, 'targets': 8})
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  try:
    partitioning.param_specs(boxed, rules, mesh)
  except ValueError as e:
    raise PreflightError(f'On mesh {mesh}: {e}') from e


def _next_multiple(n: int, k: int) -> int:
  return max(k, -(-n // k) * k)


# ----------------------------------------------------------------------------------------------
# Reading the gin config.


def _partitioner_bindings() -> dict[str, Any]:
  try:
    reference = gin.query_parameter('%PARTITIONER')
  except ValueError as e:
    raise PreflightError('The gin config defines no PARTITIONER; add a mesh gin such as '
                         'meshes/fsdp.gin (the run gins include one).') from e
  if not isinstance(reference, gin.config.ConfigurableReference):
    raise PreflightError(f'PARTITIONER is {reference!r}, not a @partitioning.Partitioner().')
  configurable = reference.configurable
  selector = '/'.join(list(reference.scopes) + [configurable.selector])
  defaults = {name: p.default for name, p in
              inspect.signature(configurable.wrapped).parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **gin.get_bindings(selector)}


def _macro(name: str, default: Any = None) -> Any:
  try:
    value = gin_config.macro(name)
  except ValueError:
    return default
  return default if value is gin.REQUIRED else value


def read_mesh_config() -> MeshConfig:
  """The Partitioner's bindings in the parsed gin config (dcn_mesh_shape None when unbound)."""
  bindings = _partitioner_bindings()
  dcn = bindings.get('dcn_mesh_shape')
  return MeshConfig(mesh_shape=tuple(bindings.get('mesh_shape', (-1,))),
                    axis_names=tuple(bindings.get('axis_names', ('data',))),
                    rules=bindings.get('rules', 'data_parallel'),
                    dcn_mesh_shape=None if dcn is None else tuple(dcn))


def check(gin_files: Sequence[str], gin_bindings: Sequence[str],
          slice_type: tpu_slices.SliceType, num_slices: int = 1,
          check_model: bool = True) -> Plan:
  """Parses the gins and checks them against the slice(s); builds no Partitioner (no devices
  needed) and, with `check_model`, only the abstract shapes of the model's parameters."""
  if not gin_files:
    raise PreflightError('No --gin_file given; e.g. --gin_file=runs/tpu_pretrain_t5_1_1.gin.')
  try:
    gin_config.parse(gin_files, gin_bindings, finalize=False)
  except (ValueError, IOError, SyntaxError) as e:
    raise PreflightError(f'The gin config does not parse: {e}') from e
  try:
    mesh_config = read_mesh_config()
    batch = _macro('BATCH_SIZE')
    if batch is None:
      raise PreflightError('BATCH_SIZE (the global batch) is not set; the run gins set it, or '
                           'pass --gin.BATCH_SIZE=N.')
    result = plan(mesh_config, slice_type, num_slices, int(batch),
                  int(_macro('NUM_MICROBATCHES', 1) or 1))
    if check_model:
      model = _macro('MODEL')
      if model is not None:
        check_parameters(model, result.mesh, mesh_config.rules)
    model_dir = _macro('MODEL_DIR')
    if model_dir is None:
      raise PreflightError('MODEL_DIR is not set; pass --model-dir=gs://BUCKET/PATH.')
    if result.processes > 1 and not str(model_dir).startswith('gs://'):
      raise PreflightError(f'MODEL_DIR {model_dir!r} is not on Cloud Storage, but the run has '
                           f'{result.processes} hosts, which must write one shared checkpoint; '
                           'pass --model-dir=gs://BUCKET/PATH.')
    return result
  finally:
    gin.clear_config()
