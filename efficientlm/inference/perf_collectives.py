"""The collectives of one decoder layer under a layout, and what each one costs.

The list follows the contract in `layout_spec.py` step by step (Pope et al. 2022, sections 3.2
and 3.3); the costs follow the spec's two modes: "paper mode" (the paper's section 3.1, one
per-chip interconnect bandwidth W) and "torus mode" (the "How to Scale Your Model" book: a ring
per mesh axis, bandwidth per axis spanned, plus a latency per hop). Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from efficientlm.inference.hardware import Hardware
from efficientlm.inference.layout_spec import MESH_AXES, Collective, Layout

MODES = ('paper', 'torus')
# Bandwidth cost relative to an all-gather with the same per-chip bytes (see the contract's byte
# conventions). An all-reduce is a reduce-scatter plus an all-gather (paper section 3.1). An
# all-to-all sends each shard straight to its owner: on a bidirectional ring that is about 1/4 of
# an all-gather (the book's collectives chapter; the spec's torus-mode figure). The paper gives no
# separate W-based cost for it, so paper mode uses the same 1/4.
BANDWIDTH_FACTOR = {'all-gather': 1.0, 'reduce-scatter': 1.0, 'all-reduce': 2.0,
                    'all-to-all': 0.25}


def parse_mesh(mesh_shape: Mapping[str, int] | Sequence[int]) -> dict[str, int]:
  """{'x': X, 'y': Y, 'z': Z} from a dict (missing axes are 1) or an (X, Y, Z) tuple."""
  if isinstance(mesh_shape, Mapping):
    unknown = sorted(set(mesh_shape) - set(MESH_AXES))
    if unknown:
      raise ValueError(f'Mesh {dict(mesh_shape)}: unknown axes {unknown}; use {MESH_AXES}.')
    mesh = {a: mesh_shape.get(a, 1) for a in MESH_AXES}
  else:
    shape = tuple(mesh_shape)
    if len(shape) != len(MESH_AXES):
      raise ValueError(f'Mesh shape {shape}: give one size per axis {MESH_AXES}.')
    mesh = dict(zip(MESH_AXES, shape))
  if any(not isinstance(v, int) or v < 1 for v in mesh.values()):
    raise ValueError(f'Mesh {mesh}: axis sizes must be positive integers.')
  return mesh


def mesh_name(mesh: Mapping[str, int]) -> str:
  return '{' + ','.join(f'{a}:{mesh[a]}' for a in MESH_AXES) + '}'


def group_size(mesh: Mapping[str, int], axes: Sequence[str]) -> int:
  return math.prod(mesh[a] for a in axes)


def sharded_kv(model, layout: Layout, mesh: Mapping[str, int]) -> bool:
  """The contract's "sharded KV": head-sharded attention and K divisible by |Ah|."""
  return (layout.attention == 'heads'
          and model.num_kv_heads % group_size(mesh, layout.head_axes) == 0)


def kv_cache_shards(model, layout: Layout, mesh: Mapping[str, int]) -> int:
  """Ways the KV cache is split: batch over Ab (and A for batch_*), heads over Ah if sharded."""
  ways = group_size(mesh, layout.batch_axes)
  if layout.attention != 'heads':
    return ways * group_size(mesh, layout.attention_batch_axes)
  return ways * (group_size(mesh, layout.head_axes) if sharded_kv(model, layout, mesh) else 1)


def validate_layout(model, layout: Layout, batch: int, mesh: Mapping[str, int]) -> None:
  """Raises ValueError if a dimension is not divisible by the mesh axes that split it."""
  checks = (('batch', batch, layout.batch_axes + layout.attention_batch_axes),
            ('num_heads', model.num_heads, layout.head_axes),
            ('d_ff', model.d_ff, layout.weight_out_axes + layout.weight_in_axes),
            ('d_model', model.d_model, layout.weight_in_axes + layout.weight_out_axes))
  for dim, size, axes in checks:
    chips = group_size(mesh, axes)
    if size % chips:
      raise ValueError(
          f'Layout {layout.name} on mesh {mesh_name(mesh)}: {dim} {size} is not divisible by '
          f'the {chips} chips of axes ({", ".join(axes)}); choose another layout or mesh.')


