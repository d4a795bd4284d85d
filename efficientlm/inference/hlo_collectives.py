"""The collectives of a compiled function, read from its HLO text, as layout_spec.Collectives.

    compiled = jax.jit(f).lower(*args).compile()
    collectives_of(compiled, mesh)   # [Collective(kind, axes, bytes), ...] in program order

Each all-gather, reduce-scatter, all-reduce and all-to-all instruction becomes one Collective:
its replica groups (explicit `{{0,4},{1,5}}`, iota `[4,2]<=[2,2,2]T(0,2,1)`, or empty = all
devices) are mapped through the device assignment onto the mesh, and `axes` are the mesh axes
along which a group's members differ (each group must be a whole sub-mesh over those axes).
Bytes per chip follow layout_spec: all-gather its output (operand x group size), reduce-scatter
its input, all-reduce its operand, all-to-all its operand.

What XLA:CPU emits (jax 0.10, checked in tests/inference/test_hlo_collectives.py): psum_scatter
-> `reduce-scatter` (not all-reduce + dynamic-slice), all_gather -> `all-gather`, psum ->
`all-reduce`, all_to_all -> a *tuple* `all-to-all` with one operand per destination (its
operands together are the array; counted as one collective with their summed bytes). All are
synchronous on CPU, and independent weight all-gathers stay separate (no combiner). XLA:CPU
promotes bf16 collectives to f32 (bf16 reads 2x the bytes there; the layout tests use f32 and
int8). GPU/TPU `*-start`/`*-done` pairs count once (at the start), and collectives
wrapped in `async-start` computations are counted where they appear inside the wrapped
computation. A combined (tuple) all-gather, all-reduce or reduce-scatter counts one collective
per operand. Counts are static: a collective inside a loop body counts once. Collectives over
single-chip groups (shard_map keeps them for mesh axes of size 1) move nothing and are left
out; `axes` can only name axes of size > 1, since a size-1 axis never separates two members.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np

from efficientlm.inference.layout_spec import Collective

KINDS = {
    'all-gather': 'all-gather', 'all-gather-start': 'all-gather',
    'reduce-scatter': 'reduce-scatter', 'reduce-scatter-start': 'reduce-scatter',
    'all-reduce': 'all-reduce', 'all-reduce-start': 'all-reduce',
    'all-to-all': 'all-to-all', 'all-to-all-start': 'all-to-all',
}
DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 1, 'u4': 1,
    'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1, 'f8e4m3b11fnuz': 1, 'f8e4m3fnuz': 1,
    'f8e5m2fnuz': 1,
}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_OPCODE = re.compile(r'^\s*([a-z][\w\-]*)\(')
_COMMENT = re.compile(r'/\*.*?\*/')  # `/*index=5*/` in long operand lists


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: `f32[8,4]{1,0}` or a tuple `(f32[2], bf16[3,4])`."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      raise ValueError(f'Unknown HLO element type {dtype!r} in {shape!r}.')
    size = math.prod(int(d) for d in dims.split(',') if d)
    total += size * DTYPE_BYTES[dtype]
  return total


def _split_shape(rhs: str) -> tuple[str, str]:
  """'f32[2]{0} op(...)...' or '(f32[2], s32[]) op(...)' -> (shape, rest)."""
  if rhs.startswith('('):
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rhs[:i + 1], rhs[i + 1:]
  shape, _, rest = rhs.partition(' ')
  return shape, rest


def _top_level(text: str, start: int) -> tuple[str, int]:
  """The text inside the parentheses opening at text[start], and the index after them."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] in '({['
    depth -= text[i] in ')}]'
    if depth == 0:
      return text[start + 1:i], i + 1
  raise ValueError(f'Unbalanced parentheses in HLO: {text[:200]!r}')


def _operands(args: str) -> list[str]:
  out, depth, cur = [], 0, ''
  for ch in args:
    depth += ch in '({['
    depth -= ch in ')}]'
    if ch == ',' and depth == 0:
      out.append(cur.strip())
      cur = ''
    else:
      cur += ch
  if cur.strip():
    out.append(cur.strip())
  return out


