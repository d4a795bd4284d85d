"""Device meshes, logical-axis rules, and sharded initialization.

Model code names only logical axes ('batch', 'embed', 'heads', ...). This module maps them onto
mesh axes ('data', 'fsdp', 'model', 'expert', and 'x', 'y', 'z' for inference layouts) with two
tables per preset, one for parameters and one for activations, because the same logical axis is
often sharded differently in the two (FSDP shards a weight's 'embed' dimension but never an
activation's). Every logical name must appear in the table in use: an unknown name is a bug in a
rule table or a module, never a silent replication.

Resolution follows flax/T5X: the first rule for a logical name wins, mesh axes absent from the
mesh are dropped (so one table serves meshes with and without, say, an 'expert' axis), and a mesh
axis already used by an earlier dimension of the same array is skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from efficientlm import hybrid_mesh

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Every mesh axis a rule table may name. A rule naming anything else is a typo.
KNOWN_MESH_AXES = ('data', 'fsdp', 'model', 'expert', 'x', 'y', 'z')

_BATCH = ('data', 'fsdp', 'expert')  # every axis that is not a model axis splits the batch


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical -> mesh axis tables: one for parameters, one for activations."""

  params: Rules
  activations: Rules

  def __post_init__(self):
    for table_name in ('params', 'activations'):
      for logical, mesh_axes in getattr(self, table_name):
        for axis in _as_tuple(mesh_axes):
          if axis not in KNOWN_MESH_AXES:
            raise ValueError(
                f'AxisRules.{table_name} maps logical axis {logical!r} to unknown mesh axis '
                f'{axis!r}; mesh axes are {KNOWN_MESH_AXES}.')


# Mixture-of-Experts: experts split over the 'expert' mesh axis wherever the mesh has one (the
# batch is split over it too, so the dispatch einsum becomes an all-to-all); the router's expert
# dimension ('unmodeled') stays replicated.
_COMMON_PARAMS: Rules = (('layers', None), ('relpos_buckets', None), ('expert', 'expert'),
                         ('unmodeled', None),
                         # evolving attention's small convolution over [heads, q, k] maps
                         ('conv_query', None), ('conv_key', None), ('conv_heads_in', None),
                         ('conv_heads_out', None),
                         # state space and Fourier mixers (layers/ssm.py, fourier_mixing.py):
                         # small per-channel tables, replicated
                         ('ssm_channels', None), ('ssm_modes', None), ('ssm_taps', None),
                         ('complex', None), ('fourier_frequencies', None),
                         # Scaling Transformer (layers/sparse_ffn.py, sparse_qkv.py): the
                         # controller's bottleneck and the small sparse-QKV tables, replicated
                         ('controller_rank', None), ('qkv_modules', None),
                         ('qkv_module_features', None), ('qkv_module_out', None),
                         ('qkv_length_taps', None), ('qkv_module_taps', None))
_COMMON_ACTIVATIONS: Rules = (('batch', _BATCH), ('length', None), ('kv', None),
                              ('expert', 'expert'))


def _preset(params: Rules, activations: Rules) -> AxisRules:
  return AxisRules(params=params + _COMMON_PARAMS, activations=_COMMON_ACTIVATIONS + activations)


_REPLICATED_WEIGHTS: Rules = (('vocab', None), ('embed', None), ('mlp', None), ('heads', None),
                              ('joined_kv', None), ('joined_kv_heads', None), ('expert_mlp', None))
_UNSHARDED_FEATURES: Rules = (('embed', None), ('heads', None), ('kv_heads', None), ('mlp', None),
                              ('vocab', None), ('expert_mlp', None))
