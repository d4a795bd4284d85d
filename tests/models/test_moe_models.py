"""Models with MoE layers: T5X names, causality with drops, scanned blocks, router losses."""

import dataclasses

import jax
import numpy as np
import pytest

from efficientlm.layers.moe.config import MoeConfig
from efficientlm.models.layer_stacking import stack_layers
from tests import helpers

MOE = MoeConfig(4, layout='every', period=2, train_capacity_factor=1.0, eval_capacity_factor=1.0,
                min_expert_capacity=1)


def test_t5_moe_parameter_names_follow_t5x():
  model = helpers.t5_model(moe=MoeConfig(4, num_sparse_encoder_layers=1,
                                         num_sparse_decoder_layers=1))
  # Abstract (shapes only, nothing computed): names and shapes are what is checked.
  params = jax.eval_shape(lambda: helpers.init_params(model, helpers.seq2seq_batch(0, 2, 5, 4, 64)))
  paths = helpers.param_shapes(params)
  for stack in ('encoder', 'decoder'):
    assert paths[f'{stack}/layers_1/mlp/router/router_weights/w/kernel'] == (16, 4)
    assert paths[f'{stack}/layers_1/mlp/expert/wi_0/kernel'] == (4, 16, 32)
    assert paths[f'{stack}/layers_1/mlp/expert/wo/kernel'] == (4, 32, 16)
    assert paths[f'{stack}/layers_0/mlp/wi_0/kernel'] == (16, 32)  # layer 0 stays dense
    assert not any(p.startswith(f'{stack}/layers_0/mlp/expert') for p in paths)


def test_moe_decoder_stays_causal_with_drops_and_prioritized_routing():
  """Position-order capacity only lets earlier tokens take a later token's slot; batch-
  prioritized routing (which would not) is used in encoders only."""
  model = helpers.decoder_model(
      moe=dataclasses.replace(MOE, batch_prioritized_routing=True), num_decoder_layers=2)
  batch = helpers.lm_batch(0, 2, 10, 64)
  batch['decoder_target_tokens'][:] = np.maximum(batch['decoder_target_tokens'], 2)  # no pads
  params = helpers.init_params(model, batch)
  # One program for both batches (model.logits is _apply's first output).
  apply = jax.jit(lambda p, b: model._apply(p, b, None))  # pylint: disable=protected-access
  base, state = apply(params, batch)
  assert float(state['fraction_dropped']) > 0  # capacity 1.0 does drop tokens here
  changed = helpers.bump(batch, 'decoder_input_tokens', (slice(None), 6), 64)
  np.testing.assert_array_equal(apply(params, changed)[0][:, :6], base[:, :6])


@pytest.mark.parametrize('dispatch', ['dropping', 'dropless'])
def test_scanned_blocks_equal_unrolled(dispatch):
  moe = dataclasses.replace(MOE, dispatch=dispatch)
  unrolled = helpers.decoder_model(moe=moe, num_decoder_layers=4)
  scanned = helpers.decoder_model(moe=moe, num_decoder_layers=4, scan_layers=True,
                                  remat_policy='full')
  batch = helpers.lm_batch(1, 2, 8, 64)
  params = helpers.init_params(unrolled, batch)
  blocks = stack_layers(params, period=2)
  assert 'expert' in blocks['decoder']['layers']['layers_1']['mlp']  # block: dense, sparse
  helpers.assert_scanned_equals_unrolled(scanned, blocks, unrolled, params, batch)


def test_loss_adds_router_losses_averaged_over_moe_layers():
  model = helpers.decoder_model(moe=dataclasses.replace(MOE, layout='all'), num_decoder_layers=3)
  model = dataclasses.replace(model, z_loss=1e-3, moe_aux_loss_weight=0.1,
                              moe_z_loss_weight=0.01)
  batch = helpers.lm_batch(2, 2, 8, 64)
  params = helpers.init_params(model, batch)
  inputs = model._inputs(batch)  # pylint: disable=protected-access
  _, variables = jax.jit(lambda p: model.module.apply({'params': p}, **inputs,
                                                      mutable=['moe']))(params)
  per_layer = variables['moe']['decoder']
  balance = np.mean([per_layer[f'layers_{i}']['mlp']['load_balancing_loss'][0] for i in range(3)])
  router_z = np.mean([per_layer[f'layers_{i}']['mlp']['router_z_loss'][0] for i in range(3)])
  loss, metrics = jax.jit(model.loss_fn)(params, batch)
  np.testing.assert_allclose(metrics['moe/load_balancing_loss'], balance, rtol=1e-6)
  np.testing.assert_allclose(loss, metrics['cross_entropy'] + metrics['z_loss'] + 0.1 * balance +
                             0.01 * router_z, rtol=1e-6)
  assert set(metrics) >= {'moe/fraction_dropped', 'moe/expert_load_min', 'moe/expert_load_max',
                          'moe/expert_load_entropy'}


def test_experts_choose_only_outside_causal_decoders():
  experts_choose = dataclasses.replace(MOE, router='experts_choose')
  with pytest.raises(ValueError, match='cannot be used in a causal decoder'):
    helpers.init_params(helpers.decoder_model(moe=experts_choose), helpers.lm_batch(0, 2, 8, 64))
  # An encoder-decoder whose sparse layers are all in the encoder is fine.
  t5 = helpers.t5_model(moe=MoeConfig(4, router='experts_choose', layout='explicit',
                                      encoder_layers=(1,)))
  batch = helpers.seq2seq_batch(0, 2, 6, 4, 64)
  assert np.isfinite(jax.jit(t5.loss_fn)(helpers.init_params(t5, batch), batch)[0])