def parse_replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
  """The `replica_groups=` of an instruction's attributes (all devices if absent or empty)."""
  m = re.search(r'replica_groups=', attrs)
  if not m:
    return [list(range(num_devices))]
  text = attrs[m.end():]
  if text.startswith('{'):
    body, _ = _top_level(text, 0)
    groups = [[int(i) for i in g.split(',') if i.strip()]
              for g in re.findall(r'\{([0-9,\s]*)\}', body)]
    return groups or [list(range(num_devices))]
  iota = re.match(r'\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?', text)
  if not iota:
    raise ValueError(f'Unrecognized replica_groups format: {text[:80]!r}')
  shape = [int(i) for i in iota.group(1).split(',')]
  ids = np.arange(math.prod(int(i) for i in iota.group(2).split(',')))
  ids = ids.reshape([int(i) for i in iota.group(2).split(',')])
  if iota.group(3):
    ids = ids.transpose([int(i) for i in iota.group(3).split(',')])
  return ids.reshape(shape).tolist()


def _group_axes(groups: list[list[int]], coords: np.ndarray,
                mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """Mesh axes spanned by the replica groups (coords[i] = mesh position of logical id i)."""
  names, sizes = tuple(mesh.axis_names), tuple(mesh.devices.shape)
  spans = set()
  for group in groups:
    pos = coords[np.asarray(group)]
    axes = tuple(n for j, n in enumerate(names) if len(set(pos[:, j])) > 1)
    if len(group) != math.prod(sizes[names.index(a)] for a in axes) or len(
        set(map(tuple, pos))) != len(group):
      raise ValueError(f'Replica group {group} is not a whole sub-mesh of {dict(mesh.shape)}.')
    spans.add(axes)
  if len(spans) != 1:
    raise ValueError(f'Replica groups {groups} span different mesh axes: {sorted(spans)}.')
  return spans.pop()


def collectives_in_hlo(hlo_text: str, mesh: jax.sharding.Mesh,
                       device_assignment: Sequence[jax.Device] | None = None) -> list[Collective]:
  """Collectives in an HLO module's text. Logical device id i is device_assignment[i] (default:
  the mesh's devices in row-major order, which is what jit over that mesh uses)."""
  devices = list(mesh.devices.flat) if device_assignment is None else list(device_assignment)
  where = {d.id: np.unravel_index(i, mesh.devices.shape) for i, d in enumerate(mesh.devices.flat)}
  coords = np.asarray([where[d.id] for d in devices])
  shapes, found = {}, []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(_COMMENT.sub('', line))
    if not m:
      continue
    name, rhs = m.groups()
    shape, rest = _split_shape(rhs.strip())
    shapes[name] = shape
    op = _OPCODE.match(rest)
    if not op or op.group(1) not in KINDS:
      continue
    kind = KINDS[op.group(1)]
    args, end = _top_level(rest, op.end() - 1)
    operand_bytes = [shape_bytes(_operand_shape(a, shapes)) for a in _operands(args)]
    groups = parse_replica_groups(rest[end:], len(devices))
    if max(len(g) for g in groups) == 1:  # over size-1 mesh axes: moves nothing
      continue
    axes = _group_axes(groups, coords, mesh)
    if kind == 'all-to-all':  # CPU's tuple form: the operands are one array's pieces
      operand_bytes = [sum(operand_bytes)]
    factor = len(groups[0]) if kind == 'all-gather' else 1
    found.extend(Collective(kind, axes, b * factor) for b in operand_bytes)
  return found


def _operand_shape(arg: str, shapes: dict[str, str]) -> str:
  """An operand is `%name` or `f32[4]{0} %name`; the shape comes from its definition."""
  if _ARRAY.search(arg):
    return arg
  name = arg.split()[-1].lstrip('%')
  if name in shapes:
    return shapes[name]
  raise ValueError(f'HLO operand {arg!r} has no known shape.')


def collectives_of(compiled: jax.stages.Compiled, mesh: jax.sharding.Mesh) -> list[Collective]:
  """Collectives of a compiled jit function whose arrays live on `mesh`."""
  return collectives_in_hlo(compiled.as_text(), mesh, _device_assignment(compiled, mesh))


def _device_assignment(compiled, mesh) -> list[jax.Device] | None:
  """The executable's logical id -> device order, when jax exposes it (else the mesh's)."""
  for sharding in jax.tree.leaves(compiled.input_shardings):
    assignment = getattr(sharding, '_device_assignment', None)
    if assignment is not None and len(assignment) == mesh.devices.size:
      return list(assignment)
  return None
