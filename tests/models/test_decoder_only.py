"""Decoder-only LM: causality, packing, prefix LM, scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.models.layer_stacking import stack_layers
from tests import helpers


@pytest.fixture(scope='module')
def setup():
  model = helpers.decoder_model()
  batch = helpers.lm_batch(0, 2, 10, model.module.config.vocab_size)
  return model, batch, helpers.init_params(model, batch)


def test_changing_a_future_token_leaves_earlier_logits_unchanged(setup):
  model, batch, params = setup
  t = 6
  changed = helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64)
  logits = jax.jit(model.logits)  # one program for both batches
  a, b = logits(params, batch), logits(params, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=0)
  assert np.all(np.abs(np.asarray(a[:, t] - b[:, t])).max(axis=-1) > 1e-4)


@pytest.mark.parametrize('position_embedding', ['rotary', 'relative'])
def test_packed_sequences_equal_separate_runs(position_embedding):
  model = helpers.decoder_model(position_embedding=position_embedding)
  vocab = model.module.config.vocab_size
  rng = np.random.default_rng(1)
  first, second = helpers.tokens(rng, (1, 4), vocab), helpers.tokens(rng, (1, 5), vocab)

  def single(seq):
    inputs = np.concatenate([[[0]], seq[:, :-1]], axis=1).astype(np.int32)
    return {'decoder_input_tokens': inputs, 'decoder_target_tokens': seq}

  packed_targets = np.concatenate([first, second], axis=1)
  packed = {
      'decoder_input_tokens': np.concatenate([single(first)['decoder_input_tokens'],
                                              single(second)['decoder_input_tokens']], axis=1),
      'decoder_target_tokens': packed_targets,
      'decoder_segment_ids': np.array([[1] * 4 + [2] * 5], np.int32),
      'decoder_positions': np.array([list(range(4)) + list(range(5))], np.int32),
  }
  params = helpers.init_params(model, packed)
  logits = jax.jit(model.logits)
  got = logits(params, packed)
  np.testing.assert_allclose(got[:, :4], logits(params, single(first)), atol=1e-5)
  np.testing.assert_allclose(got[:, 4:], logits(params, single(second)), atol=1e-5)


def test_prefix_lm_attends_bidirectionally_within_the_prefix(setup):
  model, batch, params = setup
  prefix = np.zeros_like(batch['decoder_input_tokens'])
  prefix[:, :5] = 1
  with_prefix = dict(batch, decoder_causal_attention=prefix)
  changed = helpers.bump(with_prefix, 'decoder_input_tokens', (slice(None), 3), 64)  # in prefix
  logits = jax.jit(model.logits)  # one program for the three batches
  a, b = logits(params, with_prefix), logits(params, changed)
  # Earlier prefix positions see the change (bidirectional) ...
  assert np.abs(np.asarray(a[:, :3] - b[:, :3])).max() > 1e-4
  # ... and a token after the prefix still cannot influence anything before it.
  after = helpers.bump(with_prefix, 'decoder_input_tokens', (slice(None), 7), 64)
  np.testing.assert_array_equal(logits(params, after)[:, :7], a[:, :7])


@pytest.mark.parametrize('remat_policy', ['none', 'full', 'dots'])
def test_scanned_and_rematerialized_equal_unrolled(setup, remat_policy):
  model, batch, params = setup
  scanned = helpers.decoder_model(scan_layers=True, remat_policy=remat_policy)
  helpers.assert_scanned_equals_unrolled(scanned, stack_layers(params), model, params, batch)


def test_scan_keeps_the_program_size_independent_of_depth():
  """100 scanned layers trace to the same program as 2; unrolled layers grow linearly."""
  batch = helpers.lm_batch(0, 1, 8, 64)

  def num_eqns(**kw):
    model = helpers.decoder_model(**kw)
    abstract = jax.eval_shape(lambda: helpers.init_params(model, batch))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    return len(jax.make_jaxpr(lambda p: model.loss_fn(p, batch)[0])(params).jaxpr.eqns)

  assert num_eqns(scan_layers=True, num_decoder_layers=100) == num_eqns(
      scan_layers=True, num_decoder_layers=2)
  assert num_eqns(num_decoder_layers=8) > 3 * num_eqns(num_decoder_layers=2) / 2


def test_dropout_only_with_an_rng(setup):
  _, batch, params = setup
  model = helpers.decoder_model(dropout_rate=0.3)
  logits = jax.jit(model.logits)  # one program without an rng, one for both rngs
  eval_a, eval_b = logits(params, batch), logits(params, batch)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = logits(params, batch, jax.random.key(1))
  train_b = logits(params, batch, jax.random.key(2))
  assert np.abs(np.asarray(train_a - train_b)).max() > 1e-3
