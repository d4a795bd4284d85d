"""Grouped matmul (dropless MoE experts) against a per-row numpy reference, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.moe import grouped_matmul as gm
from tests.error_bounds import assert_within, dot_bound

ROWS, K, N, GROUPS = 50, 6, 5, 4


def _reference(x, w, sizes):
  """Row r of group g: x[r] @ w[g]; rows past sum(sizes): 0. Grads of sum(out * dy)."""
  group_of = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)]).astype(int)
  out = np.zeros((x.shape[0], w.shape[2]))
  for r, g in enumerate(group_of):
    out[r] = x[r] @ w[g]
  return out, group_of


def _reference_grads(x, w, dy, group_of):
  dx = np.zeros_like(x)
  dw = np.zeros_like(w)
  for r, g in enumerate(group_of):
    dx[r] = dy[r] @ w[g].T
    dw[g] += np.outer(x[r], dy[r])
  return dx, dw


@pytest.mark.parametrize('sizes', [(10, 0, 25, 15), (0, 0, 0, 50), (3, 3, 3, 3), (50, 0, 0, 0),
                                   (7, 0, 9, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize('block', [2, 8, 64])
def test_blocked_matches_per_row_reference(sizes, block):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(ROWS, K))
  w = rng.normal(size=(GROUPS, K, N))
  dy = rng.normal(size=(ROWS, N))
  sizes_arr = jnp.asarray(sizes, jnp.int32)

  def f(x, w):
    return gm.grouped_matmul(x, w, sizes_arr, 'blocked', block)

  out, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(dy, jnp.float32))
  want, group_of = _reference(x, w, sizes)
  want_dx, want_dw = _reference_grads(x, w, dy, group_of)
  # Float32 against float64: the rounding bound of each sum (over K, N and a group's rows), with
  # the sums of |terms| from the same references on absolute values.
  magnitude = _reference(np.abs(x), np.abs(w), sizes)[0]
  dx_magnitude, dw_magnitude = _reference_grads(np.abs(x), np.abs(w), np.abs(dy), group_of)
  assert_within(out, want, dot_bound(K, magnitude), 'out')
  assert_within(dx, want_dx, dot_bound(N, dx_magnitude), 'dx')
  assert_within(dw, want_dw, dot_bound(ROWS, dw_magnitude), 'dw')


def test_ragged_dot_implementation_matches_reference():
  rng = np.random.default_rng(1)
  x, w, sizes = rng.normal(size=(ROWS, K)), rng.normal(size=(GROUPS, K, N)), (10, 0, 25, 15)
  out = gm.grouped_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                          jnp.asarray(sizes), 'ragged_dot')
  assert_within(out, _reference(x, w, sizes)[0],
                dot_bound(K, _reference(np.abs(x), np.abs(w), sizes)[0]))


def _primitives(fn, *args):
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_auto_is_blocked_unless_experts_are_sharded():
  x, w = jnp.ones((64, K)), jnp.ones((8, K, N))
  sizes = jnp.full((8,), 8, jnp.int32)
  fn = lambda x, w: gm.grouped_matmul(x, w, sizes)  # pylint: disable=unnecessary-lambda-assignment
  if jax.default_backend() != 'tpu':
    assert 'custom_vjp_call' in _primitives(fn, x, w) or 'custom_vjp_call_jaxpr' in _primitives(
        fn, x, w)
  partitioner = partitioning.Partitioner(mesh_shape=(2, 4), axis_names=('data', 'expert'),
                                         rules='expert_parallel')
  with partitioner.context():
    assert partitioning.activation_axis_size('expert') == 4
    assert 'ragged_dot_general' in _primitives(fn, x, w) or 'ragged_dot' in _primitives(fn, x, w)


def test_block_size_heuristic():
  # Half the mean group size, as a power of two clipped to [32, 256].
  assert gm.block_size_for(4096, 8) == 256  # mean 512
  assert gm.block_size_for(4096, 32) == 64  # mean 128
  assert gm.block_size_for(4096, 128) == 32  # mean 32
  assert gm.block_size_for(65536, 8) == 256  # mean 8192


@pytest.mark.parametrize('sizes', [(10, 0, 25, 15), (0, 0, 0, 0), (50, 0, 0, 0), (1, 1, 1, 1)])
def test_loop_runs_only_the_blocks_that_exist(sizes):
  # Trip count sum_g ceil(n_g / block), not the static bound M / block + G; the blocks tile each
  # group's rows in order.
  block = 8
  plan = gm._plan  # pylint: disable=protected-access
  group, first, end, count = plan(jnp.asarray(sizes, jnp.int32), ROWS, block)
  want = [(g, start + i) for g, n in enumerate(sizes)
          for start in [sum(sizes[:g])] for i in range(0, n, block)]
  assert int(count) == len(want)
  assert [(int(g), int(f)) for g, f in zip(group[:count], first[:count])] == want
  assert [int(e) for e in end[:count]] == [sum(sizes[:g + 1]) for g, _ in want]


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match='tiled'):
    gm.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2]), 'tiled')
