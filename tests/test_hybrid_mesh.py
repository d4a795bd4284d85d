"""Multi-slice meshes: DCN factors outermost, each ICI block inside one slice."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from efficientlm import hybrid_mesh, partitioning


def _slices(n, ici_shape):
  """n fake slices whose devices are numbered 100 * slice + position."""
  size = int(np.prod(ici_shape))
  return [100 * s + np.arange(size).reshape(ici_shape) for s in range(n)]


def test_data_parallel_across_slices_keeps_each_model_group_in_one_slice():
  array = hybrid_mesh.hybrid_device_array((2, 2), (2, 1), _slices(2, (2, 2)))
  # Axis 0 (data, 4 = 2 slices x 2): rows 0-1 are slice 0, rows 2-3 slice 1, each in its order.
  np.testing.assert_array_equal(array, [[0, 1], [2, 3], [100, 101], [102, 103]])


def test_a_dcn_factor_on_the_second_axis_is_its_outer_stride():
  array = hybrid_mesh.hybrid_device_array((2, 2), (1, 2), _slices(2, (2, 2)))
  np.testing.assert_array_equal(array, [[0, 1, 100, 101], [2, 3, 102, 103]])


def test_dcn_on_two_axes_is_row_major_over_slices():
  array = hybrid_mesh.hybrid_device_array((1, 2), (2, 2), _slices(4, (1, 2)))
  np.testing.assert_array_equal(array, [[0, 1, 100, 101], [200, 201, 300, 301]])


def test_mismatches_are_explained():
  with pytest.raises(ValueError, match='spans 4 slices, but the devices come from 2'):
    hybrid_mesh.hybrid_device_array((2, 2), (2, 2), _slices(2, (2, 2)))
  with pytest.raises(ValueError, match='one factor per mesh axis'):
    hybrid_mesh.hybrid_device_array((2, 2), (2,), _slices(2, (2, 2)))


def test_granules_are_slices_on_tpu_and_processes_elsewhere():
  def dev(platform, slice_index, process_index):
    return types.SimpleNamespace(platform=platform, slice_index=slice_index,
                                 process_index=process_index)
  tpu = [dev('tpu', s, p) for s, p in ((1, 2), (0, 0), (1, 3), (0, 1))]
  assert [[d.process_index for d in g] for g in hybrid_mesh.device_granules(tpu)] == [[0, 1],
                                                                                       [2, 3]]
  cpu = [dev('cpu', 0, p) for p in (1, 0, 1)]  # CPUs report slice 0 in every process
  assert [[d.process_index for d in g] for g in hybrid_mesh.device_granules(cpu)] == [[0], [1, 1]]


def test_one_process_cannot_span_two_slices_and_dcn_one_is_the_plain_mesh():
  with pytest.raises(ValueError, match='spans 2 slices'):
    partitioning.create_mesh((-1, 4), ('data', 'model'), dcn_mesh_shape=(2, 1))
  plain = partitioning.create_mesh((-1, 4), ('data', 'model'))
  hybrid = partitioning.Partitioner((-1, 4), ('data', 'model'), 'tensor_parallel',
                                    dcn_mesh_shape=(1, 1)).mesh
  assert hybrid.shape == plain.shape and len(jax.devices()) == 8
  np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(hybrid.devices),
                                np.vectorize(lambda d: d.id)(plain.devices))


def test_dcn_minus_one_takes_the_slice_count_as_the_preflight_does():
  """One process is one granule: dcn (-1, 1) resolves to (1, 1), the plain mesh; the launch
  preflight accepts -1 in dcn_mesh_shape, so the mesh built on the TPU must too."""
  plain = partitioning.create_mesh((-1, 4), ('data', 'model'))
  hybrid = partitioning.create_mesh((-1, 4), ('data', 'model'), dcn_mesh_shape=(-1, 1))
  assert hybrid.shape == plain.shape
  with pytest.raises(ValueError, match='at most one -1'):
    partitioning.create_mesh((-1, 4), ('data', 'model'), dcn_mesh_shape=(-1, -1))