def layer_collectives(model, layout: Layout, batch: int, length: int,
                      mesh_shape: Mapping[str, int] | Sequence[int], act_bytes: int = 2,
                      weight_bytes: int = 2) -> list[Collective]:
  """The collectives of ONE decoder layer, in order, with per-chip bytes (the contract's list).

  A collective over a group of one chip (empty axes, or axes of size 1) does nothing and is
  left out.
  """
  mesh = parse_mesh(mesh_shape)
  validate_layout(model, layout, batch, mesh)
  size = lambda axes: group_size(mesh, axes)  # noqa: E731
  ab, ain, aout = layout.batch_axes, layout.weight_in_axes, layout.weight_out_axes
  n = size(MESH_AXES)
  e, f, h, k, d = (model.d_model, model.d_ff, model.num_heads, model.num_kv_heads,
                   model.head_dim)
  g = 2 if model.gated else 1
  act, w = act_bytes, weight_bytes
  bl = batch // size(ab) * length  # b*L rows on each chip
  kv_sharded = sharded_kv(model, layout, mesh)
  k_fused = k if kv_sharded else 0  # K' of the contract
  out: list[Collective] = []

  def add(kind, axes, nbytes):
    # A size-1 axis never separates group members: list only the axes a group really spans.
    axes = tuple(a for a in axes if mesh[a] > 1)
    if axes:
      out.append(Collective(kind, axes, nbytes))

  def gather_weights(widths):  # step 1: [E, width] matrices stored over all n chips
    for width in widths:
      add('all-gather', ab, e * width * size(ab) // n * w)

  residual = bl * e // size(ain) * act

  def norm_input():  # steps 2 and 3
    add('all-gather', aout, residual)
    add('all-reduce', ain, bl * 4)  # RMSNorm sum of squares, f32

  def replicated_kv():  # step 4, replicated KV: k and v are partial sums over Ain
    if not kv_sharded:
      add('all-reduce', ain, bl * 2 * k * d * act)

  def attention_exchange():  # step 5 of batch_* attention: q there, the output back
    a2a = bl * (h // size(layout.head_axes)) * d * act
    add('all-to-all', layout.attention_batch_axes, a2a)
    add('all-to-all', layout.attention_batch_axes, a2a)

  qkv = (h + 2 * k_fused) * d
  kv_kernels = [k * d, k * d] if kv_sharded else []
  if layout.block == 'serial':
    gather_weights([h * d] + kv_kernels + [h * d])
    norm_input()
    add('reduce-scatter', ain, bl * qkv // size(aout) * act)
    replicated_kv()
    attention_exchange()
    add('all-gather', ain, bl * h * d // size(aout) * act)
    add('reduce-scatter', aout, residual)
    gather_weights([f] * g + [f])
    norm_input()
    add('reduce-scatter', ain, bl * g * f // size(aout) * act)
    add('all-gather', ain, bl * f // size(aout) * act)
    add('reduce-scatter', aout, residual)
  else:  # parallel block: one norm, fused input and output collectives (PaLM)
    gather_weights([h * d] + kv_kernels + [f] * g + [h * d, f])
    norm_input()
    add('reduce-scatter', ain, bl * (g * f + qkv) // size(aout) * act)
    replicated_kv()
    attention_exchange()
    add('all-gather', ain, bl * (f + h * d) // size(aout) * act)
    add('reduce-scatter', aout, residual)
  return out


@dataclasses.dataclass(frozen=True)
class TimedCollective:
  """A collective with its cost split into a bandwidth part and a latency part (seconds)."""

  collective: Collective
  bandwidth_time: float
  latency_time: float  # hops (torus mode) plus any calibrated per-collective latency

  @property
  def seconds(self) -> float:
    return self.bandwidth_time + self.latency_time


def collective_time(collective: Collective, hardware: Hardware, mesh: Mapping[str, int],
                    mode: str = 'paper', interconnect_fraction: float = 1.0,
                    extra_latency: float = 0.0) -> TimedCollective:
  """Cost of one collective in paper mode (bytes / W) or torus mode (rings per axis + hops)."""
  factor = BANDWIDTH_FACTOR[collective.kind]
  if mode == 'paper':
    bandwidth, hops = hardware.interconnect_bandwidth, 0
  elif mode == 'torus':
    spanned = [a for a in collective.axes if mesh[a] > 1]
    per_axis = 1 if hardware.topology == 'switch' else len(spanned)
    bandwidth = hardware.axis_bandwidth * per_axis
    # A ring over an axis of size k takes k - 1 steps; an all-reduce is two passes.
    hops = sum(mesh[a] - 1 for a in spanned) * (2 if collective.kind == 'all-reduce' else 1)
  else:
    raise ValueError(f'mode {mode!r} not in {MODES}.')
  return TimedCollective(
      collective, factor * collective.bytes / (bandwidth * interconnect_fraction),
      hops * hardware.hop_latency + extra_latency)
