"""Sharded forward/backward equals one device; parameter shardings follow the rules; errors."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientlm import partitioning
from tests import helpers

# Expected specs, written by hand from the rule tables' intent, per (preset, parameter role).
# Roles: last path components. 'kv' is a K/V projection of grouped-query attention.
M, F = 'model', 'fsdp'
EXPECTED = {
    'tensor_parallel': {'embedding': P(M, None), 'query': P(None, M), 'key': P(None, M),
                        'kv': P(None, None), 'out': P(M, None), 'wi': P(None, M),
                        'wo': P(M, None), 'scale': P(None), 'rel_embedding': P(M, None),
                        'logits_dense': P(None, M)},
    'fsdp': {'embedding': P(None, F), 'query': P(F, None), 'key': P(F, None), 'kv': P(F, None),
             'out': P(None, F), 'wi': P(F, None), 'wo': P(None, F), 'scale': P(F),
             'rel_embedding': P(None, None), 'logits_dense': P(F, None)},
    '2d': {'embedding': P(M, F), 'query': P(F, M), 'key': P(F, M), 'kv': P(F, None),
           'out': P(M, F), 'wi': P(F, M), 'wo': P(M, F), 'scale': P(F),
           'rel_embedding': P(M, None), 'logits_dense': P(F, M)},
}
EXPECTED['data_parallel'] = {k: P(*(None,) * len(v)) for k, v in EXPECTED['fsdp'].items()}


def _role(path: str, grouped_kv: bool) -> str:
  parts = path.split('/')
  leaf_owner = parts[-2]
  if leaf_owner in ('key', 'value'):
    return 'kv' if grouped_kv else 'key'
  if leaf_owner.startswith('wi'):
    return 'wi'
  if parts[-1] in ('scale', 'embedding', 'rel_embedding'):
    return parts[-1]
  return leaf_owner


def _paths(tree):
  return {'/'.join(str(k.key) for k in p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


MESHES = [
    ('tensor_parallel', (2, 4), ('data', 'model')),
    ('fsdp', (8,), ('fsdp',)),
    ('fsdp', (2, 4), ('data', 'fsdp')),
    ('2d', (2, 4), ('fsdp', 'model')),
    ('data_parallel', (8,), ('data',)),
]
MODELS = {
    't5': (helpers.t5_model, lambda: helpers.seq2seq_batch(0, 8, 6, 5, 64), False),
    'decoder_gqa': (helpers.decoder_model, lambda: helpers.lm_batch(0, 8, 6, 64), True),
}
# The decoder on every preset; T5 (three times its compile time) on fsdp over (data, fsdp) and 2d
# over (fsdp, model), which between them shard over every kind of mesh axis.
CASES = ([('decoder_gqa',) + m for m in MESHES] +
         [('t5',) + m for m in MESHES if m[:2] in (('fsdp', (2, 4)), ('2d', (2, 4)))])


def _loss_and_grads(model, params, batch):
  return jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0])(params)


@functools.cache
def _reference(name):
  """Single-device model, batch, parameters, loss and gradients."""
  make_model, make_batch, grouped = MODELS[name]
  model, batch = make_model(), make_batch()
  params = helpers.init_params(model, batch, seed=0)
  loss, grads = jax.jit(lambda p: _loss_and_grads(model, p, batch))(params)
  return model, batch, grouped, params, loss, grads


@pytest.mark.parametrize('name,rules,shape,axes', CASES,
                         ids=[f'{n}-{r}-{s}' for n, r, s, _ in CASES])
def test_sharded_forward_backward_equals_single_device(name, rules, shape, axes):
  model, batch, grouped, ref_params, ref_loss, ref_grads = _reference(name)
  partitioner = partitioning.Partitioner(shape, axes, rules)
  params, shardings, _ = partitioner.sharded_init(
      lambda rng: model.init(rng, batch)['params'], jax.random.key(0))
  # Sharded initialization draws the same values as the unsharded one (to rounding: jit may
  # fuse the initializers' scaling differently under another sharding).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params,
               ref_params)

  expected = EXPECTED[rules]
  for path, leaf in _paths(params).items():
    want = NamedSharding(partitioner.mesh, expected[_role(path, grouped)])
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding.spec)

  sharded_batch = partitioner.shard_batch(batch)
  with partitioner.context():
    step = jax.jit(lambda p, b: _loss_and_grads(model, p, b), out_shardings=(None, shardings))
    loss, grads = step(params, sharded_batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               ref_grads)
  for path, leaf in _paths(grads).items():
    assert leaf.sharding.is_equivalent_to(_paths(shardings)[path], leaf.ndim), path


def test_sharded_init_never_holds_the_whole_tree_on_one_device():
  model = helpers.t5_model(vocab_size=512, emb_dim=64, mlp_dim=128, head_dim=16)
  batch = helpers.seq2seq_batch(0, 8, 4, 4, 512)
  partitioner = partitioning.Partitioner((8,), ('fsdp',), 'fsdp')

  def init(rng):
    return model.init(rng, batch)['params']

  with partitioner.context():
    abstract = jax.eval_shape(init, jax.random.key(0))
    compiled = jax.jit(lambda r: partitioning.unbox(init(r)),
                       out_shardings=partitioner.param_shardings(abstract)).lower(
                           jax.random.key(0)).compile()
  total = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(partitioning.unbox(abstract)))
  stats = compiled.memory_analysis()
  # Each device writes its eighth (plus the small replicated relpos tables) ...
  assert stats.output_size_in_bytes < total / 8 * 1.05
  # ... and never needs room for the whole tree while computing it.
  assert stats.output_size_in_bytes + stats.temp_size_in_bytes < total / 2


def test_scanned_layers_get_an_unsharded_leading_axis():
  model = helpers.decoder_model(scan_layers=True)
  batch = helpers.lm_batch(0, 8, 4, 64)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  params, _, axes = partitioner.sharded_init(lambda r: model.init(r, batch)['params'],
                                             jax.random.key(0))
  wi = params['decoder']['layers']['mlp']['wi']['kernel']
  assert axes['decoder']['layers']['mlp']['wi']['kernel'] == ('layers', 'embed', 'mlp')
  assert wi.sharding.is_equivalent_to(NamedSharding(partitioner.mesh, P(None, None, M)), 3)


def test_shard_batch_assembles_the_global_array():
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  local = {'decoder_input_tokens': np.arange(24, dtype=np.int32).reshape(4, 6)}
  out = partitioner.shard_batch(local)['decoder_input_tokens']
  np.testing.assert_array_equal(out, local['decoder_input_tokens'])
  assert out.sharding.is_equivalent_to(NamedSharding(partitioner.mesh, P('data', None)), 2)
  assert partitioner.local_batch_size(8) == 8  # one process holds the whole global batch


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize('shape,axes,message', [
    ((3, -1), ('data', 'model'), 'not divisible by 3'),
    ((2, 2), ('data', 'model'), 'needs 4 devices but 8'),
    ((8,), ('modle',), "Unknown mesh axis 'modle'"),
    ((-1, -1), ('data', 'model'), 'at most one -1'),
    ((8,), ('data', 'model'), 'differ in length'),
])
def test_bad_meshes(shape, axes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.create_mesh(shape, axes)


def test_rule_naming_an_unknown_mesh_axis():
  with pytest.raises(ValueError, match="unknown mesh axis 'modle'"):
    partitioning.AxisRules(params=(('mlp', 'modle'),), activations=())


def test_unknown_preset():
  with pytest.raises(ValueError, match='Unknown rule preset'):
    partitioning.Partitioner((8,), ('data',), 'tensor-parallel')


def test_mesh_that_does_not_divide_a_parameter_names_it():
  model = helpers.t5_model(mlp_dim=12, num_heads=8, head_dim=4)
  batch = helpers.seq2seq_batch(0, 8, 4, 4, 64)
  partitioner = partitioning.Partitioner((1, 8), ('data', 'model'), 'tensor_parallel')
  with pytest.raises(ValueError, match=r"parameter .(en|de)coder/layers_0/mlp/wi_0/kernel.*'mlp', size 12.*"
                     r"\('model',\) of total size 8"):
    partitioner.sharded_init(lambda r: model.init(r, batch)['params'], jax.random.key(0))


def test_activation_batch_not_divisible():
  model = helpers.decoder_model()
  batch = helpers.lm_batch(0, 3, 4, 64)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), 'tensor_parallel')
  with pytest.raises(ValueError, match='not divisible'):
    partitioner.shard_batch(batch)
  params = helpers.init_params(model, batch)
  with partitioner.context(), pytest.raises(ValueError, match=r"logical 'batch', size 3"):
    jax.jit(lambda p, b: model.loss_fn(p, b)[0])(params, batch)


def test_unknown_logical_axis_is_an_error():
  rules = partitioning.RULE_PRESETS['tensor_parallel']
  no_mlp = partitioning.AxisRules(
      params=tuple(r for r in rules.params if r[0] != 'mlp'), activations=rules.activations)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'model'), no_mlp)
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(0, 8, 4, 4, 64)
  with pytest.raises(ValueError, match=r"logical axis 'mlp' has no rule"):
    partitioner.sharded_init(lambda r: model.init(r, batch)['params'], jax.random.key(0))
  with partitioner.context(), pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    partitioning.constrain(jnp.ones((8, 4)), ('batch', 'bogus'))


def test_parameter_without_logical_axes_is_an_error():

  class Plain(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x)

  partitioner = partitioning.Partitioner((8,), ('data',), 'data_parallel')
  with pytest.raises(ValueError, match="'Dense_0/(bias|kernel)' has no logical axis names"):
    partitioner.sharded_init(lambda r: Plain().init(r, jnp.ones((8, 4)))['params'],
                             jax.random.key(0))
