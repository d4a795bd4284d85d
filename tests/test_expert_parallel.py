"""Expert parallelism on 8 emulated devices equals one device; experts are where the rules say."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientlm import partitioning
from efficientlm.layers.moe.config import MoeConfig
from tests import helpers

MOE = MoeConfig(4, layout='every', period=2, train_capacity_factor=1.0, eval_capacity_factor=1.0,
                min_expert_capacity=1)
MESHES = [((2, 4), ('data', 'expert'), 'expert_parallel', P('expert', None, None)),
          ((2, 2, 2), ('data', 'expert', 'model'), 'expert_tensor_parallel',
           P('expert', None, 'model'))]


def _loss_and_grads(model, params, batch):
  return jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0])(params)


@pytest.mark.parametrize('dispatch', ['dropping', 'dropless'])
@pytest.mark.parametrize('shape,axes,rules,expert_spec', MESHES, ids=['data_x_expert',
                                                                      'data_x_expert_x_model'])
@pytest.mark.slow
def test_expert_parallel_forward_backward_equals_single_device(dispatch, shape, axes, rules,
                                                                expert_spec):
  model = helpers.decoder_model(moe=dataclasses.replace(MOE, dispatch=dispatch),
                                num_decoder_layers=2)
  batch = helpers.lm_batch(0, 8, 8, 64)
  ref_params = helpers.init_params(model, batch)
  ref_loss, ref_grads = jax.jit(lambda p: _loss_and_grads(model, p, batch))(ref_params)
  _, ref_metrics = jax.jit(model.loss_fn)(ref_params, batch)
  if dispatch == 'dropping':  # the comparison covers dropped tokens too
    assert float(ref_metrics['moe/fraction_dropped']) > 0

  partitioner = partitioning.Partitioner(shape, axes, rules)
  params, shardings, _ = partitioner.sharded_init(lambda r: model.init(r, batch)['params'],
                                                  jax.random.key(0))
  wi = params['decoder']['layers_1']['mlp']['expert']['wi']['kernel']
  assert wi.sharding.is_equivalent_to(NamedSharding(partitioner.mesh, expert_spec), 3)
  router = params['decoder']['layers_1']['mlp']['router']['router_weights']['w']['kernel']
  assert router.sharding.is_equivalent_to(NamedSharding(partitioner.mesh, P()), 2)

  with partitioner.context():
    step = jax.jit(lambda p, b: _loss_and_grads(model, p, b), out_shardings=(None, shardings))
    sharded_batch = partitioner.shard_batch(batch)
    loss, grads = step(jax.tree.map(lambda a, b: jax.device_put(np.asarray(a), b.sharding),
                                    ref_params, params), sharded_batch)
    hlo = step.lower(params, sharded_batch).compile().as_text()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               ref_grads)
  if dispatch == 'dropping':
    # Groups sharded over the batch axes, experts over 'expert': dispatch is an all-to-all.
    assert 'all-to-all' in hlo


def test_experts_not_divisible_by_the_expert_axis_is_named():
  model = helpers.decoder_model(moe=dataclasses.replace(MOE, num_experts=6), num_decoder_layers=2)
  batch = helpers.lm_batch(0, 8, 8, 64)
  partitioner = partitioning.Partitioner((2, 4), ('data', 'expert'), 'expert_parallel')
  with pytest.raises(ValueError, match=r"layers_1/mlp/expert/wi/kernel.*'expert', size 6.*"
                     r"\('expert',\) of total size 4"):
    partitioner.sharded_init(lambda r: model.init(r, batch)['params'], jax.random.key(0))
