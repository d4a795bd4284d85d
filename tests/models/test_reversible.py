"""Reversible layers against the plain computation of the same F and G (Gomez et al. 2017).

References are written here: a sequential loop y1 = x1 + F(x2), y2 = x2 + G(y1) differentiated
by ordinary autodiff (every activation stored), which the custom VJP must match while it
recomputes the activations from the outputs instead.

Tolerances: the custom VJP evaluates F and G at reconstructed inputs x2 = (x2 + G) - G, which
differ from the stored ones by float32 rounding at the scale of the residual stream (~1e-7
relative per layer); through 3 layers of O(1) Jacobians this moves gradients by ~1e-6 relative,
so 1e-5 of each leaf's largest entry leaves a margin while a wrong term (a missing cotangent,
a wrong sign) is O(1).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.attention import MultiHeadAttention
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.norms import RMSNorm
from efficientlm.models import reversible as rv

B, L, D, HEADS = 2, 8, 16, 4
RTOL = 1e-5  # see the module docstring


class AttentionBranch(nn.Module):
  dropout_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, bias):
    h = RMSNorm(name='pre_self_attention_layer_norm')(x)
    return MultiHeadAttention(HEADS, D // HEADS, dropout_rate=self.dropout_rate,
                              name='self_attention')(h, h, mask, bias,
                                                     deterministic=self.deterministic)


class MlpBranch(nn.Module):
  dropout_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    h = RMSNorm(name='pre_mlp_layer_norm')(x)
    return MlpBlock(2 * D, intermediate_dropout_rate=self.dropout_rate, name='mlp')(
        h, self.deterministic)


def make_stack(num_layers=3, dropout=0.0, **config) -> rv.ReversibleStack:
  det = dropout == 0.0
  return rv.ReversibleStack(rv.ReversibleConfig(num_layers, **config),
                            lambda i: AttentionBranch(dropout, det),
                            lambda i: MlpBranch(dropout, det), deterministic=det)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
  bias = jnp.asarray(0.5 * rng.normal(size=(1, HEADS, L, L)), jnp.float32)  # learned-bias stand-in
  weights = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)  # the loss's random projection
  return x, mask, bias, weights


def plain_stack(variables, x, mask, bias, num_layers=3, output='mean'):
  """The reference: the same branches applied sequentially, differentiated by plain autodiff."""
  x1 = x2 = x
  for i in range(num_layers):
    p = {'params': variables['params'][f'layers_{i}']}
    x1 = x1 + AttentionBranch().apply(p, x2, mask, bias)
    x2 = x2 + MlpBranch().apply(p, x1)
  return (x1 + x2) / 2 if output == 'mean' else jnp.concatenate([x1, x2], -1)


def assert_tree_close(got, want, rtol=RTOL):
  """Leaf by leaf: max |got - want| <= rtol * max |want|."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    error = float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
    assert error <= rtol * float(np.max(np.abs(w))), (jax.tree_util.keystr(path), error)


@pytest.fixture(scope='module')
def variables():
  x, mask, bias, _ = inputs()
  return partitioning.unbox(make_stack().init(jax.random.key(0), x, mask, bias))


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match='num_layers'):
    rv.ReversibleConfig(0)
  with pytest.raises(ValueError, match='ff_chunks'):
    rv.ReversibleConfig(2, ff_chunks=0)
  with pytest.raises(ValueError, match='output'):
    rv.ReversibleConfig(2, output='sum')
  with pytest.raises(ValueError, match='divisor of 8'):
    rv.ReversibleConfig(2, ff_chunks=3).validate(8)


def test_parameter_names_and_logical_axes():
  x, mask, bias, _ = inputs()
  boxed = jax.eval_shape(make_stack(2).init, jax.random.key(0), x, mask, bias)['params']
  assert sorted(boxed) == ['layers_0', 'layers_1']
  assert sorted(boxed['layers_1']) == ['mlp', 'pre_mlp_layer_norm',
                                       'pre_self_attention_layer_norm', 'self_attention']
  axes = partitioning.logical_axes(boxed)
  assert axes['layers_0']['self_attention']['query']['kernel'] == ('embed', 'joined_kv')
  assert axes['layers_1']['mlp']['wo']['kernel'] == ('mlp', 'embed')


@pytest.mark.parametrize('output', ['mean', 'concat'])
def test_forward_equals_plain_stack(variables, output):
  x, mask, bias, _ = inputs()
  got = jax.jit(make_stack(output=output).apply)(variables, x, mask, bias)
  want = plain_stack(variables, x, mask, bias, output=output)
  assert got.shape == (B, L, D if output == 'mean' else 2 * D)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # same ops: rounding only


def test_gradients_equal_autodiff_of_plain_stack(variables):
  x, mask, bias, w = inputs()
  stack = make_stack()
  grad = jax.jit(jax.grad(lambda v, x, b: jnp.mean(stack.apply(v, x, mask, b) * w), (0, 1, 2)))
  want = jax.jit(jax.grad(lambda v, x, b: jnp.mean(plain_stack(v, x, mask, b) * w), (0, 1, 2)))
  got, ref = grad(variables, x, bias), want(variables, x, bias)
  assert_tree_close(got, ref)
  # The inputs' cotangent gathers both streams; the bias (a float argument of F) gets one too.
  assert float(jnp.max(jnp.abs(ref[2]))) > 0


def test_boxed_parameters_apply_and_differentiate():
  x, mask, bias, w = inputs()
  stack = make_stack(2)
  boxed = stack.init(jax.random.key(1), x, mask, bias)
  loss = lambda v: jnp.mean(stack.apply(v, x, mask, bias) * w)
  got = jax.jit(jax.grad(loss))(boxed)
  want = jax.jit(jax.grad(loss))(partitioning.unbox(boxed))
  assert_tree_close(partitioning.unbox(got), want, rtol=0)