# Megatron-style tensor parallelism: heads, MLP hidden units and vocabulary split over 'model'.
# K/V projections of grouped/multi-query attention stay replicated: they are small, and their
# head count rarely divides the model axis (one head for multi-query).
_TENSOR_WEIGHTS: Rules = (('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
                          ('joined_kv', 'model'), ('joined_kv_heads', None),
                          ('expert_mlp', 'model'))
_TENSOR_FEATURES: Rules = (('embed', None), ('heads', 'model'), ('kv_heads', None),
                           ('mlp', 'model'), ('vocab', 'model'), ('expert_mlp', 'model'))

RULE_PRESETS: dict[str, AxisRules] = {
    # Pure data parallelism: replicated weights, batch split over every non-model axis.
    'data_parallel': _preset(_REPLICATED_WEIGHTS, _UNSHARDED_FEATURES),
    # ZeRO-3 / FSDP: weights split over 'fsdp' along 'embed' and gathered per layer by XLA.
    # (The first rule for a name wins, so prepending ('embed', 'fsdp') overrides the table.)
    'fsdp': _preset((('embed', 'fsdp'),) + _REPLICATED_WEIGHTS, _UNSHARDED_FEATURES),
    'tensor_parallel': _preset(_TENSOR_WEIGHTS + (('embed', None),), _TENSOR_FEATURES),
    # 2D: FSDP over 'fsdp' times tensor parallelism over 'model'.
    '2d': _preset(_TENSOR_WEIGHTS + (('embed', 'fsdp'),), _TENSOR_FEATURES),
}
# Every preset places experts over an 'expert' mesh axis when there is one; these names say so
# for data x expert and data x expert x model meshes (configs/meshes/expert_*.gin).
RULE_PRESETS['expert_parallel'] = RULE_PRESETS['data_parallel']
RULE_PRESETS['expert_tensor_parallel'] = RULE_PRESETS['tensor_parallel']


def get_rules(rules: str | AxisRules) -> AxisRules:
  if isinstance(rules, AxisRules):
    return rules
  if rules not in RULE_PRESETS:
    raise ValueError(f'Unknown rule preset {rules!r}; choose one of {sorted(RULE_PRESETS)} '
                     'or pass an AxisRules.')
  return RULE_PRESETS[rules]


# ----------------------------------------------------------------------------------------------
# Mesh construction.


def resolve_mesh_shape(mesh_shape: Sequence[int], axis_names: Sequence[str], num_devices: int,
                       what: str = 'mesh_shape', hint: str = '') -> tuple[int, ...]:
  """Checks a mesh's axes and fills in its -1 entry for `num_devices` devices; needs no devices,
  so launch preflight checks use it too. The product is left to the caller, whose message says
  where the devices come from; `hint` ends the device-count messages."""
  mesh_shape, axis_names = tuple(int(s) for s in mesh_shape), tuple(axis_names)
  if len(mesh_shape) != len(axis_names):
    raise ValueError(f'{what} {mesh_shape} and axis_names {axis_names} differ in length.')
  for name in axis_names:
    if name not in KNOWN_MESH_AXES:
      raise ValueError(f'Unknown mesh axis {name!r}; mesh axes are {KNOWN_MESH_AXES}.')
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f'Repeated mesh axis in {axis_names}.')
  if mesh_shape.count(-1) > 1 or any(s == 0 or s < -1 for s in mesh_shape):
    raise ValueError(f'{what} {mesh_shape}: sizes must be positive, with at most one -1.')
  known = math.prod(s for s in mesh_shape if s != -1)
  if -1 in mesh_shape:
    if num_devices % known:
      raise ValueError(f'{what} {mesh_shape} cannot use {num_devices} devices: {num_devices} is '
                       f'not divisible by {known}.' + (f' {hint}' if hint else ''))
    mesh_shape = tuple(num_devices // known if s == -1 else s for s in mesh_shape)
  return mesh_shape


def create_mesh(mesh_shape: Sequence[int] = (-1,),
                axis_names: Sequence[str] = ('data',),
                devices: Sequence[jax.Device] | None = None,
                dcn_mesh_shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh; one entry of `mesh_shape` may be -1 to take the remaining devices.

  dcn_mesh_shape (multi-slice): per-axis factors across slices (`hybrid_mesh`); mesh_shape is
  then the mesh inside one slice, and the mesh is their elementwise product, e.g. mesh_shape
  (-1, 4) with dcn_mesh_shape (2, 1) is data parallelism over 2 slices.
  """
  axis_names = tuple(axis_names)
  devices = list(jax.devices() if devices is None else devices)
  if dcn_mesh_shape is not None:
    granules = hybrid_mesh.device_granules(devices)
    if len(set(map(len, granules))) != 1:
      raise ValueError(f'Slices (or processes) hold different device counts '
                       f'{[len(g) for g in granules]}; a multi-slice mesh needs equal slices.')
    dcn_mesh_shape = resolve_mesh_shape(dcn_mesh_shape, axis_names, len(granules),
                                        'dcn_mesh_shape')
    meshes = [create_mesh(mesh_shape, axis_names, g) for g in granules]
    array = hybrid_mesh.hybrid_device_array(meshes[0].devices.shape, dcn_mesh_shape,
                                            [m.devices for m in meshes])
    return jax.sharding.Mesh(array, axis_names, axis_types=(AxisType.Auto,) * len(axis_names))
  mesh_shape = resolve_mesh_shape(mesh_shape, axis_names, len(devices))
  if math.prod(mesh_shape) != len(devices):
    raise ValueError(
        f'mesh_shape {dict(zip(axis_names, mesh_shape))} needs {math.prod(mesh_shape)} devices '
        f'but {len(devices)} are available; make the product of the sizes {len(devices)} or use '
        '-1 for one axis.')
  # jax.make_mesh orders devices by the physical topology (ICI rings on TPU).
  return jax.make_mesh(mesh_shape, axis_names, axis_types=(AxisType.Auto,) * len(mesh_shape),
                       devices=devices)


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec.


def _axis_sizes(mesh: jax.sharding.Mesh | Mapping[str, int]) -> Mapping[str, int]:
  return mesh.shape if isinstance(mesh, jax.sharding.Mesh) else mesh


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Rules,
                    mesh: jax.sharding.Mesh | Mapping[str, int],
                    shape: Sequence[int] | None = None,
                    what: str = 'array') -> PartitionSpec:
  """Resolves logical axis names to a PartitionSpec, checking names and divisibility; `mesh`
  may be only its axis sizes (device-free checks)."""
  sizes = _axis_sizes(mesh)
  table: dict[str, MeshAxes] = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f'{what}: logical axes {tuple(logical_axes)} do not match shape '
                     f'{tuple(shape)}.')
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(
          f'{what}: logical axis {name!r} has no rule. Add ({name!r}, <mesh axes or None>) to the '
          f'rule table; known logical axes: {sorted(table)}.')
    axes = tuple(a for a in _as_tuple(table[name]) if a in sizes and a not in used)
    used.update(axes)
    if shape is not None and axes:
      size = math.prod(sizes[a] for a in axes)
      if shape[dim] % size:
        raise ValueError(
            f'{what}: dimension {dim} (logical {name!r}, size {shape[dim]}) is not divisible by '
            f'mesh axes {axes} of total size {size}. Change the mesh shape, or map {name!r} to '
            'other mesh axes (or None) in the rules.')
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def data_shards(mesh: jax.sharding.Mesh | Mapping[str, int], rules: str | AxisRules) -> int:
  """How many ways the activation rules split the batch dimension over `mesh` (or axis sizes)."""
  sizes = _axis_sizes(mesh)
  spec = logical_to_spec(('batch',), get_rules(rules).activations, sizes)
  return math.prod(sizes[a] for a in _as_tuple(spec[0]))


def _flax_rules(rules: Rules, mesh: jax.sharding.Mesh) -> Rules:
  """The table with mesh axes absent from `mesh` removed, for flax's own resolution."""
  out = []
  for logical, mesh_axes in rules:
    axes = tuple(a for a in _as_tuple(mesh_axes) if a in mesh.shape)
    out.append((logical, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Activation sharding constraints used by model code.

_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = (
    contextvars.ContextVar('efficientlm_activation_rules', default=None))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside a mesh context."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape, what=f'activation {x.shape}')
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh_and_rules() -> tuple[jax.sharding.Mesh, Rules] | None:
  """The mesh and activation rules of the innermost Partitioner.context (None outside one), for
  code that maps over the mesh itself (shard_map) instead of constraining shardings."""
  return _ACTIVE.get()


def activation_axis_size(logical_axis: str) -> int:
  """How many ways the active rules split activations along `logical_axis` (1 outside a mesh
  context or when it is unsharded)."""
  active = _ACTIVE.get()
  if active is None:
    return 1
  mesh, rules = active
  spec = logical_to_spec((logical_axis,), rules, mesh)[0]
  return math.prod(mesh.shape[a] for a in _as_tuple(spec)) if spec else 1


# ----------------------------------------------------------------------------------------------
# Parameters: shardings from LogicallyPartitioned boxes, and sharded initialization.


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
  """Strips LogicallyPartitioned boxes without applying sharding constraints."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree,
                      is_leaf=_is_box)


def param_specs(boxed_tree, rules: str | AxisRules,
                mesh: jax.sharding.Mesh | Mapping[str, int]) -> Any:
  """PartitionSpecs for a boxed parameter tree (or abstract one, from jax.eval_shape) over `mesh`
  or its axis sizes; errors name the offending parameter."""
  param_rules = get_rules(rules).params

  def spec(path, leaf):
    if not _is_box(leaf):
      raise ValueError(f'Parameter {_path_str(path)!r} has no logical axis names; create it '
                       'with nn.with_logical_partitioning.')
    return logical_to_spec(leaf.names, param_rules, mesh, leaf.value.shape,
                           what=f'parameter {_path_str(path)!r}')

  return jax.tree_util.tree_map_with_path(spec, boxed_tree, is_leaf=_is_box)


def logical_axes(boxed_tree) -> Any:
  """The tree of logical-axis tuples of a boxed (abstract or concrete) parameter tree."""

  def names(path, leaf):
    if not _is_box(leaf):
      raise ValueError(f'Parameter {_path_str(path)!r} has no logical axis names; create it with '
                       'nn.with_logical_partitioning.')
    return tuple(leaf.names)

  return jax.tree_util.tree_map_with_path(names, boxed_tree, is_leaf=_is_box)


@dataclasses.dataclass
class Partitioner:
  """Owns a mesh and a rules preset: shardings for parameters and batches, and sharded init."""

  mesh_shape: Sequence[int] = (-1,)
  axis_names: Sequence[str] = ('data',)
  rules: str | AxisRules = 'data_parallel'
  devices: Sequence[jax.Device] | None = None
  dcn_mesh_shape: Sequence[int] | None = None  # multi-slice: see create_mesh

  def __post_init__(self):
    self.mesh = create_mesh(self.mesh_shape, self.axis_names, self.devices, self.dcn_mesh_shape)
    self.axis_rules = get_rules(self.rules)

  # -- context --------------------------------------------------------------------------------
  @contextlib.contextmanager
  def context(self):
    """Mesh, flax's rules (for parameters) and our activation rules, for tracing model code."""
    token = _ACTIVE.set((self.mesh, self.axis_rules.activations))
    try:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(
          _flax_rules(self.axis_rules.params, self.mesh)):
        yield self
    finally:
      _ACTIVE.reset(token)

  # -- parameters -----------------------------------------------------------------------------
  def param_specs(self, boxed_tree) -> Any:
    """PartitionSpecs for a boxed parameter tree; errors name the offending parameter."""
    return param_specs(boxed_tree, self.axis_rules, self.mesh)

  def param_shardings(self, boxed_tree) -> Any:
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(boxed_tree),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))

  def abstract_params(self, init_fn: Callable[..., Any], *args) -> tuple[Any, Any]:
    """(unboxed ShapeDtypeStructs carrying their shardings, the shardings) of `init_fn(*args)`.

    Traced outside the mesh, so a parameter the mesh cannot split is reported by name before
    any activation constraint is seen. Nothing is allocated.
    """
    boxed = jax.eval_shape(init_fn, *args)
    shardings = self.param_shardings(boxed)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            unbox(boxed), shardings)
    return abstract, shardings

  def sharded_init(self, init_fn: Callable[..., Any], *args) -> tuple[Any, Any, Any]:
    """Runs `init_fn(*args)` (returning boxed variables) directly into sharded buffers.

    Returns (variables, shardings, logical axes), the variables unboxed. Shapes come from
    jax.eval_shape first, so the full tree never exists on one device.
    """
    _, shardings = self.abstract_params(init_fn, *args)
    axes = logical_axes(jax.eval_shape(init_fn, *args))
    with self.context():
      variables = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings, axes

  # -- batches --------------------------------------------------------------------------------
  def data_shards(self) -> int:
    """How many ways the batch dimension is split by the activation rules."""
    return data_shards(self.mesh, self.axis_rules)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    axes = ('batch',) + (None,) * (ndim - 1)
    return NamedSharding(self.mesh, logical_to_spec(axes, self.axis_rules.activations, self.mesh))

  def local_batch_size(self, global_batch_size: int) -> int:
    """This process's share of a global batch; checks it splits evenly."""
    shards, processes = self.data_shards(), jax.process_count()
    for n, what in ((shards, 'data-parallel shards'), (processes, 'processes')):
      if global_batch_size % n:
        raise ValueError(f'Global batch size {global_batch_size} is not divisible by the {n} '
                         f'{what} of mesh {dict(self.mesh.shape)}; choose a multiple of {n}.')
    return global_batch_size // processes

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles global arrays from each process's rows (multi-host input pipelines)."""
    out = {}
    for key, local in local_batch.items():
      local = np.asarray(local)
      global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
      self.local_batch_size(global_shape[0])
      out[key] = jax.make_array_from_process_local_data(
          self.batch_sharding(local.ndim), local, global_shape)
    return out
