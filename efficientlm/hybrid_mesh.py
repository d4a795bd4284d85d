"""Multi-slice meshes: fast ICI axes inside a slice, slow DCN factors across slices.

A mesh axis of size ici * dcn is laid out with the DCN factor outermost: consecutive devices
along the axis stay inside one slice (one ICI domain) and only the outer stride crosses the
data-center network. Putting data parallelism (one gradient all-reduce per step) on the DCN
factor and everything chattier inside slices is MaxText's and the JAX scaling guide's layout
for multi-slice training.

A granule is the set of devices one ICI domain joins: a TPU slice (`device.slice_index` on
multi-slice TPU), else a process (GPU hosts, CPU tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np


def device_granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
  """Devices grouped by slice (TPU multi-slice) or else by process, in granule order."""
  groups: dict[int, list[jax.Device]] = {}
  for d in devices:
    # Only TPUs mean it by slice_index (CPU devices report 0 in every process).
    key = d.slice_index if d.platform == 'tpu' else d.process_index
    groups.setdefault(key, []).append(d)
  return [groups[k] for k in sorted(groups)]


def hybrid_device_array(ici_shape: Sequence[int], dcn_shape: Sequence[int],
                        granule_meshes: Sequence[np.ndarray]) -> np.ndarray:
  """Device array of shape ici_shape * dcn_shape (per axis) from one ICI mesh per granule.

  granule_meshes: prod(dcn_shape) arrays of shape ici_shape (e.g. `jax.make_mesh(...).devices`
  of each slice), taken in row-major order over the DCN grid.
  """
  ici_shape, dcn_shape = tuple(ici_shape), tuple(dcn_shape)
  if len(ici_shape) != len(dcn_shape):
    raise ValueError(f'dcn_mesh_shape {dcn_shape} must have one factor per mesh axis '
                     f'({len(ici_shape)}).')
  if len(granule_meshes) != math.prod(dcn_shape):
    raise ValueError(f'dcn_mesh_shape {dcn_shape} spans {math.prod(dcn_shape)} slices, but the '
                     f'devices come from {len(granule_meshes)} slice(s) (or processes).')
  grid = np.stack([np.asarray(m).reshape(ici_shape) for m in granule_meshes])
  grid = grid.reshape(dcn_shape + ici_shape)
  n = len(ici_shape)
  # (dcn_0, ..., dcn_n, ici_0, ..., ici_n) -> (dcn_0, ici_0, dcn_1, ici_1, ...): DCN outermost.
  order = [a for i in range(n) for a in (i, n + i)]
  return grid.transpose(order).reshape(tuple(i * d for i, d in zip(ici_shape, dcn_shape)))