def test_inverse_reconstructs_inputs():
  rng = np.random.default_rng(3)
  params = [{'wf': jnp.asarray(rng.normal(size=(D, D)) / 4, jnp.float32),
             'wg': jnp.asarray(rng.normal(size=(D, D)) / 4, jnp.float32)} for _ in range(4)]
  f = lambda p, x, args, rng: jnp.tanh(x @ p['wf'] + args[0])
  g = lambda p, x, rng: jax.nn.gelu(x @ p['wg'])
  x1, x2 = (jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32) for _ in range(2))
  shift = jnp.asarray(rng.normal(size=(D,)), jnp.float32)
  y1, y2 = rv.reversible_layers([f] * 4, [g] * 4, params, x1, x2, (shift,))
  assert float(jnp.max(jnp.abs(y1 - x1))) > 0.1  # the layers do change the streams
  r1, r2 = rv.reverse_layers([f] * 4, [g] * 4, params, y1, y2, (shift,))
  np.testing.assert_allclose(r1, x1, atol=1e-5)  # float32 rounding of |y| ~ 3, over 4 layers
  np.testing.assert_allclose(r2, x2, atol=1e-5)


def test_dropout_recomputes_the_same_masks(variables):
  """With dropout, the backward pass must regenerate the forward pass's masks: the custom VJP
  then equals autodiff of the same forward, which stores the masks."""
  x, mask, bias, w = inputs()
  rngs = {'dropout': jax.random.key(7)}

  def loss(stack):
    return lambda v: jnp.mean(stack.apply(v, x, mask, bias, rngs=rngs) * w)

  custom = make_stack(dropout=0.3)
  plain = make_stack(dropout=0.3, custom_gradient=False)
  dropped = jax.jit(lambda v: custom.apply(v, x, mask, bias, rngs=rngs))(variables)
  assert float(jnp.max(jnp.abs(dropped - plain_stack(variables, x, mask, bias)))) > 1e-3
  assert_tree_close(jax.jit(jax.grad(loss(custom)))(variables),
                    jax.jit(jax.grad(loss(plain)))(variables))


def test_chunked_apply_equals_unchunked():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, L, D)), jnp.float32)
  mlp = MlpBranch()
  params = mlp.init(jax.random.key(2), x)

  def run(chunks):
    def loss(p, x):
      y = rv.chunked_apply(lambda xc, _: mlp.apply(p, xc), x, chunks)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, x)

  (want_grads, want) = run(1)
  (got_grads, got) = run(4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # same per-position arithmetic
  assert_tree_close(got_grads, want_grads, rtol=1e-6)
  with pytest.raises(ValueError, match='divisor of 8'):
    rv.chunked_apply(lambda xc, _: xc, x, 3)


def test_chunked_stack_equals_unchunked(variables):
  x, mask, bias, w = inputs()
  grads = {}
  for chunks in (1, 2):
    stack = make_stack(ff_chunks=chunks)
    grads[chunks] = jax.jit(jax.grad(lambda v: jnp.mean(stack.apply(v, x, mask, bias) * w)))(
        variables)
  assert_tree_close(grads[2], grads[1])


def test_sharded_parameters_match_unsharded():
  x, mask, bias, w = inputs()
  stack = make_stack(2)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  sharded, shardings, _ = partitioner.sharded_init(stack.init, jax.random.key(0), x, mask, bias)
  kernel = sharded['params']['layers_0']['mlp']['wi_0']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'model')
  loss = lambda v: jnp.mean(stack.apply(v, x, mask, bias) * w)
  with partitioner.context():
    got = jax.jit(jax.grad(loss), out_shardings=shardings)(sharded)
  assert_tree_close(got, jax.jit(jax.grad(loss))(jax.device_get(sharded)))


def test_branches_with_other_collections_raise():
  x, mask, bias, _ = inputs()

  class Sows(nn.Module):
    @nn.compact
    def __call__(self, x):
      self.sow('intermediates', 'h', x)
      return nn.Dense(D, name='dense')(x)

  stack = rv.ReversibleStack(rv.ReversibleConfig(1), lambda i: AttentionBranch(), lambda i: Sows())
  with pytest.raises(ValueError, match="only 'params'"):
    stack.init(jax.random.key(0), x, mask, bias)


def test_clashing_branch_names_raise():
  x = jnp.ones((B, L, D))

  class Branch(nn.Module):
    @nn.compact
    def __call__(self, x, *args):
      return nn.Dense(D, name='dense')(x)

  stack = rv.ReversibleStack(rv.ReversibleConfig(1), lambda i: Branch(), lambda i: Branch())
  with pytest.raises(ValueError, match="sub-modules \\['dense'\\]"):
    stack.init(jax.random.key(0), x)


def test_activation_memory_does_not_grow_with_depth():
  """The point of the custom VJP, measured as the benchmark does (XLA's temp bytes of the
  compiled loss + gradient; deterministic for a given XLA, no timing) at a tiny size."""
  from benchmarks import reversible_memory  # pylint: disable=g-import-not-at-top
  setting = reversible_memory.Setting(width=16, length=16, batch=2, num_heads=2)
  temp = {(structure, depth): reversible_memory.temp_bytes(setting, depth, structure)
          for structure in ('standard', 'reversible') for depth in (1, 4)}
  # Seen: reversible 1.19x (one layer's buffers at this tiny size are partly fixed overhead),
  # standard 3.3x (four layers' activations stored).
  assert temp['reversible', 4] <= 1.3 * temp['reversible', 1]
  assert temp['standard', 4] >= 2.5 * temp['standard', 1]
